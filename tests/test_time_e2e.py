"""End to end: ``twistd -n netlab`` with the time service, queried by real clients.

The lesson's client (seeds/004, rewritten), ntplib, Debian's rdate (SNTP and
RFC 868), the ``netlab time`` command, and worker processes that share the
port and die with the daemon.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import ntplib
from twisted.trial.unittest import TestCase

from netlab.time.proto import client_request
from tests import support
from tests.support import Daemon, run_netlab, temporary_directory, write_config

TIME_ONLY = """
[file]
enabled = false
[chat]
enabled = false
[time]
endpoint = "udp:0:interface=127.0.0.1"
leap = "none"
"""


def start(testcase: TestCase, extra: str = "") -> tuple[Daemon, int, Path]:
    """A daemon running only the time service; its port and config file."""
    directory = temporary_directory(testcase)
    config = write_config(directory, TIME_ONLY + extra)
    daemon = Daemon(testcase, config)
    daemon.wait_listening(1)
    return daemon, daemon.addresses["time"][1], config


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", port))
        return sock.recv(2048)


class RealClientTests(TestCase):
    def setUp(self) -> None:
        self.daemon, self.port, self.config = start(self)

    def test_lesson_client(self) -> None:
        """The seeds/004 client's loop (send b"time", print the reply) gets the time.

        Rewritten from the lesson: one UDP socket sends ``time`` in a loop and
        prints what comes back; here three rounds, 0.1 s apart, not forever.
        """
        sk = socket.socket(type=socket.SOCK_DGRAM)
        sk.settimeout(5)
        self.addCleanup(sk.close)
        for _ in range(3):
            sk.sendto(b"time", ("127.0.0.1", self.port))
            ret, addr = sk.recvfrom(1024)
            self.assertEqual(addr, ("127.0.0.1", self.port))
            shown = ret.decode("utf-8")
            self.assertRegex(shown, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
            served = time.mktime(time.strptime(shown, "%Y-%m-%d %H:%M:%S"))
            self.assertLess(abs(served - time.time()), 2)
            time.sleep(0.1)

    def test_ntplib(self) -> None:
        """ntplib gets a version 4 server reply with an offset under 5 ms."""
        response = ntplib.NTPClient().request("127.0.0.1", version=4, port=self.port)
        self.assertLess(abs(response.offset), 0.005)
        self.assertEqual((response.mode, response.leap), (4, 0))
        self.assertEqual(response.stratum, 10)
        self.assertEqual(response.ref_id, int.from_bytes(b"LOCL", "big"))

    def test_ntplib_version_3(self) -> None:
        """An NTPv3 client gets a version 3 reply."""
        response = ntplib.NTPClient().request("127.0.0.1", version=3, port=self.port)
        self.assertEqual(response.version, 3)

    def rdate(self, *flags: str) -> str:
        if shutil.which("rdate") is None:
            self.skipTest("rdate is not installed (apt-get install rdate)")
        result = subprocess.run(
            ["rdate", "-p", *flags, "-o", str(self.port), "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout + result.stderr

    def test_rdate_sntp(self) -> None:
        """rdate -n (SNTP over UDP) finds the local clock off by under 5 ms."""
        output = self.rdate("-n", "-v")
        match = re.search(r"adjust local clock by (-?[\d.]+) seconds", output)
        assert match is not None, output
        self.assertLess(abs(float(match.group(1))), 0.005)

    def test_rdate_rfc868(self) -> None:
        """rdate -u (RFC 868 over UDP) gets the time to the second."""
        output = self.rdate("-u", "-v")
        match = re.search(r"adjust local clock by (-?\d+) seconds", output)
        assert match is not None, output
        self.assertLessEqual(abs(int(match.group(1))), 1)

    def test_flood_from_one_source_others_served(self) -> None:
        """One socket flooding gets cut off; another client is still answered."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
            flooder.settimeout(0.5)
            for _ in range(300):
                flooder.sendto(client_request(time.time_ns()), ("127.0.0.1", self.port))
            replies = []
            while True:
                try:
                    replies.append(flooder.recv(100))
                except OSError:
                    break
        # The default burst (16), the leak (one in 8 of the rest) and a KoD.
        self.assertLess(len(replies), 100)
        self.assertGreaterEqual(len(replies), 16)
        kods = [r for r in replies if r[1] == 0 and r[12:16] == b"RATE"]
        self.assertEqual(len(kods), 1)
        # The bucket is per source address: the flooder shares 127.0.0.1 with
        # us, so the other client comes from 127.0.0.2.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.2", 0))
            other.settimeout(5)
            other.sendto(b"iso", ("127.0.0.1", self.port))
            self.assertRegex(other.recv(100), rb"^\d{4}-\d\d-\d\dT")


