"""The process's resident memory (RSS): now, and its peak since a reset.

- `rss_bytes()`: the RSS now (/proc on Linux, else psutil, else the peak so far, with a warning).
- `KernelPeakRss`: the kernel's own high-water mark of the RSS (Linux), read and reset: exact.
- `max_rss_bytes(usage)`: `ru_maxrss` in bytes.

What the process will hold (`process_peak`) and the C allocator's settings are in process_memory.
"""

from __future__ import annotations

import os
import resource
import sys
import warnings
import weakref

__all__ = ["KernelPeakRss", "max_rss_bytes", "rss_bytes"]

KiB, MiB = 2**10, 2**20
_RSS_FALLBACK_WARNED = False


def rss_bytes() -> int:
    """Resident set size of this process now: /proc on Linux (one small file read), else psutil.

    Without either, the kernel's `ru_maxrss` (the peak so far, which only grows) is returned, with
    one warning: per-step peaks and the phases then show the highest value reached, not the current.
    """
    global _RSS_FALLBACK_WARNED
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional: only off Linux, where /proc is missing

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    if not _RSS_FALLBACK_WARNED:
        _RSS_FALLBACK_WARNED = True
        warnings.warn("CPU memory: no /proc and no psutil, so the current RSS is unknown; using ru_maxrss, which "
                      "only grows: per-step peaks and phases show the highest RSS so far (pip install psutil)",
                      stacklevel=2)
    return max_rss_bytes(resource.getrusage(resource.RUSAGE_SELF))


class KernelPeakRss:
    """The kernel's own high-water mark of this process's RSS (Linux `VmHWM`), read, then reset to
    the RSS now (`/proc/self/clear_refs` "5", Linux 4.0+): the exact peak since this counter's last
    reset, every page counted, with no thread sampling it. The kernel updates the mark before it
    unmaps or discards pages, so a peak freed a microsecond later is still in it (a sampler every
    10 ms misses it).

    The kernel keeps one mark per process: every `KernelPeakRss` alive shares it, and a reset by one
    first carries the mark into the others, so each still reads its own peak since its own reset.
    A reset also lowers what `getrusage` reports as this process's `ru_maxrss` (the same mark):
    whoever reads that in a process that resets it sees the peak since the last reset only.

    `open()` returns None where there is no such counter (not Linux, /proc/self/clear_refs not
    writable, or a write the kernel ignores): callers sample instead. `read` and `reset` raise
    OSError or ValueError if /proc fails them later.
    """

    _alive: weakref.WeakSet[KernelPeakRss] = weakref.WeakSet()

    def __init__(self) -> None:
        self.peak_at_open = 0  # the mark before open() reset it: the process's peak from its start
        self._carried = 0  # the highest mark other counters' resets took away since this one's last

    @classmethod
    def open(cls) -> KernelPeakRss | None:
        counter = cls()
        try:
            counter.peak_at_open = _read_hwm()
            cls._alive.add(counter)
            counter.reset()
            after = _read_hwm()
        except (OSError, ValueError):
            cls._alive.discard(counter)
            return None
        if after == counter.peak_at_open and after > rss_bytes() + MiB:  # the write did not reset it
            cls._alive.discard(counter)
            return None
        return counter

    def read(self) -> int:
        """The highest RSS (bytes) since this counter's last reset (or its opening)."""
        return max(self._carried, _read_hwm())

    def reset(self) -> None:
        """Start this counter's peak again from the RSS now (the others keep theirs)."""
        mark = _read_hwm()
        for other in list(self._alive):
            other._carried = max(other._carried, mark)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._carried = 0


def _read_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise ValueError("no VmHWM line in /proc/self/status")


def max_rss_bytes(usage: resource.struct_rusage) -> int:
    """`ru_maxrss` of a `getrusage`/`wait4` result in bytes (the kernel gives KiB on Linux, bytes on macOS)."""
    return usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * KiB
