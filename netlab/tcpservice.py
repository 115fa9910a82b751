"""The base of netlab's framed TCP services (file, command).

:class:`SessionService` listens on the section's endpoint (``tcp:``,
``ssl:`` or ``systemd:``), loads the users file before it listens (an unsafe
or malformed file stops start-up with one line), serves sessions through a
:class:`~netlab.session.SessionFactory`, and on reload re-reads the users file
and takes over the new limits.  A service subclass provides
:meth:`SessionService.application` and, if it accepts anonymous clients,
:meth:`SessionService.allow_anonymous`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from netlab.auth import FailureTracker, KeyFileError, Users, Verifier, load_users
from netlab.config import NetlabConfig
from netlab.errors import ConfigError
from netlab.service import ServiceStartError, StreamListeningService
from netlab.session import (
    ErrorCode,
    ISessionApplication,
    ServerSession,
    SessionFactory,
    SessionPolicy,
)

log = Logger(namespace="netlab")


def load_users_for(config: NetlabConfig) -> Users:
    """The users named by ``[netlab] users_file`` (none when it is unset)."""
    path = config.netlab.users_file
    return Users() if path is None else load_users(path)


def check_tls_files(config: NetlabConfig) -> None:
    """Refuse (at daemon start-up) a TLS service without a certificate and key.

    Only the daemon runs this: a client shares the file but holds no key.
    """
    for name in config.enabled_services():
        address = config.listen_address(name)
        if not address.tls or "privateKey" in address.options:
            continue
        for key in ("certificate", "private_key"):
            if getattr(config.tls, key) is None:
                kind = "an ssl:" if address.kind == "ssl" else "a tls=yes"
                raise ConfigError(
                    f"[{name}] endpoint is {kind} endpoint, so set [tls] certificate "
                    "and private_key"
                    + (
                        " (or privateKey= and certKey= in the endpoint)"
                        if address.kind == "ssl"
                        else ""
                    ),
                    path=str(config.path) if config.path else None,
                    section="tls",
                    key=key,
                )


class SessionService(StreamListeningService):
    """A TCP service speaking the netlab session protocol."""

    def __init__(self, config: NetlabConfig, reactor: Any) -> None:
        super().__init__(config, reactor)
        netlab = config.netlab
        self.verifier = Verifier()
        self.failures = FailureTracker(
            reactor,
            netlab.auth_max_failures,
            netlab.auth_failure_window,
            netlab.auth_lockout,
        )
        self.session_factory = SessionFactory(
            self.policy(config), self.verifier, self.failures, self.application, reactor
        )

    # -- what a service provides ---------------------------------------------

    def application(self, session: ServerSession) -> ISessionApplication:
        """The application that serves ``session`` once it is READY."""
        raise NotImplementedError

    def allow_anonymous(self, config: NetlabConfig) -> bool:
        """Whether clients may skip authentication (never, unless overridden)."""
        return False

    # -- machinery ------------------------------------------------------------

    def policy(self, config: NetlabConfig) -> SessionPolicy:
        section = config.section(self.section_name)
        return SessionPolicy(
            service=self.section_name,
            max_frame_size=section.max_frame_size,
            handshake_timeout=section.handshake_timeout,
            idle_timeout=section.idle_timeout,
            max_connections=section.max_connections,
            max_connections_per_address=section.max_connections_per_address,
            allow_anonymous=self.allow_anonymous(config),
            auth_failure_delay=config.netlab.auth_failure_delay,
        )

    def factory(self) -> IProtocolFactory:
        return self.session_factory

    def privilegedStartService(self) -> None:
        try:
            self.verifier.users = load_users_for(self.config)
        except KeyFileError as error:
            raise ServiceStartError(f"[netlab] users_file: {error}") from None
        super().privilegedStartService()
        address = self.config.listen_address(self.section_name)
        if address.kind == "tcp" and not address.is_loopback:
            log.warn(
                "{service} service listens on {endpoint} without TLS: keys are "
                "safe, but file contents and commands cross the network in clear; "
                "use an ssl: endpoint",
                event="netlab.tls.missing",
                service=self.name,
                endpoint=self.section.endpoint,
            )
        if not self.verifier.users and not self.allow_anonymous(self.config):
            log.warn(
                "{service} service has no users, so it refuses every client; "
                "create one with netlab keygen",
                event="netlab.users.none",
                service=self.name,
            )

    def stopService(self) -> Deferred[None] | None:
        stopped = super().stopService()
        self.session_factory.close_all(
            ErrorCode.SHUTTING_DOWN, "the server is shutting down"
        )
        return stopped

    def apply(self, config: NetlabConfig) -> None:
        try:
            self.verifier.users = load_users_for(config)
        except KeyFileError as error:
            log.warn(
                "reload: keeping the previous users: {reason}",
                event="netlab.users.reload_failed",
                reason=str(error),
            )
        else:
            log.info(
                "{service} service: {count} users loaded",
                event="netlab.users.loaded",
                service=self.name,
                count=len(self.verifier.users),
            )
        netlab = config.netlab
        self.failures.reconfigure(
            netlab.auth_max_failures, netlab.auth_failure_window, netlab.auth_lockout
        )
        self.session_factory.policy = self.policy(config)
