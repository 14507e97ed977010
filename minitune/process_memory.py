"""What the operating system sees of a run: the process, not only its tensors.

1. `tune_malloc()`: the C allocator's settings, applied once when a run starts. PyTorch's CPU
   allocator takes every tensor from glibc's malloc. By default glibc raises its mmap threshold
   each time a large block is freed (up to 32 MiB), so after the first steps the tensors of
   variable-size batches come from the heap, and freed heap memory that is not at its top is kept,
   not returned: RSS grows step after step by what malloc caches, not by what training holds.
   A fixed threshold of 128 KiB (glibc's own starting value, which `mallopt` stops it from moving)
   puts every tensor of 128 KiB or more in its own mapping, returned to the system when freed.
   glibc reads `MALLOC_MMAP_THRESHOLD_` and friends only at process start, so a library cannot set
   them through the environment: `mallopt` (through ctypes) does the same from inside the process.
   `MINITUNE_MALLOC=default` in the environment leaves glibc as it is (to measure the difference).
   `release_free_memory()` (`malloc_trim`) hands back what loading freed (file buffers, fp32 copies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["release_free_memory", "tune_malloc"]

KiB = 2**10

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * KiB  # glibc's default starting value; mallopt fixes it there
TRIM_THRESHOLD = 128 * KiB  # free heap top above this goes back to the system (glibc's default)

_tuned: str | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError off glibc: musl has no mallopt knobs we want)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc() -> str:
    """Fix glibc's mmap and trim thresholds for this process (once; later calls return the same).

    Returns:
        What was done, for the run's start-up lines: the settings, or why nothing changed (not glibc,
        or MINITUNE_MALLOC=default).
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    libc = _glibc()
    if os.environ.get("MINITUNE_MALLOC", "").lower() == "default":
        _tuned = "glibc defaults kept (MINITUNE_MALLOC=default)"
    elif libc is None:
        _tuned = "unchanged (not glibc)"
    elif libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        _tuned = f"glibc mmap threshold fixed at {MMAP_THRESHOLD // KiB} KiB, trim threshold {TRIM_THRESHOLD // KiB} KiB"
    else:
        _tuned = "unchanged (mallopt refused)"
    return _tuned


def release_free_memory() -> None:
    """Return malloc's free memory to the system (glibc `malloc_trim`); nothing elsewhere. Cheap
    (a walk over the free lists): called after loading, which frees large temporaries."""
    libc = _glibc()
    if libc is not None and os.environ.get("MINITUNE_MALLOC", "").lower() != "default":
        libc.malloc_trim(0)
