"""Tests for netlab.time.service: the responder's replies, guards and limits, and
the service on real loopback sockets (oversize datagrams are never truncated)."""

from __future__ import annotations

import errno
import random
import socket
import time
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from netlab.config import NetlabConfig, TimeSection, from_mapping
from netlab.errors import ConfigError
from netlab.service import ServiceStartError
from netlab.time.proto import (
    LEAP_INSERT,
    LEAP_NONE,
    LEAP_UNSYNCHRONISED,
    NTP_UNIX_OFFSET,
    NTPPacket,
    client_request,
    ntp_timestamp,
    ntp_to_unix_ns,
    rfc868_to_unix,
    short_format,
)
from netlab.time.service import (
    COUNTERS,
    RESTART_DELAY_MAX,
    STABLE_RUN,
    KernelClock,
    TimeResponder,
    TimeService,
    TimestampingPort,
    WorkerProcess,
    kernel_clock,
    log_counters,
)
from tests.support import temporary_directory

NS = 1_000_000_000
CLIENT = ("127.0.0.1", 40000)
OTHER = ("127.0.0.2", 40001)
SYNCHRONISED = KernelClock(leap=LEAP_NONE, max_error=0.25)
INSTANT = 1_795_272_566 * NS


@attrs.define
class Harness:
    """A responder on a fake transport, with a fake reactor and a settable clock."""

    responder: TimeResponder
    transport: FakeDatagramTransport
    reactor: Clock
    now: list[int]

    def send(self, data: bytes, addr: tuple[str, int] = CLIENT) -> list[bytes]:
        """Deliver one datagram; return the replies it caused to ``addr``."""
        before = len(self.transport.written)
        self.responder.datagramReceived(data, addr)
        replies = self.transport.written[before:]
        for _, destination in replies:
            assert destination == addr, (destination, addr)
        return [reply for reply, _ in replies]


def harness(
    kernel: KernelClock | None = SYNCHRONISED, now: int = INSTANT, **settings: Any
) -> Harness:
    """A responder configured with ``[time]`` settings (rate limits off by default)."""
    settings.setdefault("rate", 0.0)
    settings.setdefault("global_rate", 0.0)
    section = TimeSection(**settings)
    clock = Clock()
    instant = [now]
    responder = TimeResponder(
        section, clock, clock=lambda: instant[0], kernel=lambda: kernel
    )
    transport = FakeDatagramTransport()
    responder.makeConnection(transport)
    return Harness(responder, transport, clock, instant)


def ntp(
    transmit: bytes = b"\x01\x02\x03\x04\x05\x06\x07\x08", first: int = 0x23
) -> bytes:
    return bytes([first, 0, 6, 0]) + bytes(36) + transmit


