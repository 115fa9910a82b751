"""The file store: atomic verified uploads, resume, policy, quota, faults, sweep."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase

from netlab.file.paths import PathRefused, parse_path
from netlab.file.store import (
    PARTIAL_PREFIX,
    ChunkWorker,
    DigestCache,
    PutRequest,
    Store,
    StorePolicy,
    Writer,
    widen_transport,
)
from tests.support import temporary_directory

DATA = os.urandom(300_000)
DIGEST = hashlib.sha256(DATA).hexdigest()


def partials(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(PARTIAL_PREFIX)]


class StoreTestCase(TestCase):
    def setUp(self) -> None:
        self.root = temporary_directory(self)
        self.store = self.make_store()

    def make_store(self, writer: Writer = os.write, **policy: object) -> Store:
        defaults: dict[str, object] = {"min_free_space": 0}
        defaults.update(policy)
        return Store(
            self.root,
            reactor,
            StorePolicy(**defaults),
            writer=writer,  # type: ignore[arg-type]
            high_water=64 * 1024,
        )

    async def put(
        self,
        name: str,
        *,
        data: bytes = DATA,
        digest: str = DIGEST,
        overwrite: bool = False,
        store: Store | None = None,
        size: int | None = None,
    ) -> None:
        store = store or self.store
        declared = len(data) if size is None else size
        request = PutRequest("alice", parse_path(name), declared, digest, overwrite)
        upload = store.begin_upload(request)
        for start in range(upload.offset, len(data), 65536):
            upload.receive(data[start : start + 65536])
        replaced = await upload.complete()
        store.finished_upload(upload, replaced)


class UploadTests(StoreTestCase):
    """put: verified, fsynced, renamed atomically; failures leave no target."""

    async def test_put_then_read(self) -> None:
        """A complete upload becomes the target and leaves no partial."""
        await self.put("f")
        self.assertEqual((self.root / "f").read_bytes(), DATA)
        self.assertEqual(partials(self.root), [])
        self.assertEqual(self.store.usage, len(DATA))

    async def test_resume_after_interruption(self) -> None:
        """An interrupted upload keeps its partial; the same put resumes, verified."""
        path = parse_path("f")
        upload = self.store.begin_upload(PutRequest("alice", path, len(DATA), DIGEST))
        upload.receive(DATA[:100_000])
        await upload.interrupt()
        self.assertEqual(len(partials(self.root)), 1)
        self.assertFalse((self.root / "f").exists())
        resumed = self.store.begin_upload(PutRequest("alice", path, len(DATA), DIGEST))
        self.assertEqual(resumed.offset, 100_000)
        resumed.receive(DATA[100_000:])
        await resumed.complete()
        self.assertEqual((self.root / "f").read_bytes(), DATA)
        self.assertEqual(partials(self.root), [])

    async def test_partial_is_per_user(self) -> None:
        """Another user's identical put does not resume from alice's partial."""
        path = parse_path("f")
        upload = self.store.begin_upload(PutRequest("alice", path, len(DATA), DIGEST))
        upload.receive(DATA[:1000])
        await upload.interrupt()
        other = self.store.begin_upload(PutRequest("bob", path, len(DATA), DIGEST))
        self.assertEqual(other.offset, 0)
        await other.close(keep=False)

    async def test_wrong_sha256(self) -> None:
        """A digest mismatch is refused, the partial removed and no target appears."""
        with self.assertRaises(PathRefused) as caught:
            await self.put("f", digest="0" * 64)
        self.assertEqual(caught.exception.code, "integrity")
        self.assertFalse((self.root / "f").exists())
        self.assertEqual(partials(self.root), [])

    async def test_more_bytes_than_declared(self) -> None:
        """Data past the declared size is refused at once."""
        upload = self.store.begin_upload(
            PutRequest("alice", parse_path("f"), 10, DIGEST)
        )
        with self.assertRaises(PathRefused) as caught:
            upload.receive(b"x" * 11)
        self.assertEqual(caught.exception.code, "size-mismatch")
        await upload.close(keep=False)
        self.assertEqual(partials(self.root), [])

    async def test_fewer_bytes_than_declared(self) -> None:
        """Completing before the declared size is refused; nothing is installed."""
        with self.assertRaises(PathRefused) as caught:
            await self.put("f", data=DATA, size=len(DATA) + 5)
        self.assertEqual(caught.exception.code, "size-mismatch")
        self.assertFalse((self.root / "f").exists())
        self.assertEqual(partials(self.root), [])

    async def test_exists_needs_overwrite(self) -> None:
        """An existing target is kept unless the client asked to overwrite."""
        (self.root / "f").write_bytes(b"old")
        with self.assertRaises(PathRefused) as caught:
            await self.put("f")
        self.assertEqual(caught.exception.code, "exists")
        self.assertIn("--force", caught.exception.message)
        self.assertEqual((self.root / "f").read_bytes(), b"old")
        await self.put("f", overwrite=True)
        self.assertEqual((self.root / "f").read_bytes(), DATA)

    async def test_target_appears_meanwhile(self) -> None:
        """A target created during a no-overwrite upload is not replaced."""
        upload = self.store.begin_upload(
            PutRequest("alice", parse_path("f"), len(DATA), DIGEST)
        )
        upload.receive(DATA)
        (self.root / "f").write_bytes(b"raced")
        with self.assertRaises(PathRefused) as caught:
            await upload.complete()
        self.assertEqual(caught.exception.code, "exists")
        self.assertEqual((self.root / "f").read_bytes(), b"raced")
        self.assertEqual(partials(self.root), [])

    async def test_overwrite_policies(self) -> None:
        """overwrite = "never" refuses --force; "always" needs no --force."""
        (self.root / "f").write_bytes(b"old")
        never = self.make_store(overwrite="never")
        with self.assertRaises(PathRefused) as caught:
            await self.put("f", overwrite=True, store=never)
        self.assertEqual(caught.exception.code, "forbidden")
        always = self.make_store(overwrite="always")
        await self.put("f", store=always)
        self.assertEqual((self.root / "f").read_bytes(), DATA)

    async def test_target_is_directory(self) -> None:
        """A put over a directory is refused even with --force."""
        (self.root / "d").mkdir()
        with self.assertRaises(PathRefused) as caught:
            await self.put("d", overwrite=True)
        self.assertEqual(caught.exception.code, "is-a-directory")
        self.assertTrue((self.root / "d").is_dir())

    async def test_busy(self) -> None:
        """A second concurrent put to one target is told busy; the first completes."""
        first = self.store.begin_upload(
            PutRequest("alice", parse_path("f"), len(DATA), DIGEST)
        )
        with self.assertRaises(PathRefused) as caught:
            self.store.begin_upload(PutRequest("bob", parse_path("f"), 3, "0" * 64))
        self.assertEqual(caught.exception.code, "busy")
        first.receive(DATA)
        await first.complete()
        self.assertEqual((self.root / "f").read_bytes(), DATA)
        # Once done, the name is free again.
        await self.put("f", overwrite=True)

    async def test_too_large_and_quota(self) -> None:
        """max_file_size and quota refuse a put before any byte is stored."""
        limited = self.make_store(max_file_size=1000)
        with self.assertRaises(PathRefused) as caught:
            await self.put("f", store=limited)
        self.assertEqual(caught.exception.code, "too-large")
        quota = self.make_store(quota=len(DATA) + 10)
        await self.put("a", store=quota)
        with self.assertRaises(PathRefused) as caught:
            await self.put("b", store=quota)
        self.assertEqual(caught.exception.code, "over-quota")
        self.assertEqual(partials(self.root), [])
        # Replacing a file counts only the difference.
        await self.put("a", store=quota, overwrite=True)

    async def test_free_space(self) -> None:
        """A put needing more than the free space (minus the reserve) is refused."""
        greedy = self.make_store(min_free_space=2**62)
        with self.assertRaises(PathRefused) as caught:
            await self.put("f", store=greedy)
        self.assertEqual(caught.exception.code, "no-space")

    async def test_write_failure(self) -> None:
        """ENOSPC while writing fails the upload and removes the partial file."""
        written = [0]

        def full_disk(descriptor: int, data: bytes) -> int:
            if written[0] > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            written[0] += len(data)
            return os.write(descriptor, data)

        errors: list[OSError] = []
        store = self.make_store(writer=full_disk)
        request = PutRequest("alice", parse_path("f"), len(DATA), DIGEST)
        upload = store.begin_upload(request, on_error=errors.append)
        for start in range(0, len(DATA), 65536):
            upload.receive(DATA[start : start + 65536])
        with self.assertRaises(OSError) as caught:
            await upload.complete()
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual([e.errno for e in errors], [errno.ENOSPC])
        self.assertFalse((self.root / "f").exists())
        self.assertEqual(partials(self.root), [])
        self.assertEqual(store.busy, set())

    async def test_missing_parent(self) -> None:
        """A put into a directory that does not exist is refused as not-found."""
        with self.assertRaises(PathRefused) as caught:
            await self.put("nope/f")
        self.assertEqual(caught.exception.code, "not-found")


class SweepTests(StoreTestCase):
    """Expired partials are removed by the sweep; fresh ones are kept for resume."""

    async def test_sweep(self) -> None:
        """Only partials older than partial_expiry go; usage counts the rest."""
        (self.root / "keep").write_bytes(b"12345")
        old = self.root / (PARTIAL_PREFIX + "old")
        fresh = self.root / (PARTIAL_PREFIX + "fresh")
        old.write_bytes(b"x" * 100)
        fresh.write_bytes(b"y" * 10)
        long_ago = time.time() - 7200
        os.utime(old, (long_ago, long_ago))
        store = self.make_store(partial_expiry=3600.0)
        await store.sweep()
        self.assertFalse(old.exists())
        self.assertTrue(fresh.exists())
        self.assertEqual(store.usage, 15)

    async def test_sweep_spares_uploads_in_progress(self) -> None:
        """The partial of a running upload survives a sweep even once it is
        older than partial_expiry, and the upload then completes; once the
        upload ends without completing, the same partial is swept."""
        store = self.make_store(partial_expiry=60.0)
        request = PutRequest("alice", parse_path("f"), len(DATA), DIGEST)
        upload = store.begin_upload(request)
        half = len(DATA) // 2
        upload.receive(DATA[:half])
        [partial] = partials(self.root)
        # An hour later, as far as the sweep can tell, with nothing written.
        store.clock = lambda: time.time() + 3600
        await store.sweep()
        self.assertEqual(partials(self.root), [partial])
        upload.receive(DATA[half:])
        await upload.complete()
        self.assertEqual((self.root / "f").read_bytes(), DATA)

        interrupted = store.begin_upload(
            PutRequest("alice", parse_path("g"), len(DATA), DIGEST)
        )
        interrupted.receive(DATA[:half])
        await interrupted.interrupt()
        self.assertEqual(len(partials(self.root)), 1)
        await store.sweep()
        self.assertEqual(partials(self.root), [])


class ListingTests(StoreTestCase):
    """ls, stat, mkdir and rm through the sandbox."""

    def test_list_hides_partials(self) -> None:
        """Listings are sorted, typed and never show partial uploads."""
        (self.root / "b").write_bytes(b"12")
        (self.root / "a").mkdir()
        (self.root / (PARTIAL_PREFIX + "x")).write_bytes(b"")
        os.symlink("/etc/passwd", self.root / "c")
        entries = self.store.list_directory(parse_path("", allow_root=True))
        self.assertEqual(
            [(e.name, e.type, e.size) for e in entries],
            [("a", "directory", 0), ("b", "file", 2), ("c", "symlink", 0)],
        )

    def test_mkdir_rm(self) -> None:
        """mkdir creates, rm removes files and empty directories only."""
        self.store.mkdir(parse_path("d"))
        with self.assertRaises(PathRefused) as caught:
            self.store.mkdir(parse_path("d"))
        self.assertEqual(caught.exception.code, "exists")
        (self.root / "d" / "f").write_bytes(b"1")
        with self.assertRaises(PathRefused) as caught:
            self.store.remove(parse_path("d"))
        self.assertEqual(caught.exception.code, "not-empty")
        self.store.remove(parse_path("d/f"))
        self.store.remove(parse_path("d"))
        self.assertEqual(list(self.root.iterdir()), [])

    def test_rm_symlink_not_target(self) -> None:
        """rm of a symlink pointing out removes the link, never its target."""
        outside = temporary_directory(self) / "precious"
        outside.write_bytes(b"keep me")
        os.symlink(outside, self.root / "link")
        self.store.remove(parse_path("link"))
        self.assertEqual(outside.read_bytes(), b"keep me")

    def test_download_checks(self) -> None:
        """get refuses directories, symlinks and offsets past the end."""
        (self.root / "d").mkdir()
        (self.root / "f").write_bytes(b"abc")
        os.symlink(self.root / "f", self.root / "l")
        for name, offset, code in (
            ("d", 0, "is-a-directory"),
            ("l", 0, "symlink"),
            ("f", 4, "bad-offset"),
            ("missing", 0, "not-found"),
        ):
            with self.assertRaises(PathRefused) as c:
                self.store.open_download(parse_path(name), offset)
            self.assertEqual(getattr(c.exception, "code", None), code)
        download = self.store.open_download(parse_path("f"), 3)
        self.assertEqual(download.size, 3)
        download.close()


class DigestCacheTests(TestCase):
    """The digest cache trusts a digest only while the file is unchanged."""

    def test_changes_invalidate(self) -> None:
        """A write (new size or ctime) makes the cached digest unusable."""
        path = temporary_directory(self) / "f"
        path.write_bytes(b"one")
        cache = DigestCache(capacity=2)
        cache.put(os.stat(path), b"d1")
        self.assertEqual(cache.get(os.stat(path)), b"d1")
        path.write_bytes(b"two")
        self.assertIsNone(cache.get(os.stat(path)))

    def test_capacity(self) -> None:
        """The least recently used entry is dropped beyond capacity."""
        directory = temporary_directory(self)
        cache = DigestCache(capacity=2)
        statuses = []
        for name in "abc":
            (directory / name).write_bytes(name.encode())
            statuses.append(os.stat(directory / name))
            cache.put(statuses[-1], name.encode())
        self.assertIsNone(cache.get(statuses[0]))
        self.assertEqual(cache.get(statuses[2]), b"c")


class ChunkWorkerTests(TestCase):
    """The worker thread hashes in order and signals back-pressure."""

    async def test_backpressure(self) -> None:
        """submit asks for a pause over high water; on_drained follows."""
        drained: Deferred[None] = Deferred()
        worker = ChunkWorker(
            reactor, high_water=1000, on_drained=lambda: drained.callback(None)
        )
        self.assertFalse(worker.submit(b"a" * 500))
        self.assertTrue(worker.submit(b"b" * 600))
        await drained
        await worker.finish()
        self.assertEqual(
            worker.digests()[0], hashlib.sha256(b"a" * 500 + b"b" * 600).digest()
        )

    async def test_prefix(self) -> None:
        """With a prefix, the whole digest covers prefix and chunks."""
        path = temporary_directory(self) / "f"
        path.write_bytes(b"head")
        descriptor = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, descriptor)
        worker = ChunkWorker(reactor, prefix=(descriptor, 4))
        worker.submit(b"tail")
        await worker.finish()
        range_digest, whole = worker.digests()
        self.assertEqual(range_digest, hashlib.sha256(b"tail").digest())
        self.assertEqual(whole, hashlib.sha256(b"headtail").digest())

    async def test_writes_in_order_after_hashing(self) -> None:
        """With a descriptor, every chunk is hashed and written in order, and
        the backlog counts a chunk until it is written."""
        path = temporary_directory(self) / "f"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, descriptor)
        release = threading.Event()

        def slow_writer(fd: int, data: bytes) -> int:
            release.wait(10)
            return os.write(fd, data)

        worker = ChunkWorker(reactor, descriptor=descriptor, writer=slow_writer)
        chunks = [bytes([index]) * (1000 + index) for index in range(50)]
        for chunk in chunks:
            worker.submit(memoryview(chunk))
        # Nothing can be written yet, so nothing has left the backlog.
        self.assertEqual(worker.backlog, sum(map(len, chunks)))
        release.set()
        await worker.finish()
        self.assertEqual(worker.backlog, 0)
        self.assertEqual(path.read_bytes(), b"".join(chunks))
        self.assertEqual(worker.digests()[0], hashlib.sha256(b"".join(chunks)).digest())


class WidenTransportTests(TestCase):
    """widen_transport changes how much the TCP transport reads and sends per call."""

    def test_plain_tcp_transport(self) -> None:
        """A plain TCP transport gets the new read size and send limit."""
        tcp = StringTransport()
        tcp.bufferSize = 65536  # type: ignore[attr-defined]
        widen_transport(tcp, 1 << 20)
        self.assertEqual(tcp.bufferSize, 1 << 20)  # type: ignore[attr-defined]
        self.assertEqual(tcp.SEND_LIMIT, 1 << 20)  # type: ignore[attr-defined]

    def test_reaches_the_tcp_transport_under_a_wrapper(self) -> None:
        """Under a wrapping transport (TLS) the TCP transport's read size changes,
        not an attribute on the wrapper, which forwards attribute reads."""
        tcp = StringTransport()
        tcp.bufferSize = 65536  # type: ignore[attr-defined]
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        wrapper.makeConnection(tcp)
        widen_transport(wrapper, 1 << 20)
        self.assertEqual(tcp.bufferSize, 1 << 20)  # type: ignore[attr-defined]
        self.assertEqual(tcp.SEND_LIMIT, 1 << 20)  # type: ignore[attr-defined]
        self.assertNotIn("bufferSize", vars(wrapper))
        self.assertNotIn("SEND_LIMIT", vars(wrapper))
