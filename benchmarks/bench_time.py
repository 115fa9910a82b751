"""Benchmark the time service beside chronyd, measured in the same run.

Throughput: a UDP load generator runs in a separate process (several
sockets, each keeping a window of 48-byte SNTP requests outstanding, for a
bounded time) and reports sustained replies a second and the p50/p99 round
trip (each request carries its send time in its transmit timestamp, which
the server echoes as the originate timestamp).  It runs against netlab with
one process and with ``workers = 2``, against chronyd (rate limiting off in
both), against a minimal Twisted responder that only builds the reply (the
floor set by the reactor and Python on this machine), and against a socket
that never answers, which shows the generator's own ceiling (requests sent a
second).

Accuracy: ``ntplib`` queries each server in turn; the medians of the offset
and the round-trip delay are shown.

``--quick`` uses short runs and skips servers that are not installed; it is
what tests/test_bench_time.py runs.  Nothing here binds anything but
127.0.0.1, and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ntplib

sys.path.insert(0, str(Path(__file__).resolve().parent))

import refservers

ROOT = Path(__file__).resolve().parent.parent
MAX_SECONDS = 20.0
_STAMP = struct.Struct("!Q")


# --------------------------------------------------------------------------
# The load generator (runs in its own process: --generate).
# --------------------------------------------------------------------------


def generate(
    port: int, seconds: float, sockets: int, window: int, answer: bool
) -> dict[str, float]:
    """Keep ``window`` requests outstanding on each of ``sockets`` sockets.

    With ``answer`` false the target never answers: then requests are sent
    back to back and the result is the generator's own sending ceiling.
    """
    seconds = min(seconds, MAX_SECONDS)
    target = ("127.0.0.1", port)
    head = b"\x23" + bytes(39)  # version 4, mode 3; bytes 40-47: our send time
    socks = []
    for _ in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(target)
        socks.append(sock)
    poller = select.epoll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    clock = time.perf_counter_ns
    rtts: list[int] = []
    sent = received = 0
    start = clock()
    end = start + int(seconds * 1e9)
    if not answer:
        while clock() < end:
            for sock in socks:
                for _ in range(64):
                    with contextlib.suppress(BlockingIOError):
                        sock.send(head + _STAMP.pack(clock()))
                        sent += 1
        elapsed = (clock() - start) / 1e9
        return {"rate": sent / elapsed, "sent": sent, "elapsed": elapsed}
    outstanding = dict.fromkeys(by_fd, 0)
    last_reply = dict.fromkeys(by_fd, start)

    def top_up(fd: int, now: int) -> None:
        nonlocal sent
        sock = by_fd[fd]
        while outstanding[fd] < window:
            try:
                sock.send(head + _STAMP.pack(now))
            except BlockingIOError:
                return
            outstanding[fd] += 1
            sent += 1

    for fd in by_fd:
        top_up(fd, clock())
    while True:
        now = clock()
        if now >= end:
            break
        for fd, _ in poller.poll(0.05):
            sock = by_fd[fd]
            while True:
                try:
                    reply = sock.recv(512)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                arrived = clock()
                received += 1
                rtts.append(arrived - _STAMP.unpack_from(reply, 24)[0])
                outstanding[fd] = max(0, outstanding[fd] - 1)
                last_reply[fd] = arrived
            top_up(fd, clock())
        # Requests lost (dropped by a full buffer) would shrink the window for
        # good: after 200 ms without a reply, a socket starts a fresh window.
        now = clock()
        for fd in by_fd:
            if now - last_reply[fd] > 200_000_000:
                outstanding[fd] = 0
                last_reply[fd] = now
                top_up(fd, now)
    elapsed = (clock() - start) / 1e9
    rtts.sort()
    return {
        "rate": received / elapsed,
        "sent": sent,
        "received": received,
        "elapsed": elapsed,
        "p50_us": rtts[len(rtts) // 2] / 1000 if rtts else float("nan"),
        "p99_us": rtts[int(len(rtts) * 0.99)] / 1000 if rtts else float("nan"),
    }


def run_generator(port: int, seconds: float, answer: bool = True) -> dict[str, float]:
    """Run :func:`generate` in a separate process and return its figures."""
    argv = [sys.executable, __file__, "--generate", str(port), str(seconds)]
    if not answer:
        argv.append("--sink")
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=MAX_SECONDS + 30, check=True
    )
    figures: dict[str, float] = json.loads(result.stdout)
    return figures


# --------------------------------------------------------------------------
# The servers.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def netlab_time(workers: int) -> Iterator[refservers.RunningServer]:
    """``twistd -n netlab`` with only the time service, limits off."""
    port = refservers.free_port(socket.SOCK_DGRAM)
    with refservers.scratch("netlab-time") as directory:
        config = directory / "netlab.toml"
        config.write_text(
            f'[netlab]\nstate_directory = "{directory / "state"}"\n'
            "[file]\nenabled = false\n[chat]\nenabled = false\n"
            f'[time]\nendpoint = "udp:{port}:interface=127.0.0.1"\n'
            'leap = "none"\nrate = 0\nglobal_rate = 0\n'
            f"workers = {workers}\n"
        )
        argv = refservers.twistd_netlab(config)
        with refservers.running("netlab", argv, port, directory, tcp=False) as server:
            refservers.wait_for_ntp(port)
            if workers > 1:
                wait_for_line(
                    directory / "netlab.log", rf"time worker {workers - 1} answering"
                )
            yield server


def wait_for_line(path: Path, pattern: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(0.05)
    raise refservers.Unavailable(f"{path.name}: no line matching {pattern!r}")


def minimal_twisted(port: int) -> None:
    """A Twisted SNTP responder doing nothing but the reply (no checks, no limits).

    It shows what the reactor and a Python datagramReceived cost by
    themselves on this machine: the floor under netlab's figure.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    head = b"\x24\x0a\x00\xec" + bytes(20)  # v4 server, stratum 10

    class Minimal(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
            stamp = int((time.time() + 2_208_988_800) * 2**32)
            times = stamp.to_bytes(8, "big")
            self.transport.write(head + data[40:48] + times + times, addr)

    reactor.listenUDP(port, Minimal(), interface="127.0.0.1")
    reactor.run()


@contextlib.contextmanager
def minimal_twisted_server() -> Iterator[refservers.RunningServer]:
    port = refservers.free_port(socket.SOCK_DGRAM)
    with refservers.scratch("minimal-twisted") as directory:
        argv = [sys.executable, __file__, "--minimal-twisted", str(port)]
        with refservers.running("minimal", argv, port, directory, tcp=False) as server:
            refservers.wait_for_ntp(port)
            yield server


@contextlib.contextmanager
def silent_socket() -> Iterator[int]:
    """A bound UDP socket that never answers (the generator's ceiling)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        yield sink.getsockname()[1]


def accuracy(port: int, queries: int) -> tuple[float, float]:
    """Median offset and delay (microseconds) over ``queries`` ntplib queries."""
    client = ntplib.NTPClient()
    offsets, delays = [], []
    for _ in range(queries):
        response = client.request("127.0.0.1", version=4, port=port, timeout=2)
        offsets.append(response.offset * 1e6)
        delays.append(response.delay * 1e6)
        time.sleep(0.005)
    return statistics.median(offsets), statistics.median(delays)


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


Server = Callable[[], contextlib.AbstractContextManager[refservers.RunningServer]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short runs, skip missing servers"
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="load per server (max 20)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per server (median)"
    )
    parser.add_argument(
        "--queries", type=int, default=200, help="ntplib queries per server"
    )
    parser.add_argument(
        "--generate", nargs=2, metavar=("PORT", "SECONDS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--minimal-twisted", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minimal_twisted:
        minimal_twisted(args.minimal_twisted)
        return 0
    if args.generate:
        port, seconds = int(args.generate[0]), float(args.generate[1])
        print(
            json.dumps(
                generate(port, seconds, sockets=8, window=16, answer=not args.sink)
            )
        )
        return 0
    if args.quick:
        args.seconds, args.rounds, args.queries = 0.5, 1, 10
    seconds = min(args.seconds, MAX_SECONDS)

    servers: list[tuple[str, Server]] = [
        ("chronyd", refservers.chronyd),
        ("netlab (1 process)", lambda: netlab_time(1)),
        ("netlab (workers = 2)", lambda: netlab_time(2)),
        ("minimal Twisted SNTP", minimal_twisted_server),
    ]
    load_rows: list[tuple[str, dict[str, float] | str]] = []
    accuracy_rows: list[tuple[str, tuple[float, float] | str]] = []
    for name, server in servers:
        try:
            with server() as running:
                runs = [
                    run_generator(running.port, seconds) for _ in range(args.rounds)
                ]
                figures = {
                    key: statistics.median(run[key] for run in runs)
                    for key in ("rate", "p50_us", "p99_us")
                }
                load_rows.append((name, figures))
                if name.startswith(("chronyd", "netlab (1")):
                    accuracy_rows.append((name, accuracy(running.port, args.queries)))
        except refservers.Unavailable as reason:
            if not args.quick:
                raise
            load_rows.append((name, f"skipped: {reason}"))
    with silent_socket() as sink:
        ceiling = statistics.median(
            run_generator(sink, seconds, answer=False)["rate"]
            for _ in range(args.rounds)
        )

    chrony = next(
        (row for name, row in load_rows if name == "chronyd" and isinstance(row, dict)),
        None,
    )
    print(
        f"SNTP load: {seconds:g} s x {args.rounds} runs per server, "
        "8 sockets x 16 outstanding, medians"
    )
    header = ("replies/s", "p50 rtt us", "p99 rtt us", "vs chronyd")
    print(f"{'server':<24}" + "".join(f"{title:>12}" for title in header))
    for name, row in load_rows:
        if isinstance(row, str):
            print(f"{name:<24}{row}")
            continue
        ratio = f"{row['rate'] / chrony['rate']:.2f}" if chrony else "-"
        print(
            f"{name:<24}{row['rate']:>12,.0f}{row['p50_us']:>12.0f}{row['p99_us']:>12.0f}{ratio:>12}"
        )
    note = "(requests sent/s, nothing answers)"
    print(f"{'generator ceiling':<24}{ceiling:>12,.0f}  {note}")
    print()
    print(f"ntplib accuracy: {args.queries} queries per server, medians")
    print(f"{'server':<24}{'offset us':>12}{'delay us':>12}")
    for name, result in accuracy_rows:
        if isinstance(result, str):
            print(f"{name:<24}{result}")
        else:
            print(f"{name:<24}{result[0]:>+12.1f}{result[1]:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
