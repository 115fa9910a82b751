"""End-to-end tests of the systemd integration against ``twistd -n netlab``.

The daemon runs in a subprocess (tests.support.Daemon) with ``NOTIFY_SOCKET``
pointing at an abstract datagram socket the test reads, as systemd would
with ``Type=notify``.  Reload is driven by real ``SIGHUP`` signals.
"""

from __future__ import annotations

import signal
import socket
import time

from twisted.trial.unittest import TestCase

from netlab.systemd import notify_address
from tests.support import Daemon, temporary_directory, write_config
from tests.test_systemd import notify_listener

#: No service enabled: what is tested here is the daemon around them.
NO_SERVICES = """
[file]
enabled = false
[time]
enabled = false
[chat]
enabled = false
"""


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
        state = self.directory / "state"
        write_config(
            self.directory, f'[netlab]\nstate_directory = "{state}"\n{netlab}\n{text}'
        )

    def test_ready_then_stopping(self) -> None:
        """READY=1 with a STATUS= line arrives once the daemon runs; SIGTERM
        brings STOPPING=1 and a clean exit."""
        daemon = self.start(NO_SERVICES)
        self.assertEqual(
            next_notification(self.listener),
            {"READY": "1", "STATUS": "running, no services enabled"},
        )
        daemon.wait_for("netlab ready")
        status = daemon.stop()
        self.assertEqual(
            next_notification(self.listener), {"STOPPING": "1", "STATUS": "stopping"}
        )
        self.assertEqual(status, -signal.SIGTERM, daemon.log)

    def test_sighup_valid_config(self) -> None:
        """A valid new configuration is applied between RELOADING=1 and
        READY=1; a setting that needs a restart is named in the log."""
        daemon = self.start(NO_SERVICES)
        next_notification(self.listener)
        self.rewrite(NO_SERVICES, netlab='log_level = "debug"\nlog_format = "json"')
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
        daemon = self.start(NO_SERVICES)
        next_notification(self.listener)
        self.rewrite(NO_SERVICES, netlab="log_level = 5")
        daemon.process.send_signal(signal.SIGHUP)
        self.assertIn("RELOADING", next_notification(self.listener))
        self.assertEqual(next_notification(self.listener)["READY"], "1")
        line = daemon.wait_for("reload refused")
        self.assertIn("[netlab] log_level: 5 is not allowed", line)
        self.assertIn("still running with the previous configuration", line)
        self.assertIsNone(daemon.process.poll())

        self.rewrite(NO_SERVICES, netlab='log_level = "warn"')
        daemon.process.send_signal(signal.SIGHUP)
        next_notification(self.listener)
        next_notification(self.listener)
        self.assertEqual(daemon.stop(), -signal.SIGTERM, daemon.log)
        # At level "warn" the info lines of the stop are no longer written.
        self.assertNotIn("netlab stopping", daemon.log)

    def test_without_notify_socket(self) -> None:
        """Without NOTIFY_SOCKET the daemon runs, reloads and stops the same."""
        path = write_config(self.directory, NO_SERVICES)
        daemon = Daemon(self, path)
        daemon.wait_for("netlab ready")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("configuration reloaded")
        daemon.stop()
        self.assertNotIn("notify", daemon.log)
        with self.assertRaises(BlockingIOError):
            self.listener.recv(4096)
