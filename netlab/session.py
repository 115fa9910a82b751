"""The netlab session protocol: messages, the server's state machine, its Protocol.

Layers, from the wire up:

* :mod:`netlab.framing` cuts the byte stream into frames.
* :func:`decode_frame` / :func:`encode_control` turn frames into messages and
  back, with no I/O: a frame whose payload starts with ``{`` is a *control*
  message (a UTF-8 JSON object with a string ``op``), one that starts with
  ``0x00`` is a *data* frame (the rest is raw bytes); anything else is refused.
* :class:`ServerSession` is the server's state machine,
  ``HELLO -> AUTH -> READY -> CLOSED``, with the handshake and idle timers,
  authentication and its failure delay, and ``ping``/``bye``.  It talks to
  the network only through the small :class:`ServerProtocol` it is given.
* Once a session is READY, an application (the file or command service)
  takes over: :class:`ISessionApplication` receives every other control
  message and every data frame, and answers through the session's ``send*``
  methods, registering a producer to stream.

Every message and error code is documented in ``docs/protocol.rst``.
"""

from __future__ import annotations

import base64
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from netlab.auth import (
    NONCE_SIZE,
    USER_NAME,
    FailureTracker,
    Verifier,
    decode_base64,
    new_nonce,
)
from netlab.framing import (
    DATA_TYPE,
    LARGEST_FRAME,
    FrameReceiver,
    FrameTooLarge,
    encode_data_frame,
)
from netlab.ratelimit import LogThrottle

log = Logger(namespace="netlab.session")

#: The protocol name in ``hello``.
PROTOCOL = "netlab"
#: The protocol version this code speaks.
VERSION = 1
#: The largest control message (JSON) the server accepts, in bytes.  The
#: server's own replies (a page of a directory listing) may be larger, up to
#: the client's ``max_frame``.
MAX_CONTROL_SIZE = 65536
#: The smallest ``max_frame`` a peer may announce: a control message must fit.
MIN_FRAME_SIZE = MAX_CONTROL_SIZE
#: How deeply JSON arrays and objects may nest in a control message.
MAX_JSON_DEPTH = 32
#: How long a closing connection may take to flush before it is aborted.
CLOSE_GRACE = 10.0
#: Authentication mechanisms, as named in ``hello`` and ``auth``.
HMAC_SHA256 = "hmac-sha256"
ANONYMOUS = "anonymous"


class ErrorCode:
    """The stable error codes of ``{"op": "error"}`` (docs/protocol.rst)."""

    BAD_FRAME = "bad-frame"
    BAD_MESSAGE = "bad-message"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNEXPECTED_MESSAGE = "unexpected-message"
    AUTH_REQUIRED = "auth-required"
    AUTH_FAILED = "auth-failed"
    LOCKED_OUT = "locked-out"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    IDLE_TIMEOUT = "idle-timeout"
    UNKNOWN_OP = "unknown-op"
    SHUTTING_DOWN = "shutting-down"
    INTERNAL = "internal-error"


class ProtocolError(Exception):
    """A message breaks the protocol: answered with an error, then the
    connection is closed (unless ``fatal`` is False)."""

    def __init__(self, code: str, message: str, *, fatal: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


class RequestError(ProtocolError):
    """An application refuses one request; the session stays open.

    Raise it from :meth:`ISessionApplication.control_received` (or the
    coroutine it returns) with a code from docs/protocol.rst; extra keyword
    fields are added to the error message.
    """

    def __init__(self, code: str, message: str, **fields: Any) -> None:
        super().__init__(code, message, fatal=False)
        self.fields = fields


# --------------------------------------------------------------------------
# Messages (pure).
# --------------------------------------------------------------------------


@attrs.frozen
class Control:
    """A control message: a JSON object with a string ``op``."""

    op: str
    fields: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.op if key == "op" else self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.op if key == "op" else self.fields.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, **self.fields}


