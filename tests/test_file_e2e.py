"""End to end: ``twistd -n netlab`` in a subprocess, the ``netlab`` client against it.

Each fault (kill -9 mid-put, a full disk, a stalled downloader, quota ...)
is followed by a well-behaved client that must still be served.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from netlab.client import Session, connect
from netlab.config import load
from netlab.errors import RemoteError
from netlab.file.client import part_path, upload
from netlab.file.localdigest import HashedFile
from netlab.file.store import PARTIAL_PREFIX
from netlab.framing import encode_data_frame
from tests.filesupport import FileSetup, file_setup
from tests.support import Daemon, run_netlab, temporary_directory
from tests.tlssupport import CertificateAuthority


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class EndToEndTestCase(TestCase):
    extra = ""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)
        self.setup = self.make_setup()
        self.daemon = self.start()

    def make_setup(self) -> FileSetup:
        return file_setup(self.directory, self.extra)

    def start(self) -> Daemon:
        daemon = Daemon(self, self.setup.config, cwd=self.directory)
        daemon.wait_listening(1)
        return daemon

    @property
    def server(self) -> str:
        host, port = self.daemon.addresses["file"]
        return f"{host}:{port}"

    def netlab(
        self, *args: str, user: str | None = "alice"
    ) -> subprocess.CompletedProcess[str]:
        return run_netlab(
            *self.setup.client_args(user),
            "--server",
            self.server,
            *args,
            env=self.setup.env(user or "alice"),
            cwd=self.directory,
        )

    def assertServed(self) -> None:
        """Another client is still served: a put and a get round-trip."""
        probe = self.directory / "probe"
        probe.write_bytes(os.urandom(1000))
        result = self.netlab("put", "--force", str(probe), "probe")
        self.assertEqual(result.returncode, 0, result.stderr)
        back = self.directory / "probe.back"
        result = self.netlab("get", "--force", "probe", str(back))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(back.read_bytes(), probe.read_bytes())

    async def session(self, user: str = "alice") -> Session:
        config = load(self.setup.config)
        session = await connect(
            config,
            "file",
            reactor=reactor,
            server=self.server,
            user=user,
            key_file=self.setup.keys[user],
        )
        self.addCleanup(session.protocol.transport.abortConnection)
        return session


class CommandLineTests(EndToEndTestCase):
    """The netlab file commands and their exit statuses."""

    def test_round_trip(self) -> None:
        """put, ls -l, stat, get, mkdir and rm do what they say."""
        source = self.directory / "source.bin"
        data = os.urandom(3_000_000)
        source.write_bytes(data)
        self.assertEqual(self.netlab("put", "-q", str(source), "a.bin").returncode, 0)
        self.assertEqual((self.setup.root / "a.bin").read_bytes(), data)
        listing = self.netlab("ls", "-l")
        self.assertIn("3000000", listing.stdout)
        self.assertIn("a.bin", listing.stdout)
        stat = self.netlab("stat", "a.bin")
        self.assertIn(hashlib.sha256(data).hexdigest(), stat.stdout)
        target = self.directory / "copy.bin"
        self.assertEqual(self.netlab("get", "a.bin", str(target)).returncode, 0)
        self.assertEqual(target.read_bytes(), data)
        self.assertFalse(part_path(target).exists())
        self.assertEqual(self.netlab("mkdir", "d").returncode, 0)
        self.assertEqual(self.netlab("rm", "a.bin").returncode, 0)
        self.assertEqual(self.netlab("ls").stdout.split(), ["d/"])

    def test_exit_statuses(self) -> None:
        """Remote refusals exit 6, local ones 2, with one line saying what to do."""
        source = self.directory / "s"
        source.write_bytes(b"x")
        self.netlab("put", str(source), "s")
        again = self.netlab("put", str(source), "s")
        self.assertEqual(again.returncode, 6)
        self.assertIn("--force", again.stderr)
        self.assertEqual(self.netlab("put", "--force", str(source), "s").returncode, 0)
        local_exists = self.netlab("get", "s", str(source))
        self.assertEqual(local_exists.returncode, 2)
        self.assertIn("--force", local_exists.stderr)
        self.netlab("mkdir", "d")
        onto_directory = self.netlab("put", "--force", str(source), "d")
        self.assertEqual(onto_directory.returncode, 6)
        self.assertIn("is-a-directory", onto_directory.stderr)
        for hostile in ("../x", "/etc/passwd", "a/../../x", "x\x1b[2J"):
            result = self.netlab("get", hostile, str(self.directory / "out"))
            self.assertEqual(result.returncode, 6, hostile)
            self.assertIn("bad-path", result.stderr)
            self.assertNotIn("\x1b", result.stderr)
        self.assertServed()

    def test_read_only_user(self) -> None:
        """A read-only user's put and rm are refused (exit 6); reading works."""
        source = self.directory / "s"
        source.write_bytes(b"x")
        self.netlab("put", str(source), "s")
        for args in (("put", "--force", str(source), "s"), ("rm", "s"), ("mkdir", "d")):
            result = self.netlab(*args, user="reader")
            self.assertEqual(result.returncode, 6, args)
            self.assertIn("forbidden", result.stderr)
        self.assertEqual(self.netlab("ls", user="reader").returncode, 0)
        self.assertTrue((self.setup.root / "s").exists())

    def test_unauthenticated_refused(self) -> None:
        """With anonymous = "no" (the default) a client without a user exits 5."""
        result = self.netlab("ls", user=None)
        self.assertEqual(result.returncode, 5, result.stderr)

    def test_recursive(self) -> None:
        """put -r and get -r copy a tree, one verified transfer per file."""
        tree = self.directory / "tree"
        (tree / "sub" / "deeper").mkdir(parents=True)
        files = {
            "top.txt": b"top",
            "sub/a.bin": os.urandom(100_000),
            "sub/deeper/b": b"",
        }
        for name, data in files.items():
            (tree / name).write_bytes(data)
        self.assertEqual(self.netlab("put", "-r", str(tree), "t").returncode, 0)
        back = self.directory / "back"
        result = self.netlab("get", "-r", "t", str(back))
        self.assertEqual(result.returncode, 0, result.stderr)
        for name, data in files.items():
            self.assertEqual((back / name).read_bytes(), data, name)

    def test_resumed_get(self) -> None:
        """get resumes from LOCAL.part; a wrong part exits 7 and is removed."""
        data = os.urandom(2_000_000)
        (self.setup.root / "f").write_bytes(data)
        target = self.directory / "f"
        part_path(target).write_bytes(data[:1_234_567])
        self.assertEqual(self.netlab("get", "f", str(target)).returncode, 0)
        self.assertEqual(target.read_bytes(), data)
        self.daemon.wait_for(r"offset 1234567")
        target.unlink()
        part_path(target).write_bytes(b"not the start of the file")
        corrupt = self.netlab("get", "f", str(target))
        self.assertEqual(corrupt.returncode, 7, corrupt.stderr)
        self.assertFalse(part_path(target).exists())
        self.assertFalse(target.exists())
        self.assertEqual(self.netlab("get", "f", str(target)).returncode, 0)
        self.assertEqual(target.read_bytes(), data)


