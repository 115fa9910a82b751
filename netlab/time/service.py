"""The time service: SNTPv4, RFC 868 and the lessons' text time on one UDP port.

:class:`TimeResponder` is the ``DatagramProtocol``: it classifies each
datagram with :mod:`netlab.time.proto`, applies the reflection guards and the
rate limits, and answers.  :class:`TimeService` listens, refreshes what the
kernel says about the clock, logs the counters, and with ``workers = N``
starts N-1 worker processes (:mod:`netlab.time.worker`) that answer on the
same port, and starts again any that dies.

A UDP responder on the open internet is a reflection weapon: anyone can send
it a request with a victim's source address.  The guards, in order:
requests from source ports below 1024 are ignored (services such as DNS or
NTP itself sit there, and two servers must never be made to talk to each
other forever, as inetd's internal services learned); NTP replies are never
larger than the request; every source address has a token bucket (with a
leak, so a spoofed flood in a victim's name cannot cut the victim off
completely); a global ceiling caps what the whole service sends; and over
its limit a source gets silence, except for an occasional NTP KoD ``RATE``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, udp
from twisted.internet.interfaces import IListeningPort, IReactorProcess
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from netlab.config import NetlabConfig, TimeSection, format_duration
from netlab.ratelimit import RateLimiter, TokenBucket, Verdict
from netlab.service import (
    DatagramListeningService,
    ServiceStartError,
    systemd_datagram_sockets,
)
from netlab.time.proto import (
    LEAP_DELETE,
    LEAP_INSERT,
    LEAP_NONE,
    LEAP_UNSYNCHRONISED,
    Clock,
    Drop,
    RequestKind,
    ServerState,
    check_client_request,
    classify,
    kiss_of_death,
    measure_precision,
    ntp_timestamp,
    rfc868_bytes,
    server_reply,
    short_format,
    text_reply,
)

log = Logger(namespace="netlab.time")

#: Datagrams are read up to this size: above the largest UDP payload (65507
#: bytes), so nothing is ever truncated; oversize requests are seen whole and
#: dropped (the application limit is proto.MAX_DATAGRAM).
MAX_PACKET_SIZE = 65536
#: How often the kernel is asked about the clock (leap, synchronisation, error).
REFRESH_INTERVAL = 16.0
#: Every counter the responder keeps, in the order they are logged.
COUNTERS = (
    "answered-ntp",
    "answered-rfc868",
    "answered-text",
    "kod-sent",
    "dropped-privileged-port",
    "dropped-oversize",
    "dropped-malformed",
    "dropped-ntp-not-client",
    "dropped-ntp-bad-version",
    "dropped-rate-limit",
    "dropped-global-limit",
    "send-failed",
)
_OVERRIDES = {
    "none": LEAP_NONE,
    "insert": LEAP_INSERT,
    "delete": LEAP_DELETE,
    "unsynchronised": LEAP_UNSYNCHRONISED,
}


# ---------------------------------------------------------------------------
# What the kernel says about the clock.
# ---------------------------------------------------------------------------


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """Linux ``struct timex`` (adjtimex(2)); read only, ``modes`` stays 0."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


@attrs.frozen
class KernelClock:
    """The kernel's view of the system clock."""

    leap: int
    #: The kernel's maximum error estimate, in seconds.
    max_error: float


#: adjtimex return values (clock states) and the leap indicator each means.
_KERNEL_LEAP = {
    0: LEAP_NONE,
    1: LEAP_INSERT,
    2: LEAP_DELETE,
    3: LEAP_NONE,
    4: LEAP_NONE,
}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library runs ldconfig: once per process, not on every refresh.
    library = ctypes.util.find_library("c")
    if sys.platform != "linux" or library is None:
        return None
    return ctypes.CDLL(library, use_errno=True)


def kernel_clock() -> KernelClock | None:
    """Ask the kernel (adjtimex with no modes set: read only); None if it cannot."""
    libc = _libc()
    if libc is None:
        return None
    timex = _Timex()
    state = libc.adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    # TIME_ERROR (5): STA_UNSYNC is set, nothing (ntpd, chrony, timesyncd)
    # disciplines the clock, so the leap indicator says "unsynchronised".
    leap = _KERNEL_LEAP.get(state, LEAP_UNSYNCHRONISED)
    return KernelClock(leap=leap, max_error=timex.maxerror / 1e6)


# ---------------------------------------------------------------------------
# The responder.
# ---------------------------------------------------------------------------