@attrs.frozen
class Data:
    """A data frame's payload (without its type byte).

    The payload is a read-only view into the received frame rather than a
    copy of it: a data frame is usually hundreds of KiB, and copying it only
    to drop its first byte cost a memory copy and a fresh allocation per
    frame.
    """

    payload: bytes | memoryview


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth(value: Any) -> int:
    """How deeply containers nest in a decoded JSON value (iteratively)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in items)
    return deepest


def decode_control(payload: bytes, limit: int = MAX_CONTROL_SIZE) -> Control:
    """Parse a control frame's payload; :class:`ProtocolError` if malformed."""
    if len(payload) > limit:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"control message of {len(payload)} bytes exceeds {limit}",
        )
    try:
        text = payload.decode("utf-8")
        # Deep nesting fails cleanly: the decoder raises RecursionError.
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except UnicodeDecodeError:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "control message is not UTF-8"
        ) from None
    except RecursionError:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "control message nests too deeply"
        ) from None
    except ValueError as error:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"control message is not valid JSON: {error}"
        ) from None
    if not isinstance(value, dict):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "control message is not a JSON object"
        )
    if _depth(value) > MAX_JSON_DEPTH:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"control message nests deeper than {MAX_JSON_DEPTH}"
        )
    op = value.pop("op", None)
    if not isinstance(op, str) or not op:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, 'control message lacks a string "op"'
        )
    return Control(op, value)


def decode_frame(
    payload: bytes, control_limit: int = MAX_CONTROL_SIZE
) -> Control | Data:
    """Tell a control message from a data frame by its first byte, and decode it."""
    if payload[:1] == b"{":
        return decode_control(payload, control_limit)
    if payload[:1] == DATA_TYPE:
        return Data(memoryview(payload)[1:])
    if not payload:
        raise ProtocolError(ErrorCode.BAD_FRAME, "empty frame")
    raise ProtocolError(
        ErrorCode.BAD_FRAME,
        f"frame starts with byte 0x{payload[0]:02x}; expected '{{' (control) "
        "or 0x00 (data)",
    )


def encode_control(op: str, **fields: Any) -> bytes:
    """The payload of a control message (compact UTF-8 JSON)."""
    body = {"op": op, **fields}
    return json.dumps(
        body, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def error_payload(code: str, message: str, **fields: Any) -> bytes:
    return encode_control("error", code=code, message=message, **fields)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def require_field(message: Control, name: str, kind: type | tuple[type, ...]) -> Any:
    """A field of ``message`` of type ``kind``, else a ``bad-message`` error."""
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f'"{message.op}" needs a field "{name}" of the right type',
        )
    return value


def check_frame_limit(value: Any) -> int:
    """A peer's announced ``max_frame``, checked."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not MIN_FRAME_SIZE <= value <= LARGEST_FRAME
    ):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f'"max_frame" must be an integer from {MIN_FRAME_SIZE} to {LARGEST_FRAME}',
        )
    return value


def check_hello(message: Control) -> int:
    """Check a peer's ``hello``; return its ``max_frame``."""
    if message.op != "hello":
        raise ProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE, f'expected "hello" first, got "{message.op}"'
        )
    if message.get("protocol") != PROTOCOL:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f'"protocol" must be "{PROTOCOL}"')
    version = message.get("version")
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; this server speaks "
            f"version {VERSION}: upgrade the client",
        )
    return check_frame_limit(message.get("max_frame"))


# --------------------------------------------------------------------------
# Policy shared by every connection of one service.
# --------------------------------------------------------------------------


@attrs.frozen
class SessionPolicy:
    """The limits and rules of one TCP service (from its config section)."""

    service: str
    max_frame_size: int = 2 * 1024 * 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_connections: int = 100
    max_connections_per_address: int = 10
    allow_anonymous: bool = False
    auth_failure_delay: float = 1.0