class EarlyHashTests(EndToEndTestCase):
    """put hashes LOCAL from the moment its command line is parsed."""

    async def test_upload_sends_the_descriptor_it_hashed(self) -> None:
        """upload sends the file HashedFile opened and hashed, even when the
        path names another file by then: what is declared is what is sent."""
        source = self.directory / "f"
        original = os.urandom(3_000_000)
        source.write_bytes(original)
        hashed = HashedFile.open(source)
        self.addCleanup(hashed.close)
        (self.directory / "other").write_bytes(b"another file")
        os.replace(self.directory / "other", source)
        session = await self.session()
        sent = await upload(session, source, "f", hashed=hashed, reactor=reactor)
        await session.close()
        self.assertEqual(sent, len(original))
        self.assertEqual((self.setup.root / "f").read_bytes(), original)

    def test_local_problems_are_reported_as_before(self) -> None:
        """A missing LOCAL, a directory without -r, a file that is not regular
        and one that cannot be opened each give their one-line message and
        exit status; nothing reaches the server, which still serves others."""
        listening = socket.socket(socket.AF_UNIX)
        self.addCleanup(listening.close)
        listening.bind(str(self.directory / "socket"))
        (self.directory / "tree").mkdir()
        cases = {
            "missing": (2, f"netlab: {self.directory}/missing does not exist\n"),
            "tree": (2, f"netlab: {self.directory}/tree is a directory; use -r\n"),
            "/dev/null": (
                2,
                "netlab: /dev/null is not a regular file (use -r for directories)\n",
            ),
            "socket": (
                1,
                "netlab: unexpected error: OSError(6, 'No such device or address') "
                "(run with -v for details)\n",
            ),
        }
        for name, expected in cases.items():
            local = name if name.startswith("/") else str(self.directory / name)
            result = self.netlab("put", local, "target")
            self.assertEqual((result.returncode, result.stderr), expected, name)
        self.assertEqual(list(self.setup.root.iterdir()), [])
        self.assertServed()

    def test_failed_connection_does_not_wait_for_the_hash(self) -> None:
        """A put whose server cannot be reached ends with its one-line error
        (exit 4) while its file is still being hashed: the hashing threads,
        cut off at exit, print nothing and do not change the exit status."""
        big = self.directory / "big"
        with big.open("wb") as stream:
            stream.truncate(4 << 30)  # sparse: instant to make, seconds to hash
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        result = run_netlab(
            *self.setup.client_args(),
            "--server",
            f"127.0.0.1:{port}",
            "put",
            str(big),
            env=self.setup.env(),
            cwd=self.directory,
        )
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("cannot connect to the file service", result.stderr)


