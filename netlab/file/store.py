"""The file service's storage: uploads, downloads, partials, quota and digests.

Nothing here speaks the wire.  The protocol layer asks the :class:`Store` for
an :class:`Upload` or a :class:`Download` and feeds or drains it.

Slow work never runs on the reactor thread: each transfer has a
:class:`ChunkWorker`, a thread that hashes (and, for uploads, writes) the
chunks handed to it, so hashing at ~1.8 GB/s overlaps with moving bytes on the
wire; fsync, renames and whole-tree walks go through ``deferToThread``.
The worker's queue is bounded by ``high_water`` bytes: when it is over, the
caller stops reading from (or producing to) the network until the worker
catches up, so memory stays bounded whatever the transfer size.

An upload is written to ``.netlab-partial-KEY`` in the target directory,
where KEY is derived from the user, the target path, the declared size and
SHA-256.  Only a complete, verified, fsynced file is renamed over the target
(then the directory is fsynced), so no reader ever sees a half-written
target.  An interrupted upload keeps its partial file so the same ``put`` can
resume; partials older than ``[file] partial_expiry`` are removed at start-up
and periodically after, except those an upload still has open.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper

from netlab.file.paths import RESERVED_PREFIX, PathRefused, RemotePath, Sandbox

log = Logger(namespace="netlab.file")

PARTIAL_PREFIX = RESERVED_PREFIX + "partial-"

Writer = Callable[[int, bytes], int]


class TransferRefused(PathRefused):
    """An operation is refused (same shape as :class:`PathRefused`: code, message)."""


# --------------------------------------------------------------------------
# Digest cache
# --------------------------------------------------------------------------


class DigestCache:
    """SHA-256 digests of files, trusted while the file's identity is unchanged.

    The key is (device, inode); a digest is used only while size, mtime and
    ctime (nanoseconds) are what they were when it was computed.  Any write,
    truncate, rename-over or ``touch`` changes ctime, so a stale digest is
    never served; a get of an unchanged file then costs no hashing at all.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[
            tuple[int, int], tuple[tuple[int, int, int], bytes]
        ] = OrderedDict()

    @staticmethod
    def _version(status: os.stat_result) -> tuple[int, int, int]:
        return (status.st_size, status.st_mtime_ns, status.st_ctime_ns)

    def get(self, status: os.stat_result) -> bytes | None:
        key = (status.st_dev, status.st_ino)
        entry = self._entries.get(key)
        if entry is None or entry[0] != self._version(status):
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, status: os.stat_result, digest: bytes) -> None:
        key = (status.st_dev, status.st_ino)
        self._entries[key] = (self._version(status), digest)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


# --------------------------------------------------------------------------
# The per-transfer worker thread
# --------------------------------------------------------------------------


_STOP = object()


