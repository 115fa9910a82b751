"""``twistd netlab``: command-line options and the service tree.

Configuration problems are found while options are parsed, that is before
twistd daemonizes or binds anything, and reported as one line on stderr with
exit status 3 (``--check`` reports a valid configuration and exits 0).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.python import usage

from netlab import __version__
from netlab.config import SERVICE_TRANSPORTS, NetlabConfig, load
from netlab.errors import ConfigError, ExitCode
from netlab.lifecycle import Lifecycle
from netlab.logs import NetlabLogObserver, open_destination
from netlab.memory import keep_freed_memory
from netlab.service import NetlabService, ServiceStartError, check_available
from netlab.systemd import Notifier
from netlab.tcpservice import check_tls_files


class Options(usage.Options):
    """Options of ``twistd netlab``."""

    synopsis = "[--config FILE] [--check]"
    longdesc = (
        "Run the netlab services (file, command, time, chat) configured in FILE, "
        "or with built-in loopback defaults when no file is given."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: built-in defaults)."]
    ]
    optFlags = [
        ["check", None, "Validate the configuration, print the services and exit."]
    ]

    config: NetlabConfig

    def opt_version(self) -> None:
        """Print the netlab version and exit."""
        print(f"netlab {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self.config = load_daemon_config(self["config"])
        except ConfigError as error:
            # SystemExit, not usage.UsageError: twistd prints its whole help
            # text before a UsageError, burying the one line that matters.
            sys.stderr.write(f"netlab: config error: {error}\n")
            raise SystemExit(ExitCode.CONFIG) from None
        if self["check"]:
            print(describe(self.config))
            raise SystemExit(ExitCode.OK)


def load_daemon_config(path: str | None) -> NetlabConfig:
    """Load the daemon's configuration and check every enabled service exists."""
    config = load(path)
    check_available(config)
    check_tls_files(config)
    return config


def describe(config: NetlabConfig) -> str:
    """The ``--check`` report: where the configuration came from and what runs."""
    source = str(config.path) if config.path else "built-in defaults"
    lines = [f"configuration OK ({source})"]
    for name in config.enabled_services():
        lines.append(f"  {name:<8} {config.section(name).endpoint}")
    off = [name for name in SERVICE_TRANSPORTS if not config.section(name).enabled]
    if off:
        lines.append("  disabled: " + ", ".join(off))
    return "\n".join(lines)


class _FailFastService(NetlabService):
    """Turns a start-up failure into one line and a non-zero exit."""

    nodaemon: bool = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (ServiceStartError, OSError) as error:
            from twisted.logger import Logger

            Logger(namespace="netlab").critical(
                "cannot start: {reason}", event="netlab.start.failed", reason=str(error)
            )
            if self.nodaemon:
                raise SystemExit(f"netlab: cannot start: {error}") from None
            # Daemonized: twistd reports a plain exception to the waiting parent.
            raise


def makeService(options: Options) -> NetlabService:
    """Build the service tree (called by twistd after :meth:`Options.postOptions`)."""
    from twisted.internet import reactor

    keep_freed_memory()
    config = options.config
    parent: Any = options.parent or {}
    nodaemon = bool(parent.get("nodaemon", True))
    observer = None
    if not parent.get("logger") and not parent.get("syslog"):
        # Log where twistd would: stdout in the foreground, twistd.log otherwise.
        logfile = parent.get("logfile") or ("-" if nodaemon else "twistd.log")
        observer = NetlabLogObserver.create(
            config.netlab.log_format,
            config.netlab.log_level,
            open_destination(logfile),
        )
    service = _FailFastService(config, reactor, observer)
    service.nodaemon = nodaemon
    # Last child: it starts once every service listens and stops first.
    notifier = Notifier.from_environment(os.environ)
    Lifecycle(reactor, notifier, load_daemon_config).setServiceParent(service)
    return service
