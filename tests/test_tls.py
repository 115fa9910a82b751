"""netlab.tls: the bulk TLS transport, in memory and over loopback.

The in-memory tests connect a client and a server :class:`BulkTLSProtocol`
through ``StringTransport`` objects and move the bytes by hand, so they can
count how many objects cross each layer; the loopback tests run real sockets
on port 0 and check that what is written arrives intact and in order.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

import netlab.tls
from netlab.framing import writes_consumed_at_once
from netlab.tls import (
    BULK_WRITE,
    BulkTLSFactory,
    BulkTLSProtocol,
    TLSListeningReactor,
    connect_tls,
    server_connection_creator,
)
from tests.support import temporary_directory
from tests.tlssupport import CertificateAuthority


class Recorder(Protocol):
    """Keeps every ``dataReceived`` call; fires ``lost`` with the reason the
    connection was lost."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.lost: Deferred[list[Failure]] = Deferred()

    @property
    def received(self) -> bytes:
        return b"".join(self.calls)

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Wrapped in a list: a Deferred fed a Failure would fail with it.
        self.lost.callback([reason])


class ViewRecorder(Recorder):
    """A Recorder that says it takes any bytes-like object."""

    accepts_views = True

    @property
    def received(self) -> bytes:
        return b"".join(bytes(call) for call in self.calls)


