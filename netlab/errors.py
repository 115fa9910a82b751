"""Errors shared by the daemon and the client, and the client's exit codes.

Every error that reaches a person is one line that says what went wrong and,
where it can, how to fix it.  Each class carries the exit status the ``netlab``
command uses for it, so scripts can tell failures apart.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit statuses of the ``netlab`` command (documented in docs/cli.rst)."""

    OK = 0
    FAILURE = 1  #: anything not covered below
    USAGE = 2  #: bad command line
    CONFIG = 3  #: the configuration file is invalid
    CONNECTION = 4  #: the server could not be reached or stopped answering
    AUTHENTICATION = 5  #: the server refused our identity or proved none
    REMOTE = 6  #: the server answered with an error
    INTEGRITY = 7  #: data arrived but failed verification
    TLS = 8  #: the server's certificate could not be verified
    INTERRUPTED = 130  #: stopped by Ctrl-C


class NetlabError(Exception):
    """Base class for errors that are reported to a person as one line."""

    exit_code: ExitCode = ExitCode.FAILURE


class UsageError(NetlabError):
    """The command line asks for something impossible."""

    exit_code = ExitCode.USAGE


class ConfigError(NetlabError):
    """The configuration is invalid.

    The message names the file, the section and the key, then the problem and
    the expected form, e.g.
    ``netlab.toml: [file] max_size: "12 parsecs" is not a size (expected ...)``.
    """

    exit_code = ExitCode.CONFIG

    def __init__(
        self,
        reason: str,
        *,
        path: str | None = None,
        section: str | None = None,
        key: str | None = None,
    ) -> None:
        self.reason = reason
        self.path = path
        self.section = section
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(f"{self.path}:")
        if self.section:
            where.append(f"[{self.section}]" + (f" {self.key}:" if self.key else ":"))
        elif self.key:
            where.append(f"{self.key}:")
        return " ".join([*where, self.reason])


class ConnectionFailed(NetlabError):
    """The server could not be reached, refused us, or stopped answering."""

    exit_code = ExitCode.CONNECTION


class AuthenticationFailed(NetlabError):
    """Authentication failed in either direction."""

    exit_code = ExitCode.AUTHENTICATION


class RemoteError(NetlabError):
    """The server answered a request with an error message.

    ``code`` is the stable machine-readable code from the wire protocol.
    """

    exit_code = ExitCode.REMOTE

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{message} ({code})")


class IntegrityError(NetlabError):
    """Data was received but does not match its declared size or digest."""

    exit_code = ExitCode.INTEGRITY


class TLSVerificationFailed(NetlabError):
    """The server's TLS certificate is untrusted or names another host."""

    exit_code = ExitCode.TLS
