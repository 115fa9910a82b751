"""The time service's wire formats, without any I/O: SNTPv4, RFC 868 and text.

One UDP port carries three kinds of request, told apart by :func:`classify`:

* an **empty** datagram asks for RFC 868 time: 4 bytes, big-endian seconds
  since 1900-01-01 UTC, modulo 2**32 (the count wraps in February 2036; a
  reader takes the era nearest its own clock, as RFC 4330 does for NTP);
* **text** (valid UTF-8 without control characters other than tab, CR and
  LF) is a command: ``time``, ``iso``, ``unix`` or ``help``; anything else is
  answered like ``time``, because the lessons' clients send arbitrary text;
* any other datagram of at least 48 bytes is an **NTP** packet; only client
  requests (mode 3, version 1 to 4) are answered.  Shorter binary datagrams
  are dropped, as are datagrams over :data:`MAX_DATAGRAM`.

NTP timestamps are 64-bit fixed point (32 bits of seconds since the start of
the NTP era, 32 of fraction); netlab keeps time as integer Unix nanoseconds so
conversions are exact, and the era is chosen by the nearest pivot.  Everything
that reads a clock takes it as an argument, so tests can inject any instant.
"""

from __future__ import annotations

import enum
import math
import re
import struct
import time
from collections.abc import Callable
from datetime import datetime, timezone

import attrs

#: Seconds from 1900-01-01 (the NTP and RFC 868 epoch) to 1970-01-01.
NTP_UNIX_OFFSET = 2_208_988_800
_NS = 1_000_000_000
_OFFSET_NS = NTP_UNIX_OFFSET * _NS
_ERA = 1 << 64  # one NTP era in units of 2**-32 s
_MASK64 = _ERA - 1
_MASK32 = (1 << 32) - 1

#: No request or reply is larger than this: it fits any path without fragments.
MAX_DATAGRAM = 1200
#: The size of an NTP header without extension fields.
NTP_HEADER_SIZE = 48

MODE_CLIENT = 3
MODE_SERVER = 4
LEAP_NONE = 0
LEAP_INSERT = 1
LEAP_DELETE = 2
LEAP_UNSYNCHRONISED = 3

#: The NTP header.  The poll byte is carried unsigned so it is copied as is;
#: the originate timestamp is 8 raw bytes so it is echoed bit-exact.
_HEADER = struct.Struct("!BBBbII4sQ8sQQ")
_RFC868 = struct.Struct("!I")

Clock = Callable[[], int]
"""A clock: the current time as integer Unix nanoseconds (``time.time_ns``)."""


# ---------------------------------------------------------------------------
# Timestamps and eras.
# ---------------------------------------------------------------------------


