"""The client side of the netlab session protocol, for the CLI and other programs.

::

    session = await connect(config, "file", reactor=reactor)
    answer = await session.request("stat", path="notes.txt")
    await session.close()

:func:`connect` connects (over TLS when the service's endpoint in the
configuration is ``ssl:``), says ``hello``, authenticates with the user and
key from the configuration (or anonymously when no user is set), checks the
server's proof, and returns a READY :class:`Session`.  Every public method
returns a Deferred, so ``await`` works in ``async def`` code under
``ensureDeferred``.  Failures are :mod:`netlab.errors` classes:
:class:`~netlab.errors.ConnectionFailed`,
:class:`~netlab.errors.AuthenticationFailed`,
:class:`~netlab.errors.RemoteError` (an ``error`` message from the server)
and :class:`~netlab.errors.TLSVerificationFailed`.
"""

from __future__ import annotations

import hmac
import os
import re
from collections import deque
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure

from netlab.auth import (
    NONCE_SIZE,
    KeyFileError,
    client_proof,
    decode_base64,
    new_nonce,
    read_key_file,
    server_proof,
)
from netlab.config import NetlabConfig
from netlab.errors import (
    AuthenticationFailed,
    ConfigError,
    ConnectionFailed,
    NetlabError,
    RemoteError,
    TLSVerificationFailed,
    UsageError,
)
from netlab.framing import (
    DATA_TYPE,
    DataFrameBuffer,
    FrameReceiver,
    encode_data_frame,
    writes_consumed_at_once,
)
from netlab.session import (
    ANONYMOUS,
    HMAC_SHA256,
    PROTOCOL,
    VERSION,
    Control,
    Data,
    ErrorCode,
    ProtocolError,
    b64,
    check_hello,
    decode_frame,
    encode_control,
)

#: The largest frame the client accepts (announced in its hello).
CLIENT_MAX_FRAME = 16 * 1024 * 1024
#: Reading from the socket pauses while this many received bytes wait for
#: :meth:`Session.receive`, and resumes below a quarter of it.
QUEUE_HIGH_WATER = 8 * 1024 * 1024

#: Server error codes that mean "not authenticated" and "busy".
_AUTH_CODES = {ErrorCode.AUTH_FAILED, ErrorCode.AUTH_REQUIRED, ErrorCode.LOCKED_OUT}


@attrs.frozen
class Identity:
    """Who the client authenticates as; ``user`` None means anonymously."""

    user: str | None = None
    key: bytes | None = attrs.field(default=None, repr=False)


def resolve_identity(
    config: NetlabConfig, user: str | None = None, key_file: str | Path | None = None
) -> Identity:
    """Who to be: ``user``/``key_file``, else ``$NETLAB_KEY_FILE`` and ``[client]``."""
    name = user or config.client.user or None
    if name is None:
        return Identity()
    path = key_file or os.environ.get("NETLAB_KEY_FILE") or config.client.key_file
    if not path:
        raise ConfigError(
            f"user {name!r} needs a key: set key_file here or $NETLAB_KEY_FILE "
            "(netlab keygen creates one)",
            path=str(config.path) if config.path else None,
            section="client",
            key="key_file",
        )
    try:
        return Identity(name, read_key_file(Path(path).expanduser()))
    except KeyFileError as error:
        raise ConfigError(str(error)) from None


def service_address(
    config: NetlabConfig, service: str, server: str | None
) -> tuple[str, int, bool]:
    """``(host, port, tls)`` for ``service``.

    ``server`` (``--server``) is ``HOST``, ``HOST:PORT`` or ``[IPV6]:PORT``;
    the port otherwise comes from the service's endpoint in the configuration,
    and TLS is used when that endpoint is ``ssl:`` (or ``systemd:`` with
    ``tls=yes``).
    """
    address = config.listen_address(service)
    host = server or config.client.server
    port: int | None = None
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+):(\d+)", host)
    if match:
        host = match.group(1) or match.group(3)
        port_text = match.group(2) or match.group(4)
        port = int(port_text) if port_text else None
    if port is None:
        port = address.port
    if not port:
        raise UsageError(
            f"[{service}] endpoint {address.description!r} names no port to connect "
            "to; give one with --server HOST:PORT"
        )
    return host, port, address.tls


