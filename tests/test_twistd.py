"""End to end: ``twistd netlab`` in a subprocess, as an operator runs it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import TestCase

from netlab.configdoc import SAMPLE_PATH

from .support import EPHEMERAL, TWISTD, Daemon, temporary_directory, write_config

DEFAULT_PORTS = {"file": 8021, "time": 8123, "chat": 8070}


def run_twistd(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWISTD, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


class TwistdTests(TestCase):
    def test_help_lists_netlab(self) -> None:
        """`twistd --help` lists the netlab plugin."""
        result = run_twistd("--help")
        self.assertIn("netlab", result.stdout)

    def test_check_on_sample(self) -> None:
        """`twistd netlab --check` accepts the shipped sample and lists services."""
        result = run_twistd("netlab", "--config", str(SAMPLE_PATH), "--check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("configuration OK", result.stdout)
        self.assertIn("file     tcp:8021:interface=127.0.0.1", result.stdout)

    def test_bad_config_exits_before_binding(self) -> None:
        """A bad file exits non-zero with one line naming the key, binding nothing."""
        directory = temporary_directory(self)
        path = write_config(directory, EPHEMERAL + "histroy = 3\n")
        for extra in ((), ("--check",)):
            result = run_twistd(
                "-n", "--pidfile=", "netlab", "--config", str(path), *extra
            )
            self.assertEqual(result.returncode, 3)
            self.assertEqual(result.stdout, "")
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
            self.assertIn("[chat] histroy: unknown key", result.stderr)

    def stop_cleanly(self, daemon: Daemon) -> None:
        started = time.monotonic()
        self.assertEqual(daemon.stop(signal.SIGTERM, timeout=5), 0, daemon.log)
        self.assertLess(time.monotonic() - started, 5)
        self.assertNotIn("Traceback", daemon.log)
        self.assertNotIn("Unable to write to plugin cache", daemon.log)

    def test_defaults_bind_default_ports_and_stop_on_sigterm(self) -> None:
        """With no file the daemon serves on its loopback defaults and stops on TERM."""
        state = temporary_directory(self)
        daemon = Daemon(self, None, env={"STATE_DIRECTORY": str(state)})
        addresses = daemon.wait_listening(len(DEFAULT_PORTS))
        self.assertEqual(
            addresses,
            {name: ("127.0.0.1", port) for name, port in DEFAULT_PORTS.items()},
        )
        self.stop_cleanly(daemon)

    def test_sample_config_runs(self) -> None:
        """The shipped sample runs as is, one log line per listening service."""
        state = temporary_directory(self)
        daemon = Daemon(self, SAMPLE_PATH, env={"STATE_DIRECTORY": str(state)})
        daemon.wait_listening(len(DEFAULT_PORTS))
        listening = [line for line in daemon.output if "service listening on" in line]
        self.assertEqual(len(listening), len(DEFAULT_PORTS))
        self.stop_cleanly(daemon)

    def test_port_in_use_is_one_clear_line(self) -> None:
        """A port that is taken stops start-up with a non-zero status and a hint."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            directory = temporary_directory(self)
            path = write_config(
                directory,
                EPHEMERAL.replace("udp:0", f"udp:{port}", 1),
            )
            daemon = Daemon(self, path)
            self.assertNotEqual(daemon.finish(), 0)
        self.assertIn(f"cannot listen on udp:{port}", daemon.log)
        self.assertIn("is another program using that port?", daemon.log)
        self.assertNotIn("Traceback", daemon.log)

    def test_json_logs(self) -> None:
        """log_format = "json" writes one JSON object per line with event names."""
        directory = temporary_directory(self)
        path = write_config(
            directory,
            f'[netlab]\nlog_format = "json"\nstate_directory = "{directory}"\n'
            + EPHEMERAL,
        )
        daemon = Daemon(self, path)
        daemon.wait_for('"event": "netlab.listening"')
        self.stop_cleanly(daemon)
        records = [json.loads(line) for line in daemon.output if line.strip()]
        events = {record.get("event") for record in records}
        self.assertIn("netlab.listening", events)
