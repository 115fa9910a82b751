"""File transfer throughput: netlab get/put beside raw copy, rsyncd, scp and sftp.

One run measures everything, so the ratios compare like with like:

* netlab get and put over plain TCP and over TLS, each one ``netlab`` command
  (process start, connect, authenticate, transfer, SHA-256 on both ends,
  fsync, rename), verified afterwards against the source's SHA-256;
* a raw socket copy of the same bytes with socat (``-b 262144``): the wire's
  limit here, with no hashing, no framing and no integrity check;
* an rsync daemon (``rsync --daemon``) get and put;
* scp get and put (default cipher) and sftp get and put with
  ``aes128-gcm@openssh.com``, against a local sshd with key auth.

Every server reads and writes in one tmpfs directory (/dev/shm when it
exists), so the table measures the transfer path, not this disk: a 1 GiB
fsync to the disk here alone takes about 2 s.  Each figure is the median of
``--repeat`` runs, in MB/s (10^6 bytes per second).  The daemon's peak RSS
(VmHWM) is reported per netlab daemon, and a last test runs 20 concurrent
50 MiB gets and 20 concurrent puts, each verified.

After the targets it prints the ceiling SHA-256 puts on ``put`` here: the
two hash passes a put needs in sequence (the client's before its first byte,
the server's before the rename), timed on this run's own file hashes, plus
the median time of a 1-byte put.

``--quick`` (for CI) uses 32 MiB, one repeat, 4 concurrent 4 MiB transfers,
and skips reference tools that are not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import refservers
from netlab.auth import add_user, encode_key, generate_key, write_private
from tests.tlssupport import CertificateAuthority

MiB = 1024 * 1024
NETLAB = [sys.executable, "-m", "netlab"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as stream:
        while block := stream.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def timed(argv: list[str], **kwargs: object) -> float:
    """Run ``argv`` to completion (bounded); return the wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        argv,
        capture_output=True,
        timeout=600,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv[:6]))} ... exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace')[-400:]}"
        )
    return elapsed


def children_cpu() -> float:
    """CPU seconds used by this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int | None) -> float:
    """CPU seconds of process ``pid`` and its waited-for children (0 if None)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class Row:
    """One line of the table: a tool, a direction, wall and CPU seconds per run."""

    def __init__(self, tool: str, operation: str, size: int) -> None:
        self.tool = tool
        self.operation = operation
        self.size = size
        self.seconds: list[float] = []
        self.cpu: list[float] = []

    @property
    def rate(self) -> float:
        return (
            self.size / statistics.median(self.seconds) / 1e6 if self.seconds else 0.0
        )


# --------------------------------------------------------------------------
# The netlab daemon
# --------------------------------------------------------------------------


class NetlabDaemon:
    """``twistd -n netlab`` with a throw-away users file, key and optional TLS."""

    def __init__(self, work: Path, root: Path, tls: bool) -> None:
        self.work = work
        self.tls = tls
        users = work / "users.toml"
        key = generate_key()
        if not users.exists():
            add_user(users, "bench", key, replace=False)
            write_private(work / "bench.key", encode_key(key) + "\n")
        tls_section = ""
        endpoint = "tcp:0:interface=127.0.0.1"
        if tls:
            authority = CertificateAuthority()
            certificate, private_key = authority.issue(work, ["127.0.0.1"])
            ca_file = authority.write_ca(work / "ca.pem")
            tls_section = (
                f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{private_key}"\n'
                f'ca_file = "{ca_file}"\n'
            )
            endpoint = "ssl:0:interface=127.0.0.1"
        self.config = work / ("tls.toml" if tls else "plain.toml")
        self.config.write_text(
            f'[netlab]\nstate_directory = "{work / "state"}"\nusers_file = "{users}"\n'
            f"{tls_section}"
            f'[file]\nendpoint = "{endpoint}"\nroot = "{root}"\n'
            'overwrite = "always"\nmin_free_space = 0\n'
            "max_connections_per_address = 50\n"
            '[client]\nuser = "bench"\n'
            f'key_file = "{work / "bench.key"}"\ntimeout = "60s"\n'
            "[time]\nenabled = false\n[chat]\nenabled = false\n"
            "[command]\nenabled = false\n"
        )
        self.process = subprocess.Popen(
            refservers.twistd_netlab(self.config),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=work,
        )
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode(errors="replace")
            if not line:
                break
            match = re.search(r"file service listening on \S+:(\d+)", line)
            if match:
                # Drain the log in the background so the daemon never blocks on it.
                subprocess.Popen(
                    ["cat"], stdin=self.process.stdout, stdout=subprocess.DEVNULL
                )
                return int(match.group(1))
        raise RuntimeError("the netlab daemon did not start")

    def client(self, *args: str) -> list[str]:
        return [
            *NETLAB,
            "--config",
            str(self.config),
            "--server",
            f"127.0.0.1:{self.port}",
            *args,
        ]

    @property
    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        refservers.stop_process(self.process)


