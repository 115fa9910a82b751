"""Benchmark netlab's life under systemd beside chronyd, measured in the same run.

What an operator waits for, in milliseconds (medians of several runs):

- **cold start to first answer**: from starting the process to the first
  SNTP reply on its UDP port, netlab's time service (``twistd -n netlab``)
  beside chronyd (``chronyd -x -d``), both polled every few milliseconds;
- **start to READY=1**: from starting ``twistd -n netlab`` (file and time
  services) to the readiness notification on ``$NOTIFY_SOCKET`` (no
  reference: chronyd has no sd_notify, Debian runs it Type=forking);
- **socket-activated first answer**: ``systemd-socket-activate`` holds the
  time service's UDP socket and nothing runs; one SNTP request is sent and
  the reply timed, start-up included (no datagram is lost: it waits in the
  socket).  chronyd cannot be socket-activated: beside it stands its cold
  start, what a client of a not-yet-running chronyd waits at best;
- **warm round trip** of one SNTP request, netlab beside chronyd;
- **reload**: from SIGHUP to READY=1 (no reference: chronyd has no
  configuration reload).

The start-up runs are interleaved (one of each in turn) so that a busy
moment on the shared machine falls on netlab and chronyd alike.

``--quick`` makes two runs of each and skips what is not installed; it is
what tests/test_bench_systemd.py runs.  Everything binds 127.0.0.1 only, and
every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import refservers

SNTP_REQUEST = b"\x23" + bytes(47)  # version 4, mode 3 (client)
#: No measurement waits longer than this for anything.
TIMEOUT = 20.0
POLL = 0.002


def first_answer(port: int, started: float) -> float:
    """Seconds from ``started`` until 127.0.0.1:port first answers SNTP.

    The server may not be bound yet: requests go out every few milliseconds
    until one is answered (bounded by :data:`TIMEOUT`).
    """
    deadline = started + TIMEOUT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(POLL)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                probe.sendto(SNTP_REQUEST, ("127.0.0.1", port))
                if len(probe.recv(1024)) >= 48:
                    return time.monotonic() - started
    raise refservers.Unavailable(f"no SNTP answer on port {port} in {TIMEOUT}s")


def round_trip(port: int) -> float:
    """One SNTP round trip to an answering server, in seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(TIMEOUT)
        started = time.monotonic()
        probe.sendto(SNTP_REQUEST, ("127.0.0.1", port))
        probe.recv(1024)
        return time.monotonic() - started


def netlab_config(directory: Path, time_endpoint: str, *, file: bool = False) -> Path:
    """A configuration running the time service (and the file service)."""
    path = directory / "netlab.toml"
    path.write_text(
        f'[netlab]\nstate_directory = "{directory / "state"}"\n'
        f"[file]\nenabled = {'true' if file else 'false'}\n"
        'endpoint = "tcp:0:interface=127.0.0.1"\n'
        # Per-source rate limiting off, as it is in chronyd's configuration.
        f'[time]\nendpoint = "{time_endpoint}"\nrate = 0\n'
        "[chat]\nenabled = false\n"
    )
    return path


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An abstract datagram socket standing in for systemd's notify socket."""
    name = f"netlab-bench-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(b"\0" + name.encode())
        listener.settimeout(TIMEOUT)
        yield listener, "@" + name


def wait_notification(listener: socket.socket, field: str) -> None:
    """Read notifications until one carries ``field`` (bounded in count and time)."""
    for _ in range(16):
        if f"{field}=".encode() in listener.recv(4096):
            return
    raise refservers.Unavailable(f"the daemon never sent {field}=")


# --------------------------------------------------------------------------
# Measurements: each returns one sample, in seconds.
# --------------------------------------------------------------------------


def netlab_cold_start() -> float:
    port = refservers.free_port(socket.SOCK_DGRAM)
    with refservers.scratch("netlab") as directory:
        config = netlab_config(directory, f"udp:{port}:interface=127.0.0.1")
        started = time.monotonic()
        with refservers.running(
            "netlab", refservers.twistd_netlab(config), port, directory, tcp=False
        ):
            return first_answer(port, started)


def chronyd_cold_start() -> float:
    refservers.require("chronyd")
    port = refservers.free_port(socket.SOCK_DGRAM)
    with refservers.scratch("chronyd") as directory:
        argv = refservers.chronyd_command(directory, port)
        started = time.monotonic()
        with refservers.running("chronyd", argv, port, directory, tcp=False):
            return first_answer(port, started)


def netlab_ready() -> float:
    with refservers.scratch("netlab") as directory, notify_socket() as (listener, name):
        config = netlab_config(directory, "udp:0:interface=127.0.0.1", file=True)
        started = time.monotonic()
        with daemon(refservers.twistd_netlab(config), directory, name):
            wait_notification(listener, "READY")
            return time.monotonic() - started


