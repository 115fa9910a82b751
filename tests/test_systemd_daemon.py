"""End-to-end tests of the systemd integration against ``twistd -n netlab``.

The daemon runs in a subprocess (tests.support.Daemon) with ``NOTIFY_SOCKET``
pointing at an abstract datagram socket the test reads, as systemd would
with ``Type=notify``.  Reload is driven by real ``SIGHUP`` signals.  Socket
activation runs the daemon under ``systemd-socket-activate`` (Debian's systemd
package), and the ``netlab`` client talks to the file (TCP) and time (UDP)
services on the sockets it passed.
"""

from __future__ import annotations

import shutil
import signal
import socket
import time
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SkipTest, TestCase

from benchmarks.refservers import free_port
from netlab.client import Identity, connect
from netlab.config import load
from netlab.systemd import notify_address
from tests.support import (
    ALL_OFF,
    Daemon,
    run_netlab,
    temporary_directory,
    write_config,
)
from tests.test_systemd import notify_listener
from tests.tlssupport import CertificateAuthority

#: How a daemon that stopped cleanly on SIGTERM exits (netlab.lifecycle
#: stops the reactor itself, so twistd does not re-raise the signal).
CLEAN_STOP = (0,)


def next_notification(listener: socket.socket, timeout: float = 20.0) -> dict[str, str]:
    """The next notification the daemon sends, waiting at most ``timeout``."""
    listener.settimeout(timeout)
    try:
        data = listener.recv(4096)
    except TimeoutError:
        raise AssertionError(f"no notification within {timeout}s") from None
    finally:
        listener.setblocking(False)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


class NotifyDaemonTests(TestCase):
    """Readiness, reload and stop, as systemd sees them."""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.listener, self.notify_socket = notify_listener(self, abstract=True)
        assert isinstance(notify_address(self.notify_socket), bytes)

    def start(self, config_text: str) -> Daemon:
        path = write_config(self.directory, config_text)
        return Daemon(self, path, env={"NOTIFY_SOCKET": self.notify_socket})

    def rewrite(self, text: str, netlab: str = "") -> None:
        """Replace the configuration file; ``netlab``: [netlab] lines."""
        write_config(self.directory, f"[netlab]\n{netlab}\n{text}")

    def test_ready_then_stopping(self) -> None:
        """READY=1 with a STATUS= line arrives once the daemon runs; SIGTERM
        brings STOPPING=1 and a clean exit."""
        daemon = self.start(ALL_OFF)
        self.assertEqual(
            next_notification(self.listener),
            {"READY": "1", "STATUS": "running, no services enabled"},
        )
        daemon.wait_for("netlab ready")
        status = daemon.stop()
        self.assertEqual(
            next_notification(self.listener), {"STOPPING": "1", "STATUS": "stopping"}
        )
        self.assertIn(status, CLEAN_STOP, daemon.log)

    def test_sighup_valid_config(self) -> None:
        """A valid new configuration is applied between RELOADING=1 and
        READY=1; a setting that needs a restart is named in the log."""
        daemon = self.start(ALL_OFF)
        next_notification(self.listener)
        self.rewrite(ALL_OFF, netlab='log_level = "debug"\nlog_format = "json"')
        daemon.process.send_signal(signal.SIGHUP)
        reloading = next_notification(self.listener)
        self.assertEqual(reloading["RELOADING"], "1")
        # MONOTONIC_USEC is this host's CLOCK_MONOTONIC, as systemd checks it.
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.assertLess(abs(int(reloading["MONOTONIC_USEC"]) - now), 60_000_000)
        self.assertEqual(next_notification(self.listener)["READY"], "1")
        daemon.wait_for("configuration reloaded")
        daemon.wait_for(r"take effect only after a restart: \[netlab\] log_format")
        # The new level is in force: debug events now reach the log.
        daemon.process.send_signal(signal.SIGHUP)
        next_notification(self.listener)
        next_notification(self.listener)
        daemon.wait_for("notified systemd: RELOADING")
        daemon.stop()

    def test_sighup_invalid_config(self) -> None:
        """An invalid new configuration is logged with the reason and the
        daemon keeps running on the old one; a later valid file is taken."""
        daemon = self.start(ALL_OFF)
        next_notification(self.listener)
        self.rewrite(ALL_OFF, netlab="log_level = 5")
        daemon.process.send_signal(signal.SIGHUP)
        self.assertIn("RELOADING", next_notification(self.listener))
        self.assertEqual(next_notification(self.listener)["READY"], "1")
        line = daemon.wait_for("reload refused")
        self.assertIn("[netlab] log_level: 5 is not allowed", line)
        self.assertIn("still running with the previous configuration", line)
        self.assertIsNone(daemon.process.poll())

        self.rewrite(ALL_OFF, netlab='log_level = "warn"')
        daemon.process.send_signal(signal.SIGHUP)
        next_notification(self.listener)
        next_notification(self.listener)
        self.assertIn(daemon.stop(), CLEAN_STOP, daemon.log)
        # At level "warn" the info lines of the stop are no longer written.
        self.assertNotIn("netlab stopping", daemon.log)

    def test_sighup_burst(self) -> None:
        """A burst of SIGHUPs (signals may coalesce) leaves the daemon well:
        every RELOADING=1 is followed by READY=1 before the next one, every
        reload succeeds, and the daemon still stops cleanly."""
        daemon = self.start(ALL_OFF)
        next_notification(self.listener)
        for _ in range(20):
            daemon.process.send_signal(signal.SIGHUP)
        self.assertIn(daemon.stop(), CLEAN_STOP, daemon.log)
        reloads = []
        for _ in range(100):
            notification = next_notification(self.listener)
            if "STOPPING" in notification:
                break
            reloads.append(notification)
        self.assertGreaterEqual(len(reloads), 2)
        self.assertEqual(len(reloads) % 2, 0, reloads)
        for reloading, ready in zip(reloads[::2], reloads[1::2], strict=True):
            self.assertEqual((reloading["RELOADING"], ready["READY"]), ("1", "1"))
        self.assertEqual(
            daemon.log.count("configuration reloaded"), len(reloads) // 2, daemon.log
        )
        self.assertNotIn("Traceback", daemon.log)

    def test_without_notify_socket(self) -> None:
        """Without NOTIFY_SOCKET the daemon runs, reloads and stops the same."""
        path = write_config(self.directory, ALL_OFF)
        daemon = Daemon(self, path)
        daemon.wait_for("netlab ready")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("configuration reloaded")
        daemon.stop()
        self.assertNotIn("notify", daemon.log)
        with self.assertRaises(BlockingIOError):
            self.listener.recv(4096)