@contextlib.contextmanager
def netlab_daemon(work: Path, root: Path, tls: bool) -> Iterator[NetlabDaemon]:
    daemon = NetlabDaemon(work, root, tls)
    try:
        yield daemon
    finally:
        daemon.stop()


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, size: int, repeat: int, quick: bool, area: Path) -> None:
        self.size = size
        self.repeat = repeat
        self.quick = quick
        self.area = area
        self.served = area / "served"
        self.served.mkdir()
        self.served.chmod(0o777)
        self.local = area / "local"
        self.local.mkdir()
        self.local.chmod(0o777)
        self.source = self.served / "source.bin"
        self.upload = self.local / "upload.bin"
        write_random(self.source, size)
        shutil.copyfile(self.source, self.upload)
        for path in (self.source, self.upload):
            path.chmod(0o644)
        #: Seconds each SHA-256 of a whole file took here (source, copies).
        self.hash_seconds: list[float] = []
        #: Median seconds of a 1-byte netlab put over TCP, once measured.
        self.put_fixed_seconds: float | None = None
        self.digest = self.hash(self.source)
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def hash(self, path: Path) -> str:
        """SHA-256 of ``path``, timed (the fastest tells what hashing costs here)."""
        started = time.perf_counter()
        digest = sha256_of(path)
        self.hash_seconds.append(time.perf_counter() - started)
        return digest

    def verify(self, path: Path) -> None:
        if self.hash(path) != self.digest:
            raise RuntimeError(f"{path} does not match the source")

    def measure(
        self,
        tool: str,
        operation: str,
        run: Callable[[Path], float],
        server_pid: int | None = None,
    ) -> Row:
        """Time ``run(target)`` ``repeat`` times and verify the copy after each.

        CPU seconds are the client's (and, for the raw copy, both socats, all
        children of this process) plus the server's and its children's.
        """
        row = Row(tool, operation, self.size)
        for _ in range(self.repeat):
            target = (self.local if operation == "get" else self.served) / "copy.bin"
            target.unlink(missing_ok=True)
            cpu = children_cpu() + process_cpu(server_pid)
            row.seconds.append(run(target))
            row.cpu.append(children_cpu() + process_cpu(server_pid) - cpu)
            self.verify(target)
            target.unlink(missing_ok=True)
        self.rows.append(row)
        print(
            f"  {tool:<28} {operation:<4} {row.rate:8.0f} MB/s "
            f"{statistics.median(row.cpu):6.2f} CPU s",
            file=sys.stderr,
        )
        return row

    def skip(self, tool: str, reason: str) -> None:
        self.notes.append(f"{tool}: skipped ({reason})")
        print(f"  {tool}: skipped ({reason})", file=sys.stderr)

    # -- the tools ------------------------------------------------------------

    def raw_copy(self) -> None:
        try:
            refservers.require("socat")
        except refservers.Unavailable as error:
            self.skip("raw copy (socat)", str(error))
            return

        def run(target: Path) -> float:
            port = refservers.free_port()
            receiver = subprocess.Popen(
                [
                    "socat",
                    "-u",
                    "-b",
                    "262144",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                    f"CREATE:{target}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_listening(port)
                started = time.perf_counter()
                timed(
                    [
                        "socat",
                        "-u",
                        "-b",
                        "262144",
                        f"FILE:{self.source}",
                        f"TCP:127.0.0.1:{port}",
                    ]
                )
                receiver.wait(60)
                return time.perf_counter() - started
            finally:
                if receiver.poll() is None:
                    receiver.kill()
                    receiver.wait()

        self.measure("raw copy (socat -b256k)", "get", run)

    def netlab(self, tls: bool) -> float:
        label = "netlab TLS" if tls else "netlab TCP"
        work = Path(tempfile.mkdtemp(prefix="netlab-bench-file-", dir=self.area))
        with netlab_daemon(work, self.served, tls) as daemon:
            self.measure(
                label,
                "get",
                lambda target: timed(
                    daemon.client("get", "-q", "source.bin", str(target))
                ),
                daemon.process.pid,
            )
            self.measure(
                label,
                "put",
                lambda target: timed(
                    daemon.client("put", "-q", str(self.upload), target.name)
                ),
                daemon.process.pid,
            )
            peak = daemon.peak_rss_mib
            if not tls:
                self.put_fixed_seconds = self.tiny_puts(daemon)
        self.notes.append(f"{label} daemon peak RSS (VmHWM): {peak:.0f} MiB")
        return peak

    def tiny_puts(self, daemon: NetlabDaemon) -> float:
        """Median seconds of a 1-byte put: what any put costs besides its bytes."""
        tiny = self.local / "tiny.bin"
        tiny.write_bytes(b"x")
        seconds = []
        for index in range(max(self.repeat, 3)):
            seconds.append(
                timed(daemon.client("put", "-q", str(tiny), f"tiny-{index}.bin"))
            )
        return statistics.median(seconds)

    def rsyncd(self) -> None:
        try:
            with refservers.rsyncd(self.served, read_only=False) as server:
                url = f"rsync://127.0.0.1:{server.port}/data"
                self.measure(
                    "rsyncd",
                    "get",
                    lambda target: timed(["rsync", f"{url}/source.bin", str(target)]),
                    server.process.pid,
                )
                self.measure(
                    "rsyncd",
                    "put",
                    lambda target: timed(
                        ["rsync", str(self.upload), f"{url}/{target.name}"]
                    ),
                    server.process.pid,
                )
        except refservers.Unavailable as error:
            self.skip("rsyncd", str(error))

    def ssh(self) -> None:
        for ciphers, label in (
            (None, "scp"),
            ("aes128-gcm@openssh.com", "sftp aes128-gcm"),
        ):
            try:
                with refservers.sshd(ciphers) as server:
                    for operation, run in self.ssh_transfers(label, server).items():
                        self.measure(label, operation, run, server.server.process.pid)
            except refservers.Unavailable as error:
                self.skip(label, str(error))
                return

    def ssh_transfers(
        self, label: str, server: refservers.SSHServer
    ) -> dict[str, Callable[[Path], float]]:
        """How ``label`` (scp or sftp) gets and puts one file through ``server``."""
        if label == "scp":
            remote = f"{server.target}:"
            return {
                "get": lambda target: timed(
                    server.command("scp", f"{remote}{self.source}", str(target))
                ),
                "put": lambda target: timed(
                    server.command("scp", str(self.upload), f"{remote}{target}")
                ),
            }
        sftp = server.command("sftp", "-q", "-b", "-", server.target)
        return {
            "get": lambda target: timed(
                sftp, input=f"get {self.source} {target}\n".encode()
            ),
            "put": lambda target: timed(
                sftp, input=f"put {self.upload} {target}\n".encode()
            ),
        }

    def concurrent(self, count: int, size: int) -> str:
        """``count`` simultaneous gets, then puts, of ``size`` bytes; all verified."""
        work = Path(tempfile.mkdtemp(prefix="netlab-bench-many-", dir=self.area))
        files = self.served / "many"
        files.mkdir()
        sources = []
        for index in range(count):
            path = files / f"f{index}"
            write_random(path, size)
            sources.append(path)
        digests = [sha256_of(path) for path in sources]
        outputs = self.local / "many"
        outputs.mkdir()
        with netlab_daemon(work, self.served, tls=False) as daemon:
            started = time.perf_counter()
            gets = [
                subprocess.Popen(
                    daemon.client("get", "-q", f"many/f{i}", str(outputs / f"f{i}")),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for i in range(count)
            ]
            get_codes = [process.wait(600) for process in gets]
            get_seconds = time.perf_counter() - started
            started = time.perf_counter()
            puts = [
                subprocess.Popen(
                    daemon.client("put", "-q", str(outputs / f"f{i}"), f"many/u{i}"),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for i in range(count)
            ]
            put_codes = [process.wait(600) for process in puts]
            put_seconds = time.perf_counter() - started
            peak = daemon.peak_rss_mib
        verified = (
            sum(
                code == 0
                and sha256_of(outputs / f"f{i}") == digests[i]
                and sha256_of(files / f"u{i}") == digests[i]
                for i, code in enumerate(get_codes)
            )
            if all(code == 0 for code in put_codes)
            else 0
        )
        total = count * size / 1e6
        return (
            f"{count} concurrent {size // MiB} MiB transfers: "
            f"gets {total / get_seconds:.0f} MB/s aggregate, "
            f"puts {total / put_seconds:.0f} MB/s aggregate, "
            f"{verified}/{count} verified both ways, daemon peak RSS {peak:.0f} MiB"
        )


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until a socket listens on ``port`` (without connecting to it)."""
    wanted = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if (fields[1] + " ").endswith(wanted) and fields[3] == "0A":
                return
        time.sleep(0.01)
    raise RuntimeError(f"nothing listened on port {port}")


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as stream:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 4 * MiB))
            stream.write(block)
            remaining -= len(block)


def table(bench: Bench) -> str:
    raw = next((row.rate for row in bench.rows if row.tool.startswith("raw")), 0.0)
    lines = [
        f"file transfer over loopback: {bench.size // MiB} MiB of random bytes, "
        f"median of {bench.repeat} run(s); MB/s = 10^6 bytes/s; CPU s = client + "
        "server CPU seconds (user + system) per transfer",
        "",
        "| tool                        | op  |   MB/s | vs raw copy | CPU s | runs (s)",
        "|-----------------------------|-----|--------|-------------|-------|---------",
    ]
    for row in bench.rows:
        ratio = f"{row.rate / raw:.2f}" if raw else "-"
        runs = " ".join(f"{s:.2f}" for s in row.seconds)
        lines.append(
            f"| {row.tool:<27} | {row.operation:<3} | {row.rate:6.0f} "
            f"| {ratio:>11} | {statistics.median(row.cpu):5.2f} | {runs}"
        )
    return "\n".join(lines)


def targets(bench: Bench) -> list[str]:
    rate = {(row.tool, row.operation): row.rate for row in bench.rows}
    checks = []

    def compare(
        name: str, mine: tuple[str, str], theirs: tuple[str, str], factor: float
    ) -> None:
        if mine in rate and theirs in rate:
            ratio = rate[mine] / rate[theirs]
            verdict = "met" if ratio >= factor else "NOT met"
            checks.append(f"{name}: {ratio:.2f}x (target {factor:g}x) {verdict}")

    compare(
        "netlab TCP get vs rsyncd get", ("netlab TCP", "get"), ("rsyncd", "get"), 1.0
    )
    compare("netlab TCP put vs scp put", ("netlab TCP", "put"), ("scp", "put"), 2.0)
    if ("scp", "put") in rate and bench.put_fixed_seconds is not None:
        # A put hashes the file on the client before its first byte and on
        # the server as it arrives: two SHA-256 passes that cannot overlap.
        # Its fixed cost (start-up, connection, fsync, rename) overlaps the
        # client's hash only in part, so the ceiling lies between these two.
        hashing = 2 * min(bench.hash_seconds)
        best = bench.size / hashing / 1e6
        likely = bench.size / (hashing + bench.put_fixed_seconds) / 1e6
        scp = rate["scp", "put"]
        checks.append(
            f"verified put ceiling here: two SHA-256 passes in sequence "
            f"({hashing:.2f} s at this run's fastest file hash) and a 1-byte "
            f"put's {bench.put_fixed_seconds:.2f} s allow {likely:.0f}-{best:.0f} "
            f"MB/s, {likely / scp:.2f}-{best / scp:.2f}x scp put, "
            "with every other cost at zero"
        )
    compare(
        "netlab TLS get vs sftp aes128-gcm get",
        ("netlab TLS", "get"),
        ("sftp aes128-gcm", "get"),
        1.0,
    )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--size", type=int, help="MiB to transfer (default 1024)")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3)")
    parser.add_argument(
        "--only",
        choices=("raw", "netlab", "rsyncd", "ssh", "concurrent"),
        action="append",
        help="measure only these (repeatable; default: everything)",
    )
    args = parser.parse_args()
    size = (args.size or (32 if args.quick else 1024)) * MiB
    repeat = args.repeat or (1 if args.quick else 3)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    area = Path(tempfile.mkdtemp(prefix="netlab-bench-file-", dir=base))
    area.chmod(0o755)
    try:
        bench = Bench(size, repeat, args.quick, area)
        wanted = set(args.only or ("raw", "netlab", "rsyncd", "ssh", "concurrent"))
        if "raw" in wanted:
            bench.raw_copy()
        if "netlab" in wanted:
            bench.netlab(tls=False)
            bench.netlab(tls=True)
        if "rsyncd" in wanted:
            bench.rsyncd()
        if "ssh" in wanted:
            bench.ssh()
        if "concurrent" in wanted:
            count, each = (4, 4 * MiB) if args.quick else (20, 50 * MiB)
            bench.notes.append(bench.concurrent(count, each))
    finally:
        shutil.rmtree(area, ignore_errors=True)
    print(table(bench))
    print()
    for line in [*bench.notes, *targets(bench)]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
