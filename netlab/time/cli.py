"""``netlab time``: ask the time service for the time, by SNTP, RFC 868 or text.

SNTP (the default) prints the server's time, the offset of the local clock
from it and the round-trip delay, as RFC 4330 computes them; ``--rfc868``
prints the whole seconds the server sent; ``--text`` sends a text command
(``time``, ``iso``, ``unix``, ``help``) and prints the reply.  ``--count N
--interval S`` repeats the query like the lessons' client loop.  A query that
gets no answer within ``[client] timeout`` ends the command with exit status 4.
The command line is declared in :mod:`netlab.commands`.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol

from netlab.cli import Context
from netlab.errors import ConnectionFailed, RemoteError, UsageError
from netlab.time.proto import (
    MODE_SERVER,
    MalformedReply,
    NTPPacket,
    client_request,
    ntp_to_unix_ns,
    rfc868_to_unix,
)

_LEAP_NAMES = ("none", "insert second", "delete second", "unsynchronised")


class _Query(DatagramProtocol):
    """One connected UDP socket; each reply fires the pending Deferred."""

    noisy = False

    def __init__(self) -> None:
        self.pending: defer.Deferred[tuple[bytes, int]] | None = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        arrived = time.time_ns()
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.callback((data, arrived))

    def connectionRefused(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.errback(ConnectionFailed("connection refused"))

    def stopProtocol(self) -> None:
        # An ICMP error on a connected UDP socket makes Twisted's epoll reactor
        # close the port (without calling connectionRefused): same meaning.
        self.connectionRefused()


class TimeClient:
    """Queries one time server over UDP (a connected socket: only it may answer)."""

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.host, self.port, self.timeout = host, port, timeout
        self.protocol = _Query()
        self.listening: Any = None

    async def open(self) -> None:
        try:
            address = await self.reactor.resolve(self.host)
        except Exception as error:
            raise ConnectionFailed(f"cannot resolve {self.host!r}: {error}") from None
        interface = "::" if ":" in address else ""
        self.listening = self.reactor.listenUDP(0, self.protocol, interface=interface)
        self.listening.connect(address, self.port)

    def close(self) -> defer.Deferred[None] | None:
        if not self.listening.connected:  # already closed by an ICMP error
            return None
        result: defer.Deferred[None] | None = self.listening.stopListening()
        return result

    async def exchange(self, payload: bytes) -> tuple[bytes, int, int]:
        """Send ``payload``; return the reply, when it was sent and when it came."""
        waiting: defer.Deferred[tuple[bytes, int]] = defer.Deferred()
        self.protocol.pending = waiting
        waiting.addTimeout(self.timeout, self.reactor)
        sent = time.time_ns()
        self.listening.write(payload)
        try:
            data, arrived = await waiting
        except defer.TimeoutError:
            raise ConnectionFailed(
                f"no answer from {self.host}:{self.port} within {self.timeout:g}s; "
                "is the time service running there (check --server, --port and "
                "[time] endpoint)?"
            ) from None
        except ConnectionFailed:
            raise ConnectionFailed(
                f"{self.host}:{self.port} refused the datagram (or is unreachable): "
                "nothing listens there; check --server, --port and [time] endpoint"
            ) from None
        return data, sent, arrived

    async def ntp(self) -> str:
        request = client_request(time.time_ns())
        data, t1, t4 = await self.exchange(request)
        try:
            reply = NTPPacket.parse(data)
        except MalformedReply as error:
            raise RemoteError("malformed", f"not an NTP reply: {error}") from None
        # Our transmit timestamp must come back bit-exact as the originate:
        # anything else answers some other request, or is forged.
        if reply.originate_time != int.from_bytes(request[40:48], "big"):
            raise RemoteError("mismatch", "the NTP reply does not answer our request")
        if reply.mode != MODE_SERVER:
            raise RemoteError("malformed", f"NTP reply has mode {reply.mode}, not 4")
        if reply.stratum == 0:
            code = reply.reference_id.decode("ascii", "replace")
            raise RemoteError(
                f"kod-{code.lower()}",
                f"the server sent a kiss-o'-death {code}: query less often",
            )
        # RFC 4330's offset and delay; t1/t4 from our clock, t2/t3 from the reply.
        t2 = ntp_to_unix_ns(reply.receive_time, t4)
        t3 = ntp_to_unix_ns(reply.transmit_time, t4)
        offset = ((t2 - t1) + (t3 - t4)) / 2e9
        delay = ((t4 - t1) - (t3 - t2)) / 1e9
        return (
            f"{_iso(t3)}  offset {offset:+.6f}s  delay {delay:.6f}s  "
            f"stratum {reply.stratum}  leap {_LEAP_NAMES[reply.leap]}"
        )

    async def rfc868(self) -> str:
        data, _, arrived = await self.exchange(b"")
        try:
            seconds = rfc868_to_unix(data, arrived / 1e9)
        except MalformedReply as error:
            raise RemoteError("malformed", str(error)) from None
        return (
            f"{_iso(seconds * 1_000_000_000, micros=False)}  (RFC 868, whole seconds)"
        )

    async def text(self, command: str) -> str:
        data, _, _ = await self.exchange(command.encode("utf-8"))
        return data.decode("utf-8", "replace").rstrip("\n")


def _iso(unix_ns: int, *, micros: bool = True) -> str:
    seconds, nanoseconds = divmod(unix_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return stamp + (f".{nanoseconds // 1000:06d}Z" if micros else "Z")


def service_port(context: Context) -> int:
    """``--port``, else the port of ``[time] endpoint``."""
    if context.args.port is not None:
        return int(context.args.port)
    address = context.config.listen_address("time")
    if address.port is None or address.port == 0:
        raise UsageError(
            f"[time] endpoint {context.config.time.endpoint!r} names no fixed port; "
            "pass --port"
        )
    return address.port


async def handle(context: Context) -> int:
    args = context.args
    if args.count < 1 or args.interval < 0:
        raise UsageError("--count must be at least 1 and --interval not negative")
    client = TimeClient(
        context.reactor,
        context.server,
        service_port(context),
        context.config.client.timeout,
    )
    await client.open()
    try:
        for number in range(args.count):
            if number:
                await task.deferLater(context.reactor, args.interval, lambda: None)
            if args.text is not None:
                line = await client.text(args.text)
            elif args.kind == "rfc868":
                line = await client.rfc868()
            else:
                line = await client.ntp()
            print(line, flush=True)
    finally:
        await defer.maybeDeferred(client.close)
    return 0
