"""Helpers shared by the tests: temporary directories and a real ``twistd netlab``.

:class:`Daemon` runs ``twistd --nodaemon netlab --config FILE`` in a
subprocess, waits (bounded) until every enabled service has logged where it
listens, and stops it with SIGTERM.  Tests use port 0 so they never collide.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

#: ``twistd`` for the interpreter running the tests (``python -m twisted`` is
#: the newer ``twist`` runner, which lacks twistd's options).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

LISTENING = re.compile(r"(\w+) service listening on (\S+)")

#: A configuration with every available service on an ephemeral loopback port.
EPHEMERAL = """
[file]
endpoint = "tcp:0:interface=127.0.0.1"
[time]
endpoint = "udp:0:interface=127.0.0.1"
[chat]
endpoint = "udp:0:interface=127.0.0.1"
"""

#: Every service switched off: for tests of the daemon around the services.
ALL_OFF = """
[file]
enabled = false
[time]
enabled = false
[chat]
enabled = false
"""


def temporary_directory(testcase: Any) -> Path:
    """A fresh directory removed when the test ends (never inside the checkout)."""
    path = Path(tempfile.mkdtemp(prefix="netlab-test-"))
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def write_config(directory: Path, text: str, name: str = "netlab.toml") -> Path:
    """Write a configuration file whose state directory is inside ``directory``
    (unless ``text`` sets one)."""
    body = textwrap.dedent(text)
    state = f'state_directory = "{directory / "state"}"\n'
    if "[netlab]" not in body:
        body = "[netlab]\n" + state + body
    elif "state_directory" not in body:
        body = body.replace("[netlab]\n", "[netlab]\n" + state, 1)
    path = directory / name
    path.write_text(body)
    return path


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Daemon:
    """A ``twistd -n netlab`` subprocess (stdout and stderr merged)."""

    def __init__(
        self,
        testcase: Any,
        config: Path | None,
        *,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        # wrapper: a command that execs twistd, e.g. systemd-socket-activate.
        arguments = [*wrapper, *TWISTD, "--nodaemon", "--pidfile="]
        arguments += ["netlab", *extra_args]
        if config is not None:
            arguments += ["--config", str(config)]
        self.output: list[str] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self.process = subprocess.Popen(
            arguments,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd or temporary_directory(testcase)),
            env={**os.environ, **(env or {})},
        )
        self._buffer = b""
        testcase.addCleanup(self.kill)

    def _read(self, timeout: float) -> bool:
        """Read what is available within ``timeout``; False at end of output."""
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return True
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            return False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            match = LISTENING.search(line)
            if match:
                self.addresses[match.group(1)] = split_host_port(match.group(2))
        return True

    def wait_for(self, pattern: str, timeout: float = 15.0, count: int = 1) -> str:
        """Wait until ``count`` lines matching ``pattern`` are logged; return
        the last of them."""
        regex = re.compile(pattern)
        seen = 0
        found = 0
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output[seen:]:
                if regex.search(line):
                    found += 1
                    if found == count:
                        return line
            seen = len(self.output)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s; output:\n"
                    + "\n".join(self.output)
                )
            if not self._read(min(remaining, 0.5)):
                raise AssertionError(
                    f"daemon exited ({self.process.wait()}) before {pattern!r}; "
                    "output:\n" + "\n".join(self.output)
                )

    def wait_listening(self, services: int, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until ``services`` services have logged their address and the
        daemon has said it is ready (its reactor runs: signals are handled)."""
        deadline = time.monotonic() + timeout
        while len(self.addresses) < services:
            self.wait_for(LISTENING.pattern, max(0.1, deadline - time.monotonic()))
            # wait_for returns on any listening line, including old ones.
            if len(self.addresses) < services:
                self._read(0.2)
            if time.monotonic() > deadline:
                raise AssertionError("services did not all listen:\n" + self.log)
        self.wait_for(r"netlab ready", max(0.1, deadline - time.monotonic()))
        return self.addresses

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Signal the daemon, collect the rest of its output, return its status."""
        self.process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.2):
            pass
        try:
            return self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon did not stop within {timeout}s:\n" + self.log
            ) from None

    def finish(self, timeout: float = 15.0) -> int:
        """Wait for the daemon to exit by itself; return its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.2):
            pass
        return self.process.wait(max(0.1, deadline - time.monotonic()))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    @property
    def log(self) -> str:
        return "\n".join(self.output)


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(
    name: str, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/NAME --quick`` (a smoke run, never a timing test)."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--quick"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_netlab(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run the ``netlab`` client (as ``python -m netlab``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "netlab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
        **kw,
    )