def tls_options(config: NetlabConfig, host: str) -> Any:
    """TLS options that verify ``host`` against ``[tls] ca_file`` (or the system)."""
    from twisted.internet import ssl

    from netlab.tls import pem_certificates

    ca_file = config.tls.ca_file
    if ca_file is None:
        trust = ssl.platformTrust()
    else:
        blocks = pem_certificates(ca_file)
        if not blocks:
            raise ConfigError(
                f'"{ca_file}" holds no PEM certificate', section="tls", key="ca_file"
            )
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(block) for block in blocks]
        )
    return ssl.optionsForClientTLS(host, trustRoot=trust)


def _connection_error(reason: Failure, host: str, tls: bool) -> NetlabError:
    """Turn why a connection ended into one clear error."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason.check(VerificationError):
        return TLSVerificationFailed(
            f"the TLS certificate of {host} does not name {host}; connect "
            "(--server) with a name the certificate holds"
        )
    if reason.check(SSL.Error):
        detail = str(reason.value)
        if "certificate verify failed" in detail:
            return TLSVerificationFailed(
                f"the TLS certificate of {host} is not trusted; set [tls] ca_file "
                "to the authority that signed it"
            )
        return ConnectionFailed(
            f"TLS with {host} failed ({detail}); is its endpoint really ssl:?"
        )
    if reason.check(ConnectionDone) and not tls:
        return ConnectionFailed(f"{host} closed the connection")
    return ConnectionFailed(f"connection to {host} lost: {reason.getErrorMessage()}")


def remote_error(message: Control) -> NetlabError:
    """The exception for an ``error`` message from the server."""
    code = str(message.get("code", "unknown"))
    text = str(message.get("message", "the server reported an error"))
    if code in _AUTH_CODES:
        return AuthenticationFailed(f"{text} ({code})")
    if code == ErrorCode.TOO_MANY_CONNECTIONS:
        return ConnectionFailed(f"{text} ({code})")
    return RemoteError(code, text)


class ClientProtocol(FrameReceiver):
    """The client's end of one connection: handshake, then a receive queue."""

    MAX_LENGTH = CLIENT_MAX_FRAME

    def __init__(self, identity: Identity, host: str, tls: bool) -> None:
        self.identity = identity
        self.host = host
        self.tls = tls
        self.handshake: Deferred[Control] = Deferred()
        self.hello: Control | None = None
        self._client_nonce = new_nonce()
        self._queue: deque[Control | Data] = deque()
        self._queued_bytes = 0
        self._waiting: deque[Deferred[Control | Data]] = deque()
        self._closed: NetlabError | None = None
        self.closing = False
        self.lost = False
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.sendString(
            encode_control(
                "hello", protocol=PROTOCOL, version=VERSION, max_frame=CLIENT_MAX_FRAME
            )
        )

    def stringReceived(self, string: bytes) -> None:
        try:
            # The server's replies are bounded by our frame limit alone.
            message = decode_frame(string, control_limit=CLIENT_MAX_FRAME)
        except ProtocolError as error:
            self._abandon(
                ConnectionFailed(f"{self.host} sent a malformed frame: {error}")
            )
            return
        if not self.handshake.called:
            try:
                self._handshake_step(message)
            except NetlabError as error:
                self._abandon(error)
            except ProtocolError as error:
                self._abandon(
                    ConnectionFailed(f"{self.host} broke the protocol: {error}")
                )
            return
        self._deliver(message)

    def _handshake_step(self, message: Control | Data) -> None:
        if isinstance(message, Data):
            raise ConnectionFailed(f"{self.host} sent data during the handshake")
        if message.op == "error":
            raise remote_error(message)
        if self.hello is None:
            self.peer_max_length = check_hello(message)
            self.hello = message
            self.sendString(self._auth_message(message))
            return
        if message.op != "ready":
            raise ConnectionFailed(
                f'{self.host} sent "{message.op}" instead of "ready"'
            )
        self._check_server_proof(message)
        self.handshake.callback(message)

    def _auth_message(self, hello: Control) -> bytes:
        mechanisms = hello.get("auth")
        if not isinstance(mechanisms, list):
            raise ConnectionFailed(f"{self.host} offered no authentication mechanism")
        user, key = self.identity.user, self.identity.key
        if user is None or key is None:
            if ANONYMOUS not in mechanisms:
                raise AuthenticationFailed(
                    f"the {hello.get('service')} service on {self.host} requires "
                    "authentication: set [client] user and key_file, or --user"
                )
            return encode_control("auth", mechanism=ANONYMOUS)
        if HMAC_SHA256 not in mechanisms:
            raise ConnectionFailed(f"{self.host} does not offer {HMAC_SHA256}")
        try:
            server_nonce = decode_base64(hello.get("nonce"), "nonce")
        except ValueError:
            server_nonce = b""
        if len(server_nonce) != NONCE_SIZE:
            raise ConnectionFailed(f"{self.host} sent a malformed nonce")
        self._server_nonce = server_nonce
        proof = client_proof(key, server_nonce, self._client_nonce, user)
        return encode_control(
            "auth",
            mechanism=HMAC_SHA256,
            user=user,
            nonce=b64(self._client_nonce),
            proof=b64(proof),
        )

    def _check_server_proof(self, ready: Control) -> None:
        user, key = self.identity.user, self.identity.key
        if user is None or key is None:
            return
        try:
            proof = decode_base64(ready.get("proof"), "proof")
        except ValueError:
            proof = b""
        expected = server_proof(key, self._server_nonce, self._client_nonce, user)
        if ready.get("user") != user or not hmac.compare_digest(expected, proof):
            raise AuthenticationFailed(
                f"{self.host} did not prove it knows your key: it is not the server "
                "you have a key for, or your key is outdated"
            )

    def _deliver(self, message: Control | Data) -> None:
        if self._waiting:
            self._waiting.popleft().callback(message)
            return
        self._queue.append(message)
        self._queued_bytes += _size(message)
        if self._queued_bytes > QUEUE_HIGH_WATER and not self.paused:
            self.pauseProducing()

    def next_message(self) -> Deferred[Control | Data]:
        """The next message from the server (queued or to come)."""
        if self._queue:
            message = self._queue.popleft()
            self._queued_bytes -= _size(message)
            if (
                self.paused
                and self._queued_bytes < QUEUE_HIGH_WATER // 4
                and self._closed is None
            ):
                self.resumeProducing()
            return succeed(message)
        if self._closed is not None:
            return fail(self._closed)
        waiter: Deferred[Control | Data] = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        return waiter

    def _abandon(self, error: NetlabError) -> None:
        """Give up on the connection because of ``error``."""
        if self._closed is None:
            self._closed = error
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._closed is None:
            if self.closing:
                self._closed = ConnectionFailed("the session is closed")
            else:
                self._closed = _connection_error(reason, self.host, self.tls)
        if not self.handshake.called:
            self.handshake.errback(self._closed)
        while self._waiting:
            self._waiting.popleft().errback(self._closed)
        self.lost = True
        for waiter in self._lost_waiters:
            waiter.callback(None)

    def when_lost(self) -> Deferred[None]:
        """Fires when the connection is gone."""
        if self.lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._lost_waiters.remove)
        self._lost_waiters.append(waiter)
        return waiter