class TLSTests(EndToEndTestCase):
    """The file service on an ssl: endpoint, verified by the client."""

    def make_setup(self) -> FileSetup:
        authority = CertificateAuthority()
        certificate, key = authority.issue(self.directory, ["127.0.0.1"])
        ca_file = authority.write_ca(self.directory / "ca.pem")
        return file_setup(
            self.directory,
            endpoint="ssl:0:interface=127.0.0.1",
            sections=f"""
            [tls]
            certificate = "{certificate}"
            private_key = "{key}"
            ca_file = "{ca_file}"
            """,
        )

    def test_put_get_over_tls(self) -> None:
        """put and get work and verify over TLS: gets of a file the server
        hashes as it sends (frames copied for the hashing thread) and of one
        whose digest it knows (frames encrypted straight from its buffer)."""
        source = self.directory / "s.bin"
        data = os.urandom(2_500_000)
        source.write_bytes(data)
        result = self.netlab("put", str(source), "s.bin")
        self.assertEqual(result.returncode, 0, result.stderr)
        (self.setup.root / "unhashed.bin").write_bytes(data[::-1])
        for remote, expected in (
            ("s.bin", data),
            ("unhashed.bin", data[::-1]),
            ("unhashed.bin", data[::-1]),
        ):
            target = self.directory / "t.bin"
            target.unlink(missing_ok=True)
            result = self.netlab("get", remote, str(target))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(target.read_bytes(), expected)


class QuotaTests(EndToEndTestCase):
    """quota and max_file_size refuse a put before it starts."""

    extra = 'quota = "1MiB"\nmax_file_size = "600KiB"'

    def test_limits(self) -> None:
        """Over max_file_size: too-large; over the quota: over-quota; both exit 6."""
        big = self.directory / "big"
        big.write_bytes(os.urandom(700 * 1024))
        result = self.netlab("put", str(big), "big")
        self.assertEqual(result.returncode, 6)
        self.assertIn("too-large", result.stderr)
        part = self.directory / "part"
        part.write_bytes(os.urandom(500 * 1024))
        self.assertEqual(self.netlab("put", str(part), "one").returncode, 0)
        self.assertEqual(self.netlab("put", str(part), "two").returncode, 0)
        result = self.netlab("put", str(part), "three")
        self.assertEqual(result.returncode, 6)
        self.assertIn("over-quota", result.stderr)
        self.assertFalse((self.setup.root / "three").exists())
        self.assertEqual(self.netlab("rm", "two").returncode, 0)
        self.assertEqual(self.netlab("put", str(part), "three").returncode, 0)


