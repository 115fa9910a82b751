"""TLS for netlab's stream services and client: Twisted's memory-BIO TLS, in bulk.

Twisted's :class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` moves data
through pyOpenSSL one 16 KiB TLS record at a time: for every record it sends
it copies a slice of the plaintext, encrypts it, reads the ciphertext out of
the memory BIO and writes it to the TCP transport as its own object (which
the transport later joins into one buffer again: another copy); for every
record it receives it calls the application's ``dataReceived`` once.  A
1 MiB data frame therefore costs 64 round trips through the Python layers on
each side.  Measured on a 1 GiB get, that per-record work, not the AES-GCM
itself (about 0.2 CPU-s/GiB per side here, with AES-NI), was most of the
TLS cost.

:class:`BulkTLSProtocol` keeps Twisted's TLS state machine (handshake,
buffering while OpenSSL wants to read, shutdown, producers, certificate
verification through the connection creator) and changes only how bytes move:

* a write hands the plaintext to OpenSSL record after record from one
  ``memoryview`` (no slice copies), then drains all the ciphertext with as
  few ``bio_read`` calls as its size needs and writes it to the TCP transport
  as one object;
* a write of at least :data:`BULK_WRITE` bytes skips Twisted's small-write
  aggregator (which copies every write it is given) once that aggregator is
  flushed, so ordering is kept;
* everything decrypted from one TCP read reaches the application in one
  ``dataReceived`` call.

pyOpenSSL's public ``send`` and ``recv`` take or return one record per call,
each through a Python wrapper (argument checks, error translation, and for
``recv`` a fresh buffer copied into a fresh ``bytes``).  :func:`encrypt` and
:func:`decrypt` instead loop over ``SSL_write`` / ``SSL_read`` through
pyOpenSSL's own cffi binding: one buffer for a whole write or a whole TCP
read, errors translated by pyOpenSSL as before.  That binding is private to
pyOpenSSL, so it is looked up once and, if a future pyOpenSSL lacks it, the
public calls are used instead (the same bytes and errors, only slower).
Writes may be views of a buffer the caller refills (:attr:`BulkTLSProtocol.
consumes_writes`), and a receiver that takes views gets the decryption
buffer itself.  Together, on a 1 GiB get here, that took the sender's event
loop from 0.71-0.75 to 0.55-0.62 CPU-s and the receiver's by about 0.1 CPU-s.

:class:`BulkTLSFactory` builds those protocols.  A server using ``[tls]``'s
certificate (an ``ssl:`` endpoint, or a socket systemd passes with
``tls=yes``) wraps its factory in one, with :func:`server_tls_options`; an
``ssl:`` endpoint that names its own key and certificate listens through
:class:`TLSListeningReactor` instead, so Twisted parses those options.
:func:`server_connection_creator` puts ``TLS_AES_128_GCM_SHA256`` first in
the server's TLS 1.3 preference, the fastest suite with AES-NI.  Clients wrap
their TCP endpoint with :func:`connect_tls`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import OpenSSL.SSL
from OpenSSL.SSL import Connection, Context, Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
)
from twisted.python.failure import Failure
from zope.interface import implementer

#: TLS 1.3 suites a netlab server accepts, most preferred first (the server's
#: preference decides: Twisted's ``CertificateOptions`` sets
#: ``OP_CIPHER_SERVER_PREFERENCE``).  OpenSSL's default puts AES-256-GCM first.
TLS13_CIPHERSUITES = (
    b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
)

#: Writes this large go straight to OpenSSL instead of through Twisted's
#: small-write aggregator (whose own threshold is 64,000 bytes).
BULK_WRITE = 64 * 1024

#: The most plaintext one TLS record carries, and the most one ``recv`` returns.
_RECORD = 16 * 1024
#: What one TLS 1.3 record adds to its plaintext (header, type byte, AEAD tag),
#: rounded up; used to size the single ``bio_read`` that drains a write.
_RECORD_OVERHEAD = 32
#: ``bio_read`` size when nothing says how much is waiting (handshake, alerts).
_SMALL_READ = 32 * 1024


#: What :func:`encrypt` and :func:`decrypt` return when OpenSSL needs more
#: bytes from the peer (never raised, so it never holds a traceback).
_WANT_READ = WantReadError()


def _encrypt_public(
    connection: Connection, data: bytes | memoryview
) -> tuple[int, Error | None]:
    view = memoryview(data)
    sent = 0
    try:
        while sent < len(view):
            # One record per call (pyOpenSSL enables partial writes).
            sent += connection.send(view[sent:])
    except Error as error:
        return sent, error.with_traceback(None)
    return sent, None


def _decrypt_public(
    connection: Connection, limit: int
) -> tuple[bytes | memoryview, Error | None]:
    pieces = []
    size = 0
    try:
        while size < limit:
            piece = connection.recv(min(_RECORD, limit - size))
            pieces.append(piece)
            size += len(piece)
    except Error as error:
        return b"".join(pieces), error.with_traceback(None)
    return b"".join(pieces), None


def _records_through_binding() -> (
    tuple[
        Callable[[Connection, bytes | memoryview], tuple[int, Error | None]],
        Callable[[Connection, int], tuple[bytes | memoryview, Error | None]],
    ]
    | None
):
    """:func:`encrypt` and :func:`decrypt` through pyOpenSSL's cffi binding, if any."""
    ffi = getattr(OpenSSL.SSL, "_ffi", None)
    lib = getattr(OpenSSL.SSL, "_lib", None)
    if not (
        hasattr(ffi, "from_buffer")
        and hasattr(ffi, "new_allocator")
        and hasattr(lib, "SSL_write")
        and hasattr(lib, "SSL_read")
        and hasattr(Connection, "_raise_ssl_error")
    ):
        return None
    assert ffi is not None and lib is not None
    ssl_write = lib.SSL_write
    ssl_read = lib.SSL_read
    # OpenSSL writes every byte that is read back: no need to zero it first.
    allocate = ffi.new_allocator(should_clear_after_alloc=False)

    get_error = lib.SSL_get_error
    want_read = lib.SSL_ERROR_WANT_READ

    def failure(connection: Connection, ssl: Any, result: int) -> Error:
        """The exception pyOpenSSL raises for ``result``, without a traceback.

        The common case, an empty BIO, costs no exception at all.  A returned
        exception must not keep its traceback: the frames in it refer back to
        it, and the cycle would hold each read's buffer until the collector
        ran.
        """
        if get_error(ssl, result) == want_read:
            return _WANT_READ
        try:
            connection._raise_ssl_error(ssl, result)
        except Error as error:
            return error.with_traceback(None)
        # "No error" with nothing moved: nothing more can be done now.
        return _WANT_READ

    def encrypt(
        connection: Connection, data: bytes | memoryview
    ) -> tuple[int, Error | None]:
        ssl = connection._ssl
        size = len(data)
        sent = 0
        with ffi.from_buffer(data) as pointer:
            while sent < size:
                result = ssl_write(ssl, pointer + sent, size - sent)
                if result <= 0:
                    return sent, failure(connection, ssl, result)
                sent += result
        return sent, None

    def decrypt(
        connection: Connection, limit: int
    ) -> tuple[bytes | memoryview, Error | None]:
        ssl = connection._ssl
        buffer = allocate("char[]", limit)
        filled = 0
        error = None
        while filled < limit:
            result = ssl_read(ssl, buffer + filled, limit - filled)
            if result <= 0:
                error = failure(connection, ssl, result)
                break
            filled += result
        if filled * 2 < limit:
            # Mostly empty: a small copy lets the large buffer go at once.
            return ffi.buffer(buffer, filled)[:], error
        return memoryview(ffi.buffer(buffer, filled)), error

    return encrypt, decrypt


