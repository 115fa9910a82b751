"""The file service: ls, stat, get, put, rm and mkdir over a netlab session.

The session layer (:mod:`netlab.session`) does framing, HELLO and
authentication; once a session is READY, a :class:`FileApplication` receives
its control messages and data frames.  The messages are documented in
docs/protocol.rst ("File service"); in short::

    ls    {path, after?}                 -> listing {entries, more}
    stat  {path}                         -> entry {entry, sha256?}
    mkdir {path} / rm {path}             -> done
    get   {path, offset?}                -> get-start {size, offset, mtime},
                                            data frames, get-end {sha256, file_sha256}
    put   {path, size, sha256, force?}   -> put-start {offset}; the client sends
                                            data frames from offset, then put-end
                                         -> put-done {size, sha256}

One operation runs at a time per session.  A get streams from a push
producer: each frame is read straight into a reused buffer behind its header,
written, and the transport pauses the producer while the client is not
reading, so a downloader that stops reading holds at most one socket buffer
(and is closed by the session's idle timeout).  A put hands each data frame
to the store's worker thread and stops reading the socket while the worker is
behind.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from netlab.config import NetlabConfig
from netlab.file.paths import PathRefused, RemotePath, parse_path
from netlab.file.store import (
    ChunkWorker,
    Download,
    PutRequest,
    Store,
    StorePolicy,
    TransferRefused,
    Upload,
    widen_transport,
)
from netlab.framing import (
    DATA_TYPE,
    HEADER_SIZE,
    DataFrameBuffer,
    writes_consumed_at_once,
)
from netlab.session import (
    Control,
    ErrorCode,
    ISessionApplication,
    RequestError,
    ServerSession,
)
from netlab.tcpservice import SessionService

log = Logger(namespace="netlab.file")

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Where a data frame's payload starts (after the length prefix and type byte).
_DATA_OFFSET = HEADER_SIZE + len(DATA_TYPE)

#: Bytes a get or put may have queued for its worker thread before the
#: network side is paused.
WORKER_HIGH_WATER = 2 * 1024 * 1024
#: Bytes read per call during a put, and sent per call and queued before the
#: producer pauses during a get: larger than Twisted's 64 KiB reads and
#: 128 KiB sends for fewer reactor turns (one per 1 MiB frame), small enough
#: to keep the daemon's memory flat with many transfers.
SOCKET_BUFFER = 1024 * 1024


def store_policy(config: NetlabConfig) -> StorePolicy:
    section = config.file
    return StorePolicy(
        max_file_size=section.max_file_size,
        quota=section.quota,
        min_free_space=section.min_free_space,
        overwrite=section.overwrite,
        partial_expiry=section.partial_expiry,
    )


def _integer(message: Control, name: str, default: int | None = None) -> int:
    value = message.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(
            ErrorCode.BAD_MESSAGE,
            f'"{message.op}" needs "{name}" as a non-negative integer',
        )
    return value


def _path(message: Control, *, allow_root: bool = False) -> RemotePath:
    try:
        return parse_path(message.get("path"), allow_root=allow_root)
    except PathRefused as error:
        raise RequestError(error.code, error.message) from None


class DownloadProducer:
    """Streams one file as data frames; an ``IPushProducer``.

    ``resumeProducing`` writes frames until the transport pauses it (its
    buffer is full) or the file ends.  Each frame's payload also goes to a
    hashing worker unless the digest is already known; when that worker is
    behind, production waits for it too.
    """

    def __init__(
        self,
        session: ServerSession,
        download: Download,
        chunk_size: int,
        worker: ChunkWorker | None,
        on_sent: Callable[[], None],
    ) -> None:
        self.session = session
        self.download = download
        # A frame that only the transport uses can be a view of the buffer
        # (TLS encrypts it at once); the hashing worker keeps its frames.
        self.buffer = DataFrameBuffer(
            chunk_size,
            reuse=worker is None
            and writes_consumed_at_once(session.protocol.transport),
        )
        self.worker = worker
        self.on_sent = on_sent
        self.remaining = download.size - download.offset
        self.position = download.offset
        self.paused = False
        self.hash_paused = False
        self.stopped = False

    def _readinto(self, view: memoryview) -> int:
        wanted = min(len(view), self.remaining)
        if wanted == 0:
            return 0
        return os.preadv(self.download.descriptor, [view[:wanted]], self.position)

    def resumeProducing(self) -> None:
        self.paused = False
        self._produce()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True
        if self.worker is not None:
            self.worker.abort()

    def hash_drained(self) -> None:
        self.hash_paused = False
        self._produce()

    def _produce(self) -> None:
        while not (self.paused or self.hash_paused or self.stopped):
            if self.remaining == 0:
                self.stopped = True
                self.on_sent()
                return
            frame, size = self.buffer.fill(self._readinto)
            if size == 0:
                # The file shrank while being sent; get-end reports it.
                self.remaining = 0
                continue
            self.remaining -= size
            self.position += size
            if self.worker is not None and self.worker.submit(
                memoryview(frame)[_DATA_OFFSET:]
            ):
                self.hash_paused = True
            self.session.write_frame(frame, size)


@implementer(ISessionApplication)
class FileApplication:
    """Serves one READY session of the file service."""

    def __init__(self, session: ServerSession, service: FileService) -> None:
        self.session = session
        self.service = service
        self.store = service.store
        self.upload: Upload | None = None
        self.producer: DownloadProducer | None = None
        widen_transport(session.protocol.transport, SOCKET_BUFFER)
        #: After a failed put, the client's data frames still in flight and
        #: its put-end are dropped until it starts another operation.
        self.discarding = False

    # -- identity and permissions -----------------------------------------

    @property
    def who(self) -> str:
        return self.session.user or "(anonymous)"

    def _require_write(self) -> None:
        section = self.service.config.file
        if self.session.user is None:
            if section.anonymous != "write":
                raise RequestError(
                    "forbidden",
                    "anonymous clients may only read here; authenticate "
                    "([client] user and key_file) to change files",
                )
        elif self.session.user in section.read_only_users:
            raise RequestError(
                "forbidden", f"user {self.session.user} may only read on this server"
            )

    # -- ISessionApplication ----------------------------------------------

    def control_received(self, message: Control) -> object:
        if message.op == "put-end":
            if self.discarding:
                self.discarding = False
                return None
            if self.upload is None:
                raise RequestError(
                    ErrorCode.UNEXPECTED_MESSAGE, '"put-end" without "put"'
                )
            return self._finish_put()
        self.discarding = False
        if self.upload is not None or self.producer is not None:
            raise RequestError(
                "transfer-in-progress",
                f'"{message.op}" while a transfer runs; one operation at a time',
            )
        handler = {
            "ls": self._ls,
            "stat": self._stat,
            "mkdir": self._mkdir,
            "rm": self._rm,
            "get": self._get,
            "put": self._put,
        }.get(message.op)
        if handler is None:
            raise RequestError(
                ErrorCode.UNKNOWN_OP, f'unknown operation "{message.op}"'
            )
        try:
            return handler(message)
        except PathRefused as error:
            raise RequestError(error.code, error.message) from None

    def data_received(self, payload: bytes | memoryview) -> None:
        upload = self.upload
        if upload is None:
            if self.discarding:
                return
            raise RequestError(
                ErrorCode.UNEXPECTED_MESSAGE, "a data frame outside a put"
            )
        try:
            if upload.receive(payload):
                self.session.pause_receiving()
        except TransferRefused as error:
            self._fail_put(error.code, error.message)

    def connection_lost(self, reason: Failure) -> None:
        if self.producer is not None:
            self.producer.stopProducing()
            self._end_get()
        if self.upload is not None:
            upload, self.upload = self.upload, None
            log.info(
                "put of {path} by {user} interrupted after {received} of {size} "
                "bytes; partial kept for a resume",
                event="file.put.interrupted",
                path=str(upload.path),
                user=self.who,
                received=upload.received,
                size=upload.size,
            )
            upload.interrupt()

    # -- simple operations -------------------------------------------------

    def _ls(self, message: Control) -> None:
        path = _path(message, allow_root=True)
        after = message.get("after")
        if after is not None and not isinstance(after, str):
            raise RequestError(ErrorCode.BAD_MESSAGE, '"after" must be a name or null')
        entries = self.store.list_directory(path)
        if after is not None:
            entries = [entry for entry in entries if entry.name > after]
        page = self.service.config.file.list_page_size
        self.session.send(
            "listing",
            path=path.text,
            entries=[entry.as_wire() for entry in entries[:page]],
            more=len(entries) > page,
        )

    def _stat(self, message: Control) -> None:
        path = _path(message, allow_root=True)
        entry, digest = self.store.stat(path)
        self.session.send(
            "entry", entry=entry.as_wire(), sha256=digest.hex() if digest else None
        )

    def _mkdir(self, message: Control) -> None:
        self._require_write()
        path = _path(message)
        self.store.mkdir(path)
        log.info(
            "{user} made directory {path}",
            event="file.mkdir",
            user=self.who,
            path=str(path),
        )
        self.session.send("done")

    def _rm(self, message: Control) -> None:
        self._require_write()
        path = _path(message)
        self.store.remove(path)
        log.info(
            "{user} removed {path}", event="file.rm", user=self.who, path=str(path)
        )
        self.session.send("done")

    # -- get -----------------------------------------------------------------

    def _get(self, message: Control) -> None:
        path = _path(message)
        offset = _integer(message, "offset", 0)
        download = self.store.open_download(path, offset)
        cached = download.cached_digest
        worker = None
        if cached is None or offset:
            prefix = (
                (download.descriptor, offset) if offset and cached is None else None
            )
            worker = ChunkWorker(
                self.service.reactor,
                high_water=WORKER_HIGH_WATER,
                prefix=prefix,
                on_drained=self._hash_drained,
            )
        chunk = min(self.service.config.file.chunk_size, self.session.max_data_size)
        self.producer = DownloadProducer(
            self.session,
            download,
            chunk,
            worker,
            lambda: self._sent(path, download, worker),
        )
        self.session.send(
            "get-start",
            size=download.size,
            offset=offset,
            mtime=download.status.st_mtime,
        )
        self.session.register_producer(self.producer, True)
        self.producer.resumeProducing()

    def _hash_drained(self) -> None:
        if self.producer is not None:
            self.producer.hash_drained()

    def _sent(
        self, path: RemotePath, download: Download, worker: ChunkWorker | None
    ) -> None:
        async def finish() -> None:
            try:
                if worker is not None:
                    await worker.finish()
                    range_digest, whole = worker.digests()
                else:
                    assert download.cached_digest is not None
                    range_digest = whole = download.cached_digest
                if download.offset and download.cached_digest is not None:
                    whole = download.cached_digest
                after = os.fstat(download.descriptor)
                changed = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                    download.status.st_size,
                    download.status.st_mtime_ns,
                    download.status.st_ctime_ns,
                )
            finally:
                self._end_get()
            if changed:
                self.session.send_error(
                    "changed",
                    f"{path}: the file changed while it was sent; get it again",
                )
                return
            self.store.digests.put(after, whole)
            log.info(
                "{user} got {path} ({size} bytes from offset {offset})",
                event="file.get.done",
                user=self.who,
                path=str(path),
                size=download.size,
                offset=download.offset,
            )
            self.session.send(
                "get-end", sha256=range_digest.hex(), file_sha256=whole.hex()
            )

        ensureDeferred(finish()).addErrback(self._get_failed, path)

    def _get_failed(self, failure: Failure, path: RemotePath) -> None:
        if not self.session.open:
            return
        log.failure(
            "get of {path} failed", failure, event="file.get.failed", path=str(path)
        )
        self.session.send_error(
            "io-error", f"{path}: reading the file failed on the server"
        )

    def _end_get(self) -> None:
        producer, self.producer = self.producer, None
        if producer is None:
            return
        if self.session.open:
            self.session.unregister_producer()
        producer.download.close()

    # -- put -----------------------------------------------------------------

    def _put(self, message: Control) -> None:
        self._require_write()
        path = _path(message)
        size = _integer(message, "size")
        digest = message.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise RequestError(
                ErrorCode.BAD_MESSAGE,
                '"put" needs "sha256" as 64 lower-case hex digits',
            )
        force = message.get("force", False)
        if not isinstance(force, bool):
            raise RequestError(ErrorCode.BAD_MESSAGE, '"force" must be true or false')
        request = PutRequest(self.session.user or "", path, size, digest, force)
        self.upload = self.store.begin_upload(
            request,
            on_drained=self.session.resume_receiving,
            on_error=self._write_failed,
        )
        if self.upload.offset:
            log.info(
                "{user} resumes the put of {path} at {offset} of {size} bytes",
                event="file.put.resume",
                user=self.who,
                path=str(path),
                offset=self.upload.offset,
                size=size,
            )
        self.session.send("put-start", offset=self.upload.offset)

    def _write_failed(self, error: OSError) -> None:
        if self.upload is None:
            return
        log.error(
            "put of {path} failed: {reason}",
            event="file.put.write_failed",
            path=str(self.upload.path),
            reason=error.strerror or str(error),
        )
        self._fail_put(
            "io-error",
            f"{self.upload.path}: the server could not write the file "
            f"({error.strerror}); nothing was stored",
        )

    def _fail_put(self, code: str, message: str) -> None:
        upload, self.upload = self.upload, None
        if upload is None:
            return
        self.discarding = True
        self.session.resume_receiving()
        upload.close(keep=False)
        self.session.send_error(code, message)

    async def _finish_put(self) -> None:
        upload = self.upload
        assert upload is not None
        try:
            replaced = await upload.complete()
        except TransferRefused as error:
            self.upload = None
            raise RequestError(error.code, error.message) from None
        except OSError as error:
            self.upload = None
            raise RequestError(
                "io-error",
                f"{upload.path}: the server could not store the file "
                f"({error.strerror}); nothing was stored",
            ) from None
        self.upload = None
        self.store.finished_upload(upload, replaced)
        log.info(
            "{user} put {path} ({size} bytes)",
            event="file.put.done",
            user=self.who,
            path=str(upload.path),
            size=upload.size,
        )
        self.session.send("put-done", size=upload.size, sha256=upload.sha256)


class FileService(SessionService):
    """The ``[file]`` service."""

    section_name = "file"

    def __init__(self, config: NetlabConfig, reactor: Any) -> None:
        super().__init__(config, reactor)
        self.store = Store(
            config.file_root,
            reactor,
            store_policy(config),
            high_water=WORKER_HIGH_WATER,
        )
        self.sweeper: LoopingCall | None = None

    def application(self, session: ServerSession) -> ISessionApplication:
        return FileApplication(session, self)

    def allow_anonymous(self, config: NetlabConfig) -> bool:
        return bool(config.file.anonymous != "no")

    def privilegedStartService(self) -> None:
        if self.config.file.root is None:
            self.config.file_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().privilegedStartService()
        self.warn_if_exposed()

    def warn_if_exposed(self, config: NetlabConfig | None = None) -> None:
        """Log a warning when ``config`` (default: the one in force) opens
        anonymous access beyond loopback.

        Once listening, the address the socket is bound to decides: a
        ``systemd:`` endpoint says nothing about the socket systemd bound.
        """
        config = config or self.config
        if not self.allow_anonymous(config):
            return
        bound = self.listening_address
        host = getattr(bound, "host", None)
        if host is not None:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
        else:
            loopback = config.listen_address("file").is_loopback
        if not loopback:
            log.warn(
                "file service allows anonymous {access} access on {endpoint}, "
                "beyond loopback: anyone who can reach it can use it",
                event="file.anonymous.exposed",
                access=config.file.anonymous,
                endpoint=config.file.endpoint,
            )

    def startService(self) -> None:
        super().startService()
        self.sweeper = LoopingCall(self.store.sweep)
        self.sweeper.clock = self.reactor
        interval = min(self.config.file.partial_expiry, 3600.0)
        self.sweeper.start(interval, now=True).addErrback(
            lambda failure: log.failure(
                "sweeping the file root failed", failure, event="file.sweep.failed"
            )
        )

    def stopService(self) -> Any:
        if self.sweeper is not None and self.sweeper.running:
            self.sweeper.stop()
        return super().stopService()

    def apply(self, config: NetlabConfig) -> None:
        super().apply(config)
        self.store.policy = store_policy(config)
        if not self.allow_anonymous(self.config):  # A reload opens it.
            self.warn_if_exposed(config)


def build(config: NetlabConfig, reactor: Any) -> FileService:
    """The file service for ``config`` (registered in SERVICE_BUILDERS)."""
    return FileService(config, reactor)
