"""Tests for netlab.time.proto: timestamps, eras, NTP packets, classification, text."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from netlab.time.proto import (
    DEFAULT_TEXT_FORMAT,
    MAX_DATAGRAM,
    MODE_CLIENT,
    MODE_SERVER,
    NTP_UNIX_OFFSET,
    Drop,
    MalformedReply,
    NTPDrop,
    NTPPacket,
    RequestKind,
    ServerState,
    check_client_request,
    classify,
    client_request,
    kiss_of_death,
    measure_precision,
    ntp_timestamp,
    ntp_to_unix_ns,
    rfc868_bytes,
    rfc868_to_unix,
    server_reply,
    short_format,
    text_reply,
)

NS = 1_000_000_000
#: 2036-02-07T06:28:16Z: the first instant of NTP era 1 (seconds field wraps).
ERA_1_UNIX = (1 << 32) - NTP_UNIX_OFFSET

STATE = ServerState(
    leap=0,
    stratum=3,
    precision=-20,
    root_delay=0,
    root_dispersion=short_format(0.5),
    reference_id=b"GPS\0",
    reference_time=ntp_timestamp(1_700_000_000 * NS),
)

#: Unix times from 1970 to well past the 2036 wrap (up to 2100).
unix_ns = st.integers(min_value=0, max_value=4_102_444_800 * NS)


def request_with(transmit: bytes, first: int = 0x23, poll: int = 6) -> bytes:
    """A 48-byte client request with raw transmit timestamp bytes."""
    return bytes([first, 0, poll, 0]) + bytes(36) + transmit


class TimestampTests(TestCase):
    def test_unix_epoch(self) -> None:
        """1970-01-01 is 2208988800 seconds into NTP era 0, no fraction."""
        self.assertEqual(ntp_timestamp(0), NTP_UNIX_OFFSET << 32)

    def test_fraction(self) -> None:
        """Half a second is 2**31 in the fraction field."""
        self.assertEqual(ntp_timestamp(NS // 2) & 0xFFFFFFFF, 1 << 31)

    def test_era_wrap(self) -> None:
        """At 2036-02-07T06:28:16Z the 64-bit timestamp wraps to zero."""
        self.assertEqual(ntp_timestamp(ERA_1_UNIX * NS), 0)
        self.assertEqual(ntp_timestamp((ERA_1_UNIX - 1) * NS) >> 32, 0xFFFFFFFF)

    @given(
        unix_ns, st.integers(min_value=-(60 * 365 * 86400), max_value=60 * 365 * 86400)
    )
    def test_round_trip_with_nearby_pivot(self, instant: int, skew_s: int) -> None:
        """Any instant reads back within 1 ns given a pivot within 60 years of it."""
        pivot = instant + skew_s * NS
        self.assertLessEqual(
            abs(ntp_to_unix_ns(ntp_timestamp(instant), pivot) - instant), 1
        )

    def test_era_1_read_with_2036_pivot(self) -> None:
        """Just after the wrap, a small timestamp reads as 2036, not 1900."""
        after = (ERA_1_UNIX + 10) * NS
        self.assertEqual(ntp_to_unix_ns(ntp_timestamp(after), after), after)
        self.assertLess(ntp_timestamp(after), 11 << 32)

    def test_short_format_saturates(self) -> None:
        """Root delay/dispersion are 16.16 seconds, clamped to the field."""
        self.assertEqual(short_format(1.5), 0x18000)
        self.assertEqual(short_format(-1), 0)
        self.assertEqual(short_format(1e9), 0xFFFFFFFF)

    def test_precision_of_a_microsecond_clock(self) -> None:
        """A clock that steps by 1 us has precision 2**-19 s (1.9 us >= 1 us)."""
        ticks = iter(range(0, 10**9, 1000))
        self.assertEqual(measure_precision(lambda: next(ticks)), -19)

    def test_precision_of_the_real_clock(self) -> None:
        """The host clock's measured precision is within NTP's sane range."""
        self.assertTrue(-30 <= measure_precision(time.time_ns) <= -6)


class RFC868Tests(TestCase):
    def test_epoch(self) -> None:
        """1970-01-01 is 2208988800 seconds after 1900, big-endian."""
        self.assertEqual(rfc868_bytes(0), (2_208_988_800).to_bytes(4, "big"))

    def test_2036_wrap(self) -> None:
        """The 32-bit count wraps in 2036 and reads back with a nearby pivot."""
        after = ERA_1_UNIX + 5
        self.assertEqual(rfc868_bytes(after * NS), (5).to_bytes(4, "big"))
        self.assertEqual(rfc868_to_unix(rfc868_bytes(after * NS), after), after)
        before = ERA_1_UNIX - 5
        self.assertEqual(rfc868_to_unix(rfc868_bytes(before * NS), after), before)

    @given(unix_ns)
    def test_round_trip(self, instant: int) -> None:
        """Every second from 1970 to 2100 survives the 4-byte format."""
        seconds = instant // NS
        self.assertEqual(rfc868_to_unix(rfc868_bytes(instant), seconds + 1000), seconds)

    def test_wrong_length(self) -> None:
        """A reply that is not 4 bytes is refused."""
        self.assertRaises(MalformedReply, rfc868_to_unix, b"\0\0\0", 0)


class NTPPacketTests(TestCase):
    def test_parse_too_short(self) -> None:
        """47 bytes are not an NTP packet."""
        self.assertRaises(MalformedReply, NTPPacket.parse, bytes(47))

    @given(st.binary(min_size=48, max_size=48))
    def test_parse_build_round_trip(self, data: bytes) -> None:
        """Any 48 bytes parse and build back to the same bytes."""
        self.assertEqual(NTPPacket.parse(data).to_bytes(), data)

    def test_client_request(self) -> None:
        """A client request is version 4, mode 3, with our transmit timestamp."""
        packet = NTPPacket.parse(client_request(123 * NS))
        self.assertEqual((packet.version, packet.mode), (4, MODE_CLIENT))
        self.assertEqual(packet.transmit_time, ntp_timestamp(123 * NS))


class ServerReplyTests(TestCase):
    @given(
        st.binary(min_size=8, max_size=8),
        st.integers(min_value=1, max_value=4),
        st.integers(min_value=0, max_value=255),
        st.binary(max_size=68),
    )
    def test_originate_echoed_bit_exact(
        self, transmit: bytes, version: int, poll: int, extension: bytes
    ) -> None:
        """The request's transmit bytes come back as the originate, whatever they are.

        Version and poll are copied too, and extension fields are ignored.
        """
        request = request_with(transmit, (version << 3) | MODE_CLIENT, poll) + extension
        self.assertIsNone(check_client_request(request))
        reply = server_reply(request, STATE, 77, lambda: 5 * NS)
        self.assertEqual(len(reply), 48)
        self.assertEqual(reply[24:32], transmit)
        packet = NTPPacket.parse(reply)
        self.assertEqual(packet.version, version)
        self.assertEqual(packet.poll & 0xFF, poll)

    def test_reply_fields(self) -> None:
        """Mode 4, the state's fields, receive as given, transmit from the clock."""
        packet = NTPPacket.parse(
            server_reply(request_with(b"abcdefgh"), STATE, 12345, lambda: 9 * NS)
        )
        self.assertEqual(packet.mode, MODE_SERVER)
        self.assertEqual(packet.leap, 0)
        self.assertEqual(packet.stratum, 3)
        self.assertEqual(packet.precision, -20)
        self.assertEqual(packet.root_dispersion, short_format(0.5))
        self.assertEqual(packet.reference_id, b"GPS\0")
        self.assertEqual(packet.reference_time, STATE.reference_time)
        self.assertEqual(packet.receive_time, 12345)
        self.assertEqual(packet.transmit_time, ntp_timestamp(9 * NS))

    def test_modes_other_than_client(self) -> None:
        """Modes 0, 1, 2, 4, 5, 6 and 7 are not requests to answer."""
        for mode in (0, 1, 2, 4, 5, 6, 7):
            with self.subTest(mode=mode):
                request = request_with(bytes(8), (4 << 3) | mode)
                self.assertEqual(check_client_request(request), NTPDrop.NOT_CLIENT)

    def test_versions_out_of_range(self) -> None:
        """Versions 0, 5, 6 and 7 are refused; 1 to 4 accepted."""
        for version in (0, 5, 6, 7):
            with self.subTest(version=version):
                request = request_with(bytes(8), (version << 3) | MODE_CLIENT)
                self.assertEqual(check_client_request(request), NTPDrop.BAD_VERSION)
        for version in (1, 2, 3, 4):
            request = request_with(bytes(8), (version << 3) | MODE_CLIENT)
            self.assertIsNone(check_client_request(request))

    def test_kiss_of_death(self) -> None:
        """A RATE kiss: stratum 0, leap 3, code as reference id, originate echoed."""
        request = request_with(b"12345678")
        reply = kiss_of_death(request, b"RATE", 1, lambda: 2 * NS)
        packet = NTPPacket.parse(reply)
        self.assertEqual((packet.stratum, packet.leap), (0, 3))
        self.assertEqual(packet.reference_id, b"RATE")
        self.assertEqual(reply[24:32], b"12345678")
        self.assertLessEqual(len(reply), len(request))


