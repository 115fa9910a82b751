"""Tests of netlab.file.localdigest: hashing local files in background threads."""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import socket
import threading
from pathlib import Path

from twisted.trial.unittest import TestCase

from netlab.errors import UsageError
from netlab.file.localdigest import (
    HASH_BLOCK,
    HASH_BUFFERS,
    HashedFile,
    Outcome,
    hash_file,
    start_put_hash,
)
from tests.support import temporary_directory


class HashFileTests(TestCase):
    """hash_file reads ahead in a second thread and hashes every byte once, in order."""

    def test_sizes_around_the_block_size(self) -> None:
        """Empty, tiny, block-sized and many-block files hash as hashlib does."""
        directory = temporary_directory(self)
        sizes = [0, 1, HASH_BLOCK - 1, HASH_BLOCK, HASH_BLOCK + 1]
        sizes.append(HASH_BLOCK * (HASH_BUFFERS * 2) + 12345)
        for size in sizes:
            content = os.urandom(size)
            path = directory / f"f{size}"
            path.write_bytes(content)
            descriptor = os.open(path, os.O_RDONLY)
            try:
                # The descriptor's own offset does not matter: reads are positioned.
                os.lseek(descriptor, size // 2, os.SEEK_SET)
                self.assertEqual(
                    hash_file(descriptor),
                    (size, hashlib.sha256(content).hexdigest()),
                    f"size {size}",
                )
            finally:
                os.close(descriptor)

    def test_read_error_is_raised(self) -> None:
        """A read that fails (here: a directory) raises its OSError."""
        descriptor = os.open(temporary_directory(self), os.O_RDONLY)
        self.addCleanup(os.close, descriptor)
        with self.assertRaises(OSError) as caught:
            hash_file(descriptor)
        self.assertEqual(caught.exception.errno, errno.EISDIR)


def wait_for_outcome(hashed: HashedFile) -> Outcome:
    """Block (bounded) until ``hashed`` hands over its outcome; return it."""
    outcomes: list[Outcome] = []
    done = threading.Event()

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        done.set()

    hashed.when_done(record)
    if not done.wait(60):
        raise AssertionError("the hashing thread never handed over its outcome")
    return outcomes[0]


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class HashedFileTests(TestCase):
    """A HashedFile hashes its open file in a daemon thread, hands the result over."""

    def setUp(self) -> None:
        self.directory = temporary_directory(self)

    def write(self, name: str, content: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(content)
        return path

    def test_outcome_reaches_waiters_before_and_after(self) -> None:
        """A waiter registered while hashing and one registered after both get
        the size and SHA-256, each exactly once."""
        content = os.urandom(HASH_BLOCK * 3 + 7)
        hashed = HashedFile.open(self.write("f", content))
        self.addCleanup(hashed.close)
        expected = (len(content), hashlib.sha256(content).hexdigest())
        self.assertEqual(wait_for_outcome(hashed), expected)
        late: list[Outcome] = []
        hashed.when_done(late.append)  # already done: called at once, here
        self.assertEqual(late, [expected])

    def test_hashes_the_open_file_not_the_path(self) -> None:
        """Replacing the path and closing the descriptor mid-hash change nothing:
        the thread hashes its own duplicate of the descriptor opened first."""
        content = os.urandom(HASH_BLOCK * 2)
        path = self.write("f", content)
        hashed = HashedFile.open(path)
        os.replace(self.write("other", b"something else"), path)
        hashed.close()
        self.assertEqual(
            wait_for_outcome(hashed),
            (len(content), hashlib.sha256(content).hexdigest()),
        )

    def test_read_error_is_handed_over(self) -> None:
        """An error while hashing (here: reading a directory) is the outcome."""
        hashed = HashedFile(os.open(self.directory, os.O_RDONLY))
        self.addCleanup(hashed.close)
        outcome = wait_for_outcome(hashed)
        self.assertIsInstance(outcome, OSError)
        assert isinstance(outcome, OSError)
        self.assertEqual(outcome.errno, errno.EISDIR)

    def test_threads_are_daemon_threads(self) -> None:
        """The hashing threads never hold up the exit of the process."""
        started: list[threading.Thread] = []
        real_start = threading.Thread.start

        def start(thread: threading.Thread) -> None:
            started.append(thread)
            real_start(thread)

        self.patch(threading.Thread, "start", start)
        hashed = HashedFile.open(self.write("f", b"data"))
        self.addCleanup(hashed.close)
        wait_for_outcome(hashed)
        self.assertEqual(
            sorted((thread.name, thread.daemon) for thread in started),
            [("netlab-hash", True), ("netlab-hash-read", True)],
        )

    def test_open_refuses_what_is_not_a_regular_file(self) -> None:
        """A directory or a FIFO is refused with the put command's message (a
        FIFO without blocking, with wait_for_writer=False); a missing file
        raises its OSError; no descriptor is left open."""
        fifo = self.directory / "fifo"
        os.mkfifo(fifo)
        before = open_descriptors()
        with self.assertRaises(UsageError) as caught:
            HashedFile.open(self.directory)
        self.assertEqual(
            str(caught.exception),
            f"{self.directory} is not a regular file (use -r for directories)",
        )
        with self.assertRaises(UsageError):
            HashedFile.open(fifo, wait_for_writer=False)
        with self.assertRaises(FileNotFoundError):
            HashedFile.open(self.directory / "missing")
        self.assertEqual(open_descriptors(), before)


class StartPutHashTests(TestCase):
    """put's prepare hook opens LOCAL early, and stays silent when it cannot."""

    def prepare(self, local: Path, recursive: bool = False) -> HashedFile | None:
        args = argparse.Namespace(local=str(local), recursive=recursive)
        args.hashed_file = None
        start_put_hash(args)
        hashed: HashedFile | None = args.hashed_file
        if hashed is not None:
            self.addCleanup(hashed.close)
        return hashed

    def test_single_file_is_hashing(self) -> None:
        """For a regular file, args.hashed_file is that file, being hashed."""
        local = temporary_directory(self) / "f"
        local.write_bytes(b"content")
        hashed = self.prepare(local)
        assert hashed is not None
        self.assertEqual(
            wait_for_outcome(hashed), (7, hashlib.sha256(b"content").hexdigest())
        )

    def test_problems_are_left_to_the_put_command(self) -> None:
        """-r, a missing LOCAL, a directory, a FIFO, a socket or a name with a
        NUL: nothing is opened, nothing raised; the put command reports them
        as it always has."""
        directory = temporary_directory(self)
        (directory / "f").write_bytes(b"content")
        os.mkfifo(directory / "fifo")
        listening = socket.socket(socket.AF_UNIX)
        self.addCleanup(listening.close)
        listening.bind(str(directory / "socket"))
        before = open_descriptors()
        for local, recursive in (
            (directory / "f", True),
            (directory / "missing", False),
            (directory, False),
            (directory / "fifo", False),
            (directory / "socket", False),
            (directory / "nul\0in-name", False),
        ):
            self.assertIsNone(self.prepare(local, recursive), local)
        self.assertEqual(open_descriptors(), before)
