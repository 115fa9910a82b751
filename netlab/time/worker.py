"""A time service worker process, started by the daemon when ``[time] workers > 1``.

``python -m netlab.time.worker [--config FILE] --index N`` answers time requests
on descriptor 3, a UDP socket the daemon bound (with SO_REUSEPORT, so the
kernel spreads clients over the processes) or the socket systemd passed.  It
runs the same :class:`~netlab.time.service.TimeResponder` as the daemon, logs
its own counters (as JSON lines on stdout, which the daemon publishes in its
own log), re-reads the configuration on SIGHUP (the daemon forwards
its reload) and exits when its stdin, a pipe from the daemon, closes: so a
worker never outlives the daemon, even one killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, globalLogBeginner
from zope.interface import implementer

from netlab.config import load
from netlab.logs import NetlabLogObserver
from netlab.service import describe_address
from netlab.time.service import (
    REFRESH_INTERVAL,
    TimeResponder,
    adopt,
    log_counters,
)

log = Logger(namespace="netlab.time")

#: The descriptor the daemon passes the socket on.
SOCKET_DESCRIPTOR = 3


class Stopper:
    """Stops the reactor once, whichever comes first: a signal or the daemon's end.

    Twisted's own signal handlers are not installed (a worker has no
    children to reap): a second SIGTERM (``timeout``, process-group signals)
    would make them stop a stopped reactor and log a traceback.
    """

    def __init__(self, reactor: Any, index: int) -> None:
        self.reactor = reactor
        self.index = index
        self.stopping = False

    def stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            log.info(
                "time worker {index} stopping: {why}",
                event="time.worker.stopping",
                index=self.index,
                why=why,
            )
            self.reactor.stop()

    def on_signal(self, number: int, frame: object) -> None:
        name = signal.Signals(number).name
        self.reactor.callFromThread(self.stop, name)


@implementer(IReadDescriptor)
class ParentWatch:
    """Stops the worker when the daemon's end of our stdin closes."""

    def __init__(self, reactor: Any, stopper: Stopper) -> None:
        self.reactor = reactor
        self.stopper = stopper

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "netlab-time-worker"

    def doRead(self) -> None:
        if not os.read(0, 4096):
            self.orphaned()

    def connectionLost(self, reason: object) -> None:
        # epoll reports a pipe whose writer closed as a hang-up, which Twisted
        # turns into connectionLost instead of a read of zero bytes.
        self.orphaned()

    def orphaned(self) -> None:
        self.reactor.removeReader(self)
        self.stopper.stop("the daemon is gone")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m netlab.time.worker")
    parser.add_argument("--config")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    config = load(args.config)

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    # JSON lines to the daemon, which publishes them in its own log.
    observer = NetlabLogObserver.create("json", config.netlab.log_level, sys.stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    responder = TimeResponder(config.time, reactor)
    port = adopt(reactor, socket.socket(fileno=SOCKET_DESCRIPTOR), responder)
    log.info(
        "time worker {index} answering on {address}",
        event="time.worker.started",
        index=args.index,
        address=describe_address(port.getHost()),
    )
    stopper = Stopper(reactor, args.index)
    reactor.addReader(ParentWatch(reactor, stopper))
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, stopper.on_signal)

    state = {"section": config.time}

    def report() -> None:
        log_counters(
            responder.take_counters(), state["section"].stats_interval, args.index
        )

    reporter = LoopingCall(report)
    LoopingCall(responder.refresh).start(REFRESH_INTERVAL, now=False)

    def reload() -> None:
        try:
            section = load(args.config).time
        except Exception as error:  # keep serving with the old settings
            log.failure(
                "reload failed: {error}",
                event="time.worker.reload.failed",
                error=str(error),
            )
            return
        responder.configure(section)
        if section.stats_interval != state["section"].stats_interval:
            reporter.stop()
            reporter.start(section.stats_interval, now=False)
        state["section"] = section

    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))  # type: ignore[attr-defined]
    reporter.start(config.time.stats_interval, now=False)
    reactor.addSystemEventTrigger("before", "shutdown", report)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