class CommandLineTests(TestCase):
    def setUp(self) -> None:
        self.daemon, self.port, self.config = start(self)

    def netlab(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_netlab("--config", str(self.config), "time", "--port",
                          str(self.port), *args)  # fmt: skip

    def test_sntp(self) -> None:
        """``netlab time`` prints the server time, a small offset and the delay."""
        result = self.netlab()
        self.assertEqual(result.returncode, 0, result.stderr)
        match = re.fullmatch(
            r"\S+Z  offset ([+-][\d.]+)s  delay ([\d.]+)s  stratum 10  leap none\n",
            result.stdout,
        )
        assert match is not None, result.stdout
        self.assertLess(abs(float(match.group(1))), 0.005)

    def test_rfc868(self) -> None:
        """``--rfc868`` prints whole seconds."""
        result = self.netlab("--rfc868")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  \(RFC 868")

    def test_text_and_count(self) -> None:
        """``--text iso --count 3 --interval 0.1`` prints three replies."""
        result = self.netlab("--text", "iso", "--count", "3", "--interval", "0.1")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), 3)
        for line in lines:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

    def test_text_default_is_time(self) -> None:
        """``--text`` alone sends the lesson's ``time``."""
        result = self.netlab("--text")
        self.assertRegex(result.stdout, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n$")

    def test_port_from_config(self) -> None:
        """Without --port the client uses the port of [time] endpoint."""
        directory = temporary_directory(self)
        client_config = write_config(
            directory, f'[time]\nendpoint = "udp:{self.port}:interface=127.0.0.1"\n'
        )
        result = run_netlab("--config", str(client_config), "time", "--text", "unix")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertLess(abs(float(result.stdout) - time.time()), 2)


class RateLimitedClientTests(TestCase):
    def test_kiss_of_death(self) -> None:
        """A client over its limit is told by a KoD RATE: exit status 6."""
        _, port, config = start(self, "rate = 0.001\nburst = 1\nleak = 0\n")
        result = run_netlab("--config", str(config), "time", "--port", str(port),
                            "--count", "2", "--interval", "0")  # fmt: skip
        self.assertEqual(result.returncode, 6, result.stderr)
        self.assertEqual(len(result.stdout.splitlines()), 1)
        self.assertIn("kiss-o'-death RATE", result.stderr)


class ClientFailureTests(TestCase):
    def client_config(self, port: int) -> Path:
        return write_config(
            temporary_directory(self),
            f'[client]\ntimeout = "300ms"\n[time]\nendpoint = "udp:{port}"\n',
        )

    def test_timeout(self) -> None:
        """A server that never answers: one line and exit status 4."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        config = self.client_config(silent.getsockname()[1])
        result = run_netlab("--config", str(config), "time", "--count", "2")
        self.assertEqual(result.returncode, 4)
        self.assertEqual(result.stdout, "")
        self.assertRegex(
            result.stderr, r"^netlab: no answer from 127\.0\.0\.1:\d+ within"
        )

    def test_refused(self) -> None:
        """Nothing listening: told so at once, exit status 4."""
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        result = run_netlab("--config", str(self.client_config(port)), "time")
        self.assertEqual(result.returncode, 4)
        self.assertIn("refused the datagram", result.stderr)

    def test_no_fixed_port(self) -> None:
        """An endpoint on port 0 without --port is a usage error."""
        config = self.client_config(0)
        result = run_netlab("--config", str(config), "time")
        self.assertEqual(result.returncode, 2)
        self.assertIn("pass --port", result.stderr)


def children(pid: int) -> list[int]:
    """The PIDs of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (
            (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        )
    except OSError:
        return False
    return state != "Z"


class WorkerTests(TestCase):
    def setUp(self) -> None:
        self.daemon, self.port, self.config = start(self, "workers = 3\nrate = 0\n")
        for index in (1, 2):
            self.daemon.wait_for(
                rf"time worker {index} answering on 127\.0\.0\.1:{self.port}"
            )
        self.workers = children(self.daemon.process.pid)
        self.assertEqual(len(self.workers), 2)

    def test_all_processes_answer(self) -> None:
        """Queries from many sockets are all answered, by more than one process."""
        for _ in range(60):
            self.assertEqual(len(exchange(self.port, b"")), 4)
        self.daemon.stop()
        # Each process logs its final counters when it stops.
        served = [int(n) for n in re.findall(r"answered-rfc868 (\d+)", self.daemon.log)]
        self.assertEqual(sum(served), 60)
        self.assertGreater(len(served), 1)

    def test_workers_reload_on_sighup(self) -> None:
        """A worker given SIGHUP reads the configuration file again."""
        self.config.write_text(
            self.config.read_text().replace(
                'leap = "none"', 'leap = "none"\ntext_format = "reloaded %Y"'
            )
        )
        for pid in self.workers:
            os.kill(pid, signal.SIGHUP)
        replies = set()
        deadline = time.monotonic() + 10
        while not any(r.startswith(b"reloaded") for r in replies):
            self.assertLess(time.monotonic(), deadline, replies)
            # UDP: a request may go unanswered (e.g. queued behind a worker's
            # reload on a loaded machine); ask again, as a client would.
            with contextlib.suppress(TimeoutError):
                replies.add(exchange(self.port, b"time", timeout=1.0))
        self.assertNotIn("reload failed", self.daemon.log)

    def test_workers_stop_with_daemon(self) -> None:
        """SIGTERM stops the daemon and its workers cleanly."""
        # twistd ends by re-raising the signal that stopped it.
        self.assertEqual(self.daemon.stop(), 0)
        self.assertIn("time worker 1 exited", self.daemon.log)
        self.assertIn("Server Shut Down", self.daemon.log)
        for pid in self.workers:
            self.assertFalse(alive(pid))

    def test_killed_worker_is_restarted(self) -> None:
        """A worker killed with SIGKILL is started again within seconds, on a
        socket of its own, while the other processes go on answering; then
        every query is answered, by more than one process."""
        victim = self.workers[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(20):  # Meanwhile: answered, asking again as clients do.
            with contextlib.suppress(TimeoutError):
                self.assertEqual(len(exchange(self.port, b"", timeout=1.0)), 4)
        died = self.daemon.wait_for(r"time worker \d exited: .*; restarting")
        index = re.search(r"time worker (\d)", died).group(1)  # type: ignore[union-attr]
        self.daemon.wait_for(rf"time worker {index} restarted")
        self.daemon.wait_for(
            rf"time worker {index} answering on 127\.0\.0\.1:{self.port}", count=2
        )
        now = children(self.daemon.process.pid)
        self.assertEqual(len(now), 2)
        self.assertNotIn(victim, now)
        for _ in range(60):
            self.assertEqual(len(exchange(self.port, b"")), 4)
        self.daemon.stop()
        served = [int(n) for n in re.findall(r"answered-rfc868 (\d+)", self.daemon.log)]
        self.assertGreaterEqual(sum(served), 60)
        self.assertGreater(len([n for n in served if n]), 1)

    def test_workers_die_with_killed_daemon(self) -> None:
        """Even SIGKILL of the daemon takes the workers down (their stdin closes)."""
        os.kill(self.daemon.process.pid, signal.SIGKILL)
        self.daemon.process.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in self.workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([pid for pid in self.workers if alive(pid)], [])


class SocketActivationTests(TestCase):
    def test_systemd_datagram_socket_shared_with_workers(self) -> None:
        """Under systemd-socket-activate the daemon and its worker share the socket."""
        if shutil.which("systemd-socket-activate") is None:
            self.skipTest("systemd-socket-activate is not installed")
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        activate = ["systemd-socket-activate", "--datagram",
                    "-l", f"127.0.0.1:{port}", "--fdname=netlab-time"]  # fmt: skip
        self.patch(support, "TWISTD", [*activate, *support.TWISTD])
        directory = temporary_directory(self)
        config = write_config(
            directory,
            TIME_ONLY.replace("udp:0:interface=127.0.0.1", "systemd:name=netlab-time")
            + "workers = 2\nrate = 0\n",
        )
        daemon = Daemon(self, config)
        # systemd-socket-activate starts the daemon on the first datagram,
        # which waits in the socket and is answered once the daemon is up.
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(first.close)
        first.settimeout(20)
        daemon.wait_for(rf"Listening on 127\.0\.0\.1:{port}")
        first.sendto(b"unix", ("127.0.0.1", port))
        daemon.wait_listening(1)
        self.assertRegex(first.recv(100), rb"^\d+\.\d{6}$")
        self.assertEqual(daemon.addresses["time"], ("127.0.0.1", port))
        daemon.wait_for(rf"time worker 1 answering on 127\.0\.0\.1:{port}")
        for _ in range(20):
            self.assertEqual(len(exchange(port, b"")), 4)
        daemon.stop()
        served = re.findall(r"answered-rfc868 (\d+)", daemon.log)
        self.assertEqual(sum(int(n) for n in served), 20)
        self.assertIn("answered-text 1", daemon.log)
