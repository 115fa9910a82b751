"""Keep glibc's allocator from returning transfer buffers to the kernel after each use.

A transfer allocates and frees buffers of hundreds of KiB at a high rate: every
socket read (``SOCKET_BUFFER``) and every joined frame.  With glibc's defaults
such a buffer is served from a fresh ``mmap`` (or from heap memory just trimmed
back with ``brk``), so every page of every buffer is faulted in and zeroed again:
on a 1 GiB upload over loopback that page-fault churn was about 15% of the
daemon's CPU.  :func:`keep_transfer_buffers` raises the mmap threshold above
the largest buffer and lets up to ``TRIM_THRESHOLD`` of free heap stay mapped,
so freed buffers are reused.  Memory stays bounded: the live buffers are bounded
by the back-pressure limits, and the retained free memory by the trim threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from twisted.logger import Logger

log = Logger(namespace="netlab.allocator")

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations below this come from the heap, not a private mmap each.
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the top of the heap kept mapped instead of trimmed.
TRIM_THRESHOLD = 16 * 1024 * 1024


def keep_transfer_buffers() -> bool:
    """Tune glibc malloc for buffer reuse; False (and nothing done) elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl, macOS ...): its allocator's defaults stand
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug(
        "malloc tuned for transfer buffers: {done}",
        event="allocator.tuned",
        done=done,
    )
    return done