def netlab_activated_first_answer() -> float:
    refservers.require("systemd-socket-activate")
    port = refservers.free_port(socket.SOCK_DGRAM)
    with refservers.scratch("netlab") as directory:
        config = netlab_config(directory, "systemd:name=netlab-time")
        argv = [
            "systemd-socket-activate",
            "--datagram",
            f"--listen=127.0.0.1:{port}",
            "--fdname=netlab-time",
            *refservers.twistd_netlab(config),
        ]
        with refservers.running("activated netlab", argv, port, directory, tcp=False):
            wait_listening(directory / "activated netlab.log", port)
            return round_trip(port)


def wait_listening(log: Path, port: int) -> None:
    """Wait until systemd-socket-activate has bound its socket (it says so)."""
    deadline = time.monotonic() + TIMEOUT
    expected = f"Listening on 127.0.0.1:{port}"
    while expected not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise refservers.Unavailable("systemd-socket-activate did not listen")
        time.sleep(POLL)


def netlab_reloads(runs: int) -> list[float]:
    samples = []
    with refservers.scratch("netlab") as directory, notify_socket() as (listener, name):
        config = netlab_config(directory, "udp:0:interface=127.0.0.1", file=True)
        with daemon(refservers.twistd_netlab(config), directory, name) as process:
            wait_notification(listener, "READY")
            for _ in range(runs):
                started = time.monotonic()
                process.send_signal(signal.SIGHUP)
                wait_notification(listener, "RELOADING")
                wait_notification(listener, "READY")
                samples.append(time.monotonic() - started)
    return samples


def warm_round_trips(port: int, runs: int) -> list[float]:
    return [round_trip(port) for _ in range(runs)]


def netlab_warm(runs: int) -> list[float]:
    port = refservers.free_port(socket.SOCK_DGRAM)
    with refservers.scratch("netlab") as directory:
        config = netlab_config(directory, f"udp:{port}:interface=127.0.0.1")
        with refservers.running(
            "netlab", refservers.twistd_netlab(config), port, directory, tcp=False
        ):
            first_answer(port, time.monotonic())
            return warm_round_trips(port, runs)


def chronyd_warm(runs: int) -> list[float]:
    with refservers.chronyd() as server:
        return warm_round_trips(server.port, runs)


@contextlib.contextmanager
def daemon(
    argv: list[str], directory: Path, notify: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with ``NOTIFY_SOCKET`` set; stop it by its PID afterwards."""
    with (directory / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": notify},
        )
        try:
            yield process
        finally:
            refservers.stop_process(process)


# --------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------


def interleaved_medians(
    measures: dict[str, Callable[[], float]], runs: int
) -> dict[str, float | None]:
    """The median of each measurement in milliseconds (None if unavailable).

    The runs are interleaved, one of each in turn, so that a busy moment on
    this shared machine falls on netlab and its reference alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in measures}
    unavailable: set[str] = set()
    for _ in range(runs):
        for name, measure in measures.items():
            if name in unavailable:
                continue
            try:
                samples[name].append(measure())
            except refservers.Unavailable as error:
                print(f"skipped {name}: {error}", file=sys.stderr)
                unavailable.add(name)
    return {
        name: None if name in unavailable else 1000 * statistics.median(values)
        for name, values in samples.items()
    }


def median_list_ms(measure: Callable[[int], list[float]], runs: int) -> float | None:
    try:
        return 1000 * statistics.median(measure(runs))
    except refservers.Unavailable as error:
        print(f"skipped: {error}", file=sys.stderr)
        return None


def cell(value: float | None) -> str:
    return f"{'n/a':>9}" if value is None else f"{value:9.3f}"


def ratio(netlab: float | None, reference: float | None) -> str:
    if netlab is None or reference is None or reference == 0:
        return "-"
    return f"{netlab / reference:.1f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="two runs each; skip what is missing"
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 9)
    round_trips = 5 if args.quick else 200

    starts = interleaved_medians(
        {
            "netlab cold": netlab_cold_start,
            "chronyd cold": chronyd_cold_start,
            "netlab ready": netlab_ready,
            "netlab activated": netlab_activated_first_answer,
        },
        runs,
    )
    netlab_warm_ms = median_list_ms(netlab_warm, round_trips)
    rows = [
        (
            "cold start -> first SNTP answer",
            starts["netlab cold"],
            "chronyd",
            starts["chronyd cold"],
        ),
        (
            "socket-activated first answer",
            starts["netlab activated"],
            "chronyd cold",
            starts["chronyd cold"],
        ),
        (
            "warm SNTP round trip",
            netlab_warm_ms,
            "chronyd warm",
            median_list_ms(chronyd_warm, round_trips),
        ),
        ("start -> READY=1 (file+time)", starts["netlab ready"], "(none)", None),
        (
            "SIGHUP -> READY=1 (reload)",
            median_list_ms(netlab_reloads, runs),
            "(none)",
            None,
        ),
    ]
    print(
        f"netlab under systemd, medians in ms ({runs} runs; {round_trips} round trips)"
    )
    print(f"{'measurement':34} {'netlab':>9}  {'reference':14} {'ref':>9}  ratio")
    for name, netlab, reference_name, reference in rows:
        print(
            f"{name:34} {cell(netlab)}  {reference_name:14} {cell(reference)}"
            f"  {ratio(netlab, reference)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
