"""The netlab configuration: one TOML file shared by the daemon and the client.

The file has the sections ``[netlab]``, ``[tls]``, ``[file]``, ``[command]``,
``[time]``, ``[chat]`` and ``[client]``.  Each section is a frozen attrs class
below; each key is declared once with :func:`setting`, which carries its
default, its kind (how a TOML value is checked and converted), whether a reload
can apply it without a restart, and its documentation.  ``docs/configuration.rst``
and ``etc/netlab.toml`` are generated from these declarations
(``python -m netlab.configdoc``), and a test keeps them in step.

A missing file means all defaults: every service on 127.0.0.1, the command
service disabled.  Anything wrong is a :class:`~netlab.errors.ConfigError`
naming file, section, key, the problem and the expected form.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import attrs

from netlab.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class Invalid(ValueError):
    """A value does not have the form a key expects (message: why)."""


# --------------------------------------------------------------------------
# Kinds: how one TOML value is checked and converted.
# --------------------------------------------------------------------------


@attrs.frozen
class ParseContext:
    """What a kind may need besides the value: where relative paths start."""

    base_directory: Path


class Kind(Generic[T]):
    """How a key's TOML value is checked and turned into a Python value."""

    #: The expected form, as shown in errors and in the documentation.
    form: str = ""

    def parse(self, value: object, context: ParseContext) -> T:
        raise NotImplementedError

    def render(self, value: T) -> str:
        """The TOML spelling of a (default) value, for the sample file."""
        return toml_literal(value)


def toml_literal(value: object) -> str:
    """Spell a simple Python value as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value)
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    if value is None:
        return '""'
    raise TypeError(f"no TOML spelling for {value!r}")


def _describe(value: object) -> str:
    """A short, safe rendering of a bad value for an error message."""
    text = toml_literal(value) if isinstance(value, str | bool | int | float) else None
    if text is None:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


class Boolean(Kind[bool]):
    form = "true or false"

    def parse(self, value: object, context: ParseContext) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"{_describe(value)} is not a boolean")
        return value


@attrs.frozen
class Integer(Kind[int]):
    minimum: int | None = None
    maximum: int | None = None

    @property
    def form(self) -> str:  # type: ignore[override]
        return "an integer" + _range_text(self.minimum, self.maximum)

    def parse(self, value: object, context: ParseContext) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"{_describe(value)} is not an integer")
        _check_range(value, self.minimum, self.maximum, str)
        return value


@attrs.frozen
class Number(Kind[float]):
    minimum: float | None = None
    maximum: float | None = None

    @property
    def form(self) -> str:  # type: ignore[override]
        return "a number" + _range_text(self.minimum, self.maximum)

    def parse(self, value: object, context: ParseContext) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"{_describe(value)} is not a number")
        if not math.isfinite(value):
            raise Invalid(f"{value} is not a finite number")
        _check_range(value, self.minimum, self.maximum, str)
        return float(value)


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    if maximum is not None:
        return f" of at most {maximum}"
    return ""


def _check_range(
    value: float,
    minimum: float | None,
    maximum: float | None,
    show: Callable[[float], str],
) -> None:
    if minimum is not None and value < minimum:
        raise Invalid(f"{show(value)} is below the minimum {show(minimum)}")
    if maximum is not None and value > maximum:
        raise Invalid(f"{show(value)} is above the maximum {show(maximum)}")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse a human size such as ``"64MiB"``, ``"1.5 GB"`` or ``"512"`` to bytes."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise Invalid(f"{_describe(text)} is not a size")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(size: int) -> str:
    """The shortest exact binary spelling of ``size`` (``"64MiB"``)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


@attrs.frozen
class Size(Kind[int]):
    minimum: int = 0
    maximum: int | None = None
    form: str = 'a size: bytes as an integer, or a string such as "64MiB" or "1.5GB"'

    def parse(self, value: object, context: ParseContext) -> int:
        if isinstance(value, bool):
            raise Invalid(f"{_describe(value)} is not a size")
        if isinstance(value, int):
            size = value
        elif isinstance(value, str):
            size = parse_size(value)
        else:
            raise Invalid(f"{_describe(value)} is not a size")
        _check_range(size, self.minimum, self.maximum, lambda n: format_size(int(n)))
        return size

    def render(self, value: int) -> str:
        return toml_literal(format_size(value))


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Parse ``"30s"``, ``"250ms"``, ``"5m"``, ``"1h30m"`` or ``"2d"`` to seconds."""
    compact = text.strip()
    parts = _DURATION_PART.findall(compact)
    if not compact or _DURATION_PART.sub("", compact).strip():
        raise Invalid(f"{_describe(text)} is not a duration")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """Spell a number of seconds the way the sample file does (``"90s"``)."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    if 0 < seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    text = repr(float(seconds))
    return (text.removesuffix(".0")) + "s"


