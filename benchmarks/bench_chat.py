"""Chat fan-out: netlab's chat service beside an IRC server (ngircd), same run.

One sender says MESSAGES messages to a room of 20 (then 100) receiving
members; a bounded load process holds the receivers (UDP sockets for netlab,
TCP connections for IRC), counts what arrives and measures each message's
latency from the timestamp the sender put in it (both processes read the same
monotonic clock).  Printed per server and room size: delivered messages a
second (deliveries to receivers / time from first send to last arrival),
loss, and p50/p99 latency; medians of the repeats, and netlab's ratio to IRC.

The netlab sender uses the chat protocol as ``netlab chat`` does: a window of
unacknowledged messages, retransmitted until acknowledged.  The IRC sender is
an operator with flood protection off (``MaxPenaltyTime = 0``, mode ``+F``).

    python benchmarks/bench_chat.py            # 10,000 messages, rooms 20 and 100
    python benchmarks/bench_chat.py --quick    # small, seconds; IRC if installed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import refservers

#: Where a message's number and send time are found, per protocol.
NETLAB_MESSAGE = re.compile(rb'"text":"m(\d+) ([0-9.]+)"')
IRC_MESSAGE = re.compile(rb"PRIVMSG #bench :m(\d+) ([0-9.]+)")

#: Receivers stop once nothing has arrived for this long after the first message.
IDLE = 2.0
#: Every run is bounded in time as well as in messages.
RUN_DEADLINE = 120.0
BUFFER = 8 * 1024 * 1024


def big_buffers(sock: socket.socket) -> None:
    """Large socket buffers, so bursts are not lost in the kernel (root may force)."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
            return


# --------------------------------------------------------------------------
# netlab chat protocol (just enough of it, with plain sockets)
# --------------------------------------------------------------------------


def chat_join(sock: socket.socket, server: tuple[str, int], nick: str) -> str:
    """Join the lobby (cookie round trip); return the session token."""
    request: dict[str, Any] = {"type": "join", "nick": nick, "id": 1, "pad": "x" * 150}
    sock.settimeout(5)
    for _ in range(10):
        sock.sendto(json.dumps(request).encode(), server)
        with contextlib.suppress(TimeoutError):
            for line in sock.recv(65536).split(b"\n"):
                if not line:
                    continue
                message = json.loads(line)
                if message["type"] == "cookie":
                    request["cookie"] = message["cookie"]
                    sock.sendto(json.dumps(request).encode(), server)
                elif message["type"] == "welcome":
                    sock.setblocking(False)
                    return str(message["token"])
                elif message["type"] == "error":
                    raise SystemExit(f"join refused: {message['message']}")
            while True:
                for line in sock.recv(65536).split(b"\n"):
                    if line and json.loads(line)["type"] == "welcome":
                        sock.setblocking(False)
                        return str(json.loads(line)["token"])
    raise SystemExit("the chat server did not welcome us")


