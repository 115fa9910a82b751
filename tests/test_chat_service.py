"""Tests for the chat service's Twisted adapter (netlab.chat.service).

Real loopback sockets check that datagrams are read whole (never truncated);
fake transports check send-error handling, the eviction timer and reload.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from netlab.chat.service import ChatService
from netlab.config import NetlabConfig
from tests.chat_support import settings


def chat_config(**overrides: Any) -> NetlabConfig:
    return NetlabConfig(
        chat=settings(endpoint="udp:0:interface=127.0.0.1", **overrides)
    )


class FakeTransport:
    """A datagram transport that records writes and can fail some of them."""

    def __init__(self, failures: list[int] | None = None) -> None:
        self.written: list[tuple[bytes, Any]] = []
        self.failures = failures or []

    def write(self, datagram: bytes, address: Any) -> None:
        if self.failures:
            raise OSError(self.failures.pop(0), "simulated")
        self.written.append((datagram, address))


class _Receiver(DatagramProtocol):
    def __init__(self) -> None:
        self.answers: list[Deferred[bytes]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.answers:
            self.answers.pop(0).callback(datagram)


class LoopbackTests(TestCase):
    def start(self, **overrides: Any) -> tuple[ChatService, int]:
        service = ChatService(chat_config(**overrides), global_reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service, service.listening_address.port

    async def exchange(self, port: int, datagram: bytes) -> bytes:
        """Send from this test's one client port; wait (bounded) for the answer."""
        if not hasattr(self, "receiver"):
            self.receiver = _Receiver()
            self.client = global_reactor.listenUDP(
                0, self.receiver, interface="127.0.0.1"
            )
            self.addCleanup(self.client.stopListening)
        answer: Deferred[bytes] = Deferred()
        answer.addTimeout(5, global_reactor)
        self.receiver.answers.append(answer)
        self.client.write(datagram, ("127.0.0.1", port))
        return await answer

    async def test_65507_byte_datagram_refused_whole(self) -> None:
        """The largest UDP datagram is read whole and refused with the limit named."""
        _, port = self.start()
        answer = await self.exchange(port, b"x" * 65507)
        self.assertEqual(
            answer, b"! datagrams are limited to 1200 bytes; send a shorter message\n"
        )

    async def test_large_datagrams_are_not_truncated(self) -> None:
        """A 16 KB datagram (over Twisted's 8192 default) arrives whole.

        Its last byte makes it invalid UTF-8; cut at 8192 bytes it would be
        valid text and be answered with a join code instead.
        """
        _, port = self.start(max_datagram=20000)
        answer = await self.exchange(port, b"a" * 16000 + b"\xff")
        self.assertEqual(answer, b"! datagrams must be UTF-8 text\n")

    def test_socket_buffers_are_enlarged(self) -> None:
        """socket_buffer is asked for (up to the kernel's cap) on the chat socket."""
        service, _ = self.start(socket_buffer=1024 * 1024)
        handle = service.port.getHandle()  # type: ignore[union-attr]
        cap = int(Path("/proc/sys/net/core/rmem_max").read_text())
        received = handle.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.assertGreaterEqual(received, min(cap, 1024 * 1024))

    async def test_text_join_over_loopback(self) -> None:
        """nc-style: any text gets a code; echoing it back joins (over real sockets)."""
        _, port = self.start()
        code = await self.exchange(
            port, b"hello, is this the netlab chat service? who is out there?"
        )
        self.assertTrue(code.startswith(b"netlab chat: to join, send back this code:"))
        welcome = await self.exchange(port, code.split()[-1])
        self.assertIn(b"choose a nickname", welcome)


