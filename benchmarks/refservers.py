"""Start and stop the reference servers the benchmarks compare netlab with.

Every server runs from Debian's package, unprivileged where it can, bound to
127.0.0.1 on a free high port, with its configuration in a temporary
directory; it is stopped by the PID this module started.  A server whose
program is missing is reported as unavailable (``--quick`` runs skip it).

See ../shared/REFERENCE-SERVERS.md for how each one behaved on this machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

#: ``twistd`` for this interpreter (``python -m twisted`` is the newer ``twist``).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd_netlab(config: Path) -> list[str]:
    """The command line of a foreground ``twistd netlab`` with ``config``."""
    return [*TWISTD, "--nodaemon", "--pidfile=", "netlab", "--config", str(config)]


class Unavailable(Exception):
    """The reference server cannot run here (its message says why)."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that is free right now (for servers that need one named)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require(*programs: str) -> None:
    """Raise :class:`Unavailable` unless every program is installed."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise Unavailable("not installed: " + ", ".join(missing))


def wait_for_tcp(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise Unavailable(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@attrs.define
class RunningServer:
    """A reference server process and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process this module started: SIGTERM, then SIGKILL after ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running(
    name: str, argv: Sequence[str], port: int, directory: Path, *, tcp: bool = True
) -> Iterator[RunningServer]:
    """Run ``argv`` until the block ends; wait for its TCP port when ``tcp``."""
    log = (directory / f"{name}.log").open("wb")
    process = subprocess.Popen(
        list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    server = RunningServer(name, process, port, directory)
    try:
        if tcp:
            wait_for_tcp(port)
        yield server
    finally:
        server.stop()
        log.close()


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory for one server's configuration and data."""
    path = Path(tempfile.mkdtemp(prefix=f"netlab-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Each reference server below is a context manager yielding a RunningServer:
# chronyd (time), ngircd (chat), sshd and rsyncd (file).


# --------------------------------------------------------------------------
# ngircd: the IRC server the chat benchmark compares fan-out with.
# --------------------------------------------------------------------------

#: The IRC operator the benchmark's sender logs in as (flood protection off).
IRC_OPERATOR = ("bench", "bench-password")


@contextlib.contextmanager
def ngircd() -> Iterator[RunningServer]:
    """Debian's ngircd on 127.0.0.1, penalties off, one operator (IRC_OPERATOR).

    ``MaxPenaltyTime = 0`` turns off the per-client flood penalty that holds a
    normal client to a few messages a second; the sender also opers and sets
    user mode ``+F``.
    """
    require("ngircd")
    port = free_port()
    with scratch("ngircd") as directory:
        config = directory / "ngircd.conf"
        name, password = IRC_OPERATOR
        config.write_text(
            f"""[Global]
    Name = bench.netlab.test
    Info = netlab chat benchmark reference
    Listen = 127.0.0.1
    Ports = {port}
    MotdPhrase = "benchmark"
    PidFile = {directory}/ngircd.pid
[Limits]
    MaxConnections = 1000
    MaxConnectionsIP = 1000
    MaxJoins = 10
    MaxNickLength = 30
    MaxPenaltyTime = 0
    PingTimeout = 600
    PongTimeout = 600
[Options]
    DNS = no
    Ident = no
    PAM = no
    OperCanUseMode = yes
[Operator]
    Name = {name}
    Password = {password}
"""
        )
        argv = ["ngircd", "-n", "-f", str(config)]
        with running("ngircd", argv, port, directory) as server:
            yield server


# --------------------------------------------------------------------------
# File transfer: sshd (scp, sftp) and an rsync daemon.
# --------------------------------------------------------------------------

#: The account scp/sftp log in as: a plain /bin/sh login, so that no shell
#: start-up (pyenv, conda ...) is timed along with the transfer.
BENCH_USER = "netlab-bench"


def ensure_bench_user() -> None:
    """Create :data:`BENCH_USER` (no password, /bin/sh) unless it exists."""
    import pwd

    try:
        pwd.getpwnam(BENCH_USER)
    except KeyError:
        pass
    else:
        return
    require("useradd")
    if os.geteuid() != 0:
        raise Unavailable(f"creating the user {BENCH_USER} needs root")
    subprocess.run(
        [
            "useradd",
            "--system",
            "--shell",
            "/bin/sh",
            "--home-dir",
            "/nonexistent",
            "--no-create-home",
            BENCH_USER,
        ],
        check=True,
        capture_output=True,
    )


@attrs.define
class SSHServer:
    """A running sshd plus what a client needs to log in to it."""

    server: RunningServer
    client_config: Path

    def command(self, program: str, *arguments: str) -> list[str]:
        """``scp``/``sftp``/``ssh`` with the options that reach this server."""
        port_flag = "-p" if program == "ssh" else "-P"
        return [
            program,
            "-F",
            str(self.client_config),
            port_flag,
            str(self.server.port),
            *arguments,
        ]

    @property
    def target(self) -> str:
        return f"{BENCH_USER}@127.0.0.1"


@contextlib.contextmanager
def sshd(ciphers: str | None = None) -> Iterator[SSHServer]:
    """sshd on a free loopback port, key auth for :data:`BENCH_USER`.

    ``ciphers`` (e.g. ``"aes128-gcm@openssh.com"``) restricts what the client
    offers.  sshd must start as root (it changes to the user after login).
    """
    require("sshd", "ssh-keygen", "scp", "sftp")
    if os.geteuid() != 0:
        raise Unavailable("sshd must start as root to log a user in")
    ensure_bench_user()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with scratch("sshd") as directory:
        directory.chmod(0o755)
        host_key = directory / "host_key"
        client_key = directory / "client_key"
        for key in (host_key, client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
            )
        authorized = directory / "authorized_keys"
        authorized.write_text((directory / "client_key.pub").read_text())
        authorized.chmod(0o644)
        port = free_port()
        config = directory / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM yes\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"PidFile {directory / 'sshd.pid'}\n"
            "Subsystem sftp internal-sftp\n"
        )
        client_config = directory / "ssh_config"
        client_config.write_text(
            f"Host *\n  IdentityFile {client_key}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
            + (f"  Ciphers {ciphers}\n" if ciphers else "")
        )
        with running(
            "sshd",
            [shutil.which("sshd") or "sshd", "-D", "-e", "-f", str(config)],
            port,
            directory,
        ) as server:
            yield SSHServer(server, client_config)


@contextlib.contextmanager
def rsyncd(module_path: Path, *, read_only: bool = True) -> Iterator[RunningServer]:
    """An rsync daemon on a free loopback port serving ``module_path`` as ``data``."""
    require("rsync")
    with scratch("rsyncd") as directory:
        port = free_port()
        config = directory / "rsyncd.conf"
        config.write_text(
            "use chroot = no\n"
            f"pid file = {directory / 'rsyncd.pid'}\n"
            "[data]\n"
            f"  path = {module_path}\n"
            f"  read only = {'yes' if read_only else 'no'}\n"
            # As root, rsyncd would otherwise switch to "nobody", who cannot
            # write into the benchmark's directory.
            + ("  uid = root\n  gid = root\n" if os.geteuid() == 0 else "")
        )
        argv = [
            "rsync",
            "--daemon",
            "--no-detach",
            "--address",
            "127.0.0.1",
            "--port",
            str(port),
            "--config",
            str(config),
        ]
        with running("rsyncd", argv, port, directory) as server:
            yield server


# --------------------------------------------------------------------------
# chronyd (time): an NTP server on a loopback port, never touching the clock.
# --------------------------------------------------------------------------


def wait_for_ntp(port: int, timeout: float = 10.0) -> None:
    """Wait until 127.0.0.1:port answers an SNTP client request."""
    request = b"\x23" + bytes(47)  # version 4, mode 3
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                probe.sendto(request, ("127.0.0.1", port))
                if len(probe.recv(1024)) >= 48:
                    return
    raise Unavailable(f"nothing answered NTP on 127.0.0.1:{port} within {timeout}s")


def chronyd_command(directory: Path, port: int) -> list[str]:
    """Write a chrony.conf into ``directory`` for NTP on 127.0.0.1:``port``;
    return the chronyd command line that uses it.

    ``-x``: never adjust the system clock; ``local stratum 10``: serve the
    local clock; no ``ratelimit`` line, so rate limiting is off; ``cmdport
    0``: no control socket.  It runs as root (dropping to the _chrony user
    would need its own directories) but with ``-x`` it changes nothing.
    """
    config = directory / "chrony.conf"
    config.write_text(
        f"port {port}\n"
        "bindaddress 127.0.0.1\n"
        "allow 127.0.0.1\n"
        "local stratum 10\n"
        "cmdport 0\n"
        f"pidfile {directory / 'chronyd.pid'}\n"
        f"driftfile {directory / 'drift'}\n"
    )
    return ["chronyd", "-x", "-d", "-u", "root", "-f", str(config)]


@contextlib.contextmanager
def chronyd() -> Iterator[RunningServer]:
    """Debian's chronyd serving NTP on a free loopback port (see chronyd_command)."""
    require("chronyd")
    port = free_port(socket.SOCK_DGRAM)
    with scratch("chronyd") as directory:
        argv = chronyd_command(directory, port)
        with running("chronyd", argv, port, directory, tcp=False) as server:
            wait_for_ntp(port)
            yield server
