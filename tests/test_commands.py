"""Tests of the light command registration (netlab.commands) and how cli uses it.

Parsing a ``netlab`` command line must not import Twisted, pyOpenSSL or any
command's implementation: those load only once the command runs.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import subprocess
import sys
import textwrap
from typing import Any

from twisted.trial.unittest import TestCase

from netlab import cli
from netlab.commands import resolve
from netlab.errors import ExitCode, UsageError
from netlab.file.localdigest import HashedFile

from .support import temporary_directory

#: One command line per subcommand, with its required arguments.
COMMAND_LINES: dict[str, list[str]] = {
    "config": ["config"],
    "keygen": ["keygen", "alice"],
    "ls": ["ls", "-l"],
    "stat": ["stat", "f"],
    "get": ["get", "-r", "d"],
    "put": ["put", "LOCAL"],
    "rm": ["rm", "f"],
    "mkdir": ["mkdir", "d"],
    "time": ["time", "--rfc868"],
    "chat": ["chat", "--send", "hi"],
}

#: The netlab modules that parsing (and put's prepare hook) may load.
LIGHT_MODULES = {
    "netlab",
    "netlab.cli",
    "netlab.commands",
    "netlab.errors",
    "netlab.memory",
    "netlab.terminal",
}

#: Packages that parsing must not import: Twisted and what comes with it,
#: and attrs (the configuration's classes load after parsing).
HEAVY_PACKAGES = {"twisted", "OpenSSL", "cryptography", "zope", "attr", "attrs"}

#: Parses every command line, calls put's prepare hook on a real file, and
#: prints what was imported before and after that hook.
PARSE_ALL = textwrap.dedent(
    """
    import json, sys
    from netlab.cli import build_parser
    from netlab.commands import resolve

    command_lines, local = json.loads(sys.argv[1])
    parser = build_parser()
    parsed = [parser.parse_args(line) for line in command_lines]
    after_parsing = sorted(sys.modules)
    for args in parsed:
        if getattr(args, "prepare", None):
            args.local = local
            resolve(args.prepare)(args)
            assert args.hashed_file is not None
    print(json.dumps([after_parsing, sorted(sys.modules)]))
    """
)


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    """The names of ``parser``'s subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("the parser has no subcommands")


class LightParsingTests(TestCase):
    """Building the parser and parsing stay free of heavy imports."""

    def test_command_lines_cover_every_subcommand(self) -> None:
        """COMMAND_LINES names every subcommand, so the import check sees them all."""
        self.assertEqual(set(COMMAND_LINES), subcommands(cli.build_parser()))

    def test_parsing_imports_nothing_heavy(self) -> None:
        """After parsing every command (in a fresh interpreter), and after put's
        prepare hook, no Twisted, OpenSSL or command implementation is loaded."""
        local = temporary_directory(self) / "local.bin"
        local.write_bytes(b"some bytes to hash")
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                PARSE_ALL,
                json.dumps([list(COMMAND_LINES.values()), str(local)]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        after_parsing, after_prepare = json.loads(result.stdout)
        for loaded, allowed in (
            (after_parsing, LIGHT_MODULES),
            (after_prepare, LIGHT_MODULES | {"netlab.file", "netlab.file.localdigest"}),
        ):
            heavy = [name for name in loaded if name.split(".")[0] in HEAVY_PACKAGES]
            self.assertEqual(heavy, [])
            ours = {name for name in loaded if name.split(".")[0] == "netlab"}
            self.assertLessEqual(ours, allowed)
            self.assertIn("netlab.commands", ours)


class HandlerTests(TestCase):
    """Every command names code that exists, in the form cli expects."""

    def parse(self, name: str) -> argparse.Namespace:
        return cli.build_parser().parse_args(COMMAND_LINES[name])

    def test_every_handler_is_an_async_function(self) -> None:
        """Each subcommand's handler string resolves to an ``async def``."""
        for name in COMMAND_LINES:
            handler = self.parse(name).handler
            self.assertIsInstance(handler, str, name)
            self.assertTrue(inspect.iscoroutinefunction(resolve(handler)), name)

    def test_only_put_prepares(self) -> None:
        """put has a prepare hook (its early hash); no other command has one."""
        for name in COMMAND_LINES:
            prepare: str | None = getattr(self.parse(name), "prepare", None)
            if name == "put":
                self.assertEqual(prepare, "netlab.file.localdigest:start_put_hash")
                self.assertTrue(callable(resolve(str(prepare))))
            else:
                self.assertIsNone(prepare, name)

    def test_keygen_user_is_not_the_global_user(self) -> None:
        """keygen's USER (whom to create) does not overwrite --user (whom to
        connect as)."""
        args = cli.build_parser().parse_args(["--user", "bob", "keygen", "ann"])
        self.assertEqual((args.user, args.new_user), ("bob", "ann"))

    def test_resolve(self) -> None:
        """resolve imports "module:name" and returns the attribute; a wrong
        name fails loudly."""
        self.assertIs(resolve("netlab.errors:UsageError"), UsageError)
        with self.assertRaises(AttributeError):
            resolve("netlab.errors:NoSuchThing")
        with self.assertRaises(ImportError):
            resolve("netlab.no_such_module:thing")


class MainTests(TestCase):
    """cli.main parses, prepares, then hands the handler's name to run."""

    def run_main(self, *argv: str) -> tuple[Any, list[tuple[str, argparse.Namespace]]]:
        calls: list[tuple[str, argparse.Namespace]] = []

        def run(handler: str, args: argparse.Namespace) -> int:
            calls.append((handler, args))
            return 0

        self.patch(cli, "run", run)
        with self.assertRaises(SystemExit) as exited:
            cli.main(list(argv))
        return exited.exception.code, calls

    def test_put_starts_hashing_before_running(self) -> None:
        """A single-file put reaches run() with LOCAL already open and hashing."""
        local = temporary_directory(self) / "local.bin"
        local.write_bytes(b"x" * 1000)
        code, calls = self.run_main("put", str(local))
        self.assertEqual(code, 0)
        [(handler, args)] = calls
        self.assertEqual(handler, "netlab.file.cli:put_command")
        self.assertIsInstance(args.hashed_file, HashedFile)
        args.hashed_file.close()

    def test_recursive_put_does_not_hash_early(self) -> None:
        """put -r hashes each file when its turn comes, not at parse time."""
        code, calls = self.run_main("put", "-r", str(temporary_directory(self)))
        self.assertEqual(code, 0)
        self.assertIsNone(calls[0][1].hashed_file)

    def test_no_command_runs_nothing(self) -> None:
        """Without a subcommand main exits 2 without calling run."""
        self.patch(sys, "stderr", io.StringIO())
        code, calls = self.run_main()
        self.assertEqual((code, calls), (ExitCode.USAGE, []))
