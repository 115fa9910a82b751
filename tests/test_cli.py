"""Tests for the ``netlab`` command: help, version, config lookup, exit codes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from twisted.trial.unittest import TestCase

from netlab import __version__, cli
from netlab.cli import build_parser, report
from netlab.config import client_config_path
from netlab.errors import ConnectionFailed, ExitCode, RemoteError

from .support import run_netlab, temporary_directory, write_config


class ParserTests(TestCase):
    def test_help_lists_subcommands(self) -> None:
        """`netlab --help` lists every registered subcommand and the exit codes."""
        result = run_netlab("--help")
        self.assertEqual(result.returncode, 0)
        self.assertIn("config", result.stdout)
        self.assertIn("Exit status:", result.stdout)
        parser = build_parser()
        self.assertIn("--server HOST", parser.format_help())

    def test_version(self) -> None:
        """`netlab --version` prints the package version."""
        result = run_netlab("--version")
        self.assertEqual(
            (result.returncode, result.stdout.strip()), (0, f"netlab {__version__}")
        )

    def test_no_command_is_a_usage_error(self) -> None:
        """Without a subcommand netlab shows help on stderr and exits 2."""
        result = run_netlab()
        self.assertEqual(result.returncode, ExitCode.USAGE)
        self.assertIn("commands:", result.stderr)

    def test_unknown_option_is_one_line(self) -> None:
        """A bad option is one line on stderr with exit status 2."""
        result = run_netlab("--frobnicate")
        self.assertEqual(result.returncode, ExitCode.USAGE)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn(
            "unrecognized arguments: --frobnicate (try --help)", result.stderr
        )


class ConfigCommandTests(TestCase):
    def test_bad_config_exits_3_with_one_line(self) -> None:
        """A broken configuration file gives exit status 3 and one line."""
        directory = temporary_directory(self)
        path = write_config(directory, "[client]\ntimeout = -1\n")
        result = run_netlab("--config", str(path), "config")
        self.assertEqual(result.returncode, ExitCode.CONFIG)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn("[client] timeout: -1s is below the minimum 100ms", result.stderr)

    def test_config_shows_effective_settings(self) -> None:
        """`netlab config` prints the settings in force, from the chosen file."""
        directory = temporary_directory(self)
        path = write_config(directory, '[client]\nserver = "127.0.0.2"\n')
        result = run_netlab("--config", str(path), "config")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"# effective configuration from {path}", result.stdout)
        self.assertIn('server = "127.0.0.2"', result.stdout)

    def test_environment_names_the_file(self) -> None:
        """$NETLAB_CONFIG is used when --config is not given."""
        directory = temporary_directory(self)
        path = write_config(directory, '[client]\nserver = "127.0.0.3"\n')
        result = run_netlab("config", env={"NETLAB_CONFIG": str(path)})
        self.assertIn('server = "127.0.0.3"', result.stdout)

    def test_lookup_order(self) -> None:
        """--config beats $NETLAB_CONFIG, which beats the user's file."""
        directory = temporary_directory(self)
        user = directory / "netlab" / "netlab.toml"
        user.parent.mkdir()
        user.write_text("")
        self.patch(
            __import__("os"),
            "environ",
            {"XDG_CONFIG_HOME": str(directory), "NETLAB_CONFIG": "/env.toml"},
        )
        self.assertEqual(str(client_config_path("/cli.toml")), "/cli.toml")
        self.assertEqual(str(client_config_path(None)), "/env.toml")
        del __import__("os").environ["NETLAB_CONFIG"]
        self.assertEqual(client_config_path(None), user)


