"""The client side of the file service, on a READY :class:`netlab.client.Session`.

Every function here is ``async`` and used by the ``netlab`` file commands
(:mod:`netlab.file.cli`); other Twisted programs may call them too.

* :func:`download` writes to ``LOCAL.part``, resuming from what it already
  holds, hashes in a worker thread as data arrives, checks the server's
  SHA-256 of the bytes sent against its own running hash and the whole-file
  SHA-256 against the whole local file, fsyncs, then renames the part file
  over ``LOCAL``.  A mismatch removes the part file and raises
  :class:`~netlab.errors.IntegrityError` (exit status 7).
* :func:`upload` declares the local file's size and SHA-256 up front (the
  server wants them before the data), computed by a
  :class:`~netlab.file.localdigest.HashedFile` in a background thread, which the
  caller may have started long before (``netlab put`` starts it right after
  parsing its command line); then it streams from the offset the server
  already holds with a push producer, so a slow server pauses the reading
  of the file.  It sends the very descriptor that was hashed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from netlab.client import Session
from netlab.errors import ConnectionFailed, IntegrityError, RemoteError, UsageError
from netlab.file.localdigest import HashedFile, Outcome
from netlab.file.store import ChunkWorker, widen_transport
from netlab.session import Control, Data
from netlab.terminal import escape_name

#: Bytes of file data per frame the client sends (capped by the server's limit).
CHUNK_SIZE = 1024 * 1024
#: Bytes the client reads from the socket per call while downloading, and
#: sends per call while uploading.
SOCKET_BUFFER = 1024 * 1024
#: Received data queued for the client's worker thread before reading pauses.
WORKER_HIGH_WATER = 8 * 1024 * 1024

Progress = Callable[[int], None]


@attrs.frozen
class RemoteEntry:
    """One entry of a listing, as the server describes it."""

    name: str
    type: str
    size: int
    mtime: float

    @classmethod
    def from_wire(cls, fields: Any) -> RemoteEntry:
        if not isinstance(fields, dict):
            raise ConnectionFailed("the server sent a malformed listing entry")
        try:
            return cls(
                str(fields["name"]),
                str(fields["type"]),
                int(fields["size"]),
                float(fields["mtime"]),
            )
        except (KeyError, TypeError, ValueError):
            raise ConnectionFailed(
                "the server sent a malformed listing entry"
            ) from None


def _expect(message: Control | Data, op: str) -> Control:
    if not isinstance(message, Control) or message.op != op:
        what = "a data frame" if isinstance(message, Data) else f'"{message.op}"'
        raise ConnectionFailed(f'the server sent {what} where "{op}" was expected')
    return message


async def list_directory(session: Session, path: str) -> AsyncIterator[RemoteEntry]:
    """Every entry of a remote directory, fetching page after page."""
    after: str | None = None
    while True:
        answer = _expect(await session.request("ls", path=path, after=after), "listing")
        entries = [RemoteEntry.from_wire(item) for item in answer.get("entries") or []]
        for entry in entries:
            yield entry
        if not answer.get("more") or not entries:
            return
        after = entries[-1].name


async def stat_remote(session: Session, path: str) -> tuple[RemoteEntry, str | None]:
    """The entry for ``path`` and its SHA-256 when the server knows it."""
    answer = _expect(await session.request("stat", path=path), "entry")
    digest = answer.get("sha256")
    return RemoteEntry.from_wire(answer.get("entry")), (
        digest if isinstance(digest, str) else None
    )


async def make_directory(session: Session, path: str) -> None:
    _expect(await session.request("mkdir", path=path), "done")


async def remove(session: Session, path: str) -> None:
    _expect(await session.request("rm", path=path), "done")


def part_path(local: Path) -> Path:
    """Where a download is written until it is verified."""
    return local.with_name(local.name + ".part")


async def download(
    session: Session,
    remote: str,
    local: Path,
    *,
    resume: bool = True,
    force: bool = False,
    reactor: Any,
    progress: Callable[[int, int], Progress] | None = None,
) -> int:
    """Get ``remote`` into ``local``; returns the bytes received."""
    if local.exists() and not force:
        raise UsageError(f"{local} already exists; use --force to replace it")
    part = part_path(local)
    offset = part.stat().st_size if resume and part.exists() else 0
    try:
        start = await session.request("get", path=remote, offset=offset)
    except RemoteError as error:
        if error.code != "bad-offset":
            raise
        # The part file is longer than the remote file: it is another
        # version's. Start over.
        offset = 0
        start = await session.request("get", path=remote, offset=0)
    _expect(start, "get-start")
    size = int(start.get("size", -1))
    widen_transport(session.transport, SOCKET_BUFFER)
    descriptor = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(descriptor, offset)
        os.lseek(descriptor, offset, os.SEEK_SET)
        received = await _receive_file(
            session,
            descriptor,
            offset=offset,
            size=size,
            remote=remote,
            reactor=reactor,
            progress=progress,
        )
        await deferToThread(os.fsync, descriptor)
    except IntegrityError:
        os.close(descriptor)
        part.unlink(missing_ok=True)
        raise
    except BaseException:
        os.close(descriptor)
        raise
    os.close(descriptor)
    os.replace(part, local)
    return received


async def _receive_file(
    session: Session,
    descriptor: int,
    *,
    offset: int,
    size: int,
    remote: str,
    reactor: Any,
    progress: Callable[[int, int], Progress] | None,
) -> int:
    drained: list[Deferred[None]] = []

    def wake() -> None:
        while drained:
            drained.pop().callback(None)

    worker = ChunkWorker(
        reactor,
        descriptor=descriptor,
        high_water=WORKER_HIGH_WATER,
        prefix=(descriptor, offset) if offset else None,
        on_drained=wake,
    )
    advance = progress(size, offset) if progress else None
    received = 0
    try:
        while True:
            message = await session.receive()
            if isinstance(message, Data):
                received += len(message.payload)
                _check_not_over(remote, offset + received, size)
                if worker.submit(message.payload):
                    waiter: Deferred[None] = Deferred()
                    drained.append(waiter)
                    await waiter
                if advance:
                    advance(len(message.payload))
                continue
            end = _expect(message, "get-end")
            break
    except BaseException:
        worker.abort()
        await worker.finish().addErrback(lambda _: None)
        raise
    await worker.finish()
    range_digest, whole = worker.digests()
    shown = escape_name(remote)
    if offset + received != size:
        raise IntegrityError(
            f"{shown}: received {offset + received} of {size} bytes; get it again"
        )
    if range_digest.hex() != end.get("sha256"):
        raise IntegrityError(
            f"{shown}: the data received does not match the server's SHA-256; "
            "the partial download was removed, get it again"
        )
    if whole.hex() != end.get("file_sha256"):
        raise IntegrityError(
            f"{shown}: the resumed file does not match the server's SHA-256 "
            "(the remote file changed?); the partial download was removed, get it again"
        )
    return received


def _check_not_over(remote: str, received: int, size: int) -> None:
    if received > size:
        raise IntegrityError(
            f"{escape_name(remote)}: the server sent more than the "
            f"{size} bytes it announced"
        )


class _FileProducer:
    """Streams a local file from an offset as data frames (an IPushProducer).

    ``on_end`` is called once, when the file is sent or the transport stops us.
    """

    def __init__(
        self,
        session: Session,
        descriptor: int,
        span: tuple[int, int],
        advance: Progress | None,
        on_end: Callable[[], None],
    ) -> None:
        self.session = session
        self.descriptor = descriptor
        self.position, self.size = span
        self.advance = advance
        self.on_end = on_end
        self.buffer = session.data_frame_buffer(CHUNK_SIZE)
        self.paused = False
        self.stopped = False
        self.finished = False

    def _readinto(self, view: memoryview) -> int:
        wanted = min(len(view), self.size - self.position)
        if wanted <= 0:
            return 0
        return os.preadv(self.descriptor, [view[:wanted]], self.position)

    def resumeProducing(self) -> None:
        self.paused = False
        while not (self.paused or self.stopped):
            frame, count = self.buffer.fill(self._readinto)
            if count == 0:
                self.finished = True
                self.stopProducing()
                return
            self.position += count
            self.session.write_frame(frame)
            if self.advance:
                self.advance(count)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.on_end()


async def upload(
    session: Session,
    local: Path,
    remote: str,
    *,
    force: bool = False,
    progress: Callable[[int, int], Progress] | None = None,
    hashed: HashedFile | None = None,
    reactor: Any = None,
) -> int:
    """Put ``local`` to ``remote``; returns the bytes sent.

    ``hashed`` is ``local`` already open and being hashed (the caller keeps
    it and closes it); without it, ``local`` is opened and hashed here.
    ``reactor`` (default: the global one) runs ``session``.
    """
    opened = hashed if hashed is not None else HashedFile.open(local)
    try:
        size, digest = await _digest(opened, reactor)
        start = _expect(
            await session.request(
                "put", path=remote, size=size, sha256=digest, force=force
            ),
            "put-start",
        )
        offset = int(start.get("offset", 0))
        advance = progress(size, offset) if progress else None
        # Stop streaming when the file is sent, or as soon as the server
        # answers early (an error: disk full, quota ...), whichever is first.
        settled: Deferred[None] = Deferred()

        def settle() -> None:
            if not settled.called:
                settled.callback(None)

        def answered(result: object) -> object:
            settle()
            return result

        answer = session.receive()
        answer.addBoth(answered)
        widen_transport(session.transport, SOCKET_BUFFER)
        producer = _FileProducer(
            session, opened.descriptor, (offset, size), advance, settle
        )
        session.register_producer(producer, True)
        producer.resumeProducing()
        await settled
        producer.stopped = True
        session.unregister_producer()
        if producer.finished:
            session.send("put-end")
        _expect(await answer, "put-done")
        return size - offset
    finally:
        if hashed is None:  # Opened here, so closed here.
            opened.close()


def _digest(hashed: HashedFile, reactor: Any) -> Deferred[tuple[int, str]]:
    """The size and SHA-256 of ``hashed``, fired in the reactor thread.

    The hashing thread hands its outcome over with ``callFromThread``: no
    thread of the reactor's pool blocks waiting for it, which would hold up
    the reactor's shutdown after Ctrl-C until the whole file was hashed.
    """
    if reactor is None:
        from twisted.internet import reactor
    result: Deferred[tuple[int, str]] = Deferred()

    def settle(outcome: Outcome) -> None:
        if isinstance(outcome, BaseException):
            result.errback(outcome)
        else:
            result.callback(outcome)

    hashed.when_done(lambda outcome: reactor.callFromThread(settle, outcome))
    return result
