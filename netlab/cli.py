"""The ``netlab`` command: one client for every netlab service.

The command line of every subcommand is declared in :mod:`netlab.commands`,
which imports nothing heavy, so parsing (and ``--help``, ``--version``, usage
errors) costs almost nothing.  After parsing, :func:`main` calls the
command's ``prepare`` hook, if it has one (``put`` starts hashing its file);
:func:`run` then loads the configuration, imports the command's ``handler``
(an ``async def handler(context: Context) -> int | None``, in its own module
with Twisted and the rest) and runs it on the reactor.  Errors derived from
:class:`~netlab.errors.NetlabError` become one line on stderr and the exit
status of their class (docs/cli.rst lists them); ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from netlab import __version__
from netlab.commands import add_commands, resolve
from netlab.errors import ExitCode, NetlabError
from netlab.memory import keep_freed_memory
from netlab.terminal import escape_name

if TYPE_CHECKING:
    from netlab.config import NetlabConfig


class Context(NamedTuple):
    """What a subcommand handler is given.

    (A named tuple, not an attrs class: this module is imported before the
    command line is parsed, and must stay quick to import.)
    """

    reactor: Any
    args: argparse.Namespace
    config: NetlabConfig

    @property
    def server(self) -> str:
        """The host to connect to: ``--server``, else ``[client] server``."""
        return self.args.server or self.config.client.server

    @property
    def verbose(self) -> int:
        return int(self.args.verbose)

    def connect(self, service: str) -> Any:
        """A READY :class:`netlab.client.Session` with ``service`` (a Deferred).

        Uses ``--server`` and ``--user`` over the configuration.
        """
        from netlab.client import connect

        return connect(
            self.config,
            service,
            reactor=self.reactor,
            server=self.args.server,
            user=self.args.user,
        )


Handler = Callable[[Context], Awaitable[int | None]]


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line plus a hint."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message} (try --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="netlab",
        description="Client for the netlab daemon: files, commands, time and chat.",
        epilog="Exit status: 0 ok, 1 other failure, 2 usage, 3 configuration, "
        "4 connection, 5 authentication, 6 remote error, 7 integrity, "
        "8 TLS verification, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"netlab {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $NETLAB_CONFIG, then "
        "~/.config/netlab/netlab.toml, then /etc/netlab/netlab.toml)",
    )
    parser.add_argument("--server", metavar="HOST", help="server to connect to")
    parser.add_argument("--user", metavar="NAME", help="user to authenticate as")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more detail on errors"
    )
    add_commands(parser.add_subparsers(title="commands", metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``netlab`` console script."""
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: str | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        raise SystemExit(ExitCode.USAGE)
    prepare: str | None = getattr(args, "prepare", None)
    if prepare is not None:
        resolve(prepare)(args)
    raise SystemExit(run(handler, args))


def console() -> NoReturn:
    """Entry point of the ``netlab`` console script and ``python -m netlab``.

    Runs :func:`main`, then ends the process without tearing the interpreter
    down.  By then the reactor has stopped and every file the command wrote
    is synced and closed; what is left is freeing some 600 modules one object
    at a time, which only delays the shell prompt (about 40 ms here, a sixth
    of a small command).  Exit handlers (``atexit``) still run and standard
    output is flushed first; if a thread that is not a daemon is still
    running, the interpreter exits the ordinary way and waits for it.
    """
    try:
        main()
    except SystemExit as stop:
        status = stop.code
    if status is None:
        status = 0
    elif not isinstance(status, int):
        sys.stderr.write(f"{status}\n")
        status = int(ExitCode.FAILURE)
    others = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon
    ]
    if others:
        raise SystemExit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # A reader that went away (``netlab ls | head``) wants no more.
    os._exit(status)


def report(error: BaseException, verbose: int) -> int:
    """Print an error as one line (plus a traceback with -v); return the exit code."""
    if isinstance(error, BrokenPipeError):
        # Whoever read our output has gone (``netlab ls | head``): they
        # wanted no more, and there is nobody to tell.
        return int(ExitCode.FAILURE)
    if verbose:
        traceback.print_exception(error)
    # Messages may quote what a server sent: escape them so a hostile server
    # cannot drive the terminal or break the one-line promise.
    if isinstance(error, NetlabError):
        sys.stderr.write(f"netlab: {escape_name(str(error))}\n")
        return int(error.exit_code)
    detail = escape_name(repr(error))
    sys.stderr.write(f"netlab: unexpected error: {detail} (run with -v for details)\n")
    return int(ExitCode.FAILURE)


def run(handler_name: str, args: argparse.Namespace) -> int:
    """Load the configuration, then run the handler ``handler_name`` names
    (``"module:function"``) on the reactor; return the exit code."""
    from netlab.config import client_config_path, load

    try:
        config = load(client_config_path(args.config))
    except NetlabError as error:
        return report(error, args.verbose)

    handler: Handler = resolve(handler_name)

    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    outcome: dict[str, int] = {}

    def finish(result: object) -> None:
        if isinstance(result, BaseException):
            outcome["code"] = report(result, args.verbose)
        else:
            outcome["code"] = int(result) if isinstance(result, int) else 0
        if reactor.running:
            reactor.stop()

    async def call() -> None:
        try:
            result = await handler(Context(reactor, args, config))
        except Exception as error:
            finish(error)
        else:
            finish(result)

    reactor.callWhenRunning(lambda: ensureDeferred(call()))
    reactor.run()
    if "code" not in outcome:  # The reactor stopped first: Ctrl-C or a signal.
        return int(ExitCode.INTERRUPTED)
    return outcome["code"]


def colour_enabled(stream: Any = None) -> bool:
    """Whether to colour output: a terminal, and ``NO_COLOR`` unset."""
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and bool(getattr(stream, "isatty", bool)())