class FaultTests(EndToEndTestCase):
    """kill -9, a full disk and a stalled downloader."""

    extra = 'idle_timeout = "1s"'

    async def start_put(self, data: bytes, name: str, sent: int) -> Session:
        """Begin a put of ``data`` and send its first ``sent`` bytes."""
        session = await self.session()
        digest = hashlib.sha256(data).hexdigest()
        start = await session.request("put", path=name, size=len(data), sha256=digest)
        self.assertEqual(start.op, "put-start")
        for index in range(0, sent, 65536):
            session.write_frame(
                encode_data_frame(data[index : min(sent, index + 65536)])
            )
        return session

    async def partial_size(self, at_least: int) -> int:
        for _ in range(2000):
            sizes = [
                p.stat().st_size
                for p in self.setup.root.iterdir()
                if p.name.startswith(PARTIAL_PREFIX)
            ]
            if sizes and sizes[0] >= at_least:
                return sizes[0]
            await deferLater(reactor, 0.005, lambda: None)
        self.fail("the partial upload never reached the disk")

    async def test_sigkill_mid_put(self) -> None:
        """kill -9 during a put: target untouched, the partial resumes after restart."""
        (self.setup.root / "f").write_bytes(b"previous version")
        data = os.urandom(3_000_000)
        await self.start_put(data, "g", 1_000_000)
        await self.partial_size(1_000_000)
        self.daemon.stop(signal.SIGKILL)
        self.daemon = self.start()
        self.assertEqual((self.setup.root / "f").read_bytes(), b"previous version")
        self.assertFalse((self.setup.root / "g").exists())
        source = self.directory / "g"
        source.write_bytes(data)
        session = await self.session()
        sent = await upload(session, source, "g")
        self.assertEqual(sent, len(data) - 1_000_000)
        await session.close()
        self.assertEqual((self.setup.root / "g").read_bytes(), data)
        self.assertServed()

    def test_stale_partial_swept_at_start(self) -> None:
        """A partial older than partial_expiry is removed when the daemon starts."""
        self.daemon.wait_for(r"expired partials")  # the first daemon's own sweep
        stale = self.setup.root / (PARTIAL_PREFIX + "0" * 40)
        stale.write_bytes(b"left over by a crash")
        long_ago = time.time() - 2 * 86400
        os.utime(stale, (long_ago, long_ago))
        self.daemon.stop()
        self.daemon = self.start()
        self.daemon.wait_for(r"removed 1 expired partials")
        self.assertFalse(stale.exists())
        self.assertServed()

    async def test_disconnect_mid_put(self) -> None:
        """A client that drops mid-put resumes where the server's partial ends."""
        data = os.urandom(2_000_000)
        session = await self.start_put(data, "g", 700_000)
        await self.partial_size(700_000)
        session.protocol.transport.abortConnection()
        source = self.directory / "g"
        source.write_bytes(data)
        for _ in range(200):  # the server releases the name once it sees the close
            again = await self.session()
            try:
                sent = await upload(again, source, "g")
                break
            except RemoteError as error:
                self.assertEqual(error.code, "busy")
                await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(sent, len(data) - 700_000)
        self.assertEqual((self.setup.root / "g").read_bytes(), data)

    def test_disk_full(self) -> None:
        """A write failure mid-put (RLIMIT_FSIZE: EFBIG) fails that put cleanly."""
        limit = 1_000_000
        resource.prlimit(self.daemon.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
        big = self.directory / "big"
        big.write_bytes(os.urandom(3 * limit))
        result = self.netlab("put", str(big), "big")
        self.assertEqual(result.returncode, 6, result.stderr)
        self.assertIn("could not write", result.stderr)
        self.assertEqual(
            [p.name for p in self.setup.root.iterdir() if p.name != "probe"], []
        )
        self.assertServed()

    async def test_stalled_downloader(self) -> None:
        """A client that stops reading holds bounded server memory and is closed."""
        (self.setup.root / "big").write_bytes(os.urandom(200 * 1024 * 1024))
        before = rss_kib(self.daemon.process.pid)
        session = await self.session()
        session.protocol.pauseProducing()  # stop reading the socket
        session.send("get", path="big")
        await deferLater(reactor, 0.5, lambda: None)
        self.assertServed()
        grown = rss_kib(self.daemon.process.pid) - before
        self.assertLess(grown, 32 * 1024, f"server RSS grew by {grown} KiB")
        # Not reading, this client cannot see the close itself: the log can.
        self.daemon.wait_for(r"idle for 1s", timeout=15)
        session.protocol.transport.abortConnection()