class ClassifyTests(TestCase):
    def test_empty_is_rfc868(self) -> None:
        """An empty datagram asks for RFC 868 time."""
        self.assertEqual(classify(b""), RequestKind.RFC868)

    def test_text(self) -> None:
        """Printable UTF-8, with a trailing newline, is a text command."""
        self.assertEqual(classify(b"time"), RequestKind.TEXT)
        self.assertEqual(classify("时间\n".encode()), RequestKind.TEXT)

    def test_ntp(self) -> None:
        """A binary datagram of 48 bytes or more is NTP."""
        self.assertEqual(classify(client_request(0)), RequestKind.NTP)

    def test_short_binary(self) -> None:
        """A 47-byte NTP-looking datagram is dropped as malformed."""
        self.assertEqual(classify(client_request(0)[:47]), Drop.MALFORMED)

    def test_invalid_utf8(self) -> None:
        """Invalid UTF-8 is not text; short, it is dropped."""
        self.assertEqual(classify(b"\xff\xfe time"), Drop.MALFORMED)
        self.assertEqual(classify(b"ti\xc3me"), Drop.MALFORMED)

    def test_control_characters(self) -> None:
        """ANSI escapes, NUL and C1 controls make a datagram binary, not text."""
        self.assertEqual(classify(b"\x1b[31mtime"), Drop.MALFORMED)
        self.assertEqual(classify(b"time\x00"), Drop.MALFORMED)
        self.assertEqual(classify("time\x9b".encode()), Drop.MALFORMED)

    def test_oversize(self) -> None:
        """Anything over 1200 bytes is dropped, text or NTP."""
        self.assertEqual(classify(b"t" * (MAX_DATAGRAM + 1)), Drop.OVERSIZE)
        self.assertEqual(classify(client_request(0) + bytes(65507 - 48)), Drop.OVERSIZE)
        self.assertEqual(classify(b"t" * MAX_DATAGRAM), RequestKind.TEXT)

    @given(st.binary(max_size=1300))
    def test_total(self, data: bytes) -> None:
        """Every datagram is classified without an exception."""
        classify(data)