class AdapterTests(TestCase):
    def service(
        self, **overrides: Any
    ) -> tuple[ChatService, MemoryReactorClock, FakeTransport]:
        reactor = MemoryReactorClock()
        service = ChatService(chat_config(**overrides), reactor)
        # Not privilegedStartService: the memory reactor has no UDP; the
        # protocol gets a fake transport instead.
        service.startService()
        transport = FakeTransport()
        service.chat_protocol.transport = transport
        return service, reactor, transport

    def join(
        self,
        service: ChatService,
        reactor: MemoryReactorClock,
        transport: FakeTransport,
        address: tuple[str, int],
        nick: str,
    ) -> None:
        request = {"type": "join", "nick": nick, "id": 1, "pad": "x" * 80}
        service.chat_protocol.datagramReceived(json.dumps(request).encode(), address)
        reactor.advance(0)
        cookie = json.loads(transport.written[-1][0])["cookie"]
        request["cookie"] = cookie
        service.chat_protocol.datagramReceived(json.dumps(request).encode(), address)
        reactor.advance(0)

    def test_send_errors_are_counted_not_raised(self) -> None:
        """EAGAIN/ENOBUFS during fan-out are counted, not raised; the rest is sent."""
        service, reactor, transport = self.service()
        self.join(service, reactor, transport, ("127.0.0.1", 5001), "ann")
        self.join(service, reactor, transport, ("127.0.0.1", 5002), "bob")
        token = service.server.sessions[("127.0.0.1", 5001)].token
        transport.failures = [errno.EAGAIN, errno.ENOBUFS]
        transport.written.clear()
        say = {"type": "say", "token": token, "id": 2, "text": "hi"}
        service.chat_protocol.datagramReceived(
            json.dumps(say).encode(), ("127.0.0.1", 5001)
        )
        service.chat_protocol.datagramReceived(
            json.dumps({**say, "id": 3}).encode(), ("127.0.0.1", 5001)
        )
        reactor.advance(0)
        self.assertEqual(service.server.counters.send_errors, 2)
        service.chat_protocol.datagramReceived(
            json.dumps({**say, "id": 4}).encode(), ("127.0.0.1", 5001)
        )
        reactor.advance(0)
        self.assertEqual(len(transport.written), 2)

    def test_other_send_errors_propagate(self) -> None:
        """An unexpected socket error is not swallowed."""
        service, reactor, transport = self.service()
        transport.failures = [errno.EBADF]
        service.chat_protocol.datagramReceived(
            b"hello there, anyone?", ("127.0.0.1", 5001)
        )
        self.assertRaises(OSError, reactor.advance, 0)

    def test_burst_is_flushed_once_packed(self) -> None:
        """Datagrams read in one turn are answered after it, packed per member."""
        service, reactor, transport = self.service(message_burst=100.0)
        self.join(service, reactor, transport, ("127.0.0.1", 5001), "ann")
        token = service.server.sessions[("127.0.0.1", 5001)].token
        transport.written.clear()
        for number in range(20):
            say = {
                "type": "say",
                "token": token,
                "id": 10 + number,
                "text": f"m{number}",
            }
            service.chat_protocol.datagramReceived(
                json.dumps(say).encode(), ("127.0.0.1", 5001)
            )
        self.assertEqual(transport.written, [])
        reactor.advance(0)
        # 20 messages and 20 acks: two datagrams of at most 1200 bytes.
        self.assertEqual(len(transport.written), 2)
        self.assertTrue(all(len(d) <= 1200 for d, _ in transport.written))
        said = b"".join(d for d, _ in transport.written).count(b'"type":"msg"')
        self.assertEqual(said, 20)

    def test_silent_member_evicted_by_the_timer(self) -> None:
        """The sweep timer evicts a silent member and tells the room."""
        service, reactor, transport = self.service(member_timeout=12.0)
        self.join(service, reactor, transport, ("127.0.0.1", 5001), "ann")
        self.join(service, reactor, transport, ("127.0.0.1", 5002), "bob")
        token = service.server.sessions[("127.0.0.1", 5002)].token
        transport.written.clear()
        for _ in range(8):
            reactor.advance(2)
            ping = {"type": "ping", "token": token}
            service.chat_protocol.datagramReceived(
                json.dumps(ping).encode(), ("127.0.0.1", 5002)
            )
        reactor.advance(0)
        told = [d for d, a in transport.written if b'"event":"timeout"' in d]
        self.assertEqual(len(told), 1)
        self.assertNotIn(("127.0.0.1", 5001), service.server.sessions)
        service.stopService()
        self.assertFalse(service._sweeper.running)

    def test_reload(self) -> None:
        """Live keys are applied; a changed endpoint is reported as needing restart."""
        service, _, _ = self.service()
        new = attrs.evolve(
            chat_config(),
            chat=settings(endpoint="udp:9999", history=5, message_rate=1.0),
        )
        restart = service.reconfigure(new)
        self.assertEqual(restart, ["[chat] endpoint"])
        self.assertEqual(service.server.settings.message_rate, 1.0)
        self.assertEqual(service.server.members.rate, 1.0)