def irc_connect(port: int, nick: str, oper: bool = False) -> socket.socket:
    """A registered IRC client in #bench."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    big_buffers(sock)
    sock.sendall(f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode())
    buffer = b""
    while b" 376 " not in buffer and b" 422 " not in buffer:  # end of MOTD
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit(f"ngircd closed the connection of {nick}")
        buffer += chunk
    if oper:
        name, password = refservers.IRC_OPERATOR
        sock.sendall(f"OPER {name} {password}\r\nMODE {nick} +F\r\n".encode())
    sock.sendall(b"JOIN #bench\r\n")
    while b" 366 " not in buffer:  # end of NAMES: joined
        buffer += sock.recv(65536)
    return sock


# --------------------------------------------------------------------------
# The load process: many receivers
# --------------------------------------------------------------------------


def receive(kind: str, port: int, members: int, messages: int) -> None:
    """Run the receivers (in a subprocess); print one JSON line of results."""
    sockets: list[socket.socket] = []
    for index in range(members):
        if kind == "netlab":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            big_buffers(sock)
            chat_join(sock, ("127.0.0.1", port), f"r{index}")
        else:
            sock = irc_connect(port, f"r{index}")
            sock.setblocking(False)
        sockets.append(sock)
    pattern = NETLAB_MESSAGE if kind == "netlab" else IRC_MESSAGE
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(sockets):
        selector.register(sock, selectors.EVENT_READ, index)
    seen = [bytearray(messages) for _ in sockets]
    tails = [b""] * len(sockets)
    delivered = duplicates = 0
    latencies: list[float] = []
    first = last = 0.0
    deadline = time.monotonic() + RUN_DEADLINE
    expected = members * messages
    while delivered < expected and time.monotonic() < deadline:
        events = selector.select(IDLE if first else 30.0)
        if not events:
            break
        now = time.perf_counter()
        for key, _ in events:
            index = key.data
            sock = sockets[index]
            while True:
                try:
                    data = sock.recv(262144)
                except BlockingIOError:
                    break
                if kind == "irc":
                    # A TCP read may end mid-line: keep the tail for the next one.
                    data = tails[index] + data
                    cut = data.rfind(b"\n") + 1
                    data, tails[index] = data[:cut], data[cut:]
                for match in pattern.finditer(data):
                    number = int(match.group(1))
                    if number >= messages:
                        continue
                    if seen[index][number]:
                        duplicates += 1
                        continue
                    seen[index][number] = 1
                    delivered += 1
                    latencies.append(now - float(match.group(2)))
        first = first or now
        last = now
    sample = random.Random(0).sample(latencies, min(len(latencies), 50000))
    print(
        json.dumps(
            {
                "delivered": delivered,
                "duplicates": duplicates,
                "first": first,
                "last": last,
                "latencies": sample,
            }
        ),
        flush=True,
    )


@contextlib.contextmanager
def receivers(
    kind: str, port: int, members: int, messages: int
) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--receive",
            kind,
            str(port),
            str(members),
            str(messages),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise SystemExit(f"{kind} receivers failed to start")
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(RUN_DEADLINE)
        if process.poll() is None:
            process.kill()
            process.wait()


def results(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    output = process.stdout.read()
    process.wait(RUN_DEADLINE)
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# Senders
# --------------------------------------------------------------------------


def send_netlab(port: int, messages: int, window: int = 256) -> float:
    """Say ``messages`` messages with a window of unacknowledged ones; return start."""
    server = ("127.0.0.1", port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    big_buffers(sock)
    token = chat_join(sock, server, "sender")
    ack = re.compile(rb'"type":"ok","re":(\d+)')
    unacked: dict[int, tuple[bytes, float]] = {}
    sent = 0
    start = time.perf_counter()
    deadline = time.monotonic() + RUN_DEADLINE
    while (sent < messages or unacked) and time.monotonic() < deadline:
        while sent < messages and len(unacked) < window:
            message_id = 1000 + sent
            text = f"m{sent} {time.perf_counter():.6f}"
            payload = json.dumps(
                {"type": "say", "token": token, "id": message_id, "text": text},
                separators=(",", ":"),
            ).encode()
            sock.sendto(payload, server)
            unacked[message_id] = (payload, time.monotonic())
            sent += 1
        got = False
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            got = True
            for match in ack.finditer(data):
                unacked.pop(int(match.group(1)), None)
        if not got:
            time.sleep(0.0005)
            now = time.monotonic()
            for message_id, (payload, when) in list(unacked.items()):
                if now - when > 0.5:
                    sock.sendto(payload, server)
                    unacked[message_id] = (payload, now)
    sock.close()
    return start


def send_irc(port: int, messages: int) -> float:
    """Send ``messages`` PRIVMSGs as an operator with flood protection off."""
    sock = irc_connect(port, "sender", oper=True)
    sock.setblocking(True)
    start = time.perf_counter()
    batch = 64
    for first in range(0, messages, batch):
        lines = b"".join(
            f"PRIVMSG #bench :m{n} {time.perf_counter():.6f}\r\n".encode()
            for n in range(first, min(messages, first + batch))
        )
        sock.sendall(lines)
    # Stay connected (ngircd drops what a vanished client sent) until the
    # receivers are done; the caller closes us.
    sending_sockets.append(sock)
    return start


sending_sockets: list[socket.socket] = []


# --------------------------------------------------------------------------
# The netlab daemon
# --------------------------------------------------------------------------


@contextlib.contextmanager
def netlab_daemon(members: int) -> Iterator[int]:
    port = refservers.free_port(socket.SOCK_DGRAM)
    with tempfile.TemporaryDirectory(prefix="netlab-bench-chat-") as directory:
        config = Path(directory) / "netlab.toml"
        config.write_text(
            f"""[netlab]