class CountingTransport(StringTransport):
    """A StringTransport that counts its ``write`` calls."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def _credentials(directory: Path) -> tuple[Any, Any, str]:
    """Server options, client options, and the ``ssl:`` key options, for localhost."""
    authority = CertificateAuthority()
    certificate, key = authority.issue(directory, ["localhost", "127.0.0.1"])
    server = ssl.PrivateCertificate.loadPEM(
        certificate.read_bytes() + key.read_bytes()
    ).options()
    trust = ssl.Certificate.loadPEM(
        authority.write_ca(directory / "ca.pem").read_bytes()
    )
    client = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust)
    description = f"privateKey={key}:certKey={certificate}"
    return server, client, description


class InMemoryTests(TestCase):
    """A client and a server BulkTLSProtocol joined by hand-pumped transports."""

    def setUp(self) -> None:
        directory = temporary_directory(self)
        server_options, self.client_options, _ = _credentials(directory)
        self.server_connections = server_connection_creator(server_options)
        self.clock = MemoryReactorClock()
        self.server, self.client, self.server_app, self.client_app = self.connect_pair()
        self.pump()
        self.assertTrue(self.client._handshakeDone and self.server._handshakeDone)

    def connect_pair(
        self, application: type[Recorder] = Recorder
    ) -> tuple[Any, Any, Recorder, Recorder]:
        """A new server and client, connected to their wires, before any pump."""
        server_app = application()
        client_app = application()
        server_factory = BulkTLSFactory(
            self.server_connections,
            False,
            Factory.forProtocol(lambda: server_app),
            clock=self.clock,
        )
        client_factory = BulkTLSFactory(
            self.client_options,
            True,
            Factory.forProtocol(lambda: client_app),
            clock=self.clock,
        )
        server = server_factory.buildProtocol(None)
        client = client_factory.buildProtocol(None)
        server.makeConnection(CountingTransport())
        client.makeConnection(CountingTransport())
        return server, client, server_app, client_app

    @property
    def server_wire(self) -> CountingTransport:
        wire: CountingTransport = self.server.transport
        return wire

    @property
    def client_wire(self) -> CountingTransport:
        wire: CountingTransport = self.client.transport
        return wire

    def pump(self, server: Any = None, client: Any = None) -> None:
        """Deliver what each side wrote to the other until both are quiet."""
        server = server or self.server
        client = client or self.client
        while True:
            self.clock.advance(0)  # flush Twisted's small-write aggregator
            to_server = client.transport.value()
            to_client = server.transport.value()
            if not (to_server or to_client):
                return
            client.transport.clear()
            server.transport.clear()
            if to_server:
                server.dataReceived(to_server)
            if to_client:
                client.dataReceived(to_client)

    def test_fast_record_calls_in_use(self) -> None:
        """With the pyOpenSSL this project installs, records move through its
        cffi binding; if an upgrade removes it, this says so (the public
        calls still work: PublicRecordCallsTests)."""
        self.assertIsNotNone(netlab.tls._FAST_RECORDS)
        self.assertIsNot(netlab.tls.encrypt, netlab.tls._encrypt_public)

    def test_protocol_classes(self) -> None:
        """Both ends are BulkTLSProtocol and agree on TLS 1.3 with AES-128-GCM."""
        self.assertIsInstance(self.server, BulkTLSProtocol)
        self.assertIsInstance(self.client, BulkTLSProtocol)
        for side in (self.server, self.client):
            connection = side.getHandle()
            self.assertEqual(connection.get_protocol_version_name(), "TLSv1.3")
            self.assertEqual(connection.get_cipher_name(), "TLS_AES_128_GCM_SHA256")

    def test_bulk_write_is_one_transport_write(self) -> None:
        """A 1 MiB write (64 TLS records) reaches TCP as one object, not 64."""
        payload = os.urandom(1024 * 1024)
        before = self.server_wire.writes
        self.server.write(payload)
        self.assertEqual(self.server_wire.writes - before, 1)
        self.pump()
        self.assertEqual(self.client_app.received, payload)

    def test_one_read_is_one_delivery(self) -> None:
        """All the records decrypted from one TCP read reach dataReceived at once."""
        payload = os.urandom(3 * 1024 * 1024 + 7)
        self.server.write(payload)
        ciphertext = self.server_wire.value()
        self.server_wire.clear()
        self.client.dataReceived(ciphertext)
        self.assertEqual(self.client_app.calls, [payload])

    def test_views_only_for_applications_that_take_them(self) -> None:
        """A plain Protocol gets bytes; one that declares ``accepts_views``
        (netlab's FrameReceiver) gets a large read as a view of the
        decryption buffer, with the same content."""
        payload = os.urandom(256 * 1024)
        self.server.write(payload)
        ciphertext = self.server_wire.value()
        self.server_wire.clear()
        self.client.dataReceived(ciphertext)
        self.assertIs(type(self.client_app.calls[0]), bytes)

        server, client, _, client_app = self.connect_pair(ViewRecorder)
        self.pump(server, client)
        server.write(payload)
        ciphertext = server.transport.value()
        server.transport.clear()
        client.dataReceived(ciphertext)
        self.assertEqual(client_app.received, payload)
        if netlab.tls._FAST_RECORDS is not None and netlab.tls.decrypt is not (
            netlab.tls._decrypt_public
        ):
            self.assertIsInstance(client_app.calls[0], memoryview)

    def test_small_and_large_writes_keep_their_order(self) -> None:
        """Small writes held by the aggregator go out before a later bulk write."""
        large = os.urandom(BULK_WRITE * 3 + 1)
        self.client.write(b"first ")
        self.client.write(large)
        self.client.write(b" last")
        self.pump()
        self.assertEqual(self.server_app.received, b"first " + large + b" last")

    def test_data_before_close_is_delivered(self) -> None:
        """Bytes written just before loseConnection arrive before the TLS close."""
        payload = os.urandom(200_000)
        self.server.write(payload)
        self.server.loseConnection()
        ciphertext = self.server_wire.value()
        self.server_wire.clear()
        self.client.dataReceived(ciphertext)
        self.assertEqual(self.client_app.received, payload)
        self.assertTrue(self.client._lostTLSConnection)

    def test_written_views_may_be_reused(self) -> None:
        """write() is done with its argument when it returns: a producer may
        refill the same buffer at once, for small (aggregated) and bulk writes."""
        self.assertTrue(writes_consumed_at_once(self.server))
        buffer = bytearray(os.urandom(BULK_WRITE * 2))
        expected = b""
        for size in (100, BULK_WRITE * 2, 5_000):
            self.server.write(memoryview(buffer)[:size])
            expected += bytes(buffer[:size])
            buffer[:] = os.urandom(len(buffer))
        self.pump()
        self.assertEqual(self.client_app.received, expected)

    def test_view_written_before_the_handshake_is_copied(self) -> None:
        """A write that must wait for the handshake keeps a copy, not the view."""
        server, client, server_app, _ = self.connect_pair()
        buffer = bytearray(os.urandom(BULK_WRITE))
        expected = bytes(buffer)
        client.write(memoryview(buffer))
        buffer[:] = bytes(len(buffer))
        self.pump(server, client)
        self.assertTrue(client._handshakeDone)
        self.assertEqual(server_app.received, expected)

    def test_corrupted_record_fails_the_connection(self) -> None:
        """A tampered record is a TLS error: nothing of it is delivered."""
        self.server.write(b"x" * 50_000)
        self.clock.advance(0)  # a small write waits for the aggregator
        ciphertext = bytearray(self.server_wire.value())
        self.server_wire.clear()
        ciphertext[-10] ^= 0xFF
        self.client.dataReceived(bytes(ciphertext))
        self.assertTrue(self.client._lostTLSConnection)
        self.assertTrue(self.client_wire.disconnecting)
        self.assertLess(len(self.client_app.received), 50_000)


class PublicRecordCallsTests(InMemoryTests):
    """The same, through pyOpenSSL's public send/recv (the fallback when its
    cffi binding is not there)."""

    def setUp(self) -> None:
        self.patch(netlab.tls, "encrypt", netlab.tls._encrypt_public)
        self.patch(netlab.tls, "decrypt", netlab.tls._decrypt_public)
        super().setUp()

    def test_fast_record_calls_in_use(self) -> None:
        """The public calls are the ones in use here."""
        self.assertIs(netlab.tls.encrypt, netlab.tls._encrypt_public)


class LoopbackTests(TestCase):
    """Real sockets: a server from an ssl: endpoint string, a client by connect_tls."""

    def test_round_trip(self) -> None:
        """Several MiB each way arrive intact, with certificate verification on."""
        directory = temporary_directory(self)
        _, client_options, key_options = _credentials(directory)
        payload = os.urandom(5 * 1024 * 1024 + 3)
        server_app = Recorder()

        class Echo(Protocol):
            def dataReceived(self, data: bytes) -> None:
                server_app.dataReceived(data)
                assert self.transport is not None
                self.transport.write(data)
                if len(server_app.received) == len(payload):
                    self.transport.loseConnection()

        endpoint = serverFromString(
            TLSListeningReactor(reactor),
            f"ssl:0:interface=127.0.0.1:{key_options}",
        )

        async def scenario() -> None:
            port = await endpoint.listen(Factory.forProtocol(Echo))
            self.addCleanup(port.stopListening)
            client_app = Recorder()
            client = await connect_tls(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                client_options,
                Factory.forProtocol(lambda: client_app),
                reactor,
            )
            self.assertIs(client, client_app)
            client.transport.write(payload)
            await client_app.lost
            self.assertEqual(client_app.received, payload)
            self.assertEqual(server_app.received, payload)

        return ensureDeferred(scenario())

    def test_untrusted_server_is_refused(self) -> None:
        """connect_tls keeps verification: a server from another CA is refused."""
        directory = temporary_directory(self)
        _, _, key_options = _credentials(directory)
        stranger = Path(tempfile.mkdtemp(dir=directory))
        _, client_options, _ = _credentials(stranger)
        endpoint = serverFromString(
            TLSListeningReactor(reactor),
            f"ssl:0:interface=127.0.0.1:{key_options}",
        )

        async def scenario() -> None:
            port = await endpoint.listen(Factory.forProtocol(Protocol))
            self.addCleanup(port.stopListening)
            client_app = Recorder()
            await connect_tls(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                client_options,
                Factory.forProtocol(lambda: client_app),
                reactor,
            )
            [reason] = await client_app.lost
            self.assertIn("certificate verify failed", str(reason.value))
            self.assertEqual(client_app.received, b"")

        return ensureDeferred(scenario())