def _size(message: Control | Data) -> int:
    return len(message.payload) if isinstance(message, Data) else 256


class Session:
    """A READY session with a netlab TCP service.

    Receive with :meth:`receive` (control messages and data frames in order;
    an ``error`` message raises); send with :meth:`send`, :meth:`send_data`
    or, for streaming, :meth:`data_frame_buffer` + :meth:`write_frame` under a
    producer registered with :meth:`register_producer`.
    """

    def __init__(
        self, protocol: ClientProtocol, ready: Control, clock: Any, timeout: float
    ) -> None:
        self.protocol = protocol
        self.clock = clock
        self.timeout = timeout
        assert protocol.hello is not None
        #: The server's hello (``service``, ``max_frame`` ...).
        self.hello: Control = protocol.hello
        #: The user the server authenticated, or None when anonymous.
        self.user: str | None = ready.get("user")

    @property
    def service(self) -> str:
        return str(self.hello.get("service"))

    @property
    def max_data_size(self) -> int:
        """The largest data-frame payload the server accepts."""
        return self.protocol.peer_max_length - len(DATA_TYPE)

    @property
    def transport(self) -> Any:
        return self.protocol.transport

    def send(self, op: str, **fields: Any) -> None:
        """Send a control message."""
        self.protocol.sendString(encode_control(op, **fields))

    def send_data(self, payload: bytes) -> None:
        """Send one data frame (at most :attr:`max_data_size` bytes)."""
        if len(payload) > self.max_data_size:
            raise ValueError(
                f"{len(payload)} bytes exceed the server's data frame limit of "
                f"{self.max_data_size}"
            )
        self.protocol.transport.write(encode_data_frame(payload))

    def data_frame_buffer(self, capacity: int) -> DataFrameBuffer:
        """A reused frame buffer of ``capacity`` bytes, capped at the server's limit.

        Its frames are views of the buffer itself when the transport is done
        with each write at once (TLS): one copy per frame less.
        """
        return DataFrameBuffer(
            min(capacity, self.max_data_size),
            reuse=writes_consumed_at_once(self.protocol.transport),
        )

    def write_frame(self, frame: bytes | memoryview) -> None:
        """Write a frame from :meth:`DataFrameBuffer.fill` as is."""
        self.protocol.transport.write(frame)

    def register_producer(self, producer: Any, streaming: bool) -> None:
        self.protocol.transport.registerProducer(producer, streaming)

    def unregister_producer(self) -> None:
        self.protocol.transport.unregisterProducer()

    def receive(self, timeout: float | None = None) -> Deferred[Control | Data]:
        """The next message; an ``error`` message fails it with :func:`remote_error`."""
        return Deferred.fromCoroutine(self._receive(timeout))

    async def _receive(self, timeout: float | None) -> Control | Data:
        waiting = self.protocol.next_message()
        limit = self.timeout if timeout is None else timeout
        waiting.addTimeout(limit, self.clock)
        try:
            message = await waiting
        except (TimeoutError, CancelledError):
            raise ConnectionFailed(
                f"{self.protocol.host} did not answer within {limit:g}s"
            ) from None
        if isinstance(message, Control) and message.op == "error":
            raise remote_error(message)
        return message

    def request(self, op: str, **fields: Any) -> Deferred[Control]:
        """Send a control message and return the control message that answers it."""
        return Deferred.fromCoroutine(self._request(op, fields))

    async def _request(self, op: str, fields: dict[str, Any]) -> Control:
        self.send(op, **fields)
        answer = await self._receive(None)
        if not isinstance(answer, Control):
            raise ConnectionFailed(
                f'{self.protocol.host} answered "{op}" with a data frame'
            )
        return answer

    def ping(self) -> Deferred[float]:
        """Round-trip a ``ping``; the result is the time it took, in seconds."""
        return Deferred.fromCoroutine(self._ping())

    async def _ping(self) -> float:
        started = self.clock.seconds()
        answer = await self._request("ping", {"id": 1})
        if answer.op != "pong":
            raise ConnectionFailed(
                f'{self.protocol.host} answered ping with "{answer.op}"'
            )
        return float(self.clock.seconds() - started)

    def close(self) -> Deferred[None]:
        """Say ``bye`` and wait (bounded) for the server to close the connection."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        protocol = self.protocol
        if protocol.lost:
            return
        protocol.closing = True
        protocol.sendString(encode_control("bye"))
        lost = protocol.when_lost()
        lost.addTimeout(self.timeout, self.clock)
        try:
            await lost
        except (TimeoutError, CancelledError):
            # The server did not close in time: our side of the bye is done.
            protocol.transport.abortConnection()


def connect(
    config: NetlabConfig,
    service: str = "file",
    *,
    reactor: Any = None,
    server: str | None = None,
    user: str | None = None,
    key_file: str | Path | None = None,
    identity: Identity | None = None,
) -> Deferred[Session]:
    """Connect to ``service``, authenticate, and return a READY :class:`Session`.

    ``server`` overrides ``[client] server`` (``HOST``, ``HOST:PORT``),
    ``user`` and ``key_file`` override the configured identity, or
    ``identity`` gives one outright.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return Deferred.fromCoroutine(
        _connect(
            config,
            service,
            reactor,
            server,
            identity or resolve_identity(config, user, key_file),
        )
    )


async def _connect(
    config: NetlabConfig,
    service: str,
    reactor: Any,
    server: str | None,
    identity: Identity,
) -> Session:
    host, port, tls = service_address(config, service, server)
    timeout = config.client.timeout
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    options = tls_options(config, host) if tls else None
    factory = Factory.forProtocol(lambda: ClientProtocol(identity, host, tls))
    try:
        if options is None:
            connecting = endpoint.connect(factory)
        else:
            # Imported here: plain-TCP commands never need netlab.tls.
            from netlab.tls import connect_tls

            connecting = connect_tls(endpoint, options, factory, reactor)
        protocol: ClientProtocol = await connecting
    except Exception as error:
        raise ConnectionFailed(
            f"cannot connect to the {service} service at {host}:{port}: {error}"
        ) from None
    handshake = protocol.handshake
    handshake.addTimeout(timeout, reactor)
    try:
        ready = await handshake
    except (TimeoutError, CancelledError):
        protocol.transport.abortConnection()
        raise ConnectionFailed(
            f"the {service} service at {host}:{port} did not finish the handshake "
            f"within {timeout:g}s"
        ) from None
    return Session(protocol, ready, reactor, timeout)
