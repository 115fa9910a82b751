"""End to end against ``twistd -n netlab``: hostile clients, caps, example client, TLS.

The daemon runs the file service (the first TCP service) on a loopback port.
A well-behaved client, written here with blocking sockets, authenticates
first and must get ``pong`` after every hostile connection; the daemon's log
must hold no traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from netlab.auth import add_user, encode_key, write_private
from tests.support import Daemon, run_netlab, temporary_directory, write_config
from tests.tlssupport import CertificateAuthority

KEY = bytes(range(32))
EXAMPLE = (
    Path(__file__).resolve().parent.parent / "docs" / "examples" / "plain_client.py"
)


def frame(message: dict[str, Any] | bytes) -> bytes:
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">I", len(payload)) + payload


def proof(
    label: bytes, server_nonce: bytes, client_nonce: bytes, user: str, key: bytes
) -> str:
    digest = hmac.new(
        key, label + server_nonce + client_nonce + user.encode(), hashlib.sha256
    )
    return base64.b64encode(digest.digest()).decode()


class BlockingClient:
    """A minimal protocol client on a blocking socket (timeouts bounded)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: dict[str, Any] | bytes, raw: bool = False) -> None:
        self.sock.sendall(data if raw and isinstance(data, bytes) else frame(data))

    def _exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def receive(self) -> dict[str, Any] | None:
        """The next control message, or None when the server closed."""
        header = self._exactly(4)
        if header is None:
            return None
        body = self._exactly(struct.unpack(">I", header)[0])
        return None if body is None else json.loads(body)

    def closed_by_server(self) -> bool:
        return self.receive() is None

    def hello(self) -> bytes:
        self.send(
            {"op": "hello", "protocol": "netlab", "version": 1, "max_frame": 1 << 24}
        )
        answer = self.receive()
        assert answer is not None and answer["op"] == "hello", answer
        return base64.b64decode(answer["nonce"])

    def auth_message(
        self,
        server_nonce: bytes,
        user: str = "alice",
        key: bytes = KEY,
        client_nonce: bytes | None = None,
    ) -> dict[str, Any]:
        nonce = client_nonce or secrets.token_bytes(32)
        return {
            "op": "auth",
            "mechanism": "hmac-sha256",
            "user": user,
            "nonce": base64.b64encode(nonce).decode(),
            "proof": proof(b"netlab-client", server_nonce, nonce, user, key),
        }

    def login(self) -> None:
        self.send(self.auth_message(self.hello()))
        answer = self.receive()
        assert answer is not None and answer["op"] == "ready", answer

    def ping(self) -> dict[str, Any] | None:
        self.send({"op": "ping", "id": "alive"})
        return self.receive()


def daemon_config(
    directory: Path,
    file_extra: str = "",
    endpoint: str = "tcp:0:interface=127.0.0.1",
    extra: str = "",
) -> Path:
    (directory / "root").mkdir(exist_ok=True)
    add_user(directory / "users.toml", "alice", KEY, replace=True)
    return write_config(
        directory,
        f"""
        [netlab]
        state_directory = "{directory / "state"}"
        users_file = "{directory / "users.toml"}"
        auth_failure_delay = "50ms"
        auth_max_failures = 1000
        [file]
        endpoint = "{endpoint}"
        root = "{directory / "root"}"
        handshake_timeout = "1s"
        {file_extra}
        [time]
        enabled = false
        [chat]
        enabled = false
        {extra}
        """,
    )


