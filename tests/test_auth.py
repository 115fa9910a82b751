"""Tests for netlab.auth (keys, users file, proofs, lock-out) and ``netlab keygen``."""

from __future__ import annotations

import base64
import stat

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from netlab.auth import (
    FailureTracker,
    KeyFileError,
    Users,
    Verifier,
    client_proof,
    load_users,
    new_nonce,
    read_key_file,
    server_proof,
    write_private,
)
from tests.support import run_netlab, temporary_directory

KEY = bytes(range(32))


class ProofTests(TestCase):
    """The MAC input and the verifier."""

    def test_proof_input(self) -> None:
        """The client proof is HMAC-SHA256 over label, both nonces and the user."""
        import hashlib
        import hmac

        server_nonce, client_nonce = b"s" * 32, b"c" * 32
        expected = hmac.new(
            KEY,
            b"netlab-client" + server_nonce + client_nonce + b"alice",
            hashlib.sha256,
        ).digest()
        self.assertEqual(
            client_proof(KEY, server_nonce, client_nonce, "alice"), expected
        )
        self.assertNotEqual(
            server_proof(KEY, server_nonce, client_nonce, "alice"), expected
        )

    def test_verifier(self) -> None:
        """Only the right user, key and nonces verify; unknown users never do."""
        verifier = Verifier(Users({"alice": KEY}))
        ns, nc = new_nonce(), new_nonce()
        good = client_proof(KEY, ns, nc, "alice")
        self.assertEqual(
            verifier.verify("alice", ns, nc, good), server_proof(KEY, ns, nc, "alice")
        )
        self.assertIsNone(verifier.verify("alice", new_nonce(), nc, good))
        self.assertIsNone(
            verifier.verify("alice", ns, nc, server_proof(KEY, ns, nc, "alice"))
        )
        self.assertIsNone(
            verifier.verify("bob", ns, nc, client_proof(KEY, ns, nc, "bob"))
        )
        self.assertIsNone(verifier.verify("alice", ns, nc, b"short"))


class UsersFileTests(TestCase):
    """Reading the users file and key files safely."""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.path = self.directory / "users.toml"

    def write(self, text: str, mode: int = 0o600) -> None:
        write_private(self.path, text)
        self.path.chmod(mode)

    def test_valid(self) -> None:
        """A well-formed private users file loads."""
        self.write(f'[users.alice]\nkey = "{base64.b64encode(KEY).decode()}"\n')
        self.assertEqual(load_users(self.path), Users({"alice": KEY}))

    def test_group_or_world_readable(self) -> None:
        """Group- or world-accessible users files are refused with the fix."""
        for mode in (0o640, 0o604, 0o660):
            self.write("", mode)
            with self.assertRaises(KeyFileError) as caught:
                load_users(self.path)
            self.assertIn(f"chmod 600 {self.path}", str(caught.exception))

    def test_malformed(self) -> None:
        """Short keys, bad base64, bad names and stray keys are refused clearly."""
        short = base64.b64encode(b"x" * 16).decode()
        cases = {
            f'[users.alice]\nkey = "{short}"\n': "fewer than 32",
            '[users.alice]\nkey = "not base64!"\n': "not valid base64",
            f'[users."a b"]\nkey = "{base64.b64encode(KEY).decode()}"\n': "user name",
            '[users.alice]\nkey = "x"\nextra = 1\n': "exactly one key",
            "other = 1\n": "unknown top-level key",
            "[users\n": "not valid TOML",
        }
        for text, expected in cases.items():
            self.write(text)
            with self.assertRaises(KeyFileError) as caught:
                load_users(self.path)
            self.assertIn(expected, str(caught.exception))

    def test_missing(self) -> None:
        """A missing users file is named in the error."""
        with self.assertRaises(KeyFileError) as caught:
            load_users(self.path)
        self.assertIn("does not exist", str(caught.exception))

    def test_key_file(self) -> None:
        """Key files are one base64 line, private."""
        key_file = self.directory / "key"
        write_private(key_file, base64.b64encode(KEY).decode() + "\n")
        self.assertEqual(read_key_file(key_file), KEY)
        key_file.chmod(0o644)
        self.assertRaises(KeyFileError, read_key_file, key_file)


class FailureTrackerTests(TestCase):
    """Failures per address within a window lock the address out for a while."""

    def test_lockout_window(self) -> None:
        """Failures spread beyond the window do not lock; a burst does, then expires."""
        clock = Clock()
        tracker = FailureTracker(clock, 3, 60.0, 300.0)
        for _ in range(5):
            self.assertFalse(tracker.record_failure("10.0.0.1"))
            clock.advance(31)
        self.assertFalse(tracker.locked("10.0.0.1"))
        clock.advance(60)
        self.assertFalse(tracker.record_failure("10.0.0.1"))
        self.assertFalse(tracker.record_failure("10.0.0.1"))
        self.assertTrue(tracker.record_failure("10.0.0.1"))
        self.assertTrue(tracker.locked("10.0.0.1"))
        self.assertFalse(tracker.locked("10.0.0.2"))
        clock.advance(300)
        self.assertFalse(tracker.locked("10.0.0.1"))


class KeygenTests(TestCase):
    """``netlab keygen`` writes matching private files atomically."""

    def test_keygen(self) -> None:
        """keygen adds the user and writes the same key, both mode 0600."""
        directory = temporary_directory(self)
        users, key = directory / "users.toml", directory / "client" / "alice.key"
        result = run_netlab(
            "keygen", "alice", "--users-file", str(users), "--key-file", str(key)
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("added user alice", result.stdout)
        self.assertEqual(load_users(users).keys["alice"], read_key_file(key))
        self.assertEqual(len(read_key_file(key)), 32)
        for path in (users, key):
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        # A second user keeps the first; an existing user needs --force.
        run_netlab(
            "keygen",
            "bob",
            "--users-file",
            str(users),
            "--key-file",
            str(directory / "bob.key"),
        )
        self.assertEqual(set(load_users(users).keys), {"alice", "bob"})
        again = run_netlab(
            "keygen",
            "alice",
            "--users-file",
            str(users),
            "--key-file",
            str(directory / "other.key"),
        )
        self.assertEqual(again.returncode, 2)
        self.assertIn("--force", again.stderr)
        self.assertEqual(len(again.stderr.strip().splitlines()), 1)
