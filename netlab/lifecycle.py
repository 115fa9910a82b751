"""The daemon's lifecycle around its services: readiness, reload on SIGHUP, stop.

:class:`Lifecycle` is added as the *last* child of the root
:class:`~netlab.service.NetlabService`.  A ``MultiService`` starts its
children in order and stops them in reverse, so the lifecycle starts after
every service is listening (then tells systemd ``READY=1``) and stops before
any of them (telling systemd ``STOPPING=1`` first).

On ``SIGHUP`` it re-reads the configuration file the daemon started with.  An
invalid file is logged and the daemon keeps running unchanged; a valid one is
handed to :meth:`NetlabService.reconfigure`, which applies what can change
while running and returns the changes that need a restart, which are logged.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from netlab.config import NetlabConfig
from netlab.errors import ConfigError
from netlab.service import INetlabService, NetlabService, describe_address
from netlab.systemd import Notifier, monotonic_usec

log = Logger(namespace="netlab")

#: Loads and validates the daemon's configuration file (``None``: defaults).
ConfigLoader = Callable[[str | None], NetlabConfig]

SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class Lifecycle(Service):
    """Readiness and stop notifications, and configuration reload on SIGHUP."""

    name = "lifecycle"

    def __init__(
        self, reactor: Any, notifier: Notifier | None, load_config: ConfigLoader
    ) -> None:
        self.reactor = reactor
        self.notifier = notifier
        self.load_config = load_config
        self._previous_handler: SignalHandler = None
        self._previous_term_handler: SignalHandler = None

    @property
    def root(self) -> NetlabService:
        """The service tree this lifecycle belongs to."""
        parent = self.parent
        assert isinstance(parent, NetlabService), "Lifecycle is a NetlabService child"
        return parent

    def _notify(self, **fields: str) -> None:
        if self.notifier is not None:
            self.notifier.send(**fields)

    def status(self) -> str:
        """The ``STATUS=`` line: each service and where it listens."""
        serving = [
            f"{child.name} on {describe_address(child.listening_address)}"
            for child in self.root
            if INetlabService.providedBy(child)
        ]
        if not serving:
            return "running, no services enabled"
        return "serving " + ", ".join(serving)

    def startService(self) -> None:
        super().startService()
        # SIGHUP is free: twistd and the reactor handle SIGINT, SIGTERM,
        # SIGUSR1 (log rotation) and SIGCHLD, none of which is touched here.
        self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)
        # Every service listened in privilegedStartService and started before
        # this (the last) child; waiting for the reactor to run means that
        # whatever connects after READY=1 is served, not just queued.
        self.reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if not self.running:
            return
        # SIGTERM is how systemd and operators ask for a stop, so a stop it
        # asked for exits 0; the reactor's own handler (installed by now)
        # would make twistd re-raise the signal and exit with -15.
        self._previous_term_handler = signal.signal(signal.SIGTERM, self._sigterm)
        status = self.status()
        log.info("netlab ready: {status}", event="netlab.ready", status=status)
        self._notify(READY="1", STATUS=status)

    def _sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        with contextlib.suppress(ReactorNotRunning):  # A second TERM while stopping.
            self.reactor.stop()

    def _sighup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the reactor anywhere: only queue the
        # reload, which then runs in the reactor loop like any other event.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> list[str] | None:
        """Re-read the configuration and apply it.

        Returns the settings that need a restart, or ``None`` when the new
        configuration was refused (the old one stays in force) or a service
        failed to apply it (logged).
        """
        if not self.running:
            return None
        path = self.root.config.path
        shown = str(path) if path else "built-in defaults"
        self._notify(RELOADING="1", MONOTONIC_USEC=monotonic_usec(), STATUS="reloading")
        log.info("reloading {path}", event="netlab.reload.start", path=shown)
        try:
            return self._apply(path)
        finally:
            # Whatever happened, systemd must not be left waiting in "reloading".
            self._notify(READY="1", STATUS=self.status())

    def _apply(self, path: Path | None) -> list[str] | None:
        # Reading and checking one small file is quick (benchmarks/
        # bench_systemd.py: a few ms from SIGHUP to READY=1), so it is done
        # here, keeping the reload one event that nothing can interleave with.
        try:
            config = self.load_config(str(path) if path else None)
        except ConfigError as error:
            refusal = str(error)
        else:
            return self._reconfigure(config)
        log.error(
            "reload refused, still running with the previous configuration: {reason}",
            event="netlab.reload.refused",
            reason=refusal,
        )
        return None

    def _reconfigure(self, config: NetlabConfig) -> list[str] | None:
        try:
            restart = self.root.reconfigure(config)
        except Exception:
            # A service failed to take its new settings (a bug): say so with
            # the traceback; the services that did take theirs keep them.
            log.failure(
                "reload failed while applying the configuration",
                event="netlab.reload.failed",
            )
            return None
        log.info("configuration reloaded", event="netlab.reload.done")
        if restart:
            log.warn(
                "changed settings that take effect only after a restart: {settings}",
                event="netlab.reload.restart_needed",
                settings=", ".join(restart),
            )
        return restart

    def stopService(self) -> None:
        self._notify(STOPPING="1", STATUS="stopping")
        log.info("netlab stopping", event="netlab.stopping")
        for number, ours, previous in (
            (signal.SIGHUP, self._sighup, self._previous_handler),
            (signal.SIGTERM, self._sigterm, self._previous_term_handler),
        ):
            if signal.getsignal(number) == ours:
                # None: the previous handler was not installed from Python.
                signal.signal(number, signal.SIG_DFL if previous is None else previous)
        super().stopService()
