"""Framing throughput: netlab's FrameReceiver beside Twisted's Int32StringReceiver.

Three tables, medians of several runs, all measured in the same run:

1. decode in memory: frames of 64 KiB - 1 MiB fed in 64 KiB reads (what TCP
   delivers) to Twisted's stock ``Int32StringReceiver`` and to netlab's
   ``FrameReceiver``;
2. encode in memory: data frames read from a file object with ``read`` plus
   concatenation, and with netlab's reused ``DataFrameBuffer``;
3. over loopback: a plain-socket sender streams 256 KiB frames to a receiver
   process: socat (reference, ``-b 262144`` to /dev/null), a raw unframed
   Twisted protocol (reference: the reactor's own ceiling), the stock
   receiver and netlab's.  Throughput is measured by the sender from connect
   to the receiver's close, so every receiver is timed the same way.

``--quick`` uses small sizes and skips socat when it is not installed.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from twisted.protocols.basic import Int32StringReceiver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.refservers import free_port
from netlab.framing import (
    DataFrameBuffer,
    FrameReceiver,
    encode_data_frame,
    encode_frame,
)

KiB = 1024
MiB = 1024 * KiB
READ_SIZE = 64 * KiB


class _Count:
    frames = 0

    def stringReceived(self, string: bytes) -> None:
        self.frames += 1


class StockReceiver(_Count, Int32StringReceiver):
    MAX_LENGTH = 16 * MiB


class NetlabReceiver(_Count, FrameReceiver):
    MAX_LENGTH = 16 * MiB


RECEIVERS: dict[str, type] = {
    "twisted Int32StringReceiver": StockReceiver,
    "netlab FrameReceiver": NetlabReceiver,
}


def median_rate(run: Callable[[], float], total: int, repeats: int) -> float:
    """Median GB/s over ``repeats`` runs of ``run`` (which returns seconds)."""
    return statistics.median(total / run() / 1e9 for _ in range(repeats))


def row(frame_size: int, theirs: float, ours: float) -> str:
    size = f"{frame_size // KiB} KiB"
    return f"| {size:>9} | {theirs:>8.2f} | {ours:>8.2f} | {ours / theirs:>5.1f}x |"


def decode_seconds(receiver_class: type, stream: bytes, frames: int) -> float:
    from twisted.internet.testing import StringTransport

    receiver = receiver_class()
    receiver.makeConnection(StringTransport())
    view = memoryview(stream)
    started = time.perf_counter()
    for offset in range(0, len(stream), READ_SIZE):
        receiver.dataReceived(bytes(view[offset : offset + READ_SIZE]))
    elapsed = time.perf_counter() - started
    assert receiver.frames == frames, (receiver.frames, frames)
    return elapsed


def decode_table(total: int, repeats: int) -> list[str]:
    rows = []
    for frame_size in (64 * KiB, 256 * KiB, 1 * MiB):
        frames = max(1, total // frame_size)
        stream = encode_frame(b"x" * frame_size) * frames
        rates = {
            name: median_rate(
                partial(decode_seconds, cls, stream, frames),
                len(stream),
                repeats,
            )
            for name, cls in RECEIVERS.items()
        }
        stock, ours = rates.values()
        rows.append(row(frame_size, stock, ours))
    return [
        f"decode in memory, {total // MiB} MiB in {READ_SIZE // KiB} KiB reads (GB/s)",
        "| frame     | twisted  | netlab   | ratio  |",
        "|-----------|----------|----------|--------|",
        *rows,
    ]


def encode_seconds(source: bytes, frame_size: int, reused: bool) -> float:
    stream = io.BytesIO(source)
    buffer = DataFrameBuffer(frame_size)
    started = time.perf_counter()
    if reused:
        while buffer.fill(stream.readinto)[1]:
            pass
    else:
        while chunk := stream.read(frame_size):
            encode_data_frame(chunk)
    return time.perf_counter() - started


def encode_table(total: int, repeats: int) -> list[str]:
    source = os.urandom(total)
    rows = []
    for frame_size in (256 * KiB, 1 * MiB):
        fresh = median_rate(
            partial(encode_seconds, source, frame_size, False), total, repeats
        )
        reused = median_rate(
            partial(encode_seconds, source, frame_size, True), total, repeats
        )
        rows.append(row(frame_size, fresh, reused))
    return [
        f"encode data frames from a file object, {total // MiB} MiB (GB/s)",
        "| frame     | read+cat | reused   | ratio  |",
        "|-----------|----------|----------|--------|",
        *rows,
    ]


# -- loopback -----------------------------------------------------------------

# The receiver answers the sender's half-close with what it counted (bytes
# for the raw protocol, frames otherwise), so every figure is checked.
SERVE_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from twisted.internet import reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer
from benchmarks.bench_framing import RECEIVERS

class Raw(Protocol):
    frames = 0
    def dataReceived(self, data):
        self.frames += len(data)

kind = sys.argv[1]
protocol = Raw if kind == "raw" else RECEIVERS[kind]

@implementer(IHalfCloseableProtocol)
class Reporting(protocol):
    def readConnectionLost(self):
        self.transport.write(b"%d" % self.frames)
        self.transport.loseConnection()
    def writeConnectionLost(self):
        pass
    def connectionLost(self, reason):
        reactor.stop()

factory = Factory.forProtocol(Reporting)
reactor.listenTCP(int(sys.argv[2]), factory, interface="127.0.0.1")
reactor.run()
"""


