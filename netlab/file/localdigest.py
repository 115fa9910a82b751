"""The size and SHA-256 of a local file, computed in background threads.

A ``put`` must declare its file's size and SHA-256 before it sends a byte,
and hashing costs about 0.55 s per GiB here: on the critical path of every
upload.  hashlib releases the GIL while it hashes a large buffer, so the
hashing can run on another core while the main thread does something else.
:class:`HashedFile` starts it the moment the file is opened, and
:func:`start_put_hash` (the ``prepare`` hook of ``netlab put``, see
:mod:`netlab.commands`) opens the file right after the command line is
parsed: the hash is computed while the client imports Twisted, reads its
configuration, connects and authenticates, instead of after all that.

This module imports no Twisted (it runs before Twisted is loaded); the file
client waits for the result from the reactor with :meth:`HashedFile.when_done`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from netlab.errors import UsageError

if TYPE_CHECKING:
    import argparse

#: Bytes per read while hashing a file before a put, and how many such
#: buffers the read-ahead thread may fill before the hashing catches up.
HASH_BLOCK = 1024 * 1024
HASH_BUFFERS = 4

#: What hashing a file ends with: its size and SHA-256 (hex), or why it failed.
Outcome = tuple[int, str] | BaseException


def hash_file(descriptor: int) -> tuple[int, str]:
    """(thread) The size and SHA-256 (hex) of an open file, read from offset 0.

    A second thread reads the next blocks into a few reused buffers while
    this one hashes, so reading (a memory copy from the page cache, ~0.2
    s/GiB) overlaps with SHA-256 (~0.55 s/GiB) instead of adding to it:
    a put cannot send a byte before its digest is known.
    """
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    filled: queue.SimpleQueue[tuple[bytearray, int] | OSError] = queue.SimpleQueue()
    for _ in range(HASH_BUFFERS):
        free.put(bytearray(HASH_BLOCK))
    stop = threading.Event()

    def read_ahead() -> None:
        position = 0
        try:
            while not stop.is_set():
                buffer = free.get()
                count = os.preadv(descriptor, [buffer], position)
                filled.put((buffer, count))
                if not count:
                    return
                position += count
        except OSError as error:
            filled.put(error)

    threading.Thread(target=read_ahead, name="netlab-hash-read", daemon=True).start()
    digest = hashlib.sha256()
    size = 0
    try:
        while True:
            item = filled.get()
            if isinstance(item, OSError):
                raise item
            buffer, count = item
            if not count:
                return size, digest.hexdigest()
            digest.update(memoryview(buffer)[:count])
            size += count
            free.put(buffer)
    finally:
        # Let a reader still waiting for a buffer see the stop and end.
        stop.set()
        free.put(bytearray(HASH_BLOCK))


class HashedFile:
    """A local regular file, open for an upload and hashed in a daemon thread.

    The hashing starts when the object is made.  It reads its own duplicate
    of the descriptor (positioned reads, no shared offset) and closes it when
    done, so :meth:`close` may come at any time, even mid-hash.  Uploading
    :attr:`descriptor` sends the very file that was hashed, whatever happens
    to the path meanwhile.  The threads are daemon threads: a command that
    fails before it needs the digest exits without waiting for them.
    """

    def __init__(self, descriptor: int) -> None:
        #: The open file; the owner of this object closes it with :meth:`close`.
        self.descriptor = descriptor
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._waiters: list[Callable[[Outcome], None]] = []
        threading.Thread(
            target=self._hash,
            args=(os.dup(descriptor),),
            name="netlab-hash",
            daemon=True,
        ).start()

    @classmethod
    def open(cls, path: Path | str, *, wait_for_writer: bool = True) -> HashedFile:
        """Open ``path`` and start hashing it.

        Raises the :class:`OSError` of ``open`` or :class:`UsageError` when
        ``path`` is not a regular file.  ``wait_for_writer=False`` opens
        without blocking (a FIFO without a writer would block ``open``).
        """
        flags = os.O_RDONLY | os.O_CLOEXEC | (0 if wait_for_writer else os.O_NONBLOCK)
        descriptor = os.open(path, flags)
        try:
            mode = os.fstat(descriptor).st_mode
            os.set_blocking(descriptor, True)  # O_NONBLOCK was for the open only.
            if stat.S_ISREG(mode):
                return cls(descriptor)
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)
        raise UsageError(f"{path} is not a regular file (use -r for directories)")

    def _hash(self, reading: int) -> None:
        outcome: Outcome
        try:
            outcome = hash_file(reading)
        except BaseException as error:  # Handed to whoever waits for the digest.
            outcome = error
        finally:
            os.close(reading)
        with self._lock:
            self._outcome = outcome
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter(outcome)

    def when_done(self, callback: Callable[[Outcome], None]) -> None:
        """Call ``callback`` with the outcome once hashing ends: at once (in
        this thread) when it already has, else in the hashing thread."""
        with self._lock:
            outcome = self._outcome
            if outcome is None:
                self._waiters.append(callback)
                return
        callback(outcome)

    def close(self) -> None:
        """Close :attr:`descriptor` (the hashing, if still running, goes on
        with its own descriptor; nobody waits for it)."""
        os.close(self.descriptor)


def start_put_hash(args: argparse.Namespace) -> None:
    """The ``prepare`` hook of ``netlab put``: start hashing LOCAL now.

    Stores a :class:`HashedFile` as ``args.hashed_file`` for a single-file
    put (``-r`` hashes each file when its turn comes).  Any problem with
    LOCAL (missing, a directory, unreadable, not a regular file, a name the
    system refuses) leaves ``args.hashed_file`` None: the put command then
    meets the problem where it always has and reports it the same way.
    """
    if args.recursive:
        return
    try:
        args.hashed_file = HashedFile.open(args.local, wait_for_writer=False)
    except (OSError, ValueError, UsageError):
        return