def ntp_timestamp(unix_ns: int) -> int:
    """The 64-bit NTP timestamp of a Unix time in nanoseconds (era wrapped)."""
    return (((unix_ns + _OFFSET_NS) << 32) // _NS) & _MASK64


def ntp_to_unix_ns(timestamp: int, pivot_ns: int) -> int:
    """The Unix time of an NTP timestamp, in the era nearest ``pivot_ns``.

    A timestamp only says where in its 136-year era an instant lies; the
    reader's own clock (the pivot) decides which era, so 2036's wrap to zero
    reads as 2036, not 1900.
    """
    pivot = ((pivot_ns + _OFFSET_NS) << 32) // _NS
    era = (pivot - timestamp + _ERA // 2) // _ERA
    absolute = timestamp + era * _ERA
    return ((absolute * _NS) >> 32) - _OFFSET_NS


def rfc868_bytes(unix_ns: int) -> bytes:
    """The RFC 868 reply: whole seconds since 1900, modulo 2**32, big-endian."""
    return _RFC868.pack((unix_ns // _NS + NTP_UNIX_OFFSET) & _MASK32)


def rfc868_to_unix(data: bytes, pivot_s: float) -> int:
    """The Unix seconds of an RFC 868 reply, in the era nearest ``pivot_s``."""
    if len(data) != 4:
        raise MalformedReply(f"an RFC 868 reply is 4 bytes, not {len(data)}")
    value: int = _RFC868.unpack(data)[0]
    pivot = int(pivot_s) + NTP_UNIX_OFFSET
    era = (pivot - value + (1 << 31)) >> 32
    return value + (era << 32) - NTP_UNIX_OFFSET


def short_format(seconds: float) -> int:
    """NTP's 32-bit short format (16.16 fixed point seconds), saturating."""
    return max(0, min(_MASK32, round(seconds * 65536)))


def measure_precision(clock: Clock, samples: int = 64) -> int:
    """NTP precision: log2 of the seconds it takes to read ``clock``, rounded up.

    The smallest non-zero step between successive readings is what a client
    can actually resolve through this server, so that is what is reported.
    """
    step = _NS
    previous = clock()
    for _ in range(samples):
        current = clock()
        if current > previous:
            step = min(step, current - previous)
        previous = current
    exponent: int = math.ceil(math.log2(step / _NS))
    return max(-30, min(0, exponent))


# ---------------------------------------------------------------------------
# NTP packets.
# ---------------------------------------------------------------------------


class MalformedReply(ValueError):
    """A reply does not have the form of its protocol (message: why)."""


@attrs.frozen
class NTPPacket:
    """One NTP header (RFC 5905 figure 8); timestamps are raw 64-bit values."""

    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision: int
    root_delay: int
    root_dispersion: int
    reference_id: bytes
    reference_time: int
    originate_time: int
    receive_time: int
    transmit_time: int

    @classmethod
    def parse(cls, data: bytes) -> NTPPacket:
        """Parse the first 48 bytes (extension fields and MACs are ignored)."""
        if len(data) < NTP_HEADER_SIZE:
            raise MalformedReply(f"an NTP packet is at least 48 bytes, not {len(data)}")
        fields = _HEADER.unpack_from(data)
        first, stratum, poll, precision, delay, dispersion, refid = fields[:7]
        reference, originate, receive, transmit = fields[7:]
        return cls(
            leap=first >> 6,
            version=(first >> 3) & 7,
            mode=first & 7,
            stratum=stratum,
            poll=poll - 256 if poll > 127 else poll,
            precision=precision,
            root_delay=delay,
            root_dispersion=dispersion,
            reference_id=refid,
            reference_time=reference,
            originate_time=int.from_bytes(originate, "big"),
            receive_time=receive,
            transmit_time=transmit,
        )

    def to_bytes(self) -> bytes:
        return _HEADER.pack(
            (self.leap << 6) | (self.version << 3) | self.mode,
            self.stratum,
            self.poll & 0xFF,
            self.precision,
            self.root_delay,
            self.root_dispersion,
            self.reference_id,
            self.reference_time,
            self.originate_time.to_bytes(8, "big"),
            self.receive_time,
            self.transmit_time,
        )


def client_request(transmit_ns: int, version: int = 4) -> bytes:
    """An SNTP client request whose transmit timestamp is ``transmit_ns``."""
    return NTPPacket(
        leap=LEAP_NONE,
        version=version,
        mode=MODE_CLIENT,
        stratum=0,
        poll=0,
        precision=0,
        root_delay=0,
        root_dispersion=0,
        reference_id=b"\0" * 4,
        reference_time=0,
        originate_time=0,
        receive_time=0,
        transmit_time=ntp_timestamp(transmit_ns),
    ).to_bytes()


@attrs.frozen
class ServerState:
    """What a server says about its own clock in every reply."""

    leap: int
    stratum: int
    precision: int
    root_delay: int
    root_dispersion: int
    reference_id: bytes
    reference_time: int


class NTPDrop(enum.Enum):
    """Why an NTP-looking datagram gets no reply."""

    NOT_CLIENT = "ntp-not-client"
    BAD_VERSION = "ntp-bad-version"


def check_client_request(request: bytes) -> NTPDrop | None:
    """Why an NTP packet (48 bytes or more) is not a request to answer, if it is not.

    Only client mode is answered: a server must never answer a server or a
    broadcast (that would let two servers be played against each other), and
    control (6) and private (7) modes are what amplification attacks used.
    """
    first = request[0]
    if first & 7 != MODE_CLIENT:
        return NTPDrop.NOT_CLIENT
    if not 1 <= (first >> 3) & 7 <= 4:
        return NTPDrop.BAD_VERSION
    return None


def server_reply(
    request: bytes, state: ServerState, receive: int, clock: Clock
) -> bytes:
    """The mode 4 reply to a client request that passed :func:`check_client_request`.

    ``receive`` is the NTP timestamp taken when the request arrived; the
    transmit timestamp is read from ``clock`` as the last step.  Version and
    poll are copied from the request and its transmit timestamp becomes the
    originate timestamp, byte for byte, which is how the client matches the
    reply to its request.
    """
    return _HEADER.pack(
        (state.leap << 6) | (request[0] & 0x38) | MODE_SERVER,
        state.stratum,
        request[2],
        state.precision,
        state.root_delay,
        state.root_dispersion,
        state.reference_id,
        state.reference_time,
        request[40:48],
        receive,
        ntp_timestamp(clock()),
    )


def kiss_of_death(request: bytes, code: bytes, receive: int, clock: Clock) -> bytes:
    """A KoD reply (stratum 0, leap 3, the kiss code as reference id).

    It is never larger than the request, so it cannot amplify a flood.
    """
    first = request[0]
    return _HEADER.pack(
        (LEAP_UNSYNCHRONISED << 6) | (first & 0x38) | MODE_SERVER,
        0,
        request[2],
        0,
        0,
        0,
        code,
        0,
        request[40:48],
        receive,
        ntp_timestamp(clock()),
    )


# ---------------------------------------------------------------------------
# Request kinds and text commands.
# ---------------------------------------------------------------------------


class RequestKind(enum.Enum):
    NTP = "ntp"
    RFC868 = "rfc868"
    TEXT = "text"


class Drop(enum.Enum):
    """Why a datagram was not classified as a request."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"


#: Bytes that never occur in a text command (C0 controls but tab, LF, CR; DEL).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: C1 controls, which only show up after decoding.
_C1_CONTROLS = re.compile("[\x80-\x9f]")


def classify(data: bytes) -> RequestKind | Drop:
    """Tell what ``data`` asks for (a text request is valid UTF-8)."""
    size = len(data)
    if size == 0:
        return RequestKind.RFC868
    if size > MAX_DATAGRAM:
        return Drop.OVERSIZE
    if _CONTROL_BYTES.search(data) is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if _C1_CONTROLS.search(text) is None:
                return RequestKind.TEXT
    if size >= NTP_HEADER_SIZE:
        return RequestKind.NTP
    return Drop.MALFORMED


DEFAULT_TEXT_FORMAT = "%Y-%m-%d %H:%M:%S"

TEXT_HELP = (
    "netlab time service. Send one of:\n"
    "  time  local time in the server's format (also the answer to anything else)\n"
    "  iso   UTC time, RFC 3339 with microseconds\n"
    "  unix  seconds since 1970-01-01 UTC, 6 decimals\n"
    "  help  this list\n"
    "An empty datagram gets RFC 868 time; NTP clients get SNTPv4 replies.\n"
)

TEXT_COMMANDS = ("time", "iso", "unix", "help")


def text_reply(text: str, unix_ns: int, text_format: str) -> str:
    """The reply to a text command at Unix time ``unix_ns``."""
    command = text.strip().lower()
    seconds, nanoseconds = divmod(unix_ns, _NS)
    micros = nanoseconds // 1000
    if command == "iso":
        stamp = datetime.fromtimestamp(seconds, timezone.utc)
        return stamp.strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"
    if command == "unix":
        return f"{seconds}.{micros:06d}"
    if command == "help":
        return TEXT_HELP
    return time.strftime(text_format, time.localtime(seconds))