def connect_when_listening(port: int) -> socket.socket:
    """Connect once the receiver listens (it serves exactly one connection)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def send_frames(port: int, frame: bytes, count: int) -> tuple[float, bytes]:
    """Stream ``count`` frames; seconds until the receiver closes, and its report."""
    with connect_when_listening(port) as connection:
        started = time.perf_counter()
        for _ in range(count):
            connection.sendall(frame)
        connection.shutdown(socket.SHUT_WR)
        report = b""
        while chunk := connection.recv(65536):
            report += chunk
        return time.perf_counter() - started, report


def loopback_seconds(kind: str, frame: bytes, count: int) -> float:
    port = free_port()
    if kind == "socat":
        argv = [
            "socat",
            "-u",
            "-b",
            "262144",
            f"TCP-LISTEN:{port},bind=127.0.0.1",
            "OPEN:/dev/null",
        ]
    else:
        root = str(Path(__file__).resolve().parent.parent)
        argv = [sys.executable, "-c", SERVE_SCRIPT.format(root=root), kind, str(port)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        seconds, report = send_frames(port, frame, count)
    finally:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    expected = {"socat": b"", "raw": b"%d" % (len(frame) * count)}.get(
        kind, b"%d" % count
    )
    if report != expected:
        raise RuntimeError(f"{kind} received {report!r}, expected {expected!r}")
    return seconds


def loopback_table(total: int, repeats: int, quick: bool) -> list[str]:
    frame_size = 256 * KiB
    frame = encode_frame(b"x" * frame_size)
    count = max(1, total // frame_size)
    kinds = ["raw", *RECEIVERS]
    if shutil.which("socat"):
        kinds.insert(0, "socat")
    elif not quick:
        raise SystemExit(
            "socat is not installed (apt-get install socat), or use --quick"
        )
    names = {"socat": "socat -b256k (reference)", "raw": "twisted raw Protocol (ref.)"}
    rates = {
        kind: median_rate(
            partial(loopback_seconds, kind, frame, count),
            len(frame) * count,
            repeats,
        )
        for kind in kinds
    }
    ours = rates["netlab FrameReceiver"]
    rows = [
        f"| {names.get(kind, kind):<28} | {rate:>6.2f} | {ours / rate:>5.2f} |"
        for kind, rate in rates.items()
    ]
    if "socat" not in rates:
        rows.append("| socat                        | skipped (not installed)|")
    return [
        f"loopback, {count * frame_size // MiB} MiB in {frame_size // KiB} KiB "
        "frames (GB/s)",
        "| receiver                     | GB/s   | netlab/x |",
        "|------------------------------|--------|----------|",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a few seconds"
    )
    args = parser.parse_args()
    memory_total = 16 * MiB if args.quick else 256 * MiB
    loopback_total = 32 * MiB if args.quick else 1024 * MiB
    repeats = 1 if args.quick else 5
    for table in (
        decode_table(memory_total, repeats),
        encode_table(memory_total, repeats),
        loopback_table(loopback_total, repeats, args.quick),
    ):
        print("\n".join(table))
        print()


if __name__ == "__main__":
    main()