class ISessionApplication(Interface):
    """What a service does with a READY session (file, command ...).

    Built by the service's application factory, ``factory(session)``, when
    the session becomes READY.  ``control_received`` and ``data_received``
    may return an awaitable; a :class:`RequestError` raised by them (or by
    the awaitable) is sent to the client as an error message.
    """

    def control_received(message: Control) -> object:
        """A control message other than ``ping`` and ``bye`` arrived."""

    def data_received(payload: bytes | memoryview) -> object:
        """A data frame arrived (its payload, without the type byte)."""

    def connection_lost(reason: Failure) -> None:
        """The connection is gone; release everything (stop producers, temp files)."""


ApplicationFactory = Callable[["ServerSession"], ISessionApplication]


# --------------------------------------------------------------------------
# The server's session state machine.
# --------------------------------------------------------------------------


class State:
    HELLO = "hello"
    AUTH = "auth"
    READY = "ready"
    #: Authentication failed: input is ignored until the delayed error is sent.
    FAILING = "failing"
    CLOSED = "closed"


class ServerSession:
    """One client's session, from ``hello`` to close.

    The application sees this object: who authenticated (:attr:`user`,
    :attr:`authenticated`), how to answer (:meth:`send`, :meth:`send_error`,
    :meth:`send_data`, :meth:`write_frame`), how to stream
    (:meth:`register_producer`) and apply back-pressure
    (:meth:`pause_receiving`), and :meth:`close`.
    """

    def __init__(self, protocol: ServerProtocol, factory: SessionFactory) -> None:
        self.protocol = protocol
        self.factory = factory
        self.policy = factory.policy
        self.clock = factory.clock
        self.state = State.HELLO
        #: The authenticated user; None before authentication and when anonymous.
        self.user: str | None = None
        self.application: ISessionApplication | None = None
        self._server_nonce = new_nonce()
        self._timer: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None

    # -- what the application uses ----------------------------------------

    @property
    def authenticated(self) -> bool:
        """Whether the client proved a user's key (False when anonymous)."""
        return self.user is not None

    @property
    def peer(self) -> str:
        """``host:port`` of the client, for log lines."""
        return self.protocol.peer

    @property
    def peer_host(self) -> str:
        return self.protocol.peer_host

    @property
    def max_data_size(self) -> int:
        """The largest data-frame payload the client accepts."""
        return self.protocol.peer_max_length - len(DATA_TYPE)

    @property
    def open(self) -> bool:
        return self.state != State.CLOSED

    def send(self, op: str, **fields: Any) -> None:
        """Send a control message."""
        if self.state == State.CLOSED:
            return
        self.protocol.sendString(encode_control(op, **fields))
        self.touch()

    def send_error(self, code: str, message: str, **fields: Any) -> None:
        """Send an error message (the session stays open)."""
        self.send("error", code=code, message=message, **fields)

    def send_data(self, payload: bytes) -> None:
        """Send one data frame (at most :attr:`max_data_size` bytes)."""
        if self.state == State.CLOSED:
            return
        self._check_data_size(len(payload))
        self.protocol.transport.write(encode_data_frame(payload))
        self.touch()

    def write_frame(self, frame: bytes | memoryview, payload_size: int) -> None:
        """Write an already encoded data frame (from a DataFrameBuffer)."""
        if self.state == State.CLOSED:
            return
        self._check_data_size(payload_size)
        self.protocol.transport.write(frame)
        self.touch()

    def _check_data_size(self, size: int) -> None:
        if size > self.max_data_size:
            raise FrameTooLarge(
                f"a {size}-byte data frame exceeds the client's limit of "
                f"{self.max_data_size} bytes; split it"
            )

    def register_producer(self, producer: Any, streaming: bool) -> None:
        """Stream through the connection with a push or pull ``producer``."""
        self.protocol.transport.registerProducer(producer, streaming)

    def unregister_producer(self) -> None:
        self.protocol.transport.unregisterProducer()

    def pause_receiving(self) -> None:
        """Stop delivering frames (and reading the socket) until resumed."""
        if self.state != State.CLOSED:
            self.protocol.pauseProducing()

    def resume_receiving(self) -> None:
        if self.state != State.CLOSED:
            self.protocol.resumeProducing()

    def touch(self) -> None:
        """Count progress as activity, postponing the idle timeout."""
        if (
            self.state == State.READY
            and self._timer is not None
            and self._timer.active()
        ):
            self._timer.reset(self.policy.idle_timeout)

    def close(self, code: str | None = None, message: str = "") -> None:
        """Close the connection, first sending an error if ``code`` is given."""
        if self.state == State.CLOSED:
            return
        if code is not None:
            self.protocol.sendString(error_payload(code, message))
        self._enter_closed()
        self.protocol.transport.loseConnection()
        # A peer that never reads would keep the connection open forever.
        self._abort = self.clock.callLater(
            CLOSE_GRACE, self.protocol.transport.abortConnection
        )

    # -- driven by the protocol -------------------------------------------

    def connection_made(self) -> None:
        host = self.peer_host
        refusal = self.factory.admit(host)
        if refusal is not None:
            code, reason = refusal
            self._warn(
                "session.refused",
                "refused connection from {peer}: {reason}",
                peer=self.peer,
                reason=reason,
            )
            self.close(code, reason)
            return
        self.factory.count(self)
        self._timer = self.clock.callLater(
            self.policy.handshake_timeout, self._timed_out
        )

    def connection_lost(self, reason: Failure) -> None:
        self.factory.uncount(self)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        application, self.application = self.application, None
        self._enter_closed()
        if application is not None:
            try:
                application.connection_lost(reason)
            except Exception:
                log.failure(
                    "{service} application failed to clean up after {peer}",
                    event="session.application.failed",
                    service=self.policy.service,
                    peer=self.peer,
                )

    def frame_received(self, payload: bytes) -> None:
        if self.state in (State.CLOSED, State.FAILING):
            return
        try:
            message = decode_frame(payload)
            if self.state == State.READY:
                self.touch()
                self._ready(message)
            elif self.state == State.HELLO:
                self._hello(message)
            else:
                self._auth(message)
        except ProtocolError as error:
            self._protocol_error(error)

    # -- states -------------------------------------------------------------

    def _hello(self, message: Control | Data) -> None:
        if isinstance(message, Data):
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, 'expected "hello" first')
        self.protocol.peer_max_length = check_hello(message)
        mechanisms = [HMAC_SHA256] + (
            [ANONYMOUS] if self.policy.allow_anonymous else []
        )
        self.state = State.AUTH
        self.send(
            "hello",
            protocol=PROTOCOL,
            version=VERSION,
            service=self.policy.service,
            max_frame=self.policy.max_frame_size,
            auth=mechanisms,
            nonce=b64(self._server_nonce),
        )

    def _auth(self, message: Control | Data) -> None:
        if isinstance(message, Data) or message.op != "auth":
            what = "a data frame" if isinstance(message, Data) else f'"{message.op}"'
            self._fail_auth(
                ErrorCode.AUTH_REQUIRED,
                f'{what} before authentication; send "auth" first',
            )
            return
        mechanism = message.get("mechanism")
        if mechanism == ANONYMOUS:
            if not self.policy.allow_anonymous:
                self._fail_auth(
                    ErrorCode.AUTH_REQUIRED,
                    f"the {self.policy.service} service requires authentication; "
                    "configure [client] user and key_file",
                )
                return
            self._become_ready(None, {})
            return
        if mechanism != HMAC_SHA256:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f'"mechanism" must be "{HMAC_SHA256}" or "{ANONYMOUS}"',
            )
        user = require_field(message, "user", str)
        try:
            client_nonce = decode_base64(message.get("nonce"), '"nonce"')
            proof = decode_base64(message.get("proof"), '"proof"')
        except ValueError as error:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(error)) from None
        if len(client_nonce) != NONCE_SIZE:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f'"nonce" must be {NONCE_SIZE} bytes'
            )
        # A client "nonce" equal to ours can only be a reflection attempt.
        if client_nonce == self._server_nonce or not USER_NAME.fullmatch(user):
            answer = None
        else:
            answer = self.factory.verifier.verify(
                user, self._server_nonce, client_nonce, proof
            )
        if answer is None:
            self._fail_auth(
                ErrorCode.AUTH_FAILED,
                "authentication failed: unknown user or wrong key",
            )
            return
        self._become_ready(user, {"proof": b64(answer)})

    def _become_ready(self, user: str | None, extra: dict[str, Any]) -> None:
        self.user = user
        self.state = State.READY
        self.send("ready", user=user, **extra)
        log.info(
            "{peer} authenticated as {user}",
            event="session.ready",
            service=self.policy.service,
            peer=self.peer,
            user=user if user is not None else "(anonymous)",
        )
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(self.policy.idle_timeout, self._timed_out)
        try:
            self.application = self.factory.application_factory(self)
        except Exception:
            log.failure(
                "{service} application failed to start a session",
                event="session.application.failed",
                service=self.policy.service,
            )
            self.close(ErrorCode.INTERNAL, "the server failed; see its log")

    def _ready(self, message: Control | Data) -> None:
        application = self.application
        if application is None:
            return
        if isinstance(message, Data):
            self._run(application.data_received, message.payload)
            return
        if message.op == "ping":
            self.send(
                "pong", **({"id": message["id"]} if "id" in message.fields else {})
            )
        elif message.op == "bye":
            self.send("bye")
            self.close()
        elif message.op in ("hello", "auth"):
            raise ProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f'"{message.op}" after ready'
            )
        else:
            self._run(application.control_received, message)

    def _run(self, handler: Callable[[Any], object], argument: Any) -> None:
        try:
            result = handler(argument)
        except ProtocolError as error:
            self._protocol_error(error)
            return
        except Exception:
            self._application_failed(Failure())
            return
        if inspect.iscoroutine(result) or isinstance(result, Deferred):
            ensureDeferred(result).addErrback(self._application_errback)

    def _application_errback(self, failure: Failure) -> None:
        if isinstance(failure.value, ProtocolError):
            self._protocol_error(failure.value)
        else:
            self._application_failed(failure)

    def _application_failed(self, failure: Failure) -> None:
        log.failure(
            "{service} application failed for {peer}",
            failure,
            event="session.application.failed",
            service=self.policy.service,
            peer=self.peer,
        )
        self.close(ErrorCode.INTERNAL, "the server failed on this request; see its log")

    # -- failures -----------------------------------------------------------

    def _protocol_error(self, error: ProtocolError) -> None:
        if self.state == State.CLOSED:
            return
        if not error.fatal:
            fields = error.fields if isinstance(error, RequestError) else {}
            self.send_error(error.code, error.message, **fields)
            return
        log.warn(
            "closing {peer}: {code}: {reason}",
            event="session.protocol_error",
            service=self.policy.service,
            peer=self.peer,
            code=error.code,
            reason=error.message,
        )
        self.close(error.code, error.message)

    def _fail_auth(self, code: str, message: str) -> None:
        """Log, count towards a lock-out, and answer only after a delay."""
        host = self.peer_host
        locked = self.factory.failures.record_failure(host)
        self._warn(
            "session.auth.failed",
            "authentication failure from {peer} ({code}){lock}",
            peer=self.peer,
            code=code,
            lock="; address locked out" if locked else "",
        )
        # Stop reading: nothing the client sends now changes the outcome.
        self.state = State.FAILING
        self._cancel_timer()
        self.protocol.pauseProducing()
        self._timer = self.clock.callLater(
            self.policy.auth_failure_delay, self._send_failure, code, message
        )

    def _warn(self, event: str, text: str, **fields: Any) -> None:
        """A warning that anyone who can connect can provoke: throttled per
        service and kind, each line saying how many were held back."""
        held = self.factory.log_throttle(event).admit()
        if held is None:
            return
        log.warn(
            text + "{held_back}",
            event=event,
            service=self.policy.service,
            held_back=f" (and {held} more not logged)" if held else "",
            not_logged=held,
            **fields,
        )

    def _send_failure(self, code: str, message: str) -> None:
        self._timer = None
        self.close(code, message)

    def _timed_out(self) -> None:
        self._timer = None
        if self.state == State.READY:
            code, what = (
                ErrorCode.IDLE_TIMEOUT,
                f"idle for {self.policy.idle_timeout:g}s",
            )
        else:
            code, what = (
                ErrorCode.HANDSHAKE_TIMEOUT,
                f"handshake not finished within {self.policy.handshake_timeout:g}s",
            )
        log.info(
            "closing {peer}: {what}",
            event=f"session.{code.replace('-', '_')}",
            service=self.policy.service,
            peer=self.peer,
            what=what,
        )
        self.close(code, what)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _enter_closed(self) -> None:
        self._cancel_timer()
        self.state = State.CLOSED


