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

:class:`BulkTLSFactory` builds those protocols.  Servers get them through
:class:`TLSListeningReactor` (handed to ``serverFromString`` for ``ssl:``
endpoints, so Twisted still parses the endpoint and loads the certificate);
:func:`server_connection_creator` also puts ``TLS_AES_128_GCM_SHA256`` first
in the server's TLS 1.3 preference, the fastest suite with AES-NI.  Clients
wrap their TCP endpoint with :func:`connect_tls`.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Connection, Context, Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
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
        # The base class routes every write through its aggregator the same
        # way (an instance attribute), and resets it on connectionLost.
        self.write = self._write_bulk  # type: ignore[method-assign]

    def _write_bulk(self, data: bytes) -> None:
        if len(data) < BULK_WRITE:
            self._aggregator.write(data)
            return
        self._aggregator.flush()
        TLSMemoryBIOProtocol.write(self, data)

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                # One record per call (pyOpenSSL enables partial writes).
                sent += self._tlsConnection.send(view[sent:])
            except WantReadError:
                self._flushSendBIO(sent)
                self._bufferedWrite(data[sent:])
                return
            except Error:
                # As in the base class: shutting down flushes what was
                # encrypted, and the error reaches connectionLost.
                self._tlsShutdownFinished(Failure())
                return
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

    def _flushReceiveBIO(self) -> None:
        pieces: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                pieces.append(self._tlsConnection.recv(_RECORD))
            except WantReadError:
                break
            except ZeroReturnError:
                # The peer closed TLS: what came before the close is delivered first.
                self._deliver(pieces)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(pieces)
                self._tlsShutdownFinished(Failure())
        self._deliver(pieces)
        # The bytes received may call for an answer (handshake, key update).
        self._flushSendBIO()

    def _deliver(self, pieces: list[bytes]) -> None:
        """Hand the decrypted ``pieces`` to the application at once; clear them."""
        if not pieces or self._aborted:
            pieces.clear()
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        ProtocolWrapper.dataReceived(self, data)


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


def server_connection_creator(context_factory: Any) -> _ServerConnections:
    """Connections from ``context_factory``'s context, preferring AES-128-GCM.

    ``context_factory`` is what Twisted's ``ssl:`` endpoint parser built
    (``CertificateOptions``: certificate, key, chain, DH and cipher options).
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