state_directory = "{directory}/state"
log_level = "warn"
[file]
enabled = false
[time]
enabled = false
[chat]
endpoint = "udp:{port}:interface=127.0.0.1"
max_members = {members + 10}
member_timeout = "1h"
message_rate = 1000000.0
message_burst = 1000000.0
source_rate = 1000000.0
source_burst = 1000000.0
"""
        )
        argv = refservers.twistd_netlab(config)
        with refservers.running("netlab", argv, port, Path(directory), tcp=False):
            wait_for_chat(port)
            yield port


def wait_for_chat(port: int, timeout: float = 20.0) -> None:
    """Wait until the chat service answers a text datagram."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while time.monotonic() < deadline:
            probe.sendto(b"is the chat service up yet?", ("127.0.0.1", port))
            with contextlib.suppress(OSError):
                probe.recv(2048)
                return
    raise SystemExit(f"the netlab chat service did not start on port {port}")


# --------------------------------------------------------------------------
# Runs and the table
# --------------------------------------------------------------------------


def run_once(kind: str, members: int, messages: int, window: int) -> dict[str, float]:
    context = netlab_daemon(members) if kind == "netlab" else irc_server()
    with context as port, receivers(kind, port, members, messages) as process:
        start = (
            send_netlab(port, messages, window)
            if kind == "netlab"
            else send_irc(port, messages)
        )
        outcome = results(process)
    for sock in sending_sockets:
        sock.close()
    sending_sockets.clear()
    expected = members * messages
    elapsed = max(outcome["last"] - start, 1e-9)
    latencies = sorted(outcome["latencies"]) or [float("nan")]
    return {
        "rate": outcome["delivered"] / elapsed,
        "loss": 1 - outcome["delivered"] / expected,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


@contextlib.contextmanager
def irc_server() -> Iterator[int]:
    with refservers.ngircd() as server:
        yield server.port


def median_run(
    kind: str, members: int, messages: int, repeat: int, window: int
) -> dict[str, float]:
    runs = [run_once(kind, members, messages, window) for _ in range(repeat)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--rooms", default=None, help="room sizes, e.g. 20,100")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument(
        "--window",
        type=int,
        default=256,
        help="netlab sender: messages in flight before an acknowledgement",
    )
    parser.add_argument("--receive", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        kind, port, members, messages = args.receive
        receive(kind, int(port), int(members), int(messages))
        return
    messages = args.messages or (300 if args.quick else 10_000)
    rooms = [
        int(n) for n in (args.rooms or ("5" if args.quick else "20,100")).split(",")
    ]
    repeat = args.repeat or (1 if args.quick else 3)
    print(f"chat fan-out: {messages} messages from one sender, median of {repeat}")
    header = (
        f"{'server':<8} {'members':>7} {'delivered/s':>12} {'loss':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for members in rooms:
        measured: dict[str, dict[str, float]] = {}
        for kind in ("netlab", "irc"):
            try:
                measured[kind] = median_run(
                    kind, members, messages, repeat, args.window
                )
            except refservers.Unavailable as reason:
                if not args.quick:
                    raise
                print(f"{'ngircd':<8} {members:>7} skipped: {reason}")
                continue
            row = measured[kind]
            name = "netlab" if kind == "netlab" else "ngircd"
            print(
                f"{name:<8} {members:>7} {row['rate']:>12,.0f} {row['loss']:>7.2%} "
                f"{row['p50']:>8.2f} {row['p99']:>8.2f}"
            )
        if "irc" in measured:
            ratio = measured["netlab"]["rate"] / measured["irc"]["rate"]
            print(f"{'':<8} {members:>7} netlab/ngircd delivered/s: {ratio:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
