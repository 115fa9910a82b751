"""Length-prefixed frames over TCP: a linear-time ``Int32StringReceiver``.

Every netlab TCP message is one frame: a 4-byte big-endian unsigned length,
then that many payload bytes (``docs/protocol.rst``).  Twisted's
``IntNStringReceiver.dataReceived`` joins the whole unprocessed buffer with
every read, so a frame much larger than one read (64 KiB over TCP, 16 KiB
over TLS) costs copying quadratic in its size.  :class:`FrameReceiver` keeps
the reads in a list and joins once per frame, with the same
``stringReceived`` / ``MAX_LENGTH`` / ``lengthLimitExceeded`` contract.

Senders use :func:`frame_header` / :func:`encode_frame`, or a
:class:`DataFrameBuffer` that reads file data straight into a reused buffer
behind the header (no per-frame header concatenation).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

log = Logger(namespace="netlab.framing")

_HEADER = struct.Struct(">I")

#: Size of the length prefix.
HEADER_SIZE = _HEADER.size

#: The largest length the prefix can express.
LARGEST_FRAME = 2**32 - 1

#: First payload byte of a data frame (control frames start with ``{``).
DATA_TYPE = b"\x00"


class FrameTooLarge(ValueError):
    """A frame would exceed the limit the receiving peer announced."""


def frame_header(length: int) -> bytes:
    """The 4-byte prefix of a frame whose payload is ``length`` bytes."""
    return _HEADER.pack(length)


def encode_frame(payload: bytes) -> bytes:
    """One whole frame: prefix and payload."""
    return _HEADER.pack(len(payload)) + payload


def encode_data_frame(payload: bytes) -> bytes:
    """One whole data frame carrying ``payload``."""
    return b"".join((_HEADER.pack(len(payload) + 1), DATA_TYPE, payload))


def peer_description(transport: Any) -> str:
    """``host:port`` of the peer of ``transport``, for log lines."""
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is None:
        return str(peer)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FrameReceiver(Int32StringReceiver):
    """``Int32StringReceiver`` that does a bounded amount of copying per byte.

    Reads are queued; a frame's payload is joined from them once, when the
    whole frame has arrived.  A length prefix above :attr:`MAX_LENGTH` calls
    :meth:`lengthLimitExceeded` before a single payload byte is buffered for
    it, and nothing more is parsed afterwards.  Pausing (``pauseProducing``)
    stops delivery between frames, as in Twisted's class.  The deprecated
    ``recvd`` attribute is not supported.

    Subclasses must set :attr:`MAX_LENGTH` (Twisted's default, 99,999 bytes,
    is an accident of history) and should set :attr:`peer_max_length` once
    the peer has said how large a frame it accepts.
    """

    #: The largest payload accepted from the peer.
    MAX_LENGTH: int = 0

    #: ``dataReceived`` takes any bytes-like object, not only ``bytes``, and
    #: keeps a read only until its frames are delivered as ``bytes``; the
    #: TLS transport (:mod:`netlab.tls`) then skips a copy per read.
    accepts_views = True

    # A TCP or TLS transport once connected (ITCPTransport, IProducer, abort).
    transport: Any

    #: The largest payload the peer accepts; :meth:`sendString` refuses more.
    peer_max_length: int = LARGEST_FRAME

    _chunks: deque[bytes | memoryview]
    _buffered: int = 0
    _head_offset: int = 0
    _expected: int | None = None
    _refused: bool = False

    def _ensure_queue(self) -> deque[bytes | memoryview]:
        try:
            return self._chunks
        except AttributeError:
            self._chunks = deque()
            return self._chunks

    def dataReceived(self, data: bytes | memoryview) -> None:
        """Queue ``data`` and deliver every complete frame."""
        if self._refused:
            return
        chunks = self._ensure_queue()
        if data:
            chunks.append(data)
            self._buffered += len(data)
        while not self.paused and not self._refused:
            expected = self._expected
            if expected is None:
                if self._buffered < HEADER_SIZE:
                    return
                (length,) = _HEADER.unpack(self._take(HEADER_SIZE))
                if length > self.MAX_LENGTH:
                    self._refused = True
                    self._discard()
                    self.lengthLimitExceeded(length)
                    return
                self._expected = expected = length
            if self._buffered < expected:
                return
            self._expected = None
            self.stringReceived(self._take(expected))

    def _take(self, size: int) -> bytes:
        """Remove and return the next ``size`` queued bytes (joined once)."""
        if size == 0:
            return b""
        chunks = self._chunks
        self._buffered -= size
        head = chunks[0] if chunks else b""
        start = self._head_offset
        available = len(head) - start
        if available > size:
            self._head_offset = start + size
            return bytes(head[start : start + size])
        if available == size:
            chunks.popleft()
            self._head_offset = 0
            return bytes(head if start == 0 else head[start:])
        pieces = [memoryview(head)[start:]]
        chunks.popleft()
        needed = size - available
        while needed:
            chunk = chunks[0]
            if len(chunk) > needed:
                pieces.append(memoryview(chunk)[:needed])
                self._head_offset = needed
                break
            pieces.append(memoryview(chunk))
            chunks.popleft()
            needed -= len(chunk)
        else:
            self._head_offset = 0
        return b"".join(pieces)

    def _discard(self) -> None:
        self._ensure_queue().clear()
        self._buffered = 0
        self._head_offset = 0
        self._expected = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet delivered as frames."""
        return self._buffered

    def lengthLimitExceeded(self, length: int) -> None:
        """Log one line and drop the connection; the payload is never buffered."""
        log.warn(
            "{peer} announced a {length}-byte frame, over the limit of {limit}; "
            "disconnecting",
            event="netlab.frame.too_large",
            peer=peer_description(self.transport),
            length=length,
            limit=self.MAX_LENGTH,
        )
        self.transport.loseConnection()

    def sendString(self, string: bytes) -> None:
        """Send one frame, refusing one larger than the peer accepts."""
        if len(string) > self.peer_max_length:
            raise FrameTooLarge(
                f"a {len(string)}-byte frame exceeds the peer's limit of "
                f"{self.peer_max_length} bytes"
            )
        self.transport.write(_HEADER.pack(len(string)) + string)


