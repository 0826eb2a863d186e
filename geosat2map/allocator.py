"""Keeping the memory a model call frees for the next call (glibc's malloc).

A batch through the generator allocates and frees tens of MB of activations. glibc serves each
block over its mmap threshold (128 KiB, adapting upwards only to blocks already freed) with a fresh
``mmap`` and unmaps it on ``free``, so every batch has the kernel fault in and zero its pages
again: a fifth of a bf16 batch's time on 2 cores (width 32, batch 8: 45 against 55 ms). Raising
the mmap and trim thresholds keeps those blocks in the heap, as jemalloc or tcmalloc preloaded
would. It is a process-wide setting, so the CLI's translate makes it, not the library behind a
caller's back; a program that translates many scenes can call :func:`retain_freed_memory` itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, and up to this much free heap is kept.
RETAIN_BYTES = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (the only one these settings are written for), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Have glibc keep freed blocks (up to ``RETAIN_BYTES``) for reuse; False where the C library
    is not glibc (nothing is changed there). Peak memory stays what it was; the process just does
    not give memory back between batches."""
    libc = _glibc()
    # Both together: raising either alone was slower than neither (60 and 112 against 55 ms).
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, RETAIN_BYTES)
                                     and libc.mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES))


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the system now (glibc's ``malloc_trim``), after one-off
    work that will not come again in this process; False where the C library is not glibc. Kept
    memory is only reused by allocations like the ones that freed it: the ONNX export and the
    engine timing of auto's first run on a machine left 1.1 GB resident, and the translate after
    them grew from there."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