#: The file service (anonymous reads) and the time service, the rest off.
SERVICES = """
[file]
endpoint = "{file}"
anonymous = "read"
root = "{root}"
[time]
endpoint = "{time}"
[chat]
enabled = false
"""


def require(program: str) -> None:
    if shutil.which(program) is None:
        raise SkipTest(f"{program} is not installed (Debian package systemd)")


class ServiceDaemonTests(TestCase):
    """Readiness and socket activation with real services and real clients."""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.root = self.directory / "files"
        self.root.mkdir()
        (self.root / "hello.txt").write_text("hello\n")
        self.listener, self.notify_socket = notify_listener(self, abstract=True)

    def server_config(self, file: str, time: str) -> Path:
        text = SERVICES.format(file=file, time=time, root=self.root)
        return write_config(self.directory, text)

    def activated(self, config: Path, port: int, name: str) -> Daemon:
        """The daemon behind systemd-socket-activate, which listens on TCP
        ``port`` and passes the socket as ``name`` (nothing started yet)."""
        wrapper = (
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{port}",
            f"--fdname={name}",
        )
        daemon = Daemon(self, config, wrapper=wrapper)
        daemon.wait_for(rf"Listening on 127\.0\.0\.1:{port} as 3")
        return daemon

    def client(self, *args: str, file_port: int, time_port: int) -> str:
        """Run the ``netlab`` client against the given ports; return its output."""
        config = write_config(
            self.directory,
            SERVICES.format(
                file=f"tcp:{file_port}:interface=127.0.0.1",
                time=f"udp:{time_port}:interface=127.0.0.1",
                root=self.root,
            ),
            name="client.toml",
        )
        result = run_netlab("--config", str(config), *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_ready_only_after_ports_accept(self) -> None:
        """READY=1 comes after every service logged that it listens, and at
        that moment both ports answer real clients."""
        config = self.server_config(
            "tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"
        )
        daemon = Daemon(self, config, env={"NOTIFY_SOCKET": self.notify_socket})
        ready = next_notification(self.listener)
        daemon.wait_for("netlab ready")
        addresses = daemon.wait_listening(2)
        file_port, time_port = addresses["file"][1], addresses["time"][1]
        self.assertEqual(
            ready,
            {
                "READY": "1",
                "STATUS": f"serving file on 127.0.0.1:{file_port}, "
                f"time on 127.0.0.1:{time_port}",
            },
        )
        lines = daemon.output
        ready_line = next(i for i, line in enumerate(lines) if "netlab ready" in line)
        listening = [
            i for i, line in enumerate(lines) if "service listening on" in line
        ]
        self.assertEqual(len(listening), 2)
        self.assertLess(max(listening), ready_line)
        with socket.create_connection(("127.0.0.1", file_port), timeout=10):
            pass
        self.assertIn("hello.txt", self.client("ls", file_port=file_port, time_port=0))
        self.assertIn("offset", self.client("time", file_port=0, time_port=time_port))
        daemon.stop()
        self.assertEqual(next_notification(self.listener)["STOPPING"], "1")

    def test_socket_activation_tcp_and_udp(self) -> None:
        """systemd-socket-activate passes a TCP socket (file) and a UDP socket
        (time) by name; the first client's connection starts the daemon and is
        served, then a real client talks to each service."""
        require("systemd-socket-activate")
        file_port = free_port()
        time_port = free_port(socket.SOCK_DGRAM)
        config = self.server_config(
            "systemd:domain=INET:name=netlab-file", "systemd:name=netlab-time"
        )
        # -d applies to every socket of one invocation, so one TCP and one UDP
        # socket take two chained invocations; the second passes on the
        # first's socket and must name both.
        wrapper = (
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{file_port}",
            "--fdname=netlab-file",
            "--setenv=NOTIFY_SOCKET",
            "systemd-socket-activate",
            "--datagram",
            f"--listen=127.0.0.1:{time_port}",
            "--fdname=netlab-file:netlab-time",
            "--setenv=NOTIFY_SOCKET",
        )
        daemon = Daemon(
            self, config, env={"NOTIFY_SOCKET": self.notify_socket}, wrapper=wrapper
        )
        daemon.wait_for(rf"Listening on 127\.0\.0\.1:{file_port} as 3")
        # Nothing runs yet: this client's connection is what starts netlab.
        self.assertNotIn("twistd", daemon.log)
        listing = self.client("ls", file_port=file_port, time_port=time_port)
        self.assertIn("hello.txt", listing)
        self.assertEqual(
            next_notification(self.listener),
            {
                "READY": "1",
                "STATUS": f"serving file on 127.0.0.1:{file_port}, "
                f"time on 127.0.0.1:{time_port}",
            },
        )
        self.assertIn(
            "offset", self.client("time", file_port=file_port, time_port=time_port)
        )
        self.assertIn(
            "hello.txt", self.client("ls", file_port=file_port, time_port=time_port)
        )
        self.assertIn(daemon.stop(), CLEAN_STOP, daemon.log)

    def test_socket_activation_with_tls(self) -> None:
        """A TCP socket systemd passes serves TLS with tls=yes: a client whose
        configuration names that endpoint speaks TLS, verifies the server
        against the root of its fullchain certificate and lists the root; a
        client speaking plain TCP to it is refused (exit 4) and the daemon
        goes on serving."""
        require("systemd-socket-activate")
        root = CertificateAuthority()
        intermediate = CertificateAuthority("netlab intermediate", parent=root)
        certificate, key = intermediate.issue(self.directory, ["127.0.0.1"])
        ca_file = root.write_ca(self.directory / "ca.pem")
        tls = (
            f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'
            f'ca_file = "{ca_file}"\n'
        )
        port = free_port()
        config = write_config(
            self.directory,
            SERVICES.format(
                file="systemd:domain=INET:name=netlab-file:tls=yes",
                time="udp:0:interface=127.0.0.1",
                root=self.root,
            )
            + tls,
        )
        daemon = self.activated(config, port, "netlab-file")
        server = ("--server", f"127.0.0.1:{port}")
        listing = run_netlab("--config", str(config), *server, "ls")
        self.assertEqual(listing.returncode, 0, listing.stderr + daemon.log)
        self.assertIn("hello.txt", listing.stdout)
        plain = write_config(
            self.directory,
            SERVICES.format(
                file=f"tcp:{port}:interface=127.0.0.1",
                time="udp:0:interface=127.0.0.1",
                root=self.root,
            ),
            name="plain.toml",
        )
        refused = run_netlab("--config", str(plain), "ls")
        self.assertEqual(refused.returncode, 4, refused.stderr)
        again = run_netlab("--config", str(config), *server, "ls")
        self.assertIn("hello.txt", again.stdout)
        self.assertIn(daemon.stop(), CLEAN_STOP, daemon.log)

    def test_missing_socket_is_a_start_up_error(self) -> None:
        """A systemd: endpoint without socket activation stops start-up with
        one line naming the fix, and systemd is never told READY=1."""
        config = self.server_config(
            "tcp:0:interface=127.0.0.1", "systemd:name=netlab-time"
        )
        daemon = Daemon(self, config, env={"NOTIFY_SOCKET": self.notify_socket})
        self.assertNotEqual(daemon.finish(), 0)
        self.assertIn(
            "systemd passed no socket named 'netlab-time' (names passed: none); "
            "set FileDescriptorName=netlab-time in the .socket unit",
            daemon.log,
        )
        self.assertIn("netlab: cannot start: ", daemon.log)
        with self.assertRaises(BlockingIOError):
            self.listener.recv(4096)

    def test_wrong_socket_type_is_a_start_up_error(self) -> None:
        """A TCP socket passed under the UDP service's name is refused at
        start-up with the unit setting to use."""
        require("systemd-socket-activate")
        port = free_port()
        config = self.server_config(
            "tcp:0:interface=127.0.0.1", "systemd:name=netlab-time"
        )
        daemon = self.activated(config, port, "netlab-time")
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            self.assertNotEqual(daemon.finish(), 0)
        # The time service adopts its socket itself (it reads kernel
        # timestamps), with its own wording of the same error.
        line = daemon.wait_for("netlab: cannot start: ")
        self.assertIn(
            "[time] systemd socket 'netlab-time' is a stream (TCP) socket", line
        )
        self.assertIn(
            "use ListenDatagram=ADDRESS:PORT (and Accept=no) in the .socket unit", line
        )

    def test_reload_keeps_connected_clients(self) -> None:
        """A reload (SIGHUP) with live and restart-only changes keeps an
        authenticated session open and answering, and the ports unchanged."""
        from twisted.internet.threads import deferToThread

        config = self.server_config(
            "tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"
        )
        daemon = Daemon(self, config, env={"NOTIFY_SOCKET": self.notify_socket})
        next_notification(self.listener)
        addresses = daemon.wait_listening(2)
        file_port, time_port = addresses["file"][1], addresses["time"][1]
        client_config = load(
            write_config(
                self.directory,
                f'[file]\nendpoint = "tcp:{file_port}:interface=127.0.0.1"\n',
                name="client.toml",
            )
        )

        async def exercise() -> None:
            session = await connect(client_config, "file", identity=Identity())
            try:
                await session.ping()
                # Live: the log level and the time rate limit; restart-only:
                # the file endpoint, which must keep its old port.
                text = SERVICES.format(
                    file="tcp:0:interface=127.0.0.1:backlog=10",
                    time="udp:0:interface=127.0.0.1",
                    root=self.root,
                )
                write_config(
                    self.directory,
                    '[netlab]\nlog_level = "debug"\n'
                    + text.replace("[chat]", "rate = 100.0\n[chat]"),
                )
                daemon.process.send_signal(signal.SIGHUP)
                reloading = await deferToThread(next_notification, self.listener)
                self.assertIn("RELOADING", reloading)
                ready = await deferToThread(next_notification, self.listener)
                self.assertEqual(
                    ready["STATUS"],
                    f"serving file on 127.0.0.1:{file_port}, "
                    f"time on 127.0.0.1:{time_port}",
                )
                await session.ping()
            finally:
                await session.close()

        def check_log(_: object) -> None:
            daemon.wait_for("configuration reloaded")
            daemon.wait_for(r"only after a restart: \[file\] endpoint$")
            self.assertIn(
                "offset", self.client("time", file_port=0, time_port=time_port)
            )
            daemon.stop()

        return ensureDeferred(exercise()).addCallback(check_log)