class HostileClientsTests(TestCase):
    """Each hostile input gets its clear error; the good client is served throughout."""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.daemon = Daemon(self, daemon_config(self.directory))
        self.address = self.daemon.wait_listening(1)["file"]
        self.good = BlockingClient(self.address)
        self.addCleanup(self.good.close)
        self.good.login()

    def hostile(self) -> BlockingClient:
        client = BlockingClient(self.address)
        self.addCleanup(client.close)
        return client

    def assertError(self, client: BlockingClient, code: str) -> dict[str, Any]:
        answer = client.receive()
        self.assertIsNotNone(answer)
        assert answer is not None
        self.assertEqual((answer["op"], answer["code"]), ("error", code), answer)
        self.assertTrue(client.closed_by_server())
        self.assertEqual(self.good.ping(), {"op": "pong", "id": "alive"})
        return answer

    def test_oversized_prefixes_and_close_mid_frame(self) -> None:
        """0xFFFFFFFF and MAX+1 prefixes drop the connection; so does a half frame."""
        for length in (0xFFFFFFFF, 2 * 1024 * 1024 + 1):
            client = self.hostile()
            client.send(struct.pack(">I", length) + b"x" * 100, raw=True)
            self.assertTrue(client.closed_by_server())
            self.assertEqual(self.good.ping()["op"], "pong")  # type: ignore[index]
        half = self.hostile()
        half.send(frame({"op": "hello"})[:7], raw=True)
        half.close()
        self.assertEqual(self.good.ping()["op"], "pong")  # type: ignore[index]
        self.daemon.wait_for("announced a 4294967295-byte frame, over the limit")
        self.assertNotIn("Traceback", self.daemon.log)

    def test_malformed_messages(self) -> None:
        """Non-JSON, non-UTF-8, wrong shapes and nesting bombs are refused clearly."""
        cases = [
            (b"{garbage", "bad-message"),
            (b'{"op":"\xff"}', "bad-message"),
            (b"[1, 2]", "bad-frame"),
            (b'{"x": 1}', "bad-message"),
            (b'{"op":"hello","n":' + b"[" * 50000 + b"]" * 50000 + b"}", "bad-message"),
        ]
        for payload, code in cases:
            client = self.hostile()
            client.send(payload)
            self.assertError(client, code)

    def test_unsupported_version(self) -> None:
        """A hello for version 2 is told which version the server speaks."""
        client = self.hostile()
        client.send(
            {"op": "hello", "protocol": "netlab", "version": 2, "max_frame": 1 << 20}
        )
        answer = self.assertError(client, "unsupported-version")
        self.assertIn("version 1", answer["message"])

    def test_authentication_attacks(self) -> None:
        """Op before auth, wrong key, unknown user, replay and reflection all fail."""
        before = self.hostile()
        before.hello()
        before.send({"op": "ls", "path": "."})
        self.assertError(before, "auth-required")

        messages = []
        for user, key in (("alice", bytes(32)), ("nobody", KEY)):
            client = self.hostile()
            client.send(client.auth_message(client.hello(), user=user, key=key))
            messages.append(self.assertError(client, "auth-failed"))
        self.assertEqual(messages[0], messages[1])

        recorded_session = self.hostile()
        recorded = recorded_session.auth_message(recorded_session.hello())
        recorded_session.send(recorded)
        self.assertEqual(recorded_session.receive()["op"], "ready")  # type: ignore[index]
        replay = self.hostile()
        replay.hello()
        replay.send(recorded)
        self.assertError(replay, "auth-failed")

        reflect = self.hostile()
        server_nonce = reflect.hello()
        reflect.send(reflect.auth_message(server_nonce, client_nonce=server_nonce))
        self.assertError(reflect, "auth-failed")

        log = self.daemon.wait_for("authentication failure from 127.0.0.1")
        self.assertIn("127.0.0.1:", log)
        self.assertNotIn("Traceback", self.daemon.log)

    def test_handshake_never_finishes(self) -> None:
        """A client that stops after hello is closed with handshake-timeout."""
        slow = self.hostile()
        slow.hello()
        self.assertError(slow, "handshake-timeout")

    def test_example_client(self) -> None:
        """docs/examples/plain_client.py authenticates against the running daemon."""
        key_file = self.directory / "alice.key"
        write_private(key_file, encode_key(KEY) + "\n")
        import subprocess

        host, port = self.address
        result = subprocess.run(
            [sys.executable, str(EXAMPLE), host, str(port), "alice", str(key_file)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("authenticated as alice; server proved the key", result.stdout)
        self.assertEqual(self.good.ping()["op"], "pong")  # type: ignore[index]


class ConnectionCapTests(TestCase):
    """Over the per-address cap: an error frame, then close; others still served."""

    def test_per_address_cap(self) -> None:
        """The third connection from one address is refused; the first still works."""
        directory = temporary_directory(self)
        daemon = Daemon(
            self, daemon_config(directory, "max_connections_per_address = 2")
        )
        address = daemon.wait_listening(1)["file"]
        good = BlockingClient(address)
        self.addCleanup(good.close)
        good.login()
        second = BlockingClient(address)
        self.addCleanup(second.close)
        second.hello()
        third = BlockingClient(address)
        self.addCleanup(third.close)
        answer = third.receive()
        assert answer is not None
        self.assertEqual(answer["code"], "too-many-connections")
        self.assertTrue(third.closed_by_server())
        self.assertEqual(good.ping()["op"], "pong")  # type: ignore[index]
        second.close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the close asynchronously
            fourth = BlockingClient(address)
            self.addCleanup(fourth.close)
            try:
                fourth.hello()
                break
            except AssertionError:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.05)


class TLSEndToEndTests(TestCase):
    """A TLS session through twistd and the netlab CLI, with a throw-away CA."""

    def test_tls(self) -> None:
        """ls works over TLS for the certified name; another name exits 8."""
        directory = temporary_directory(self)
        ca = CertificateAuthority()
        ca_file = ca.write_ca(directory / "ca.pem")
        certificate, key = ca.issue(directory, ["localhost"])
        config = daemon_config(
            directory,
            endpoint="ssl:0:interface=127.0.0.1",
            extra=f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n',
        )
        daemon = Daemon(self, config)
        _, port = daemon.wait_listening(1)["file"]
        self.assertNotIn("without TLS", daemon.log)
        key_file = directory / "alice.key"
        write_private(key_file, encode_key(KEY) + "\n")
        client_config = directory / "client.toml"
        client_config.write_text(
            f'[file]\nendpoint = "ssl:{port}"\n[tls]\nca_file = "{ca_file}"\n'
            f'[client]\nuser = "alice"\nkey_file = "{key_file}"\n'
        )
        good = run_netlab(
            "--config", str(client_config), "--server", f"localhost:{port}", "ls"
        )
        self.assertEqual(good.returncode, 0, good.stderr)
        wrong = run_netlab(
            "--config", str(client_config), "--server", f"127.0.0.1:{port}", "ls"
        )
        self.assertEqual(wrong.returncode, 8, wrong.stderr)
        self.assertEqual(len(wrong.stderr.strip().splitlines()), 1, wrong.stderr)
        self.assertIn("does not name 127.0.0.1", wrong.stderr)
        self.assertNotIn("Traceback", daemon.log)


class StartupErrorTests(TestCase):
    """Unsafe users files and incomplete TLS settings stop start-up with one line."""

    def test_group_readable_users_file(self) -> None:
        """twistd refuses a group-readable users file, naming the fix."""
        directory = temporary_directory(self)
        config = daemon_config(directory)
        (directory / "users.toml").chmod(0o640)
        daemon = Daemon(self, config)
        self.assertNotEqual(daemon.finish(), 0)
        errors = [line for line in daemon.output if "chmod 600" in line]
        self.assertTrue(errors, daemon.log)
        self.assertIn("users_file", errors[0])
        self.assertNotIn("Traceback", daemon.log)

    def test_ssl_without_certificate(self) -> None:
        """An ssl: endpoint without [tls] certificate is a config error (exit 3)."""
        import subprocess

        from tests.support import TWISTD

        directory = temporary_directory(self)
        config = daemon_config(directory, endpoint="ssl:0:interface=127.0.0.1")
        result = subprocess.run(
            [*TWISTD, "netlab", "--config", str(config), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("[tls] certificate", result.stderr)


class ClientExitCodeTests(TestCase):
    """The netlab command turns authentication problems into one line and a code."""

    def test_wrong_key_and_missing_key(self) -> None:
        """A wrong key exits 5; a user without a key file exits 3; one line each."""
        directory = temporary_directory(self)
        daemon = Daemon(self, daemon_config(directory))
        _, port = daemon.wait_listening(1)["file"]
        wrong_key = directory / "wrong.key"
        write_private(wrong_key, encode_key(bytes(32)) + "\n")
        client_config = directory / "client.toml"
        client_config.write_text(f'[file]\nendpoint = "tcp:{port}"\n')
        env = {"NETLAB_KEY_FILE": str(wrong_key)}
        wrong = run_netlab(
            "--config", str(client_config), "--user", "alice", "ls", env=env
        )
        self.assertEqual(wrong.returncode, 5, wrong.stderr)
        self.assertEqual(len(wrong.stderr.strip().splitlines()), 1, wrong.stderr)
        self.assertIn("auth-failed", wrong.stderr)
        missing = run_netlab(
            "--config",
            str(client_config),
            "--user",
            "alice",
            "ls",
            env={"NETLAB_KEY_FILE": ""},
        )
        self.assertEqual(missing.returncode, 3, missing.stderr)
        self.assertIn("key_file", missing.stderr)