class TextTests(TestCase):
    INSTANT = 1_795_272_566 * NS + 5_245_000  # 2026-11-21T14:49:26.005245Z

    def test_time_and_anything_else(self) -> None:
        """``time`` and unknown text get the configured strftime, in local time."""
        expected = time.strftime(DEFAULT_TEXT_FORMAT, time.localtime(1_795_272_566))
        for command in ("time", "TIME\n", "你好吗", "what time is it?", " "):
            with self.subTest(command=command):
                self.assertEqual(
                    text_reply(command, self.INSTANT, DEFAULT_TEXT_FORMAT), expected
                )
        self.assertEqual(text_reply("time", self.INSTANT, "%Y"), "2026")

    def test_iso(self) -> None:
        """``iso`` is RFC 3339 UTC with microseconds."""
        self.assertEqual(
            text_reply("iso", self.INSTANT, DEFAULT_TEXT_FORMAT),
            "2026-11-21T14:49:26.005245Z",
        )

    def test_unix(self) -> None:
        """``unix`` is epoch seconds with 6 decimals."""
        self.assertEqual(
            text_reply("unix\r\n", self.INSTANT, DEFAULT_TEXT_FORMAT),
            "1795272566.005245",
        )

    def test_help(self) -> None:
        """``help`` lists every command."""
        reply = text_reply("help", self.INSTANT, DEFAULT_TEXT_FORMAT)
        for command in ("time", "iso", "unix", "help"):
            self.assertIn(f"  {command} ", reply)

    def test_iso_after_2036(self) -> None:
        """Text replies are not affected by the 32-bit wrap."""
        reply = text_reply("iso", (ERA_1_UNIX + 1) * NS, DEFAULT_TEXT_FORMAT)
        self.assertEqual(reply, "2036-02-07T06:28:17.000000Z")
        parsed = datetime.strptime(reply, "%Y-%m-%dT%H:%M:%S.%fZ")
        self.assertEqual(
            parsed.replace(tzinfo=timezone.utc).timestamp(), ERA_1_UNIX + 1
        )

    def test_reply_is_text(self) -> None:
        """Every reply is printable text under the datagram limit."""
        for command in ("time", "iso", "unix", "help"):
            reply = text_reply(command, self.INSTANT, DEFAULT_TEXT_FORMAT)
            self.assertLessEqual(len(reply.encode()), MAX_DATAGRAM)
            self.assertIsNone(re.search(r"[\x00-\x09\x0b-\x1f]", reply))