def server_state(
    section: TimeSection,
    kernel: KernelClock | None,
    precision: int,
    now_ns: int,
) -> ServerState:
    """What the replies say about this server, from config and the kernel."""
    if section.leap == "kernel":
        # Unknown is not synchronised: never claim a good clock we cannot vouch for.
        leap = kernel.leap if kernel is not None else LEAP_UNSYNCHRONISED
        dispersion = short_format(kernel.max_error) if kernel is not None else 0
    else:
        leap, dispersion = _OVERRIDES[section.leap], 0
    reference = 0 if leap == LEAP_UNSYNCHRONISED else ntp_timestamp(now_ns)
    return ServerState(
        leap=leap,
        stratum=section.stratum,
        precision=precision,
        root_delay=0,
        root_dispersion=dispersion,
        reference_id=section.reference_id,
        reference_time=reference,
    )


class TimeResponder(DatagramProtocol):
    """Answers time requests of all three kinds, within the limits.

    ``clock`` gives the time served (Unix nanoseconds); ``reactor`` times the
    rate limits.  :meth:`configure` takes new live settings.
    """

    noisy = False

    def __init__(
        self,
        section: TimeSection,
        reactor: Any,
        *,
        clock: Clock = time.time_ns,
        kernel: Callable[[], KernelClock | None] = kernel_clock,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.kernel = kernel
        self.precision = measure_precision(clock)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.section = section
        self.limiter: RateLimiter | None = None
        self.ceiling: TokenBucket | None = None
        self.kod: TokenBucket | None = None
        self.limiting = False
        self.configure(section)

    def configure(self, section: TimeSection) -> None:
        """Take the live settings of ``section`` (sources keep their buckets)."""
        self.section = section
        self.text_format = section.text_format
        now = self.reactor.seconds()
        if section.rate > 0:
            if self.limiter is None:
                self.limiter = RateLimiter(
                    self.reactor,
                    rate=section.rate,
                    burst=section.burst,
                    max_sources=section.max_sources,
                    global_rate=section.global_rate,
                    leak=section.leak,
                )
            else:
                self.limiter.reconfigure(
                    section.rate,
                    section.burst,
                    section.max_sources,
                    section.global_rate,
                    section.leak,
                )
            self.ceiling = None
        else:
            # No per-source limit, but the global ceiling still holds.
            self.limiter = None
            rate = section.global_rate
            self.ceiling = TokenBucket.full(rate, rate, now) if rate > 0 else None
        self.limiting = self.limiter is not None or self.ceiling is not None
        kod_rate = section.kod_rate
        self.kod = (
            TokenBucket.full(kod_rate, max(1.0, kod_rate), now) if kod_rate else None
        )
        self.refresh()

    def refresh(self) -> None:
        """Ask the kernel about the clock again (leap, synchronisation, error)."""
        self.state = server_state(
            self.section, self.kernel(), self.precision, self.clock()
        )

    def admit(self, host: str) -> Verdict:
        """Apply the rate limits to one request from ``host``."""
        if self.limiter is not None:
            return self.limiter.check(host)
        if self.ceiling is not None and not self.ceiling.take(self.reactor.seconds()):
            return Verdict.GLOBAL_LIMIT
        return Verdict.ALLOW

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        # The receive timestamp comes first: everything below is server delay.
        self.datagram_arrived(data, addr, self.clock())

    def datagram_arrived(self, data: bytes, addr: Any, receive_ns: int) -> None:
        """Answer ``data``, which arrived at ``receive_ns`` (Unix nanoseconds)."""
        # This runs for every datagram: the common case (an NTP request, no
        # limit reached) takes the fewest steps, which is most of the speed.
        counters = self.counters
        if addr[1] < 1024:
            counters["dropped-privileged-port"] += 1
            return
        kind = classify(data)
        if kind is RequestKind.NTP:
            problem = check_client_request(data)
            if problem is not None:
                counters["dropped-" + problem.value] += 1
                return
        elif isinstance(kind, Drop):
            counters["dropped-" + kind.value] += 1
            return
        if self.limiting:
            verdict = self.admit(addr[0])
            if verdict is not Verdict.ALLOW and not verdict.allowed:
                self.refuse(kind, verdict, data, addr, receive_ns)
                return
        reply: bytes
        if kind is RequestKind.NTP:
            reply = server_reply(
                data, self.state, ntp_timestamp(receive_ns), self.clock
            )
            counters["answered-ntp"] += 1
        elif kind is RequestKind.RFC868:
            reply = rfc868_bytes(receive_ns)
            counters["answered-rfc868"] += 1
        else:
            text = data.decode("utf-8")  # classify checked it decodes
            reply = text_reply(text, receive_ns, self.text_format).encode("utf-8")
            counters["answered-text"] += 1
        self.send(reply, addr)

    def refuse(
        self,
        kind: RequestKind,
        verdict: Verdict,
        data: bytes,
        addr: Any,
        receive_ns: int,
    ) -> None:
        """Deal with a request over a limit: an occasional KoD, else silence."""
        if (
            verdict is Verdict.SOURCE_LIMIT
            and kind is RequestKind.NTP
            and self.kod is not None
            and self.kod.take(self.reactor.seconds())
        ):
            reply = kiss_of_death(data, b"RATE", ntp_timestamp(receive_ns), self.clock)
            self.counters["kod-sent"] += 1
            self.send(reply, addr)
            return
        self.counters[
            "dropped-rate-limit"
            if verdict is Verdict.SOURCE_LIMIT
            else "dropped-global-limit"
        ] += 1

    def send(self, reply: bytes, addr: Any) -> None:
        assert self.transport is not None
        try:
            self.transport.write(reply, addr)
        except OSError:
            # udp.Port.write lets EAGAIN/ENOBUFS through during bursts; UDP
            # may lose a reply, the client retries.
            self.counters["send-failed"] += 1

    def take_counters(self) -> dict[str, int]:
        """The counters since the last call (then zeroed)."""
        taken, self.counters = self.counters, dict.fromkeys(COUNTERS, 0)
        return taken


def log_counters(counters: dict[str, int], interval: float, worker: int) -> None:
    """Log one counters event (only the counters that moved appear in the text)."""
    moved = ", ".join(f"{name} {value}" for name, value in counters.items() if value)
    log.info(
        "time counters, last {period} (worker {worker}): {summary}",
        event="time.counters",
        period=format_duration(interval),
        interval=interval,
        worker=worker,
        summary=moved or "no requests",
        counters=counters,
    )


# ---------------------------------------------------------------------------
# The service and its workers.
# ---------------------------------------------------------------------------


def udp_socket(interface: str, port: int, reuse_port: bool) -> socket.socket:
    """A UDP socket bound to ``interface:port``, with SO_REUSEPORT if asked."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
    except OSError:
        sock.close()
        raise
    return sock


#: Linux's SO_TIMESTAMPNS (also the SCM_ type of its message): the kernel
#: attaches to each datagram the time it arrived (CLOCK_REALTIME, a timespec).
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


class TimestampingPort(udp.Port):
    """A UDP port that hands the responder each datagram's kernel arrival time.

    The receive timestamp of an NTP reply should be when the request arrived;
    read in Python it is late by the reactor's wake-up and dispatch (tens of
    microseconds), which shows up in every client's offset as a bias.  This is
    Twisted's ``udp.Port.doRead`` with ``recvmsg`` in place of ``recvfrom``.
    """

    protocol: TimeResponder

    def doRead(self) -> None:
        read = 0
        while read < self.maxThroughput:
            try:
                data, ancillary, _, addr = self.socket.recvmsg(
                    self.maxPacketSize, _ANCILLARY_SPACE
                )
            except OSError as error:
                if error.errno in udp._sockErrReadIgnore:
                    return
                if error.errno in udp._sockErrReadRefuse:
                    return  # A listening port is never connected.
                raise
            read += len(data)
            arrival = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                    arrival = seconds * 1_000_000_000 + nanoseconds
            if self.addressFamily == socket.AF_INET6:
                addr = addr[:2]  # (host, port), as udp.Port delivers them
            try:
                if arrival is None:
                    self.protocol.datagramReceived(data, addr)
                else:
                    self.protocol.datagram_arrived(data, addr, arrival)
            except BaseException:
                log.failure("time responder failed", event="time.responder.failed")

    def write(self, datagram: bytes, addr: Any = None) -> None:
        """Send a reply to an address ``recvmsg`` gave us.

        ``udp.Port.write`` parses the address string up to three times to
        check it is an IP address of the socket's family, about a tenth of
        the cost of a request here; addresses from ``recvmsg`` always are.
        EINTR is retried by Python itself; other errors reach the responder,
        which counts them.
        """
        with contextlib.suppress(ConnectionRefusedError):
            # An ICMP error left by an earlier reply: nothing to do.
            self.socket.sendto(datagram, addr)


def adopt(
    reactor: Any, sock: socket.socket, responder: TimeResponder
) -> IListeningPort:
    """Listen on a bound UDP socket (the caller's copy is closed)."""
    with sock:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # Without it, the clock is read later.
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        port: IListeningPort = TimestampingPort._fromListeningDescriptor(
            reactor, sock.fileno(), sock.family, responder, MAX_PACKET_SIZE
        )
    port.startListening()
    return port


class WorkerProcess(ProcessProtocol):
    """The daemon's side of one worker: its stdin pipe, its log, its exit.

    The worker writes its log events as JSON lines to its stdout; they are
    published here again, so they reach wherever (and in whatever format)
    the daemon logs, daemonized or not.
    """

    def __init__(
        self,
        index: int,
        on_exit: Callable[[WorkerProcess, str], None] | None = None,
        started: float = 0.0,
    ) -> None:
        self.index = index
        self.on_exit = on_exit
        #: When it was started (the reactor's clock).
        self.started = started
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.running = True
        self.pending = b""

    def outReceived(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if line.strip():
                self.relay(line.decode("utf-8", "replace"))

    def relay(self, line: str) -> None:
        try:
            event = eventFromJSON(line)
        except ValueError:
            log.info(
                "time worker {index}: {line}",
                event="time.worker.output",
                index=self.index,
                line=line,
            )
        else:
            globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if self.on_exit is not None:
            self.on_exit(self, reason.getErrorMessage())
        else:
            log.info(
                "time worker {index} exited: {reason}",
                event="time.worker.exited",
                index=self.index,
                reason=reason.getErrorMessage(),
            )
        self.ended.callback(None)


#: A worker that ran at least this long before it died is restarted after
#: :data:`RESTART_DELAY`; one that died sooner waits twice as long as the
#: last time, up to :data:`RESTART_DELAY_MAX` (a worker that cannot start
#: must not become a fork loop).
STABLE_RUN = 30.0
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0


class TimeService(DatagramListeningService):
    """The time service (``[time]``), with ``workers - 1`` helper processes.

    A worker that dies while the service runs is started again on a socket
    of its own (or a copy of the one systemd passed), after a delay that
    grows while it keeps dying early.
    """

    section_name = "time"
    max_packet_size = MAX_PACKET_SIZE

    def __init__(
        self,
        config: NetlabConfig,
        reactor: Any,
        *,
        clock: Clock = time.time_ns,
        kernel: Callable[[], KernelClock | None] = kernel_clock,
    ) -> None:
        super().__init__(config, reactor)
        self.responder = TimeResponder(config.time, reactor, clock=clock, kernel=kernel)
        self.refresher = LoopingCall(self.responder.refresh)
        self.refresher.clock = reactor
        self.reporter = LoopingCall(self.report)
        self.reporter.clock = reactor
        self.worker_sockets: list[socket.socket] = []
        self.workers: list[WorkerProcess] = []
        #: Makes the socket a restarted worker answers on.
        self.new_worker_socket: Callable[[], socket.socket] | None = None
        #: Per worker index: the delay before its next restart, and that
        #: restart once scheduled.
        self.restart_delays: dict[int, float] = {}
        self.restarts: dict[int, Any] = {}
        self.spare_socket: socket.socket | None = None
        self.stopping = False

    def protocol(self) -> DatagramProtocol:
        return self.responder

    def listen(self) -> IListeningPort:
        sockets = self.open_sockets()
        # Workers get theirs in startService, once the reactor runs.
        self.worker_sockets = sockets[1:]
        return adopt(self.reactor, sockets[0], self.responder)

    def open_sockets(self) -> list[socket.socket]:
        """One socket for this process and one per worker."""
        workers = self.section.workers
        address = self.config.listen_address("time")
        if address.kind == "systemd":
            # Every process reads the one socket systemd passed; a spare
            # copy (never read here) is kept for workers that restart.
            assert address.name is not None
            sockets = systemd_datagram_sockets("time", address.name, workers + 1)
            self.spare_socket = sockets.pop()
            self.new_worker_socket = self.spare_socket.dup
            return sockets
        assert address.port is not None
        interface = address.interface or "0.0.0.0"  # noqa: S104 - as configured
        sockets = []
        try:
            # SO_REUSEPORT only for workers: otherwise a second daemon on the
            # same port must fail to start, not silently share the traffic.
            sockets.append(udp_socket(interface, address.port, workers > 1))
            # Port 0: the workers bind the port the kernel picked first.
            port = sockets[0].getsockname()[1]
            for _ in range(workers - 1):
                sockets.append(udp_socket(interface, port, True))
            self.new_worker_socket = functools.partial(
                udp_socket, interface, port, True
            )
        except OSError as error:
            for sock in sockets:
                sock.close()
            raise ServiceStartError(
                f"[time] cannot listen on {self.section.endpoint}: {error.strerror}; "
                "is another program using that port?"
            ) from None
        return sockets

    def startService(self) -> None:
        super().startService()
        self.refresher.start(REFRESH_INTERVAL, now=False)
        self.reporter.start(self.section.stats_interval, now=False)
        self.spawn_workers()

    def spawn_workers(self) -> None:
        """Start one worker process per socket made in :meth:`listen`."""
        sockets, self.worker_sockets = self.worker_sockets, []
        for index, sock in enumerate(sockets, start=1):
            self.spawn_worker(index, sock)

    def spawn_worker(self, index: int, sock: socket.socket) -> None:
        """Start worker ``index`` answering on ``sock`` (closed here)."""
        reactor: IReactorProcess = self.reactor
        arguments = [sys.executable, "-m", "netlab.time.worker"]
        if self.config.path is not None:
            arguments += ["--config", str(self.config.path)]
        worker = WorkerProcess(index, self.worker_exited, self.reactor.seconds())
        with sock:
            # The worker's stdin is a pipe from us: when this process dies,
            # however it dies, the pipe closes and the worker stops.
            reactor.spawnProcess(
                worker,
                sys.executable,
                [*arguments, "--index", str(index)],
                env=os.environ.copy(),
                childFDs={0: "w", 1: "r", 2: 2, 3: sock.fileno()},
            )
        self.workers.append(worker)

    def worker_exited(self, worker: WorkerProcess, reason: str) -> None:
        """Log a worker's end; unless the service is stopping, restart it later."""
        if worker in self.workers:
            self.workers.remove(worker)
        if self.stopping or not self.running or self.new_worker_socket is None:
            log.info(
                "time worker {index} exited: {reason}",
                event="time.worker.exited",
                index=worker.index,
                reason=reason,
            )
            return
        index = worker.index
        if self.reactor.seconds() - worker.started >= STABLE_RUN:
            delay = RESTART_DELAY
        else:
            delay = self.restart_delays.get(index, RESTART_DELAY / 2) * 2
        delay = min(delay, RESTART_DELAY_MAX)
        self.restart_delays[index] = delay
        log.warn(
            "time worker {index} exited: {reason}; restarting it in {delay}",
            event="time.worker.died",
            index=index,
            reason=reason,
            delay=format_duration(delay),
        )
        self.restarts[index] = self.reactor.callLater(delay, self.restart_worker, index)

    def restart_worker(self, index: int) -> None:
        """Start worker ``index`` again, on a new socket."""
        self.restarts.pop(index, None)
        assert self.new_worker_socket is not None
        try:
            sock = self.new_worker_socket()
        except OSError as error:
            log.warn(
                "time worker {index} cannot be restarted: {reason}; the other "
                "processes go on answering",
                event="time.worker.restart_failed",
                index=index,
                reason=error.strerror or str(error),
            )
            return
        self.spawn_worker(index, sock)
        log.info(
            "time worker {index} restarted",
            event="time.worker.restarted",
            index=index,
        )

    def report(self) -> None:
        log_counters(self.responder.take_counters(), self.section.stats_interval, 0)

    def apply(self, config: NetlabConfig) -> None:
        section = config.time
        self.responder.configure(section)
        if (
            section.stats_interval != self.section.stats_interval
            and self.reporter.running
        ):
            self.reporter.stop()
            self.reporter.start(section.stats_interval, now=False)
        for worker in self.workers:
            if worker.running and worker.transport is not None:
                # Workers read the same file again on SIGHUP (netlab.time.worker).
                worker.transport.signalProcess("HUP")

    def stopService(self) -> defer.Deferred[None] | None:
        self.stopping = True
        for pending in self.restarts.values():
            if pending.active():
                pending.cancel()
        self.restarts.clear()
        if self.spare_socket is not None:
            self.spare_socket.close()
        for loop in (self.refresher, self.reporter):
            if loop.running:
                loop.stop()
        self.report()
        stopped = super().stopService()
        waits: list[defer.Deferred[Any]] = [] if stopped is None else [stopped]
        for worker in list(self.workers):
            if worker.running and worker.transport is not None:
                worker.transport.signalProcess("TERM")
                waits.append(worker.ended)
        self.workers = []
        if not waits:
            return None
        return defer.gatherResults(waits).addCallback(lambda _: None)


def build(config: NetlabConfig, reactor: Any) -> TimeService:
    """The time service for ``config`` (``SERVICE_BUILDERS["time"]``)."""
    return TimeService(config, reactor)