class ReplyTests(TestCase):
    def test_ntp_reply(self) -> None:
        """An SNTP request gets a mode 4 reply with the served clock's timestamps."""
        h = harness(stratum=2, reference_id=b"\x0a\x00\x00\x01")
        (reply,) = h.send(ntp())
        packet = NTPPacket.parse(reply)
        self.assertEqual((packet.version, packet.mode, packet.poll), (4, 4, 6))
        self.assertEqual(packet.stratum, 2)
        self.assertEqual(packet.reference_id, b"\x0a\x00\x00\x01")
        self.assertEqual(reply[24:32], b"\x01\x02\x03\x04\x05\x06\x07\x08")
        self.assertEqual(packet.receive_time, ntp_timestamp(INSTANT))
        self.assertEqual(packet.transmit_time, ntp_timestamp(INSTANT))
        self.assertEqual(packet.root_dispersion, short_format(0.25))
        self.assertEqual(packet.reference_time, ntp_timestamp(INSTANT))
        self.assertEqual(h.responder.counters["answered-ntp"], 1)

    def test_receive_before_transmit(self) -> None:
        """The receive timestamp is read on arrival, the transmit one at sending."""
        h = harness()
        readings = iter([INSTANT, INSTANT + 1000])
        h.responder.clock = lambda: next(readings)
        (reply,) = h.send(ntp())
        packet = NTPPacket.parse(reply)
        self.assertEqual(packet.receive_time, ntp_timestamp(INSTANT))
        self.assertEqual(packet.transmit_time, ntp_timestamp(INSTANT + 1000))

    def test_rfc868(self) -> None:
        """An empty datagram gets 4 bytes: seconds since 1900."""
        h = harness()
        self.assertEqual(
            h.send(b""), [(INSTANT // NS + NTP_UNIX_OFFSET).to_bytes(4, "big")]
        )

    def test_text_commands(self) -> None:
        """Text commands get UTF-8 text; the lessons' b"time" gets the format."""
        h = harness(text_format="%Y/%m/%d")
        self.assertEqual(h.send(b"time"), [b"2026/11/21"])
        self.assertEqual(h.send("你好吗".encode()), [b"2026/11/21"])
        self.assertEqual(h.send(b"iso"), [b"2026-11-21T14:49:26.000000Z"])
        self.assertEqual(h.send(b"unix\n"), [b"1795272566.000000"])
        (help_text,) = h.send(b"help")
        self.assertIn(b"iso", help_text)
        self.assertEqual(h.responder.counters["answered-text"], 5)

    def test_configure_live(self) -> None:
        """A reload's new format and stratum apply to the next request."""
        h = harness(text_format="%Y")
        h.responder.configure(TimeSection(text_format="%m", stratum=7))
        self.assertEqual(h.send(b"time"), [b"11"])
        self.assertEqual(NTPPacket.parse(h.send(ntp())[0]).stratum, 7)


class LeapTests(TestCase):
    def leap_of(self, kernel: KernelClock | None, leap: str = "kernel") -> int:
        (reply,) = harness(kernel=kernel, leap=leap).send(ntp())
        return NTPPacket.parse(reply).leap

    def test_kernel_synchronised(self) -> None:
        """A synchronised kernel clock gives leap indicator 0."""
        self.assertEqual(self.leap_of(SYNCHRONISED), LEAP_NONE)

    def test_kernel_unsynchronised(self) -> None:
        """An unsynchronised kernel clock gives 3 and no reference time."""
        h = harness(kernel=KernelClock(LEAP_UNSYNCHRONISED, 16.0))
        packet = NTPPacket.parse(h.send(ntp())[0])
        self.assertEqual(packet.leap, LEAP_UNSYNCHRONISED)
        self.assertEqual(packet.reference_time, 0)

    def test_kernel_pending_leap_second(self) -> None:
        """A leap second announced by the kernel is passed on."""
        self.assertEqual(self.leap_of(KernelClock(LEAP_INSERT, 0.1)), LEAP_INSERT)

    def test_kernel_unknown(self) -> None:
        """Without adjtimex the server never claims to be synchronised."""
        self.assertEqual(self.leap_of(None), LEAP_UNSYNCHRONISED)

    def test_override(self) -> None:
        """The leap setting overrides the kernel either way."""
        unsynchronised = KernelClock(LEAP_UNSYNCHRONISED, 16.0)
        self.assertEqual(self.leap_of(unsynchronised, "none"), LEAP_NONE)
        self.assertEqual(self.leap_of(SYNCHRONISED, "unsynchronised"), 3)

    def test_refresh_asks_kernel_again(self) -> None:
        """refresh() picks up a change in the kernel's clock state."""
        states = [SYNCHRONISED]
        h = harness()
        h.responder.kernel = lambda: states[0]
        states[0] = KernelClock(LEAP_UNSYNCHRONISED, 16.0)
        h.responder.refresh()
        self.assertEqual(NTPPacket.parse(h.send(ntp())[0]).leap, LEAP_UNSYNCHRONISED)

    def test_real_kernel(self) -> None:
        """adjtimex answers on Linux with a leap indicator and an error bound."""
        state = kernel_clock()
        if state is None:
            self.skipTest("adjtimex is not available here")
        self.assertIn(state.leap, range(4))
        self.assertGreaterEqual(state.max_error, 0)


class HostileInputTests(TestCase):
    """Each hostile datagram is dropped, counted, and the next client is served."""

    def assertDroppedThenServed(self, h: Harness, data: bytes, counter: str,
                                addr: tuple[str, int] = CLIENT) -> None:  # fmt: skip
        self.assertEqual(h.send(data, addr), [])
        self.assertEqual(h.responder.counters[counter], 1, h.responder.counters)
        self.assertEqual(len(h.send(ntp(), OTHER)), 1)

    def test_47_byte_ntp(self) -> None:
        """An NTP packet one byte short is dropped as malformed."""
        self.assertDroppedThenServed(harness(), ntp()[:47], "dropped-malformed")

    def test_modes(self) -> None:
        """Modes 0, 1, 2, 4, 5, 6 and 7 are never answered."""
        for mode in (0, 1, 2, 4, 5, 6, 7):
            with self.subTest(mode=mode):
                self.assertDroppedThenServed(
                    harness(), ntp(first=(4 << 3) | mode), "dropped-ntp-not-client"
                )

    def test_versions(self) -> None:
        """Versions 0 and 5 (and 6, 7) are never answered."""
        for version in (0, 5, 6, 7):
            with self.subTest(version=version):
                self.assertDroppedThenServed(
                    harness(), ntp(first=(version << 3) | 3), "dropped-ntp-bad-version"
                )

    def test_oversize(self) -> None:
        """1201, 8193 and 65507 bytes are dropped whole, even valid NTP prefixes."""
        for size in (1201, 8193, 65507):
            with self.subTest(size=size):
                data = ntp() + bytes(size - 48)
                self.assertDroppedThenServed(harness(), data, "dropped-oversize")

    def test_invalid_utf8(self) -> None:
        """Bytes that are neither UTF-8 text nor NTP are dropped."""
        self.assertDroppedThenServed(harness(), b"\xc3\x28time", "dropped-malformed")

    def test_privileged_source_ports(self) -> None:
        """Requests from ports 53, 123 and 0 are ignored (reflection guard)."""
        for port in (53, 123, 0, 1023):
            for request in (ntp(), b"", b"time"):
                with self.subTest(port=port, request=request[:4]):
                    h = harness()
                    self.assertDroppedThenServed(
                        h, request, "dropped-privileged-port", ("127.0.0.1", port)
                    )

    def test_send_failure(self) -> None:
        """ENOBUFS while sending is counted, not raised."""
        h = harness()

        def refuse(packet: bytes, addr: object) -> None:
            raise OSError(errno.ENOBUFS, "No buffer space available")

        h.transport.write = refuse  # type: ignore[method-assign]
        h.responder.datagramReceived(ntp(), CLIENT)
        self.assertEqual(h.responder.counters["send-failed"], 1)


class RateLimitTests(TestCase):
    def test_flood_from_one_source(self) -> None:
        """A flooder gets its burst, one KoD, then silence; others are served."""
        h = harness(rate=1.0, burst=5, leak=0, kod_rate=1.0)
        replies = [h.send(ntp()) for _ in range(1000)]
        answered = [r[0] for r in replies if r]
        self.assertEqual(len(answered), 6)
        kods = [r for r in answered if NTPPacket.parse(r).stratum == 0]
        self.assertEqual(len(kods), 1)
        self.assertEqual(NTPPacket.parse(kods[0]).reference_id, b"RATE")
        self.assertEqual(h.responder.counters["dropped-rate-limit"], 994)
        self.assertEqual(len(h.send(ntp(), OTHER)), 1)
        # The bucket refills at its rate.
        h.reactor.advance(1.0)
        self.assertEqual(NTPPacket.parse(h.send(ntp())[0]).stratum, 10)

    def test_text_and_rfc868_over_limit_get_silence(self) -> None:
        """Only NTP clients are sent a KoD; other kinds over the limit get nothing."""
        h = harness(rate=1.0, burst=1, leak=0)
        self.assertEqual(len(h.send(b"time")), 1)
        self.assertEqual([h.send(b"time"), h.send(b"")], [[], []])
        self.assertEqual(h.responder.counters["kod-sent"], 0)

    def test_kod_at_most_occasionally(self) -> None:
        """Over 10 s of flooding at most kod_rate KoDs a second are sent."""
        h = harness(rate=0.001, burst=1, leak=0, kod_rate=0.5)
        for _ in range(100):
            for _ in range(100):
                h.send(ntp())
            h.reactor.advance(0.1)
        self.assertLessEqual(h.responder.counters["kod-sent"], 1 + 10 * 0.5)
        self.assertGreaterEqual(h.responder.counters["kod-sent"], 2)

    def test_leak_keeps_a_spoofed_victim_served(self) -> None:
        """A flood in the victim's name cannot stop every reply to the victim."""
        h = harness(rate=1.0, burst=1, leak=8, kod_rate=0)
        assert h.responder.limiter is not None
        h.responder.limiter.random = random.Random(4)
        answered = sum(len(h.send(ntp())) for _ in range(8000))
        self.assertTrue(800 < answered < 1200, answered)

    def test_spoofed_sources_keep_table_bounded(self) -> None:
        """100,000 spoofed sources never grow the table past max_sources."""
        h = harness(rate=1.0, burst=2, max_sources=1000)
        assert h.responder.limiter is not None
        for number in range(100_000):
            source = (f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}", 5000)
            h.responder.datagramReceived(ntp(), source)
        self.assertEqual(len(h.responder.limiter), 1000)
        self.assertEqual(h.responder.counters["answered-ntp"], 100_000)
        self.assertEqual(len(h.send(ntp(), OTHER)), 1)

    def test_global_ceiling(self) -> None:
        """Spoofed sources together cannot exceed the global ceiling."""
        h = harness(rate=10.0, burst=10, global_rate=100.0)
        for number in range(5000):
            h.responder.datagramReceived(
                ntp(), (f"10.0.{number >> 8}.{number & 255}", 5000)
            )
        self.assertEqual(h.responder.counters["answered-ntp"], 100)
        self.assertEqual(h.responder.counters["dropped-global-limit"], 4900)

    def test_global_ceiling_without_per_source_limit(self) -> None:
        """rate = 0 turns per-source limits off but keeps the global ceiling."""
        h = harness(rate=0.0, global_rate=50.0)
        self.assertIsNone(h.responder.limiter)
        answered = sum(len(h.send(ntp())) for _ in range(200))
        self.assertEqual(answered, 50)

    def test_no_limits(self) -> None:
        """With every limit off, a source is always answered."""
        h = harness(rate=0.0, global_rate=0.0)
        self.assertEqual(sum(len(h.send(b"")) for _ in range(2000)), 2000)

    def test_reconfigure_keeps_buckets(self) -> None:
        """A reload changing the rate keeps the sources' state (no free burst)."""
        h = harness(rate=1.0, burst=2, leak=0, kod_rate=0)
        h.send(ntp())
        h.send(ntp())
        h.responder.configure(TimeSection(rate=1.0, burst=3, leak=0, kod_rate=0))
        self.assertEqual(h.send(ntp()), [])


class EraTests(TestCase):
    def test_ntp_across_2036(self) -> None:
        """At the 2036 wrap NTP timestamps restart from 0 and read back as 2036."""
        wrap = ((1 << 32) - NTP_UNIX_OFFSET) * NS
        for instant in (wrap - NS, wrap, wrap + 3 * NS):
            h = harness(now=instant)
            packet = NTPPacket.parse(h.send(ntp())[0])
            self.assertEqual(ntp_to_unix_ns(packet.transmit_time, instant), instant)
        self.assertEqual(NTPPacket.parse(h.send(ntp())[0]).transmit_time >> 32, 3)

    def test_rfc868_across_2036(self) -> None:
        """RFC 868's 32-bit count wraps to 0 and a reader with a 2036 clock copes."""
        wrap_s = (1 << 32) - NTP_UNIX_OFFSET
        h = harness(now=(wrap_s + 2) * NS)
        (reply,) = h.send(b"")
        self.assertEqual(reply, (2).to_bytes(4, "big"))
        self.assertEqual(rfc868_to_unix(reply, wrap_s), wrap_s + 2)


class CountersTests(TestCase):
    def test_take_counters_resets(self) -> None:
        """take_counters returns the counts and starts from zero again."""
        h = harness()
        h.send(b"")
        h.send(b"\xff")
        taken = h.responder.take_counters()
        self.assertEqual(taken["answered-rfc868"], 1)
        self.assertEqual(taken["dropped-malformed"], 1)
        self.assertEqual(set(h.responder.counters.values()), {0})
        self.assertEqual(tuple(taken), COUNTERS)

    def test_log_event(self) -> None:
        """The counters are logged with an event name and every count."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        counters = dict.fromkeys(COUNTERS, 0)
        counters["answered-ntp"] = 3
        log_counters(counters, 60.0, 0)
        (event,) = [e for e in events if e.get("event") == "time.counters"]
        self.assertEqual(event["counters"]["answered-ntp"], 3)
        self.assertEqual(event["summary"], "answered-ntp 3")


class Receiver(DatagramProtocol):
    """A loopback client that queues what it receives."""

    def __init__(self) -> None:
        self.replies: defer.DeferredQueue[bytes] = defer.DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.replies.put(data)


def config_for(testcase: TestCase, text: str = "") -> NetlabConfig:
    directory = temporary_directory(testcase)
    document: dict[str, Any] = {
        "netlab": {"state_directory": str(directory / "state")},
        "time": {"endpoint": "udp:0:interface=127.0.0.1", "leap": "none"},
    }
    return from_mapping(document, base_directory=directory)


class LoopbackTests(TestCase):
    """The service on a real socket: sizes are preserved end to end."""

    def setUp(self) -> None:
        self.service = TimeService(config_for(self), reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.address = self.service.listening_address
        self.receiver = Receiver()
        self.client = reactor.listenUDP(0, self.receiver, interface="127.0.0.1")
        self.addCleanup(self.client.stopListening)
        # The kernel must accept a 65507-byte datagram from us.
        sock = self.client.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

    def send(self, data: bytes) -> None:
        self.client.write(data, (self.address.host, self.address.port))

    @defer.inlineCallbacks
    def test_answers_ntp(self) -> Any:
        """A real socket gets an SNTP reply echoing its transmit timestamp."""
        request = client_request(INSTANT)
        self.send(request)
        reply = yield self.receiver.replies.get().addTimeout(5, reactor)
        self.assertEqual(reply[24:32], request[40:48])

    @defer.inlineCallbacks
    def test_oversize_not_truncated(self) -> Any:
        """8193- and 65507-byte NTP requests arrive whole and are dropped.

        Twisted's default maxPacketSize (8192) silently truncates: the
        responder must see every byte, and answer only the next small request.
        """
        responder = self.service.responder
        sizes: list[int] = []

        def arrived(data: bytes, addr: Any, receive_ns: int) -> None:
            sizes.append(len(data))
            TimeResponder.datagram_arrived(responder, data, addr, receive_ns)

        responder.datagram_arrived = arrived  # type: ignore[method-assign]
        for size in (8193, 65507):
            self.send(client_request(INSTANT) + bytes(size - 48))
        marker = client_request(INSTANT + 1)
        self.send(marker)
        reply = yield self.receiver.replies.get().addTimeout(5, reactor)
        self.assertEqual(reply[24:32], marker[40:48])
        self.assertEqual(sizes, [8193, 65507, 48])
        self.assertEqual(self.service.responder.counters["dropped-oversize"], 2)
        self.assertEqual(self.service.responder.counters["answered-ntp"], 1)

    @defer.inlineCallbacks
    def test_receive_timestamp_from_kernel(self) -> Any:
        """The receive timestamp is the kernel's arrival time, not a later read.

        The responder's own clock is set to 1990 here: the receive timestamp
        must still be the real time of arrival, the transmit one from 1990.
        """
        fake = 631_152_000 * NS
        self.service.responder.clock = lambda: fake
        before = time.time_ns()
        self.send(client_request(INSTANT))
        reply = yield self.receiver.replies.get().addTimeout(5, reactor)
        packet = NTPPacket.parse(reply)
        received = ntp_to_unix_ns(packet.receive_time, before)
        self.assertTrue(before <= received <= time.time_ns())
        self.assertEqual(packet.transmit_time, ntp_timestamp(fake))

    def test_packet_size_above_maximum_udp_payload(self) -> None:
        """The service reads up to more than the largest UDP payload (65507)."""
        self.assertGreater(TimeService.max_packet_size, 65507)


class ConfigTests(TestCase):
    def load(self, table: dict[str, Any]) -> NetlabConfig:
        directory = temporary_directory(self)
        return from_mapping({"time": table}, base_directory=directory)

    def test_reference_id_forms(self) -> None:
        """A reference id is up to 4 capitals/digits (NUL padded) or an IPv4 address."""
        self.assertEqual(self.load({"reference_id": "GPS"}).time.reference_id, b"GPS\0")
        self.assertEqual(
            self.load({"reference_id": "192.0.2.1"}).time.reference_id,
            b"\xc0\x00\x02\x01",
        )

    def test_bad_values_are_refused(self) -> None:
        """Bad reference ids, formats, strata and worker counts stop the load."""
        for key, value in (
            ("reference_id", "gps!"),
            ("reference_id", "300.1.1.1"),
            ("text_format", ""),
            ("text_format", "%c" * 50),
            ("stratum", 0),
            ("stratum", 16),
            ("workers", 0),
            ("leap", "maybe"),
            ("rate", -1),
        ):
            with self.subTest(key=key, value=value):
                error = self.assertRaises(ConfigError, self.load, {key: value})
                self.assertIn(f"[time] {key}:", str(error))


class _SignalRecorder:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ReconfigureTests(TestCase):
    def config(self, **time_settings: Any) -> NetlabConfig:
        directory = temporary_directory(self)
        return from_mapping(
            {"netlab": {"state_directory": str(directory)}, "time": time_settings},
            base_directory=directory,
        )

    def test_live_keys_apply_and_workers_need_restart(self) -> None:
        """A reload applies the live keys, reports workers, and signals the workers."""
        service = TimeService(self.config(text_format="%Y"), MemoryReactorClock())
        worker = WorkerProcess(1)
        recorder = _SignalRecorder()
        worker.transport = recorder  # type: ignore[assignment]
        service.workers.append(worker)
        restart = service.reconfigure(self.config(text_format="%m", workers=2))
        self.assertEqual(list(restart), ["[time] workers"])
        self.assertEqual(service.responder.text_format, "%m")
        self.assertEqual(recorder.signals, ["HUP"])

    def test_every_time_key_but_three_is_live(self) -> None:
        """enabled, endpoint and workers need a restart; the rest reload."""
        from netlab.config import keys

        restart_only = {info.name for info in keys("time") if not info.live}
        self.assertEqual(restart_only, {"enabled", "endpoint", "workers"})


class IPv6LoopbackTests(TestCase):
    @defer.inlineCallbacks
    def test_answers_over_ipv6(self) -> Any:
        """An endpoint on ::1 answers IPv6 clients (addresses as (host, port))."""
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        directory = temporary_directory(self)
        config = from_mapping(
            {
                "netlab": {"state_directory": str(directory)},
                "time": {"endpoint": "udp:0:interface=\\:\\:1"},
            },
            base_directory=directory,
        )
        service = TimeService(config, reactor)
        try:
            service.privilegedStartService()
        except ServiceStartError as error:
            self.skipTest(f"cannot bind ::1 here: {error}")
        self.addCleanup(service.stopService)
        service.startService()
        receiver = Receiver()
        client = reactor.listenUDP(0, receiver, interface="::1")
        self.addCleanup(client.stopListening)
        client.write(b"unix", ("::1", service.listening_address.port))
        reply = yield receiver.replies.get().addTimeout(5, reactor)
        self.assertRegex(reply, rb"^\d+\.\d{6}$")


class WorkerLogTests(TestCase):
    def test_worker_json_lines_are_published(self) -> None:
        """A worker's JSON log lines, split anywhere, become events in the daemon."""
        from twisted.logger import eventAsJSON

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        line = eventAsJSON(
            {
                "log_format": "hello {who}",
                "who": "daemon",
                "event": "time.test",
                "log_namespace": "netlab.time",
                "log_time": 1.0,
            }
        ).encode()
        worker = WorkerProcess(2)
        worker.outReceived(line[:10])
        worker.outReceived(line[10:] + b"\nnot json\n")
        relayed = [e for e in events if e.get("event") == "time.test"]
        self.assertEqual([e["who"] for e in relayed], ["daemon"])
        (raw,) = [e for e in events if e.get("event") == "time.worker.output"]
        self.assertEqual((raw["index"], raw["line"]), (2, "not json"))


class _RefusingSocket:
    def __init__(self, error: OSError) -> None:
        self.error = error

    def sendto(self, data: bytes, addr: Any) -> int:
        raise self.error


class TimestampingPortWriteTests(TestCase):
    def port(self, error: OSError) -> TimestampingPort:
        port = TimestampingPort(0, DatagramProtocol(), "127.0.0.1", 65536, reactor)
        port.socket = _RefusingSocket(error)
        return port

    def test_icmp_refusal_ignored(self) -> None:
        """A pending ICMP error from an earlier reply does not fail the next one."""
        self.port(ConnectionRefusedError(errno.ECONNREFUSED, "refused")).write(
            b"x", CLIENT
        )

    def test_other_errors_reach_the_responder(self) -> None:
        """ENOBUFS propagates, so the responder can count it."""
        port = self.port(OSError(errno.ENOBUFS, "No buffer space available"))
        self.assertRaises(OSError, port.write, b"x", CLIENT)


class _ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock that records spawnProcess calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[WorkerProcess, list[str], dict[int, Any]]] = []

    def spawnProcess(  # type: ignore[override]
        self, protocol: WorkerProcess, executable: str, args: list[str], **kw: Any
    ) -> None:
        protocol.transport = _SignalRecorder()  # type: ignore[assignment]
        self.spawned.append((protocol, args, kw["childFDs"]))


class WorkerRestartTests(TestCase):
    """A worker that dies is started again, later each time it dies early."""

    def setUp(self) -> None:
        directory = temporary_directory(self)
        config = from_mapping(
            {"netlab": {"state_directory": str(directory)}, "time": {"workers": 2}},
            base_directory=directory,
        )
        self.reactor = _ProcessReactor()
        self.service = TimeService(config, self.reactor)
        self.sockets: list[socket.socket] = []

        def new_socket() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sockets.append(sock)
            return sock

        self.service.new_worker_socket = new_socket
        self.service.running = True
        self.service.spawn_worker(1, new_socket())

    def die(self, after: float) -> WorkerProcess:
        """The newest worker runs ``after`` seconds, then is killed."""
        worker = self.reactor.spawned[-1][0]
        self.reactor.advance(after)
        worker.processEnded(Failure(ProcessTerminated(signal=9)))
        return worker

    def test_restart_backs_off_then_resets(self) -> None:
        """Early deaths double the delay up to its cap; a worker that ran
        long enough is restarted after the first delay again; each new
        worker gets a socket of its own, closed here once passed on."""
        delays = []
        for _ in range(9):
            self.die(after=0.5)
            self.assertEqual(self.service.workers, [])
            spawned = len(self.reactor.spawned)
            waited = 0.0
            while len(self.reactor.spawned) == spawned:
                self.reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.die(after=STABLE_RUN)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 11)
        [worker] = self.service.workers
        self.assertEqual(worker.index, 1)
        self.assertEqual(self.reactor.spawned[-1][1][-2:], ["--index", "1"])
        self.assertTrue(all(sock.fileno() == -1 for sock in self.sockets))
        self.assertEqual(RESTART_DELAY_MAX, 60)

    def test_no_restart_once_stopping(self) -> None:
        """Stopping cancels a pending restart, and workers that end while the
        service stops stay ended."""
        self.die(after=1.0)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.service.stopService()
        self.assertEqual(
            [call for call in self.reactor.getDelayedCalls() if call.active()], []
        )
        self.reactor.advance(120)
        self.assertEqual(len(self.reactor.spawned), 1)