def writes_consumed_at_once(transport: Any) -> bool:
    """Whether ``transport.write`` is done with its argument when it returns.

    True for netlab's TLS transport (:class:`netlab.tls.BulkTLSProtocol`),
    which encrypts at once; a TCP transport keeps the object until the
    socket takes it.  Wrappers forward the attribute to what they wrap.
    """
    return bool(getattr(transport, "consumes_writes", False))


class DataFrameBuffer:
    """A reused buffer holding one data frame: prefix, type byte, payload.

    :meth:`fill` reads up to :attr:`capacity` payload bytes into the buffer
    with a ``readinto``-style function and returns the whole frame ready for
    ``transport.write``: no concatenation, and the transport, handed a single
    object, sends it without joining.  The buffer itself is allocated once
    per transfer.  The frame is a ``bytes`` copy unless ``reuse`` is set:
    then it is a view of the buffer itself, valid until the next ``fill``,
    for a transport that :func:`consumes its writes at once
    <writes_consumed_at_once>` (and nothing else keeping the frame).
    """

    def __init__(self, capacity: int, *, reuse: bool = False) -> None:
        if capacity < 1:
            raise ValueError("a data frame needs room for at least one byte")
        self.capacity = capacity
        self.reuse = reuse
        self._prefix = HEADER_SIZE + len(DATA_TYPE)
        self._buffer = bytearray(self._prefix + capacity)
        self._buffer[HEADER_SIZE : self._prefix] = DATA_TYPE
        self._payload = memoryview(self._buffer)[self._prefix :]

    def fill(
        self, readinto: Callable[[memoryview], int | None]
    ) -> tuple[bytes | memoryview, int]:
        """Read the next payload; return ``(frame, payload_size)`` (size 0 at EOF)."""
        size = readinto(self._payload) or 0
        if size == 0:
            return b"", 0
        _HEADER.pack_into(self._buffer, 0, size + len(DATA_TYPE))
        frame = memoryview(self._buffer)[: self._prefix + size]
        return (frame if self.reuse else bytes(frame)), size
