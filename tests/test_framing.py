"""Tests for netlab.framing: the linear-time Int32StringReceiver and frame writers."""

from __future__ import annotations

import io
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import TestCase

from netlab.framing import (
    DataFrameBuffer,
    FrameReceiver,
    FrameTooLarge,
    encode_data_frame,
    encode_frame,
    frame_header,
    writes_consumed_at_once,
)


class Collector(FrameReceiver):
    MAX_LENGTH = 1000

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def stringReceived(self, string: bytes) -> None:
        self.frames.append(string)


def connected() -> tuple[Collector, StringTransport]:
    receiver = Collector()
    transport = StringTransport()
    receiver.makeConnection(transport)
    return receiver, transport


class FrameReceiverTests(TestCase):
    """Frames are cut correctly however the bytes arrive, and limits hold."""

    def test_split_at_every_offset(self) -> None:
        """Every way of splitting a stream in two delivers the same frames."""
        payloads = [b"", b"a", b"hello world", bytes(range(256)) * 3]
        stream = b"".join(encode_frame(p) for p in payloads)
        for cut in range(len(stream) + 1):
            receiver, _ = connected()
            receiver.dataReceived(stream[:cut])
            receiver.dataReceived(stream[cut:])
            self.assertEqual(receiver.frames, payloads, f"split at {cut}")
            self.assertEqual(receiver.buffered, 0)

    def test_one_byte_at_a_time(self) -> None:
        """A stream fed one byte per read still yields every frame."""
        payloads = [b"x" * 300, b"", b"yz"]
        receiver, _ = connected()
        for byte in b"".join(encode_frame(p) for p in payloads):
            receiver.dataReceived(bytes([byte]))
        self.assertEqual(receiver.frames, payloads)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.binary(max_size=1000), max_size=8),
        st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=30),
        st.booleans(),
    )
    def test_arbitrary_chunking(
        self, payloads: list[bytes], sizes: list[int], views: bool
    ) -> None:
        """Any chunking of any frame sequence delivers exactly those frames,
        as bytes, whether the reads are bytes or views of a scratch buffer
        (as netlab's TLS transport hands them over) that is then wiped."""
        stream = b"".join(encode_frame(p) for p in payloads)
        receiver, _ = connected()
        position = 0
        index = 0
        while position < len(stream):
            size = sizes[index % len(sizes)]
            read = stream[position : position + size]
            if views:
                scratch = bytearray(read)
                receiver.dataReceived(memoryview(scratch))
                # A view is only valid until the frames it completes are out.
                if not receiver.buffered:
                    scratch[:] = bytes(len(scratch))
            else:
                receiver.dataReceived(read)
            position += size
            index += 1
        self.assertEqual(receiver.frames, payloads)
        self.assertTrue(all(type(frame) is bytes for frame in receiver.frames))

    def test_largest_prefix_disconnects_without_buffering(self) -> None:
        """A 0xFFFFFFFF length prefix drops the connection and keeps nothing."""
        receiver, transport = connected()
        with capturedLogs() as events:
            receiver.dataReceived(b"\xff\xff\xff\xff" + b"x" * 100)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(receiver.buffered, 0)
        self.assertEqual(receiver.frames, [])
        [event] = [e for e in events if e.get("event") == "netlab.frame.too_large"]
        self.assertEqual(event["length"], 0xFFFFFFFF)
        self.assertEqual(event["log_level"], LogLevel.warn)
        # Nothing more is parsed after the refusal.
        receiver.dataReceived(encode_frame(b"late"))
        self.assertEqual(receiver.frames, [])

    def test_one_over_the_limit(self) -> None:
        """MAX_LENGTH is accepted, MAX_LENGTH + 1 refused."""
        receiver, transport = connected()
        receiver.dataReceived(encode_frame(b"a" * 1000))
        self.assertEqual(len(receiver.frames), 1)
        self.assertFalse(transport.disconnecting)
        receiver.dataReceived(frame_header(1001))
        self.assertTrue(transport.disconnecting)

    def test_pause_holds_frames(self) -> None:
        """While paused no frame is delivered; resuming delivers the queued ones."""
        receiver, _ = connected()
        receiver.pauseProducing()
        receiver.dataReceived(encode_frame(b"one") + encode_frame(b"two"))
        self.assertEqual(receiver.frames, [])
        receiver.resumeProducing()
        self.assertEqual(receiver.frames, [b"one", b"two"])

    def test_send_string_respects_peer_limit(self) -> None:
        """sendString refuses a frame larger than the peer announced."""
        receiver, transport = connected()
        receiver.peer_max_length = 4
        receiver.sendString(b"abcd")
        self.assertEqual(transport.value(), struct.pack(">I", 4) + b"abcd")
        self.assertRaises(FrameTooLarge, receiver.sendString, b"abcde")


class WriterTests(TestCase):
    """Frames written by the helpers are what the receiver expects."""

    def test_reused_data_frame_buffer(self) -> None:
        """With reuse, each frame is a view of the one buffer: the same bytes
        as a copied frame, overwritten by the next fill."""
        source = io.BytesIO(b"0123456789")
        buffer = DataFrameBuffer(4, reuse=True)
        frame, size = buffer.fill(source.readinto)
        self.assertIsInstance(frame, memoryview)
        self.assertEqual((bytes(frame), size), (encode_data_frame(b"0123"), 4))
        second, _ = buffer.fill(source.readinto)
        self.assertEqual(bytes(frame), encode_data_frame(b"4567"))
        self.assertEqual(bytes(second), encode_data_frame(b"4567"))

    def test_plain_transports_keep_what_they_are_given(self) -> None:
        """A TCP-like transport may keep a written object: frames are copies."""
        self.assertFalse(writes_consumed_at_once(StringTransport()))
        self.assertFalse(writes_consumed_at_once(None))

    def test_data_frame_buffer(self) -> None:
        """A reused buffer yields consecutive data frames, then EOF."""
        source = io.BytesIO(b"0123456789")
        buffer = DataFrameBuffer(4)
        frames = []
        while True:
            frame, size = buffer.fill(source.readinto)
            if not size:
                break
            frames.append(frame)
        self.assertEqual(
            frames,
            [
                encode_data_frame(b"0123"),
                encode_data_frame(b"4567"),
                encode_data_frame(b"89"),
            ],
        )

    def test_data_frame_layout(self) -> None:
        """A data frame is length (payload + 1), 0x00, payload."""
        self.assertEqual(encode_data_frame(b"ab"), b"\x00\x00\x00\x03\x00ab")
