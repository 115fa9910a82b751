"""Tests for netlab.client against a session server on a loopback port.

The server is the real :class:`~netlab.session.SessionFactory` with the echo
application from ``tests.sessionsupport``, listening on 127.0.0.1 port 0 in
the test's reactor.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from netlab.auth import encode_key, write_private
from netlab.client import Identity, connect, resolve_identity, service_address
from netlab.config import from_mapping
from netlab.errors import (
    AuthenticationFailed,
    ConfigError,
    ConnectionFailed,
    RemoteError,
)
from netlab.framing import encode_frame
from netlab.session import Control, Data, SessionPolicy
from tests.sessionsupport import KEY, OTHER_KEY, make_factory
from tests.support import temporary_directory


def config_for(port: int, **client: Any) -> Any:
    return from_mapping(
        {
            "file": {"endpoint": f"tcp:{port}:interface=127.0.0.1"},
            "client": client,
        },
        base_directory=Path.cwd(),
    )


class ClientTests(TestCase):
    """The client API end to end over real loopback sockets."""

    def setUp(self) -> None:
        policy = SessionPolicy(service="file", auth_failure_delay=0.01)
        self.factory = make_factory(reactor, policy, max_failures=100)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.config = config_for(self.port.getHost().port)

    def connect(self, identity: Identity) -> Deferred[Any]:
        return connect(self.config, "file", reactor=reactor, identity=identity)

    def test_request_data_ping_close(self) -> None:
        """A session authenticates, answers requests, echoes data, pings, closes."""

        async def scenario() -> None:
            session = await self.connect(Identity("alice", KEY))
            self.assertEqual((session.user, session.service), ("alice", "file"))
            answer = await session.request("echo", n=1)
            self.assertEqual(answer, Control("echoed", {"user": "alice", "n": 1}))
            payload = os.urandom(300_000)
            session.send_data(payload)
            echoed = await session.receive()
            self.assertEqual(echoed, Data(payload))
            self.assertGreaterEqual(await session.ping(), 0.0)
            with self.assertRaises(RemoteError) as caught:
                await session.request("refuse")
            self.assertEqual(caught.exception.code, "not-allowed")
            await session.close()

        return ensureDeferred(scenario())

    def test_wrong_key(self) -> None:
        """A wrong key fails with AuthenticationFailed."""

        async def scenario() -> None:
            with self.assertRaises(AuthenticationFailed) as caught:
                await self.connect(Identity("alice", OTHER_KEY))
            self.assertIn("auth-failed", str(caught.exception))

        return ensureDeferred(scenario())

    def test_anonymous_refused(self) -> None:
        """Without a user, a service that requires auth says how to configure one."""

        async def scenario() -> None:
            with self.assertRaises(AuthenticationFailed) as caught:
                await self.connect(Identity())
            self.assertIn("[client] user", str(caught.exception))

        return ensureDeferred(scenario())

    def test_server_that_cannot_prove(self) -> None:
        """A server holding another key for the user is detected by the client."""

        async def scenario() -> None:
            # An impostor server accepts any proof but cannot make its own.
            from netlab.auth import Verifier

            class LyingVerifier(Verifier):
                def verify(self, *args: Any) -> bytes:
                    return b"\0" * 32

            self.factory.verifier = LyingVerifier()
            with self.assertRaises(AuthenticationFailed) as caught:
                await self.connect(Identity("alice", KEY))
            self.assertIn("did not prove", str(caught.exception))

        return ensureDeferred(scenario())

    def test_connection_refused(self) -> None:
        """Nothing listening is ConnectionFailed naming the address."""

        async def scenario() -> None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                free = probe.getsockname()[1]
            with self.assertRaises(ConnectionFailed) as caught:
                await connect(
                    config_for(free), "file", reactor=reactor, identity=Identity()
                )
            self.assertIn(f"127.0.0.1:{free}", str(caught.exception))

        return ensureDeferred(scenario())

    def test_second_client_served_during_hostile_one(self) -> None:
        """A client sending garbage does not disturb a well-behaved session."""

        async def scenario() -> None:
            good = await self.connect(Identity("alice", KEY))
            hostile = socket.create_connection(("127.0.0.1", self.port.getHost().port))
            self.addCleanup(hostile.close)
            hostile.sendall(encode_frame(b"\xff\xfe"))
            hostile.sendall(b"\xff\xff\xff\xff")
            for n in range(3):
                answer = await good.request("echo", n=n)
                self.assertEqual(answer["n"], n)
            await good.close()

        return ensureDeferred(scenario())


class IdentityTests(TestCase):
    """Where the client finds its user and key."""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.key_file = self.directory / "alice.key"
        write_private(self.key_file, encode_key(KEY) + "\n")

    def test_configured_identity(self) -> None:
        """[client] user and key_file give the identity."""
        config = config_for(1, user="alice", key_file=str(self.key_file))
        self.assertEqual(resolve_identity(config), Identity("alice", KEY))

    def test_overrides(self) -> None:
        """--user and $NETLAB_KEY_FILE override the configuration."""
        other = self.directory / "bob.key"
        write_private(other, encode_key(OTHER_KEY))
        config = config_for(1, user="alice", key_file=str(self.key_file))
        self.patch(os, "environ", {**os.environ, "NETLAB_KEY_FILE": str(other)})
        self.assertEqual(
            resolve_identity(config, user="bob"), Identity("bob", OTHER_KEY)
        )

    def test_no_user_is_anonymous(self) -> None:
        """No user anywhere means anonymous."""
        self.assertEqual(resolve_identity(config_for(1)), Identity())

    def test_user_without_key(self) -> None:
        """A user without a key file is a configuration error naming the key."""
        self.patch(
            os,
            "environ",
            {k: v for k, v in os.environ.items() if k != "NETLAB_KEY_FILE"},
        )
        with self.assertRaises(ConfigError) as caught:
            resolve_identity(config_for(1, user="alice"))
        self.assertIn("key_file", str(caught.exception))

    def test_readable_key_file_refused(self) -> None:
        """A key file others can read is refused with the chmod to run."""
        self.key_file.chmod(0o644)
        config = config_for(1, user="alice", key_file=str(self.key_file))
        with self.assertRaises(ConfigError) as caught:
            resolve_identity(config)
        self.assertIn("chmod 600", str(caught.exception))

    def test_server_address(self) -> None:
        """--server may carry a port; otherwise the endpoint's port is used."""
        config = config_for(8021)
        self.assertEqual(
            service_address(config, "file", None), ("127.0.0.1", 8021, False)
        )
        self.assertEqual(
            service_address(config, "file", "example.org:9000"),
            ("example.org", 9000, False),
        )
        self.assertEqual(service_address(config, "file", "[::1]:9"), ("::1", 9, False))
        self.assertEqual(service_address(config, "file", "[::1]"), ("::1", 8021, False))

    def test_tls_from_the_endpoint(self) -> None:
        """TLS is used for ssl: endpoints and for systemd sockets marked
        tls=yes (whose port comes from --server)."""
        for endpoint, server, expected in (
            ("ssl:8021:interface=127.0.0.1", None, ("127.0.0.1", 8021, True)),
            (
                "systemd:domain=INET:name=netlab-file:tls=yes",
                "127.0.0.1:9021",
                ("127.0.0.1", 9021, True),
            ),
            (
                "systemd:domain=INET:name=netlab-file",
                "127.0.0.1:9021",
                ("127.0.0.1", 9021, False),
            ),
        ):
            config = from_mapping(
                {"file": {"endpoint": endpoint}}, base_directory=Path.cwd()
            )
            self.assertEqual(service_address(config, "file", server), expected)


