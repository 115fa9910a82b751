"""End to end: ``twistd -n netlab`` with the chat service, and real clients.

Three ``netlab chat`` processes (non-TTY, so plain output) converse in one
room; the lessons' ``name : message`` client and ``netlab chat --send`` meet
in text and JSON mode; Ctrl-C and end of input leave cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from netlab.auth import add_user, encode_key, generate_key, write_private
from tests.support import Daemon, run_netlab, temporary_directory, write_config

CHAT_ONLY = """
[file]
enabled = false
[time]
enabled = false
[chat]
endpoint = "udp:0:interface=127.0.0.1"
[client]
timeout = "3s"
"""


class ChatProcess:
    """An interactive ``netlab chat`` subprocess whose output is read in a thread."""

    def __init__(self, testcase: TestCase, config: Path, port: int, nick: str) -> None:
        environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "netlab", "--config", str(config),
             "--server", f"127.0.0.1:{port}", "chat", "--nick", nick],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=environment,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        testcase.addCleanup(self.kill)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def wait_for(self, expected: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while expected not in self.lines:
            if self.process.poll() is not None:
                self.reader.join(5)  # Everything it printed, then one last look.
                if expected in self.lines:
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    f"no line {expected!r}; got {self.lines!r} "
                    f"(exit status {self.process.poll()})"
                )
            time.sleep(0.05)

    def end_input(self, timeout: float = 15.0) -> int:
        """Close standard input (Ctrl-D) and wait for the exit status."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.reader.join(5)


class EndToEndTests(TestCase):
    def setUp(self) -> None:
        directory = temporary_directory(self)
        self.config = write_config(directory, CHAT_ONLY)
        self.daemon = Daemon(self, self.config)
        self.port = self.daemon.wait_listening(1)["chat"][1]
        self.addCleanup(self.daemon.stop)

    def test_three_clients_converse(self) -> None:
        """Three netlab chat clients see each other's messages, privates and leaves."""
        clients = {
            nick: ChatProcess(self, self.config, self.port, nick)
            for nick in ("ann", "bob", "cid")
        }
        for nick, client in clients.items():
            client.wait_for(f"* you are {nick} in lobby")
        clients["cid"].wait_for("* bob joined lobby")
        clients["ann"].type("hello from ann")
        clients["bob"].type("hi ann, bob here")
        for client in clients.values():
            client.wait_for("[lobby] ann: hello from ann")
            client.wait_for("[lobby] bob: hi ann, bob here")
        clients["cid"].type("/msg ann psst")
        clients["ann"].wait_for("[private] cid: psst")
        clients["bob"].type("/who")
        clients["bob"].wait_for("* in lobby: ann, bob, cid")
        self.assertEqual(clients["ann"].end_input(), 0)
        clients["bob"].wait_for("* ann left lobby")
        clients["cid"].wait_for("* ann left lobby")
        for client in clients.values():
            self.assertFalse(any("\x1b" in line for line in client.lines))
        self.assertEqual(clients["bob"].end_input(), 0)
        self.assertEqual(clients["cid"].end_input(), 0)

    def test_stop_logs_the_counters(self) -> None:
        """SIGTERM stops the daemon cleanly and the chat service logs what it did."""
        run_netlab(
            "--config", str(self.config), "--server", f"127.0.0.1:{self.port}",
            "chat", "--nick", "ann", "--send", "hello",
        )  # fmt: skip
        # twistd re-raises SIGTERM on itself after a clean shutdown.
        self.assertEqual(self.daemon.stop(), 0)
        line = self.daemon.wait_for("chat service stopping")
        self.assertRegex(line, r"[1-9]\d* deliveries, 0 send errors")

    def test_ctrl_c_leaves_cleanly(self) -> None:
        """Ctrl-C (SIGINT) sends a leave before exiting with status 130."""
        ann = ChatProcess(self, self.config, self.port, "ann")
        bob = ChatProcess(self, self.config, self.port, "bob")
        ann.wait_for("* you are ann in lobby")
        bob.wait_for("* you are bob in lobby")
        bob.process.send_signal(signal.SIGINT)
        self.assertEqual(bob.process.wait(15), 130)
        ann.wait_for("* bob left lobby")

    def test_lesson_client_and_send(self) -> None:
        """The lessons' ``tom : hi`` client joins in text mode and hears --send."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as lesson:
            lesson.settimeout(10)
            server = ("127.0.0.1", self.port)
            name = "tom"

            def say(text: str) -> str:
                lesson.sendto(f"{name} : {text}".encode(), server)
                return lesson.recvfrom(2048)[0].decode()

            code = say("hi").strip()
            self.assertRegex(code, r"^[A-Z2-7]{6}$")
            self.assertIn("* tom joined lobby", say(code))
            self.assertEqual(say("hi"), "[lobby] tom: hi\n")
            result = run_netlab(
                "--config", str(self.config), "--server", f"127.0.0.1:{self.port}",
                "chat", "--nick", "scripter", "--send", "hello tom",
            )  # fmt: skip
            self.assertEqual((result.returncode, result.stderr), (0, ""))
            heard = ""
            while "hello tom" not in heard:
                heard += lesson.recvfrom(2048)[0].decode()
            self.assertIn("[lobby] scripter: hello tom", heard)

    def test_send_with_a_taken_nick_fails_clearly(self) -> None:
        """--send with a nickname in use exits with the remote-error status and why."""
        ann = ChatProcess(self, self.config, self.port, "ann")
        ann.wait_for("* you are ann in lobby")
        result = run_netlab(
            "--config", str(self.config), "--server", f"127.0.0.1:{self.port}", "chat",
            "--nick", "ANN", "--send", "hello",
        )  # fmt: skip
        self.assertEqual(result.returncode, 6)
        self.assertRegex(result.stderr, re.escape("is in use") + ".*nick-taken")

    def test_no_server(self) -> None:
        """With no chat server answering, --send fails with the connection status."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
            result = run_netlab(
                "--config", str(self.config), "--server", f"127.0.0.1:{port}", "chat",
                "--nick", "ann", "--send", "hello",
            )  # fmt: skip
        self.assertEqual(result.returncode, 4)
        self.assertIn("stopped answering", result.stderr)