class ChunkWorker:
    """Threads that hash chunks and, given a descriptor, write them.

    Hashing and writing each release the GIL and cost about the same per
    byte, so with a descriptor a second thread writes each chunk once the
    first has hashed it: the two overlap instead of adding up.

    ``submit`` is called on the reactor thread and returns True when the
    backlog (chunks not yet hashed and, with a descriptor, written) is above
    ``high_water``: the caller should pause its source until ``on_drained``
    is called (on the reactor thread) once the backlog is below half of it.
    A write error stops the work; ``on_error`` is called with it and
    :meth:`finish` fails with it.

    ``prefix`` (a descriptor and a length) is hashed first into the
    whole-file digest only, for transfers that resume at an offset.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        descriptor: int | None = None,
        writer: Writer = os.write,
        high_water: int = 8 * 1024 * 1024,
        prefix: tuple[int, int] | None = None,
        on_drained: Callable[[], None] | None = None,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.descriptor = descriptor
        self.writer = writer
        self.high_water = high_water
        self.prefix = prefix
        self.on_drained = on_drained
        self.on_error = on_error
        self.range_hash = hashlib.sha256()
        self.whole_hash = hashlib.sha256() if prefix else None
        self.error: OSError | None = None
        self._queue: queue.SimpleQueue[bytes | memoryview | object] = (
            queue.SimpleQueue()
        )
        self._written: queue.SimpleQueue[bytes | memoryview | object] | None = (
            queue.SimpleQueue() if descriptor is not None else None
        )
        self._lock = threading.Lock()
        self._backlog = 0
        self._waiting = False
        self._stopping = False
        self._outcome: OSError | bool | None = False  # False until the threads end
        self._waiters: list[Deferred[None]] = []
        threading.Thread(
            target=self._hash_chunks, name="netlab-file-hash", daemon=True
        ).start()
        if self._written is not None:
            threading.Thread(
                target=self._write_chunks,
                args=(self._written,),
                name="netlab-file-write",
                daemon=True,
            ).start()

    @property
    def backlog(self) -> int:
        with self._lock:
            return self._backlog

    def submit(self, chunk: bytes | memoryview) -> bool:
        """Queue ``chunk``; True when the caller should pause its source."""
        with self._lock:
            self._backlog += len(chunk)
            over = self._backlog > self.high_water
            if over:
                self._waiting = True
        self._queue.put(chunk)
        return over

    def finish(self) -> Deferred[None]:
        """A new Deferred that fires when every queued chunk is processed.

        It fails with the write error, if there was one.
        """
        self._stop()
        waiter: Deferred[None] = Deferred()
        if self._outcome is False:
            self._waiters.append(waiter)
        else:
            self._notify(waiter)
        return waiter

    def abort(self) -> None:
        """Stop after the chunk in hand; queued chunks are dropped."""
        with self._lock:
            self.error = self.error or OSError(errno.ECANCELED, "transfer aborted")
        self._stop()

    def _stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._queue.put(_STOP)

    def _notify(self, waiter: Deferred[None]) -> None:
        if isinstance(self._outcome, OSError):
            waiter.errback(self._outcome)
        else:
            waiter.callback(None)

    def _ended(self, outcome: OSError | None) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._notify(waiter)

    def digests(self) -> tuple[bytes, bytes]:
        """(SHA-256 of the chunks, SHA-256 of prefix + chunks), once finished."""
        range_digest = self.range_hash.digest()
        whole = self.whole_hash.digest() if self.whole_hash else range_digest
        return range_digest, whole

    def _hash_chunks(self) -> None:
        """(hash thread) Hash each chunk, then hand it to the writer, if any."""
        try:
            if self.prefix is not None:
                self._hash_prefix(*self.prefix)
        except OSError as error:
            self._fail(error)
        written = self._written
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, bytes | memoryview)
            if self.error is None:
                self.range_hash.update(item)
                if self.whole_hash is not None:
                    self.whole_hash.update(item)
            if written is None:
                self._done_with(item)
            else:
                written.put(item)
        if written is None:
            self.reactor.callFromThread(self._ended, self.error)
        else:
            written.put(_STOP)

    def _write_chunks(
        self, written: queue.SimpleQueue[bytes | memoryview | object]
    ) -> None:
        """(writer thread) Write each hashed chunk to the descriptor."""
        assert self.descriptor is not None
        while True:
            item = written.get()
            if item is _STOP:
                break
            assert isinstance(item, bytes | memoryview)
            if self.error is None:
                try:
                    view = memoryview(item)
                    while view:
                        count = self.writer(self.descriptor, view)  # type: ignore[arg-type]
                        view = view[count:]
                except OSError as error:
                    self._fail(error)
            self._done_with(item)
        self.reactor.callFromThread(self._ended, self.error)

    def _done_with(self, chunk: bytes | memoryview) -> None:
        """Take a finished chunk off the backlog; wake the source when drained."""
        with self._lock:
            self._backlog -= len(chunk)
            wake = self._waiting and self._backlog <= self.high_water // 2
            if wake:
                self._waiting = False
        if wake and self.on_drained is not None:
            self.reactor.callFromThread(self.on_drained)

    def _hash_prefix(self, descriptor: int, length: int) -> None:
        assert self.whole_hash is not None
        position = 0
        while position < length:
            block = os.pread(descriptor, min(1 << 20, length - position), position)
            if not block:
                raise OSError(errno.EIO, "file shorter than expected")
            self.whole_hash.update(block)
            position += len(block)

    def _fail(self, error: OSError) -> None:
        with self._lock:
            first = self.error is None
            self.error = self.error or error
        if first and self.on_error is not None:
            self.reactor.callFromThread(self.on_error, error)


# --------------------------------------------------------------------------
# Transport tuning shared by both ends of a transfer
# --------------------------------------------------------------------------


def widen_transport(transport: Any, size: int) -> None:
    """Read and send up to ``size`` bytes per call on the TCP transport under
    ``transport``.

    Twisted reads 64 KiB and sends at most 128 KiB (``SEND_LIMIT``) per call,
    so a 1 MiB frame costs 8-16 reactor turns, each with its Python overhead
    (about 0.15 CPU-s per GiB sent); the same ``bufferSize`` is also how much
    a transport queues before it pauses its producer.  Under TLS the TCP
    transport is the wrapper's ``transport``; the wrapper forwards attribute
    reads to it (``ProtocolWrapper.__getattr__``), so ``hasattr`` cannot tell
    them apart.
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = size
        transport.SEND_LIMIT = size


