"""docs/protocol.rst matches the code, and its plain-socket example client works.

The example client (stdlib only) runs in a subprocess against a session
service started in this test's reactor on a loopback port.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from netlab.auth import add_user, client_proof, encode_key, server_proof, write_private
from netlab.session import ErrorCode, decode_control, encode_control
from tests.sessionsupport import KEY, OTHER_KEY
from tests.support import temporary_directory
from tests.test_tcpservice import EchoService, make_config

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_RST = (ROOT / "docs" / "protocol.rst").read_text()
EXAMPLE = ROOT / "docs" / "examples" / "plain_client.py"


class DocumentTests(TestCase):
    """The reference agrees with the implementation."""

    def test_worked_example(self) -> None:
        """The proofs in the worked example are what the code computes."""
        server_nonce, client_nonce = bytes(range(0x40, 0x60)), bytes(range(0x80, 0xA0))
        for proof in (
            client_proof(KEY, server_nonce, client_nonce, "alice"),
            server_proof(KEY, server_nonce, client_nonce, "alice"),
        ):
            self.assertIn(proof.hex(), PROTOCOL_RST)
            self.assertIn(encode_key(proof), PROTOCOL_RST)
        self.assertIn(encode_key(KEY), PROTOCOL_RST)

    def test_error_codes(self) -> None:
        """Every error code the session uses is documented."""
        codes = [v for k, v in vars(ErrorCode).items() if k.isupper()]
        for code in codes:
            self.assertIn(f"``{code}``", PROTOCOL_RST)

    def test_hello_bytes(self) -> None:
        """The documented hello prefix is the length of that message."""
        hello = encode_control(
            "hello", protocol="netlab", version=1, max_frame=16777216
        )
        self.assertEqual(len(hello), 0x43)
        self.assertIn("00 00 00 43", PROTOCOL_RST)

    def test_examples_parse(self) -> None:
        """Every JSON example in the reference is a valid control message."""
        examples = [
            block for block in literal_blocks(PROTOCOL_RST) if block.startswith('{"op"')
        ]
        self.assertEqual(len(examples), 8)
        for example in examples:
            for message in example.split("->"):
                decode_control(message.strip().encode())


def literal_blocks(text: str) -> list[str]:
    """The literal blocks (after ``::``) of a reStructuredText document, unwrapped."""
    blocks: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        indent = len(line) - len(line.lstrip())
        body: list[str] = []
        for following in lines[index + 2 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following.strip())
        blocks.append(" ".join(part for part in body if part))
    return blocks


class PlainClientTests(TestCase):
    """docs/examples/plain_client.py authenticates against the server."""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        add_user(self.directory / "users.toml", "alice", KEY, replace=False)
        config = make_config(
            self.directory,
            "tcp:0:interface=127.0.0.1",
            netlab={"auth_failure_delay": 0.01},
        )
        self.service = EchoService(config, reactor)
        self.service.privilegedStartService()
        self.addCleanup(self.service.stopService)
        self.port = str(self.service.listening_address.port)

    def run_example(self, key: bytes) -> tuple[bytes, bytes, int]:
        key_file = self.directory / "key"
        write_private(key_file, encode_key(key) + "\n")
        return getProcessOutputAndValue(  # type: ignore[no-any-return]
            sys.executable,
            [str(EXAMPLE), "127.0.0.1", self.port, "alice", str(key_file)],
            env={},
        )

    def test_authenticates_pings_and_quits(self) -> None:
        """With the right key the example prints each step and exits 0."""

        async def scenario() -> None:
            out, err, code = await self.run_example(KEY)
            self.assertEqual(code, 0, err)
            self.assertEqual(
                out.decode().splitlines(),
                [
                    "connected to the file service",
                    "authenticated as alice; server proved the key",
                    "ping answered: pong",
                    "bye",
                ],
            )

        return ensureDeferred(scenario())

    def test_wrong_key(self) -> None:
        """With a wrong key the example prints the server's error and exits 1."""

        async def scenario() -> None:
            _, err, code = await self.run_example(OTHER_KEY)
            self.assertEqual(code, 1)
            self.assertEqual(
                err.decode().strip(),
                "plain_client: auth-failed: authentication failed: unknown user or "
                "wrong key",
            )

        return ensureDeferred(scenario())