class ClientProtocolTests(TestCase):
    """The client's protocol over a StringTransport: handshake, back-pressure."""

    def setUp(self) -> None:
        from twisted.internet.testing import StringTransport

        from netlab.client import ClientProtocol

        self.protocol = ClientProtocol(Identity("alice", KEY), "server", False)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.handshake()

    def handshake(self) -> None:
        import base64
        import json

        from netlab.auth import server_proof
        from tests.sessionsupport import control, parse_frames

        server_nonce = bytes(32)
        self.protocol.dataReceived(
            control(
                "hello",
                protocol="netlab",
                version=1,
                service="file",
                max_frame=1 << 20,
                auth=["hmac-sha256"],
                nonce=base64.b64encode(server_nonce).decode(),
            )
        )
        hello, auth = (json.loads(f) for f in parse_frames(self.transport.value()))
        self.assertEqual(hello["max_frame"], 16 * 1024 * 1024)
        self.assertEqual(auth["user"], "alice")
        client_nonce = base64.b64decode(auth["nonce"])
        proof = server_proof(KEY, server_nonce, client_nonce, "alice")
        self.protocol.dataReceived(
            control("ready", user="alice", proof=base64.b64encode(proof).decode())
        )
        self.assertTrue(self.protocol.handshake.called)

    def test_back_pressure(self) -> None:
        """Reading pauses while too much waits unread, and resumes as it drains."""
        from netlab.framing import encode_data_frame

        chunk = b"x" * (1024 * 1024)
        for _ in range(9):
            self.protocol.dataReceived(encode_data_frame(chunk))
        self.assertEqual(self.transport.producerState, "paused")
        received = []
        for _ in range(9):
            self.protocol.next_message().addCallback(received.append)
        self.assertEqual(received, [Data(chunk)] * 9)
        self.assertEqual(self.transport.producerState, "producing")

    def test_large_server_reply(self) -> None:
        """Server replies above the 64 KiB client-to-server limit are accepted."""
        from tests.sessionsupport import control

        entries = ["n" * 200] * 1000
        self.protocol.dataReceived(control("listing", entries=entries))
        received = []
        self.protocol.next_message().addCallback(received.append)
        self.assertEqual(received, [Control("listing", {"entries": entries})])
