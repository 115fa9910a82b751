"""The daemon's malloc tuning for transfer buffers."""

from __future__ import annotations

import ctypes
import platform

from twisted.trial.unittest import SkipTest, TestCase

from netlab import allocator


class KeepTransferBuffersTests(TestCase):
    """keep_transfer_buffers tunes glibc and leaves other C libraries alone."""

    def test_glibc_accepts_the_settings(self) -> None:
        """On glibc, both mallopt calls succeed."""
        if platform.libc_ver()[0] != "glibc":
            raise SkipTest("glibc only")
        self.assertTrue(allocator.keep_transfer_buffers())

    def test_without_mallopt_nothing_is_done(self) -> None:
        """A C library without mallopt (not glibc) is reported, not an error."""

        class NoMallopt:
            def __init__(self, name: object) -> None:
                pass

        self.patch(ctypes, "CDLL", NoMallopt)
        self.assertFalse(allocator.keep_transfer_buffers())