# --------------------------------------------------------------------------
# The thin Protocol and its factory.
# --------------------------------------------------------------------------


class ServerProtocol(FrameReceiver):
    """Frames in, frames out; everything else is the :class:`ServerSession`'s."""

    factory: SessionFactory
    session: ServerSession

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.factory.policy.max_frame_size
        self.peer_max_length = MIN_FRAME_SIZE  # until the client's hello says more
        peer = self.transport.getPeer()
        self.peer_host = str(getattr(peer, "host", peer))
        port = getattr(peer, "port", None)
        self.peer = (
            f"[{self.peer_host}]:{port}"
            if ":" in self.peer_host
            else f"{self.peer_host}:{port}"
        )
        self.session = ServerSession(self, self.factory)
        self.session.connection_made()

    def stringReceived(self, string: bytes) -> None:
        self.session.frame_received(string)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session.connection_lost(reason)


class SessionFactory(Factory):
    """Builds one :class:`ServerProtocol` per connection; enforces connection caps.

    ``policy``, ``verifier`` (its users) and the failure tracker's limits can
    be replaced while running (reload); existing sessions keep their limits.
    """

    protocol = ServerProtocol  # type: ignore[assignment]
    # The service logs where it listens; "Starting factory <object at 0x...>"
    # tells an operator nothing more.
    noisy = False

    def __init__(
        self,
        policy: SessionPolicy,
        verifier: Verifier,
        failures: FailureTracker,
        application_factory: ApplicationFactory,
        clock: Any,
    ) -> None:
        self.policy = policy
        self.verifier = verifier
        self.failures = failures
        self.application_factory = application_factory
        self.clock = clock
        self.sessions: set[ServerSession] = set()
        self.per_address: dict[str, int] = {}
        self._log_throttles: dict[str, LogThrottle] = {}

    def log_throttle(self, event: str) -> LogThrottle:
        """The throttle for warnings of kind ``event`` from this service."""
        throttle = self._log_throttles.get(event)
        if throttle is None:
            throttle = self._log_throttles[event] = LogThrottle(self.clock)
        return throttle

    def admit(self, host: str) -> tuple[str, str] | None:
        """Why a connection from ``host`` is refused: ``(code, reason)``, or None."""
        if self.failures.locked(host):
            return (
                ErrorCode.LOCKED_OUT,
                "too many authentication failures from your address; try again later",
            )
        if len(self.sessions) >= self.policy.max_connections:
            return (
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"the server has {self.policy.max_connections} connections, its "
                "limit; try again later",
            )
        if self.per_address.get(host, 0) >= self.policy.max_connections_per_address:
            return (
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"your address has {self.policy.max_connections_per_address} "
                "connections, the limit; close one and retry",
            )
        return None

    def count(self, session: ServerSession) -> None:
        self.sessions.add(session)
        host = session.peer_host
        self.per_address[host] = self.per_address.get(host, 0) + 1

    def uncount(self, session: ServerSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        host = session.peer_host
        remaining = self.per_address.get(host, 1) - 1
        if remaining:
            self.per_address[host] = remaining
        else:
            self.per_address.pop(host, None)

    def close_all(self, code: str, message: str) -> None:
        """Close every session, telling each client why (shutdown)."""
        for session in list(self.sessions):
            session.close(code, message)