# --------------------------------------------------------------------------
# Policy and records
# --------------------------------------------------------------------------


@attrs.frozen
class StorePolicy:
    """The ``[file]`` settings the store applies (replaced on reload)."""

    max_file_size: int = 0
    quota: int = 0
    min_free_space: int = 0
    overwrite: str = "with-force"
    partial_expiry: float = 86400.0


@attrs.frozen
class Entry:
    """One listed file or directory."""

    name: str
    type: str
    size: int
    mtime: float

    def as_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "size": self.size,
            "mtime": self.mtime,
        }


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def entry_of(name: str, status: os.stat_result) -> Entry:
    size = status.st_size if stat.S_ISREG(status.st_mode) else 0
    return Entry(name, file_type(status.st_mode), size, status.st_mtime)


@attrs.frozen
class PutRequest:
    """What a put declares up front.  ``sha256`` is lower-case hex."""

    user: str
    path: RemotePath
    size: int
    sha256: str
    overwrite: bool = False


def partial_name(request: PutRequest) -> str:
    """The temp file name of an upload; the same put finds the same partial."""
    fields = [request.user, request.path.text, str(request.size), request.sha256]
    key = hashlib.sha256("\0".join(fields).encode("utf-8", "surrogatepass"))
    key_text = key.hexdigest()[:40]
    return PARTIAL_PREFIX + key_text


def _download_problem(
    path: RemotePath, status: os.stat_result, offset: int
) -> TransferRefused | None:
    """Why a get of an open file cannot proceed, if it cannot."""
    if stat.S_ISDIR(status.st_mode):
        return TransferRefused("is-a-directory", f"{path}: is a directory")
    if not stat.S_ISREG(status.st_mode):
        return TransferRefused("not-a-file", f"{path}: is not a regular file")
    if not 0 <= offset <= status.st_size:
        return TransferRefused(
            "bad-offset",
            f"offset {offset} is outside the file ({status.st_size} bytes)",
        )
    return None


def _fsync_directory(descriptor: int) -> None:
    os.fsync(descriptor)


# --------------------------------------------------------------------------
# Upload and download
# --------------------------------------------------------------------------