class AuthenticatedEndToEndTests(TestCase):
    def test_users_file_authentication(self) -> None:
        """With require_authentication a keyed user joins; a wrong key exits 5."""
        directory = temporary_directory(self)
        users_file, key_file = directory / "users.toml", directory / "alice.key"
        key = generate_key()
        add_user(users_file, "alice", key, replace=False)
        write_private(key_file, encode_key(key) + "\n")
        config = write_config(
            directory,
            CHAT_ONLY.replace("[chat]", "[chat]\nrequire_authentication = true")
            + f'user = "alice"\nkey_file = "{key_file}"\n'
            + f'[netlab]\nusers_file = "{users_file}"\n'
            + f'state_directory = "{directory / "state"}"\n',
        )
        daemon = Daemon(self, config)
        port = daemon.wait_listening(1)["chat"][1]
        self.addCleanup(daemon.stop)
        arguments = (
            "--server",
            f"127.0.0.1:{port}",
            "chat",
            "--nick",
            "al",
            "--send",
            "hi",
        )
        good = run_netlab("--config", str(config), *arguments)
        self.assertEqual((good.returncode, good.stderr), (0, ""))
        wrong_key = directory / "wrong.key"
        write_private(wrong_key, encode_key(generate_key()) + "\n")
        bad = run_netlab(
            "--config", str(config), *arguments, env={"NETLAB_KEY_FILE": str(wrong_key)}
        )
        self.assertEqual(bad.returncode, 5, bad.stderr)
        self.assertIn("authentication failed", bad.stderr)
