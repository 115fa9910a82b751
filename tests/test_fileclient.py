"""Pure tests of the file client's helpers (no network)."""

from __future__ import annotations

import errno
import hashlib
import os

from twisted.trial.unittest import TestCase

from netlab.fileclient import HASH_BLOCK, HASH_BUFFERS, hash_file
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