class Upload:
    """One ``put`` in progress: data goes to a partial file in the target directory.

    The target directory stays open for the whole upload and the rename
    happens relative to that descriptor, so swapping a symlink into the path
    meanwhile cannot redirect the file.
    """

    def __init__(
        self,
        store: Store,
        request: PutRequest,
        *,
        directory: int,
        temp_name: str,
        descriptor: int,
        offset: int,
        lock_key: tuple[int, int, str],
        on_drained: Callable[[], None] | None,
        on_error: Callable[[OSError], None] | None,
    ) -> None:
        self.store = store
        self.path = request.path
        self.size = request.size
        self.sha256 = request.sha256
        self.overwrite = request.overwrite
        self.directory = directory
        self.temp_name = temp_name
        self.descriptor = descriptor
        self.offset = offset
        self.received = offset
        self.lock_key = lock_key
        self.closed = False
        #: Set once verification and installation have begun: from then on
        #: a lost connection must not pull the descriptors from under them.
        self.completing = False
        os.lseek(descriptor, offset, os.SEEK_SET)
        self.worker = ChunkWorker(
            store.reactor,
            descriptor=descriptor,
            writer=store.writer,
            high_water=store.high_water,
            prefix=(descriptor, offset) if offset else None,
            on_drained=on_drained,
            on_error=on_error,
        )

    def receive(self, chunk: bytes | memoryview) -> bool:
        """Take one data chunk; True when the sender should be paused.

        Raises :class:`TransferRefused` when the chunk goes past the declared size.
        """
        if self.received + len(chunk) > self.size:
            raise TransferRefused(
                "size-mismatch",
                f"more data than the declared size of {self.size} bytes",
            )
        self.received += len(chunk)
        return self.worker.submit(chunk)

    async def complete(self) -> int:
        """Verify, fsync and rename into place; returns the bytes the target replaced.

        On any failure the partial file is removed (its content is known bad).
        """
        self.completing = True
        try:
            await self._verify()
            _, digest = self.worker.digests()
            replaced = await deferToThread(self._install, digest)
        except BaseException:
            await self.close(keep=False)
            raise
        await self.close(keep=True)
        return replaced

    async def _verify(self) -> None:
        if self.received != self.size:
            raise TransferRefused(
                "size-mismatch",
                f"the upload ended after {self.received} of the declared "
                f"{self.size} bytes",
            )
        await self.worker.finish()
        _, digest = self.worker.digests()
        if digest.hex() != self.sha256:
            raise TransferRefused(
                "integrity",
                f"the data's SHA-256 is {digest.hex()}, not the declared "
                f"{self.sha256}; the upload was discarded, send it again",
            )

    def _install(self, digest: bytes) -> int:
        """(thread) fsync, rename over the target per policy, fsync the directory."""
        os.fsync(self.descriptor)
        try:
            previous = os.stat(
                self.path.name, dir_fd=self.directory, follow_symlinks=False
            )
        except FileNotFoundError:
            previous = None
        if previous is not None and stat.S_ISDIR(previous.st_mode):
            raise TransferRefused("is-a-directory", f"{self.path}: is a directory")
        if previous is not None and not self.overwrite:
            raise TransferRefused(
                "exists", f"{self.path}: already exists; use --force to overwrite it"
            )
        if self.overwrite:
            os.rename(
                self.temp_name,
                self.path.name,
                src_dir_fd=self.directory,
                dst_dir_fd=self.directory,
            )
        else:
            # link() fails if the target appeared meanwhile: no-replace, atomically.
            try:
                os.link(
                    self.temp_name,
                    self.path.name,
                    src_dir_fd=self.directory,
                    dst_dir_fd=self.directory,
                    follow_symlinks=False,
                )
            except FileExistsError:
                raise TransferRefused(
                    "exists",
                    f"{self.path}: already exists; use --force to overwrite it",
                ) from None
            os.unlink(self.temp_name, dir_fd=self.directory)
        _fsync_directory(self.directory)
        self.store.digests.put(os.fstat(self.descriptor), digest)
        return (
            previous.st_size
            if previous is not None and stat.S_ISREG(previous.st_mode)
            else 0
        )

    def interrupt(self) -> Deferred[None]:
        """The connection is gone: store what arrived and keep it for a resume.

        An upload already completing finishes by itself (its result is
        simply not reported).
        """
        if self.completing:
            return self.worker.finish().addErrback(lambda _: None)
        return self._release(keep=True, drain=True)

    def close(self, *, keep: bool) -> Deferred[None]:
        """Stop now; remove the partial unless ``keep``.  Fires once released."""
        return self._release(keep=keep, drain=False)

    def _release(self, *, keep: bool, drain: bool) -> Deferred[None]:
        if self.closed:
            return self.worker.finish().addErrback(lambda _: None)
        self.closed = True
        if not drain:
            self.worker.abort()

        # The worker may still be writing: the partial, the descriptors and
        # the busy lock are released only once its thread has stopped.
        def release(_: object) -> None:
            if not keep:
                try:
                    os.unlink(self.temp_name, dir_fd=self.directory)
                except FileNotFoundError:
                    pass
            os.close(self.descriptor)
            os.close(self.directory)
            self.store.busy.discard(self.lock_key)
            self.store.open_partials.discard(
                (self.lock_key[0], self.lock_key[1], self.temp_name)
            )

        return self.worker.finish().addBoth(release)


@attrs.define
class Download:
    """One ``get``: an open file, what to send, and what is known of its digest."""

    descriptor: int
    status: os.stat_result
    offset: int
    cached_digest: bytes | None

    @property
    def size(self) -> int:
        return self.status.st_size

    def close(self) -> None:
        os.close(self.descriptor)


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