class ReportTests(TestCase):
    def capture(self, error: BaseException, verbose: int = 0) -> tuple[int, str]:
        stream = io.StringIO()
        self.patch(sys, "stderr", stream)
        return report(error, verbose), stream.getvalue()

    def test_netlab_errors_use_their_exit_code(self) -> None:
        """Each error class maps to its documented exit status, in one line."""
        code, text = self.capture(ConnectionFailed("cannot connect to 127.0.0.1:8021"))
        self.assertEqual(
            (code, text), (4, "netlab: cannot connect to 127.0.0.1:8021\n")
        )
        code, text = self.capture(RemoteError("busy", "another upload is in progress"))
        self.assertEqual(code, ExitCode.REMOTE)
        self.assertIn("another upload is in progress (busy)", text)

    def test_server_text_cannot_drive_the_terminal(self) -> None:
        """Escape sequences and newlines a server puts in an error are escaped."""
        code, text = self.capture(RemoteError("denied", "no\x1b[2J\nfake line"))
        self.assertEqual(code, ExitCode.REMOTE)
        self.assertEqual(text, "netlab: no\\x1b[2J\\x0afake line (denied)\n")

    def test_unexpected_errors_suggest_verbose(self) -> None:
        """A bug is one line that points at -v; -v prints the traceback."""
        code, text = self.capture(ZeroDivisionError("oops"))
        self.assertEqual(code, ExitCode.FAILURE)
        self.assertIn("run with -v for details", text)
        self.assertEqual(text.count("\n"), 1)
        try:
            1 / 0  # noqa: B018 - a real traceback to print
        except ZeroDivisionError as error:
            _, verbose_text = self.capture(error, verbose=1)
        self.assertIn("Traceback", verbose_text)


class _Exited(Exception):
    """Raised by the stand-in for os._exit, with the status it was given."""


class ConsoleTests(TestCase):
    """console() runs main, then exits at once with main's status."""

    def run_console(self, status: object) -> tuple[int | None, list[str]]:
        """console() with a main that exits with ``status``: (the status given to
        os._exit, or None when it exited the ordinary way; what happened)."""
        events: list[str] = []

        def main() -> None:
            events.append("main")
            raise SystemExit(status)

        def exit_now(code: int) -> None:
            events.append("os._exit")
            raise _Exited(code)

        self.patch(cli, "main", main)
        self.patch(cli.os, "_exit", exit_now)
        self.patch(cli.atexit, "_run_exitfuncs", lambda: events.append("atexit"))
        self.patch(sys, "stderr", io.StringIO())
        try:
            cli.console()
        except _Exited as exited:
            return exited.args[0], events
        except SystemExit as stop:
            events.append(f"SystemExit({stop.code})")
        return None, events

    def test_statuses(self) -> None:
        """main's status reaches os._exit: None is 0, an int is itself, a
        message is printed and exits 1; exit handlers run first."""
        for status, expected in ((None, 0), (0, 0), (ExitCode.CONNECTION, 4)):
            self.assertEqual(
                self.run_console(status), (expected, ["main", "atexit", "os._exit"])
            )
        self.assertEqual(self.run_console("no good")[0], ExitCode.FAILURE)
        self.assertEqual(sys.stderr.getvalue(), "no good\n")

    def test_waits_for_other_threads(self) -> None:
        """With a non-daemon thread still running, the interpreter exits the
        ordinary way (which waits for it) instead of cutting it off."""
        release = threading.Event()
        worker = threading.Thread(target=release.wait, daemon=False)
        worker.start()
        self.addCleanup(worker.join)
        self.addCleanup(release.set)
        self.assertEqual(self.run_console(3), (None, ["main", "SystemExit(3)"]))

    def test_reader_gone_is_no_error(self) -> None:
        """Output to a reader that has gone away (``netlab config | true``)
        ends quietly with status 1, not a BrokenPipeError report."""
        process = subprocess.Popen(
            [sys.executable, "-m", "netlab", "config"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "NETLAB_CONFIG": os.devnull},
        )
        assert process.stdout is not None
        process.stdout.close()
        _, errors = process.communicate(timeout=30)
        self.assertEqual((process.returncode, errors), (ExitCode.FAILURE, b""))