@attrs.frozen
class Duration(Kind[float]):
    minimum: float = 0.0
    maximum: float | None = None
    form: str = 'a duration: seconds as a number, or a string such as "30s", "5m", "1h"'

    def parse(self, value: object, context: ParseContext) -> float:
        if isinstance(value, bool):
            raise Invalid(f"{_describe(value)} is not a duration")
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            seconds = parse_duration(value)
        else:
            raise Invalid(f"{_describe(value)} is not a duration")
        _check_range(seconds, self.minimum, self.maximum, format_duration)
        return seconds

    def render(self, value: float) -> str:
        return toml_literal(format_duration(value))


@attrs.frozen
class Choice(Kind[str]):
    choices: tuple[str, ...]

    @property
    def form(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(toml_literal(c) for c in self.choices)

    def parse(self, value: object, context: ParseContext) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise Invalid(f"{_describe(value)} is not allowed")
        return value


@attrs.frozen
class Text(Kind[str]):
    """A string, optionally constrained by a regular expression."""

    pattern: str | None = None
    pattern_form: str = "a string"

    @property
    def form(self) -> str:  # type: ignore[override]
        return self.pattern_form

    def parse(self, value: object, context: ParseContext) -> str:
        if not isinstance(value, str):
            raise Invalid(f"{_describe(value)} is not a string")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise Invalid(f"{_describe(value)} is not valid")
        return value


@attrs.frozen
class TextList(Kind[tuple[str, ...]]):
    """A list of strings (each checked by ``item``)."""

    item: Text = Text()

    @property
    def form(self) -> str:  # type: ignore[override]
        return f"a list of strings ({self.item.form})"

    def parse(self, value: object, context: ParseContext) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise Invalid(f"{_describe(value)} is not a list")
        return tuple(self.item.parse(item, context) for item in value)


@attrs.frozen
class FileSystemPath(Kind["Path | None"]):
    """A path; relative paths are taken from the configuration file's directory.

    An empty string means "not set" (``None``).  ``must_exist`` checks, at load
    time, that the path is there, has the right type and is readable, so the
    daemon never starts with a path it cannot use.
    """

    must_exist: bool = True
    directory: bool = False

    @property
    def form(self) -> str:  # type: ignore[override]
        what = "a directory" if self.directory else "a file"
        if self.must_exist:
            return f"the path of an existing, readable {what}"
        return f"the path of {what}"

    def parse(self, value: object, context: ParseContext) -> Path | None:
        if not isinstance(value, str):
            raise Invalid(f"{_describe(value)} is not a path string")
        if value == "":
            return None
        if "\0" in value:
            raise Invalid("the path contains a NUL character")
        path = (context.base_directory / Path(value).expanduser()).absolute()
        if self.must_exist:
            check_path(path, directory=self.directory)
        return path

    def render(self, value: Path | None) -> str:
        return toml_literal("" if value is None else str(value))


def check_path(path: Path, *, directory: bool) -> None:
    """Raise :class:`Invalid` unless ``path`` exists, has its type and is readable."""
    if not path.exists():
        raise Invalid(f'"{path}" does not exist')
    if directory and not path.is_dir():
        raise Invalid(f'"{path}" is not a directory')
    if not directory and not path.is_file():
        raise Invalid(f'"{path}" is not a regular file')
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        raise Invalid(f'"{path}" is not readable by this user')


# --------------------------------------------------------------------------
# Listen addresses.
# --------------------------------------------------------------------------


@attrs.frozen
class ListenAddress:
    """The parts of a listen endpoint string that netlab itself reasons about.

    ``kind`` is the endpoint type (``tcp``, ``ssl``, ``udp`` or ``systemd``);
    ``port`` and ``interface`` are set for the socket types, ``name`` for
    ``systemd``.  ``options`` keeps every ``key=value`` argument.
    """

    description: str
    kind: str
    port: int | None = None
    interface: str | None = None
    name: str | None = None
    options: Mapping[str, str] = attrs.field(factory=dict)

    def overlaps(self, other: ListenAddress) -> bool:
        """Whether two socket addresses would compete for one port."""
        if self.port is None or other.port is None or 0 in (self.port, other.port):
            return False
        if self.port != other.port:
            return False
        wildcard = {"", "0.0.0.0", "::"}  # noqa: S104 - compared, never bound
        return (
            self.interface in wildcard
            or other.interface in wildcard
            or self.interface == other.interface
        )

    @property
    def tls(self) -> bool:
        """Whether clients speak TLS to it (``ssl:``, or ``systemd:`` with tls=yes)."""
        return self.kind == "ssl" or self.options.get("tls") == "yes"

    @property
    def is_loopback(self) -> bool:
        """Whether the socket is reachable only from this host."""
        if self.kind == "systemd" or self.interface in (None, ""):
            return False
        try:
            return ipaddress.ip_address(self.interface).is_loopback
        except ValueError:
            return False


def split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint string into positional and ``key=value`` arguments.

    The grammar is Twisted's: arguments are separated by ``:`` and a
    backslash escapes the next character.
    """
    pieces: list[str] = []
    current: list[str] = []
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current.append(next(characters, ""))
        elif character == ":":
            pieces.append("".join(current))
            current = []
        else:
            current.append(character)
    pieces.append("".join(current))
    positional: list[str] = []
    keyword: dict[str, str] = {}
    for piece in pieces:
        key, equals, value = piece.partition("=")
        if equals and key.isidentifier():
            keyword[key] = value
        else:
            positional.append(piece)
    return positional, keyword


def parse_listen_address(description: str, kinds: Sequence[str]) -> ListenAddress:
    """Check an endpoint string for one of ``kinds`` and extract its address.

    Raises :class:`Invalid` with the reason.  ``systemd`` endpoints are checked
    for form only: their descriptor is looked up when the service starts.
    """
    positional, keyword = split_endpoint(description)
    kind = positional[0] if positional else ""
    if kind not in kinds:
        raise Invalid(f"{_describe(description)} does not start with a known type")
    if "tls" in keyword:
        # netlab's own option, not Twisted's: only a TCP socket that systemd
        # passes needs it (a port says TLS with ssl:).
        if kind != "systemd" or "domain" not in keyword:
            raise Invalid(
                f"{_describe(description)}: tls= is for systemd:domain=... "
                "(TCP) endpoints; for TLS on a port use ssl:PORT"
            )
        if keyword["tls"] not in ("yes", "no"):
            raise Invalid(f"{_describe(description)}: tls= must be yes or no")
    if kind == "systemd":
        name = keyword.get("name", "")
        if not name:
            raise Invalid(f"{_describe(description)} lacks name=NAME")
        return ListenAddress(description, kind, name=name, options=keyword)
    arguments = positional[1:]
    port_text = keyword.get("port", arguments[0] if arguments else "")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise Invalid(f"{_describe(description)} has no port from 0 to 65535")
    interface = keyword.get("interface", "")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise Invalid(
                f"{_describe(description)}: interface {interface!r} is not an IP "
                "address"
            ) from None
    return ListenAddress(
        description, kind, port=int(port_text), interface=interface, options=keyword
    )


@attrs.frozen
class StreamEndpoint(Kind[str]):
    """A Twisted stream server endpoint string for a TCP service."""

    form: str = (
        'an endpoint string: "tcp:PORT:interface=ADDRESS", "ssl:PORT:interface=ADDRESS"'
        ' or "systemd:domain=INET:name=NAME" (add ":tls=yes" for TLS)'
    )
    kinds: ClassVar[tuple[str, ...]] = ("tcp", "ssl", "systemd")

    def parse(self, value: object, context: ParseContext) -> str:
        if not isinstance(value, str):
            raise Invalid(f"{_describe(value)} is not a string")
        address = parse_listen_address(value, self.kinds)
        if address.kind == "systemd" and not address.options.get("domain"):
            raise Invalid(f"{_describe(value)} lacks domain=INET or domain=INET6")
        return value


@attrs.frozen
class DatagramEndpoint(Kind[str]):
    """netlab's endpoint string for a UDP service (Twisted has none for UDP)."""

    form: str = (
        'an endpoint string: "udp:PORT:interface=ADDRESS" or "systemd:name=NAME"'
    )
    kinds: ClassVar[tuple[str, ...]] = ("udp", "systemd")

    def parse(self, value: object, context: ParseContext) -> str:
        if not isinstance(value, str):
            raise Invalid(f"{_describe(value)} is not a string")
        parse_listen_address(value, self.kinds)
        return value


# --------------------------------------------------------------------------
# Declaring keys and sections.
# --------------------------------------------------------------------------


def setting(
    default: Any,
    kind: Kind[Any],
    help: str,
    *,
    live: bool = False,
    doc_default: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    example: object = None,
) -> Any:
    """Declare one configuration key.

    ``live`` marks keys that a reload (SIGHUP) applies to a running daemon;
    changing any other key is logged as needing a restart.  ``doc_default``
    describes a default that depends on the environment, in which case
    ``default_factory`` computes it and ``example`` is shown in the sample file.
    """
    metadata = {
        "kind": kind,
        "help": help,
        "live": live,
        "doc_default": doc_default,
        "example": example,
    }
    if default_factory is not None:
        return attrs.field(factory=default_factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def default_state_directory() -> Path:
    """``$STATE_DIRECTORY`` (systemd), else ``$XDG_STATE_HOME/netlab``, else
    ``~/.local/state/netlab``."""
    systemd_state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd_state:
        return Path(systemd_state)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "netlab"


LOOPBACK = "127.0.0.1"


@attrs.frozen
class NetlabSection:
    """Settings shared by the whole daemon."""

    # Checked when a TCP service starts, not here: the client reads this file
    # too, and the users file is (rightly) unreadable to most client users.
    users_file: Path | None = setting(
        None,
        FileSystemPath(must_exist=False),
        "TOML file with the users allowed to authenticate and their keys, one "
        '[users.NAME] table with key = "BASE64" each (netlab keygen writes it). '
        "The daemon refuses to start if group or others can read it. Empty: no "
        "users, so services that require authentication refuse everyone.",
        live=True,
    )
    auth_failure_delay: float = setting(
        1.0,
        Duration(maximum=60.0),
        "How long the server waits before answering a failed authentication "
        "(slows down guessing).",
        live=True,
    )
    auth_max_failures: int = setting(
        5,
        Integer(minimum=1),
        "Authentication failures from one address within auth_failure_window "
        "that lock the address out.",
        live=True,
    )
    auth_failure_window: float = setting(
        60.0,
        Duration(minimum=1.0),
        "The window in which auth_max_failures failures lock an address out.",
        live=True,
    )
    auth_lockout: float = setting(
        300.0,
        Duration(minimum=1.0),
        "How long a locked-out address is refused (every TCP service counts "
        "its own failures).",
        live=True,
    )
    log_format: str = setting(
        "text",
        Choice(("text", "json")),
        'Log as human-readable text, or as one JSON object per line ("json") for '
        "journald and log shippers. twistd's --logger option overrides this.",
    )
    log_level: str = setting(
        "info",
        Choice(("debug", "info", "warn", "error")),
        "The least severe log level that is written.",
        live=True,
    )
    state_directory: Path = setting(
        None,
        FileSystemPath(must_exist=False, directory=True),
        "Where the daemon keeps its state (created with mode 0700 if missing).",
        doc_default="$STATE_DIRECTORY, else $XDG_STATE_HOME/netlab, else "
        "~/.local/state/netlab",
        default_factory=default_state_directory,
        example="/var/lib/netlab",
    )


@attrs.frozen
class TLSSection:
    """TLS certificates, used by ``ssl:`` endpoints and by clients."""

    certificate: Path | None = setting(
        None,
        FileSystemPath(),
        "PEM certificate the TCP services present on ssl: endpoints, followed "
        "by the intermediate certificates clients need to verify it (a "
        "fullchain file, as certbot writes); all of them are presented.",
    )
    private_key: Path | None = setting(
        None, FileSystemPath(), "PEM private key of that certificate."
    )
    ca_file: Path | None = setting(
        None,
        FileSystemPath(),
        "PEM file of the certificate authorities the client trusts when it "
        "verifies a server. Empty: the system's trust store.",
    )


# The keys every framed TCP service section has (file, command): declared
# once here, instantiated in each section.


def max_frame_size_setting() -> Any:
    return setting(
        2 * 1024 * 1024,
        Size(minimum=64 * 1024, maximum=2**31),
        "The largest frame (message or data chunk) a client may send; a larger "
        "length prefix closes the connection before any of it is read.",
        live=True,
    )


def handshake_timeout_setting() -> Any:
    return setting(
        10.0,
        Duration(minimum=0.1),
        "A client must finish hello and authentication within this time.",
        live=True,
    )


def idle_timeout_setting() -> Any:
    return setting(
        300.0,
        Duration(minimum=0.1),
        "A session with no frame in either direction for this long is closed.",
        live=True,
    )


def max_connections_setting() -> Any:
    return setting(
        100,
        Integer(minimum=1),
        "Connections the service accepts at once; more are told "
        "too-many-connections and closed.",
        live=True,
    )


def max_connections_per_address_setting() -> Any:
    return setting(
        10,
        Integer(minimum=1),
        "Connections one client address may hold at once.",
        live=True,
    )


@attrs.frozen
class FileSection:
    """The file service: list, get and put files below a root directory."""

    enabled: bool = setting(True, Boolean(), "Run the file service.")
    endpoint: str = setting(
        f"tcp:8021:interface={LOOPBACK}",
        StreamEndpoint(),
        "Where the file service listens.",
    )
    max_frame_size: int = max_frame_size_setting()
    handshake_timeout: float = handshake_timeout_setting()
    idle_timeout: float = idle_timeout_setting()
    max_connections: int = max_connections_setting()
    max_connections_per_address: int = max_connections_per_address_setting()
    root: Path | None = setting(
        None,
        FileSystemPath(directory=True),
        "The directory the file service serves; clients cannot reach outside it.",
        doc_default="the files directory in state_directory (created if missing)",
        example="/srv/netlab",
    )
    anonymous: str = setting(
        "no",
        Choice(("no", "read", "write")),
        'Whether clients that did not authenticate may use the service: "no" '
        '(authentication required), "read" (ls, stat and get) or "write" '
        "(everything). A warning is logged when anonymous access is opened "
        "(at start-up or by a reload) on a non-loopback address (for a "
        "systemd socket, the address systemd bound it to).",
        live=True,
    )
    read_only_users: tuple[str, ...] = setting(
        (),
        TextList(),
        "Authenticated users who may only list, stat and get (put, rm and mkdir "
        "are refused).",
        live=True,
    )
    max_file_size: int = setting(
        0,
        Size(),
        "The largest file a put may store; 0 means no limit other than quota "
        "and free space.",
        live=True,
    )
    quota: int = setting(
        0,
        Size(),
        "The most bytes all files below root may use together; 0 means no quota. "
        "Usage is measured at start-up and every sweep, and kept up to date "
        "by puts and removals in between.",
        live=True,
    )
    min_free_space: int = setting(
        64 * 1024 * 1024,
        Size(),
        "A put is refused if it would leave less than this much free space on "
        "the file system holding root.",
        live=True,
    )
    overwrite: str = setting(
        "with-force",
        Choice(("with-force", "never", "always")),
        'Whether a put may replace an existing file: "with-force" (only when '
        'the client asks, netlab put --force), "never", or "always".',
        live=True,
    )
    chunk_size: int = setting(
        1024 * 1024,
        Size(minimum=4096, maximum=4 * 1024 * 1024),
        "Bytes of file data per data frame a get sends (never more than the "
        "client accepts). Larger frames cost fewer per-frame overheads: on "
        "loopback 1 MiB frames took a third less CPU than 256 KiB ones.",
        live=True,
    )
    partial_expiry: float = setting(
        86400.0,
        Duration(minimum=1.0),
        "An interrupted upload's partial file is kept this long for a resume, "
        "then removed (at start-up and by a periodic sweep; never while an "
        "upload has it open).",
        live=True,
    )
    list_page_size: int = setting(
        1000,
        Integer(minimum=1, maximum=10000),
        "The most entries one ls reply carries; larger directories are paged.",
        live=True,
    )


@attrs.frozen
class CommandSection:
    """The command service: authenticated remote execution."""

    enabled: bool = setting(
        False,
        Boolean(),
        "Run the command service. It is off until an operator turns it on.",
    )
    endpoint: str = setting(
        f"tcp:8022:interface={LOOPBACK}",
        StreamEndpoint(),
        "Where the command service listens.",
    )
    max_frame_size: int = max_frame_size_setting()
    handshake_timeout: float = handshake_timeout_setting()
    idle_timeout: float = idle_timeout_setting()
    max_connections: int = max_connections_setting()
    max_connections_per_address: int = max_connections_per_address_setting()


@attrs.frozen
class TimeFormat(Kind[str]):
    """A ``strftime`` format whose output is short enough for one reply."""

    form: str = (
        'a strftime format such as "%Y-%m-%d %H:%M:%S", output at most 200 bytes'
    )

    def parse(self, value: object, context: ParseContext) -> str:
        if not isinstance(value, str) or not value:
            raise Invalid(f"{_describe(value)} is not a non-empty string")
        try:
            sample = time.strftime(value, time.localtime(0)).encode("utf-8")
        except (ValueError, UnicodeEncodeError) as error:
            raise Invalid(
                f"{_describe(value)} is not a valid format: {error}"
            ) from None
        # %c, %x ... expand: the longest output stays well inside one datagram.
        if len(value) > 100 or len(sample) > 200:
            raise Invalid(f"{_describe(value)} is too long")
        return value


@attrs.frozen
class ReferenceId(Kind[bytes]):
    """An NTP reference id: up to 4 ASCII letters/digits, or an IPv4 address."""

    form: str = 'up to 4 capital letters or digits ("LOCL", "GPS") or an IPv4 address'

    def parse(self, value: object, context: ParseContext) -> bytes:
        if not isinstance(value, str):
            raise Invalid(f"{_describe(value)} is not a string")
        if re.fullmatch(r"[A-Z0-9]{1,4}", value):
            return value.encode("ascii").ljust(4, b"\0")
        try:
            return ipaddress.IPv4Address(value).packed
        except ValueError:
            raise Invalid(f"{_describe(value)} is not a reference id") from None

    def render(self, value: bytes) -> str:
        if value.rstrip(b"\0").isalnum():
            return toml_literal(value.rstrip(b"\0").decode("ascii"))
        return toml_literal(str(ipaddress.IPv4Address(value)))


@attrs.frozen
class TimeSection:
    """The time service: text time, RFC 868 and SNTPv4 on one UDP port.

    See docs/time.rst for the three request kinds, the replies and the limits.
    """

    enabled: bool = setting(True, Boolean(), "Run the time service.")
    endpoint: str = setting(
        f"udp:8123:interface={LOOPBACK}",
        DatagramEndpoint(),
        "Where the time service listens.",
    )
    text_format: str = setting(
        "%Y-%m-%d %H:%M:%S",
        TimeFormat(),
        'The reply to the text command "time" (and to unknown text): a strftime '
        "format, in the daemon's local time zone.",
        live=True,
    )
    stratum: int = setting(
        10,
        Integer(minimum=1, maximum=15),
        "The NTP stratum reported to clients: one more than the stratum of the "
        "source that keeps this host's clock (10: a local clock, as chrony's "
        '"local stratum 10").',
        live=True,
    )
    reference_id: bytes = setting(
        b"LOCL",
        ReferenceId(),
        "The NTP reference id reported to clients: for stratum 1 a code for the "
        'reference clock ("GPS", "PPS"), otherwise the IPv4 address of the upstream '
        "server.",
        live=True,
    )
    leap: str = setting(
        "kernel",
        Choice(("kernel", "none", "insert", "delete", "unsynchronised")),
        'The NTP leap indicator. "kernel" asks the kernel (adjtimex) and reports '
        '"unsynchronised" while the host clock is not synchronised, which makes '
        "careful clients (chrony, ntpd) ignore this server; the other values "
        "override what the kernel says.",
        live=True,
    )
    rate: float = setting(
        4.0,
        Number(minimum=0),
        "Requests a second each source address may make in the long run "
        "(token bucket refill rate). 0 turns per-source limiting off.",
        live=True,
    )
    burst: int = setting(
        16,
        Integer(minimum=1, maximum=1_000_000),
        "Requests a source may make back to back before its rate applies.",
        live=True,
    )
    leak: int = setting(
        8,
        Integer(minimum=0, maximum=1_000_000),
        "A source over its limit still gets one request in this many answered, "
        "so a flood spoofed in a victim's name cannot cut the victim off. "
        "0: never.",
        live=True,
    )
    max_sources: int = setting(
        65536,
        Integer(minimum=1, maximum=10_000_000),
        "How many source addresses the rate limiter remembers (about 200 bytes "
        "each); the least recently seen is forgotten first.",
        live=True,
    )
    global_rate: float = setting(
        50000.0,
        Number(minimum=0),
        "Replies a second the whole service (each worker) sends at most, "
        "whatever the sources. 0 turns the ceiling off.",
        live=True,
    )
    kod_rate: float = setting(
        1.0,
        Number(minimum=0),
        'NTP "kiss-o\'-death" RATE replies a second sent, service-wide, to '
        "clients over their limit (everyone else over the limit gets silence). "
        "0: never.",
        live=True,
    )
    stats_interval: float = setting(
        60.0,
        Duration(minimum=1),
        "How often the counters (answered, dropped by reason) are logged.",
        live=True,
    )
    workers: int = setting(
        1,
        Integer(minimum=1, maximum=64),
        "Processes answering on the port. More than 1 starts worker processes "
        "that share the port with SO_REUSEPORT (or share the systemd socket); "
        "worth it only with more than one free core. Rate limits apply per "
        "process.",
    )


@attrs.frozen
class ChatSection:
    """The chat service: rooms and nicknames over UDP."""

    enabled: bool = setting(True, Boolean(), "Run the chat service.")
    endpoint: str = setting(
        f"udp:8070:interface={LOOPBACK}",
        DatagramEndpoint(),
        "Where the chat service listens.",
    )
    rooms: tuple[str, ...] = setting(
        ("lobby",),
        TextList(
            Text(
                r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}",
                "room names: 1-32 ASCII letters, digits, '_', '-', '.'",
            )
        ),
        "Rooms that always exist; the first is where members land when they "
        "name no room.",
        live=True,
    )
    create_rooms: bool = setting(
        True,
        Boolean(),
        "Whether joining a room that does not exist creates it (false: only "
        "the rooms listed in rooms).",
        live=True,
    )
    max_rooms: int = setting(
        100, Integer(minimum=1), "How many rooms may exist at once.", live=True
    )
    max_members: int = setting(
        200, Integer(minimum=1), "How many members one room may hold.", live=True
    )
    max_sessions: int = setting(
        1000,
        Integer(minimum=1),
        "How many members the whole service may hold (JSON and text mode).",
        live=True,
    )
    nick_max_length: int = setting(
        24,
        Integer(minimum=1, maximum=64),
        "The longest nickname, in characters. Nicknames are letters, digits, "
        "'_', '-' and '.'; case and look-alike characters are folded when "
        "checking that a nickname is free.",
        live=True,
    )
    max_datagram: int = setting(
        1200,
        Integer(minimum=256, maximum=65507),
        "The largest datagram accepted or sent, in bytes. Larger ones are "
        "refused, never "
        "truncated; several queued messages for one member are packed into "
        "one datagram up to this size.",
        live=True,
    )
    history: int = setting(
        50,
        Integer(minimum=0, maximum=10000),
        "How many recent messages each room keeps, for joiners and for "
        "clients repairing a gap.",
        live=True,
    )
    member_timeout: float = setting(
        90.0,
        Duration(minimum=3.0),
        "A member not heard from for this long is evicted and the room is "
        "told. Clients send keepalives at a quarter of it.",
        live=True,
    )
    message_rate: float = setting(
        5.0,
        Number(minimum=0.01),
        "Messages a second one member may send (say, private, nick, who), on average.",
        live=True,
    )
    message_burst: float = setting(
        20.0,
        Number(minimum=1),
        "How many messages one member may send at once before message_rate applies.",
        live=True,
    )
    flood_strikes: int = setting(
        5,
        Integer(minimum=1),
        "Messages over the limit a member may send (each answered with a "
        "warning) before it is dropped from the chat.",
        live=True,
    )
    source_rate: float = setting(
        50.0,
        Number(minimum=0.01),
        "Datagrams a second accepted from one source address (more are "
        "dropped unanswered).",
        live=True,
    )
    source_burst: float = setting(
        100.0,
        Number(minimum=1),
        "Datagrams accepted at once from one source address.",
        live=True,
    )
    global_rate: float = setting(
        0.0,
        Number(minimum=0),
        "Datagrams a second the whole service accepts from all sources "
        "(0: no ceiling).",
        live=True,
    )
    text_mode: bool = setting(
        True,
        Boolean(),
        "Accept plain-text datagrams (nc -u, socat) besides JSON.",
        live=True,
    )
    require_authentication: bool = setting(
        False,
        Boolean(),
        "Only users of [netlab] users_file may join: the JSON join carries an "
        "HMAC-SHA256 proof of the user's key and the server proves its own. "
        "Text mode cannot authenticate, so it is refused while this is on.",
        live=True,
    )
    socket_buffer: int = setting(
        4 * 1024**2,
        Size(),
        "Receive and send buffer sizes asked for the chat socket, so bursts "
        "are not dropped by the kernel (Linux caps them at net.core.rmem_max "
        "and wmem_max). 0 keeps the system default.",
    )


@attrs.frozen
class ClientSection:
    """Settings of the ``netlab`` command-line client."""

    server: str = setting(
        LOOPBACK,
        Text(r"[A-Za-z0-9.:\-\[\]]+", "a host name or IP address"),
        "The host the client connects to (--server overrides it). The port of "
        "each service is taken from that service's endpoint in this file.",
    )
    timeout: float = setting(
        10.0,
        Duration(minimum=0.1),
        "How long the client waits to connect, and for each answer.",
    )
    user: str = setting(
        "",
        Text(
            r"([A-Za-z0-9_][A-Za-z0-9_.\-]{0,63})?",
            "a user name (letters, digits, _ . -)",
        ),
        "The user the client authenticates as (--user overrides it). Empty: "
        "connect anonymously, which only services that allow it accept.",
    )
    key_file: Path | None = setting(
        None,
        FileSystemPath(must_exist=False),
        "The file holding the user's key (netlab keygen writes it; mode 0600). "
        "$NETLAB_KEY_FILE overrides it.",
    )


#: The sections, in file order.  Each service issue adds its keys to its class.
SECTIONS: Mapping[str, type] = {
    "netlab": NetlabSection,
    "tls": TLSSection,
    "file": FileSection,
    "command": CommandSection,
    "time": TimeSection,
    "chat": ChatSection,
    "client": ClientSection,
}

#: The services the daemon can run, in start-up order, with their transports.
SERVICE_TRANSPORTS: Mapping[str, str] = {
    "file": "tcp",
    "command": "tcp",
    "time": "udp",
    "chat": "udp",
}


@attrs.frozen
class NetlabConfig:
    """The whole configuration.  ``path`` is the file it came from, if any."""

    netlab: NetlabSection = attrs.field(factory=NetlabSection)
    tls: TLSSection = attrs.field(factory=TLSSection)
    file: FileSection = attrs.field(factory=FileSection)
    command: CommandSection = attrs.field(factory=CommandSection)
    time: TimeSection = attrs.field(factory=TimeSection)
    chat: ChatSection = attrs.field(factory=ChatSection)
    client: ClientSection = attrs.field(factory=ClientSection)
    path: Path | None = None

    def section(self, name: str) -> Any:
        """The section called ``name``."""
        if name not in SECTIONS:
            raise KeyError(name)
        return getattr(self, name)

    def enabled_services(self) -> list[str]:
        """The names of the services that are switched on, in start-up order."""
        return [name for name in SERVICE_TRANSPORTS if self.section(name).enabled]

    def listen_address(self, service: str) -> ListenAddress:
        """The parsed listen endpoint of a service."""
        kinds = (
            ("tcp", "ssl", "systemd")
            if SERVICE_TRANSPORTS[service] == "tcp"
            else (
                "udp",
                "systemd",
            )
        )
        return parse_listen_address(self.section(service).endpoint, kinds)

    @property
    def file_root(self) -> Path:
        """The file service's root: ``[file] root`` or ``state_directory/files``."""
        return self.file.root or self.netlab.state_directory / "files"


@attrs.frozen
class KeyInfo:
    """Everything declared about one key, for loaders and generators."""

    section: str
    name: str
    kind: Kind[Any]
    help: str
    live: bool
    default: Any
    doc_default: str | None
    example: object


def keys(section: str) -> Iterator[KeyInfo]:
    """The declared keys of a section, in declaration order."""
    for field in attrs.fields(SECTIONS[section]):
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        yield KeyInfo(
            section=section,
            name=field.name,
            kind=field.metadata["kind"],
            help=field.metadata["help"],
            live=field.metadata["live"],
            default=default,
            doc_default=field.metadata["doc_default"],
            example=field.metadata["example"],
        )


# --------------------------------------------------------------------------
# Loading and validation.
# --------------------------------------------------------------------------


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return f'; did you mean "{close[0]}"?'
    return "; valid: " + ", ".join(candidates)


def _load_section(
    name: str, table: object, context: ParseContext, path: str | None
) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(
            f"[{name}] must be a table (a [{name}] header), not a value", path=path
        )
    declared = {info.name: info for info in keys(name)}
    for key in table:
        if key not in declared:
            raise ConfigError(
                "unknown key" + _suggest(key, list(declared)),
                path=path,
                section=name,
                key=key,
            )
    values = {}
    for key, raw in table.items():
        info = declared[key]
        try:
            values[key] = info.kind.parse(raw, context)
        except Invalid as error:
            raise ConfigError(
                f"{error} (expected {info.kind.form})", path=path, section=name, key=key
            ) from None
    return SECTIONS[name](**values)


#: Checks across keys and sections, run after every section has loaded.  Each
#: takes the configuration and raises ConfigError; service modules may append.
CROSS_CHECKS: list[Callable[[NetlabConfig], None]] = []


def _check_ports(config: NetlabConfig) -> None:
    """Two enabled services of one transport may not share a port."""
    seen: list[tuple[str, ListenAddress]] = []
    for service in config.enabled_services():
        address = config.listen_address(service)
        for other, other_address in seen:
            same_transport = SERVICE_TRANSPORTS[other] == SERVICE_TRANSPORTS[service]
            if same_transport and address.overlaps(other_address):
                raise ConfigError(
                    f"port {address.port} is also used by [{other}] endpoint; "
                    "give each service its own port",
                    path=str(config.path) if config.path else None,
                    section=service,
                    key="endpoint",
                )
        seen.append((service, address))


CROSS_CHECKS.append(_check_ports)


def from_mapping(
    document: Mapping[str, object],
    *,
    base_directory: Path,
    path: Path | None = None,
) -> NetlabConfig:
    """Build and validate a configuration from an already-parsed TOML document."""
    shown = str(path) if path else None
    context = ParseContext(base_directory=base_directory)
    sections = {}
    for name, table in document.items():
        if name not in SECTIONS:
            if not isinstance(table, dict):
                raise ConfigError(
                    f'top-level key "{name}": every setting belongs in a section '
                    "such as [netlab]",
                    path=shown,
                )
            raise ConfigError(
                f"unknown section [{name}]" + _suggest(name, list(SECTIONS)),
                path=shown,
            )
        sections[name] = _load_section(name, table, context, shown)
    config = NetlabConfig(**sections, path=path)
    for check in CROSS_CHECKS:
        check(config)
    return config


def load(path: Path | str | None) -> NetlabConfig:
    """Read and validate the configuration file at ``path``.

    ``None`` means no file: every key takes its default.
    """
    if path is None:
        return from_mapping({}, base_directory=Path.cwd())
    path = Path(path).expanduser().absolute()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            "no such file; check --config or create it from etc/netlab.toml",
            path=str(path),
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror}", path=str(path)) from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=str(path)) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML: {error}", path=str(path)) from None
    return from_mapping(document, base_directory=path.parent, path=path)


def client_config_path(explicit: str | None) -> Path | None:
    """The configuration file the client uses.

    ``--config``, else ``$NETLAB_CONFIG``, else ``~/.config/netlab/netlab.toml``,
    else ``/etc/netlab/netlab.toml``, else none (built-in defaults).
    """
    if explicit:
        return Path(explicit)
    from_environment = os.environ.get("NETLAB_CONFIG")
    if from_environment:
        return Path(from_environment)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    user_config = (Path(xdg) if xdg else Path.home() / ".config") / "netlab/netlab.toml"
    for candidate in (user_config, Path("/etc/netlab/netlab.toml")):
        if candidate.exists():
            return candidate
    return None