class Store:
    """Everything the file service does to the disk below its root."""

    def __init__(
        self,
        root: Path,
        reactor: Any,
        policy: StorePolicy,
        *,
        writer: Writer = os.write,
        high_water: int = 8 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sandbox = Sandbox(root)
        self.reactor = reactor
        self.policy = policy
        self.writer = writer
        self.high_water = high_water
        self.clock = clock
        self.digests = DigestCache()
        #: (device, inode of the directory, name) of targets being uploaded.
        self.busy: set[tuple[int, int, str]] = set()
        #: (device, inode of its directory, name) of every partial file an
        #: upload has open: the sweep leaves them alone, however old.
        self.open_partials: set[tuple[int, int, str]] = set()
        #: Bytes used below the root: measured by :meth:`sweep`, then kept up
        #: to date by completed uploads and removals.
        self.usage = 0
        #: Changes to usage made while a sweep walks the tree (it may or may
        #: not have seen them; counting them again errs on the side of quota).
        self._changed_during_sweep = 0

    # -- read-only operations ------------------------------------------------

    def stat(self, path: RemotePath) -> tuple[Entry, bytes | None]:
        """The entry for ``path`` and its digest, if one is known and current."""
        status = self.sandbox.lstat(path)
        digest = self.digests.get(status) if stat.S_ISREG(status.st_mode) else None
        return entry_of(path.name or ".", status), digest

    def list_directory(self, path: RemotePath) -> list[Entry]:
        """Every entry of a directory, sorted by name (partials hidden)."""
        entries = []
        with self.sandbox.directory(path) as directory:
            with os.scandir(directory) as iterator:
                for item in iterator:
                    if item.name.startswith(RESERVED_PREFIX):
                        continue
                    try:
                        status = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries.append(entry_of(item.name, status))
        entries.sort(key=lambda entry: entry.name)
        return entries

    def open_download(self, path: RemotePath, offset: int) -> Download:
        descriptor = self.sandbox.open_file(path, os.O_RDONLY)
        status = os.fstat(descriptor)
        problem = _download_problem(path, status, offset)
        if problem is not None:
            os.close(descriptor)
            raise problem
        return Download(descriptor, status, offset, self.digests.get(status))

    # -- changes -------------------------------------------------------------

    def mkdir(self, path: RemotePath) -> None:
        with self.sandbox.parent(path) as directory:
            try:
                os.mkdir(path.name, 0o755, dir_fd=directory)
            except FileExistsError:
                raise TransferRefused("exists", f"{path}: already exists") from None
            except OSError as error:
                raise TransferRefused("io-error", f"{path}: {error.strerror}") from None

    def remove(self, path: RemotePath) -> None:
        """Remove a file, a symlink (not its target) or an empty directory."""
        with self.sandbox.parent(path) as directory:
            try:
                status = os.stat(path.name, dir_fd=directory, follow_symlinks=False)
                if stat.S_ISDIR(status.st_mode):
                    os.rmdir(path.name, dir_fd=directory)
                else:
                    os.unlink(path.name, dir_fd=directory)
            except FileNotFoundError:
                raise TransferRefused("not-found", f"{path}: no such file") from None
            except OSError as error:
                if error.errno == errno.ENOTEMPTY:
                    raise TransferRefused(
                        "not-empty",
                        f"{path}: directory not empty; remove its files first",
                    ) from None
                raise TransferRefused("io-error", f"{path}: {error.strerror}") from None
        if stat.S_ISREG(status.st_mode):
            self._account(-status.st_size)

    def begin_upload(
        self,
        request: PutRequest,
        *,
        on_drained: Callable[[], None] | None = None,
        on_error: Callable[[OSError], None] | None = None,
    ) -> Upload:
        """Check the put against policy, limits and the disk; open its partial file."""
        policy = self.policy
        size, path, overwrite = request.size, request.path, request.overwrite
        if policy.max_file_size and size > policy.max_file_size:
            raise TransferRefused(
                "too-large",
                f"{size} bytes is over this server's limit of "
                f"{policy.max_file_size} bytes",
            )
        if overwrite and policy.overwrite == "never":
            raise TransferRefused(
                "forbidden", "this server never overwrites files; remove the file first"
            )
        if policy.overwrite == "always":
            request = attrs.evolve(request, overwrite=True)
        directory = self.sandbox.open_directory(RemotePath(path.parts[:-1]))
        try:
            return self._open_upload(request, directory, on_drained, on_error)
        except BaseException:
            os.close(directory)
            raise

    def _open_upload(
        self,
        request: PutRequest,
        directory: int,
        on_drained: Callable[[], None] | None,
        on_error: Callable[[OSError], None] | None,
    ) -> Upload:
        path, size = request.path, request.size
        directory_status = os.fstat(directory)
        lock_key = (directory_status.st_dev, directory_status.st_ino, path.name)
        if lock_key in self.busy:
            raise TransferRefused(
                "busy", f"{path}: another upload to this name is in progress; try later"
            )
        previous_size = 0
        try:
            previous = os.stat(path.name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(previous.st_mode):
                raise TransferRefused("is-a-directory", f"{path}: is a directory")
            if not request.overwrite:
                raise TransferRefused(
                    "exists", f"{path}: already exists; use --force to overwrite it"
                )
            previous_size = previous.st_size if stat.S_ISREG(previous.st_mode) else 0
        temp_name = partial_name(request)
        try:
            held = os.stat(temp_name, dir_fd=directory, follow_symlinks=False).st_size
        except FileNotFoundError:
            held = 0
        offset = held if held <= size else 0
        needed = size - offset
        if (
            self.policy.quota
            and self.usage + needed - previous_size > self.policy.quota
        ):
            raise TransferRefused(
                "over-quota",
                f"storing {size} bytes would exceed the quota of "
                f"{self.policy.quota} bytes ({self.usage} in use); remove files first",
            )
        disk = os.fstatvfs(directory)
        free = disk.f_bavail * disk.f_frsize
        if needed + self.policy.min_free_space > free:
            raise TransferRefused(
                "no-space",
                f"the server has {free} bytes free, not enough for {needed} more",
            )
        try:
            descriptor = os.open(
                temp_name,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=directory,
            )
            offset = os.fstat(descriptor).st_size
            if offset > size:
                os.ftruncate(descriptor, 0)
                offset = 0
        except OSError as error:
            raise TransferRefused("io-error", f"{path}: {error.strerror}") from None
        self.busy.add(lock_key)
        self.open_partials.add(
            (directory_status.st_dev, directory_status.st_ino, temp_name)
        )
        return Upload(
            self,
            request,
            directory=directory,
            temp_name=temp_name,
            descriptor=descriptor,
            offset=offset,
            lock_key=lock_key,
            on_drained=on_drained,
            on_error=on_error,
        )

    def finished_upload(self, upload: Upload, replaced: int) -> None:
        """Account for a completed upload that replaced ``replaced`` bytes.

        Partial files are counted only when :meth:`sweep` measures the tree.
        """
        self._account(upload.size - replaced)

    def _account(self, change: int) -> None:
        self.usage = max(0, self.usage + change)
        self._changed_during_sweep += change

    # -- maintenance ---------------------------------------------------------

    def scan(self) -> tuple[int, int]:
        """(thread) Remove expired partials and measure usage: (bytes used, removed).

        A partial that an upload has open is never expired, even one that
        has not grown for longer than ``partial_expiry`` (a stalled client
        within its idle timeout): removing it would fail that upload at
        its end.  (Membership tests of the reactor thread's set are atomic.)
        """
        now = self.clock()
        used = 0
        removed = 0
        for _, _, files, directory in _walk(self.sandbox.root):
            here = os.fstat(directory)
            for name in files:
                try:
                    status = os.stat(name, dir_fd=directory, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(status.st_mode):
                    continue
                stale = now - status.st_mtime > self.policy.partial_expiry
                if (
                    name.startswith(PARTIAL_PREFIX)
                    and stale
                    and (here.st_dev, here.st_ino, name) not in self.open_partials
                ):
                    try:
                        os.unlink(name, dir_fd=directory)
                    except FileNotFoundError:
                        continue
                    removed += 1
                    continue
                used += status.st_size
        return used, removed

    def sweep(self) -> Deferred[None]:
        """Run :meth:`scan` in a thread and record the usage it measured."""

        def record(result: tuple[int, int]) -> None:
            used, removed = result
            self.usage = max(0, used + max(0, self._changed_during_sweep))
            log.info(
                "file store holds {used} bytes; removed {removed} expired partials",
                event="file.sweep",
                used=self.usage,
                removed=removed,
            )

        self._changed_during_sweep = 0
        return deferToThread(self.scan).addCallback(record)


def _walk(root: Path) -> Iterator[tuple[str, list[str], list[str], int]]:
    # fwalk never follows symlinks and hands out directory descriptors.
    return os.fwalk(root, follow_symlinks=False)