_FAST_RECORDS = _records_through_binding()

#: ``encrypt(connection, data)``: hand ``data`` to OpenSSL record after
#: record; returns how many bytes it took and the error (``WantReadError``
#: included) that stopped it, if any.
#: ``decrypt(connection, limit)``: up to ``limit`` bytes of plaintext (bytes,
#: or a view of a buffer of its own when that saves a copy) and the
#: error that stopped the reading (``WantReadError`` when the BIO ran dry),
#: or ``None`` when ``limit`` was reached first.
encrypt, decrypt = _FAST_RECORDS or (_encrypt_public, _decrypt_public)


class BulkTLSProtocol(BufferingTLSTransport):
    """A TLS transport that moves whole writes and reads through pyOpenSSL at once.

    Overrides the byte-moving methods of Twisted's ``TLSMemoryBIOProtocol``
    (``_write``, ``_flushSendBIO``, ``_flushReceiveBIO``) with the same
    contracts; see the module docstring for why.
    """

    def __init__(
        self,
        factory: TLSMemoryBIOFactory,
        wrappedProtocol: IProtocol,
        _connectWrapped: bool = True,
    ) -> None:
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        #: Ciphertext bytes just handed to OpenSSL by ``dataReceived``.
        self._incoming = 0
        #: Whether the application takes any bytes-like object in
        #: ``dataReceived`` (see :attr:`netlab.framing.FrameReceiver.accepts_views`):
        #: then it gets views of the decryption buffer, one copy less.
        self._deliver_views = bool(getattr(wrappedProtocol, "accepts_views", False))
        # The base class routes every write through its aggregator the same
        # way (an instance attribute), and resets it on connectionLost.
        self.write = self._write_bulk  # type: ignore[method-assign]

    #: ``write`` is done with its argument when it returns: it encrypts at
    #: once and copies whatever it must keep (small writes, writes waiting
    #: for the handshake), so a producer may refill the same buffer.  Read
    #: with :func:`netlab.framing.writes_consumed_at_once`.
    consumes_writes = True

    def _write_bulk(self, data: bytes | memoryview) -> None:
        if len(data) < BULK_WRITE:
            self._aggregator.write(bytes(data))
            return
        self._aggregator.flush()
        TLSMemoryBIOProtocol.write(self, data)

    def _write(self, data: bytes | memoryview) -> None:
        if self._lostTLSConnection:
            return
        sent, error = encrypt(self._tlsConnection, data)
        if isinstance(error, WantReadError):
            self._flushSendBIO(sent)
            self._bufferedWrite(bytes(data[sent:]))
        elif error is not None:
            # As in the base class: shutting down flushes what was
            # encrypted, and the error reaches connectionLost.
            self._tlsShutdownFinished(Failure(error))
        else:
            self._flushSendBIO(sent)

    def _flushSendBIO(self, plaintext: int = 0) -> None:
        """Write all the ciphertext waiting in the send BIO as one object.

        ``plaintext`` is how many bytes were just encrypted: the first read
        is sized to take all their records at once.
        """
        size = (
            plaintext + (plaintext // _RECORD + 1) * _RECORD_OVERHEAD + _SMALL_READ
            if plaintext
            else _SMALL_READ
        )
        pieces = []
        while True:
            try:
                pieces.append(self._tlsConnection.bio_read(size))
            except WantReadError:
                break
        if pieces:
            assert self.transport is not None
            self.transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def dataReceived(self, data: bytes) -> None:
        # At most this much plaintext can come out of it: one buffer for all.
        self._incoming = len(data)
        super().dataReceived(data)

    def _flushReceiveBIO(self) -> None:
        limit = max(self._incoming, _RECORD)
        self._incoming = 0
        while not self._lostTLSConnection:
            data, error = decrypt(self._tlsConnection, limit)
            if data and not self._aborted:
                ProtocolWrapper.dataReceived(
                    self, data if self._deliver_views else bytes(data)
                )
            if error is None:
                continue  # The buffer filled up: there may be more.
            if isinstance(error, WantReadError):
                break
            if isinstance(error, ZeroReturnError):
                # The peer closed TLS, after what was just delivered.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            else:
                self._tlsShutdownFinished(Failure(error))
        # The bytes received may call for an answer (handshake, key update).
        self._flushSendBIO()


class BulkTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` building :class:`BulkTLSProtocol` connections."""

    protocol = BulkTLSProtocol


@implementer(IOpenSSLServerConnectionCreator)
class _ServerConnections:
    """Server connections from a context configured once, before first use."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Connection:
        return Connection(self.context, None)


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S
)


def pem_certificates(path: Path) -> list[bytes]:
    """The PEM certificates in the file at ``path``, in order."""
    blocks: list[bytes] = _PEM_CERTIFICATE.findall(path.read_bytes())
    return blocks


def server_tls_options(certificate: Path, private_key: Path) -> CertificateOptions:
    """What a server presents: the first certificate of ``certificate`` with
    ``private_key``, then the rest of that file (a fullchain file's
    intermediates, which clients need to verify it).

    (Twisted's ``ssl:`` endpoint would take only the first certificate of a
    fullchain file unless its chain were named again as ``extraCertChain``.)
    """
    blocks = pem_certificates(certificate)
    if not blocks:
        raise ValueError(f'"{certificate}" holds no PEM certificate')
    own = PrivateCertificate.loadPEM(blocks[0] + b"\n" + private_key.read_bytes())
    return CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        extraCertChain=[Certificate.loadPEM(block).original for block in blocks[1:]],
    )


def server_connection_creator(context_factory: Any) -> _ServerConnections:
    """Connections from ``context_factory``'s context, preferring AES-128-GCM.

    ``context_factory`` is a ``CertificateOptions`` (certificate, key,
    chain, DH and cipher options): :func:`server_tls_options`, or what
    Twisted's ``ssl:`` endpoint parser built from the endpoint's own options.
    """
    context = context_factory.getContext()
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    return _ServerConnections(context)


class TLSListeningReactor:
    """A reactor stand-in for ``serverFromString`` with ``ssl:`` endpoints.

    Twisted's ``ssl:`` endpoint parses its options, loads the certificate and
    key, then calls ``reactor.listenSSL``; this ``listenSSL`` does what the
    reactor's does (TLS over ``listenTCP``) with :class:`BulkTLSFactory`.
    Every other attribute is the real reactor's.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenSSL(
        self,
        port: int,
        factory: IProtocolFactory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        tls_factory = BulkTLSFactory(
            server_connection_creator(contextFactory),
            False,
            factory,
            clock=self._reactor,
        )
        listening: IListeningPort = self._reactor.listenTCP(
            port, tls_factory, backlog, interface
        )
        return listening


async def connect_tls(
    endpoint: IStreamClientEndpoint,
    options: Any,
    factory: IProtocolFactory,
    clock: Any,
) -> Any:
    """Connect ``endpoint`` and run TLS over it; return the application protocol.

    ``options`` is a client connection creator such as Twisted's
    ``optionsForClientTLS`` (which verifies the server's certificate and
    name with service_identity).  The same as ``wrapClientTLS(options,
    endpoint).connect(factory)``, with :class:`BulkTLSFactory`.
    """
    connecting: Deferred[Any] = endpoint.connect(
        BulkTLSFactory(options, True, factory, clock=clock)
    )
    wrapper = await connecting
    return wrapper.wrappedProtocol
