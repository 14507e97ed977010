"""The process's resident memory (RSS): now, and its peak since a reset.

- `rss_bytes()`: the RSS now (/proc on Linux, else psutil, else the peak so far, with a warning).
- `KernelPeakRss`: the kernel's own high-water mark of the RSS (Linux), read and reset: exact.
- `PeakWatcher`: the peak of a value since the last reset, the one place that keeps one: the
  kernel's mark for the RSS where it can, else a sampler thread (MPS's allocation, RSS off Linux).
- `max_rss_bytes(usage)`: `ru_maxrss` in bytes.

What the process will hold (`process_peak`) and the C allocator's settings are in process_memory.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import warnings
import weakref
from collections.abc import Callable

__all__ = ["KernelPeakRss", "PeakWatcher", "max_rss_bytes", "rss_bytes"]

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
        others = [other for other in self._alive if other is not self]
        if others:  # the one mark is theirs too: keep what it holds for them (one /proc read, only then)
            mark = _read_hwm()
            for other in others:
                other._carried = max(other._carried, mark)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._carried = 0


class PeakWatcher:
    """The highest value of `current()` since the last `reset`: the one place that keeps a peak.

    With `kernel=True` (`current` is this process's RSS) on Linux, the kernel's own mark
    (`KernelPeakRss`): exact, no thread. Otherwise (MPS's allocation; RSS where the kernel's mark
    cannot be reset) a daemon thread samples `current` every `interval_s`: a peak shorter than that
    may be missed. If the kernel's mark fails after it opened (/proc refused a read or a reset), it
    warns once and samples from there (the peak since the last good read is lost).

    Args:
        current: the value watched, in bytes (default: this process's RSS).
        interval_s: the sampler's period, where it samples.
        kernel: use the kernel's mark where it can (only for `current` = this process's RSS).
        what: the watched value's name, for the fallback's warning.
    """

    def __init__(self, current: Callable[[], int] | None = None, interval_s: float = 0.01, *, kernel: bool = True,
                 what: str = "RSS") -> None:
        self.current = current if current is not None else rss_bytes
        self.interval_s = interval_s
        self.what = what
        self._kernel = KernelPeakRss.open() if kernel else None
        # the process's peak RSS from its start to now (None where unknown: no kernel mark)
        self.peak_before = self._kernel.peak_at_open if self._kernel is not None else None
        self._source = "kernel peak" if self._kernel is not None else "sampled"
        self._lock = threading.Lock()
        self._max = 0
        self._resets = 0  # a sample read before a reset is not counted after it
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        if self._kernel is None:
            self._sample()

    @property
    def source(self) -> str:
        """'kernel peak' (exact) or 'sampled' (may miss a short peak): how the peaks were kept, also
        after stop()."""
        return self._source

    @property
    def sampling(self) -> bool:
        """True while a sampler thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def read(self) -> int:
        """The highest value since the last reset (or since watching began)."""
        if self._kernel is not None:
            try:
                return self._kernel.read()
            except (OSError, ValueError) as e:
                self._fall_back(e)
        with self._lock:
            return self._max

    def reset(self, current: int | None = None) -> None:
        """Start the peak again from now (`current`: the value now, if the caller has just read it)."""
        if self._kernel is not None:
            try:
                self._kernel.reset()
                return
            except (OSError, ValueError) as e:
                self._fall_back(e)
        with self._lock:
            self._resets += 1
            self._max = self.current() if current is None else current

    def stop(self) -> int:
        """Stop watching (the kernel's mark let go, the thread joined); return the peak since the last
        reset, which later reads return until a reset sets it to the value given."""
        last = self.read()
        self._kernel = None
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join(timeout=1.0)
            self._thread = None
            last = max(last, self.read(), self.current())  # what the thread took while stopping, and now
        with self._lock:
            self._max = last
        return last

    def _sample(self) -> None:
        if self._thread is None:
            self._stop_event.clear()
            self._max = self.current()
            self._thread = threading.Thread(target=self._run, name="minitune-memory", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            with self._lock:
                resets = self._resets
            value = self.current()
            with self._lock:
                if resets == self._resets and value > self._max:
                    self._max = value

    def _fall_back(self, error: Exception) -> None:
        warnings.warn(f"{self.what}: the kernel's peak RSS failed ({error}); sampling it every "
                      f"{self.interval_s * 1000:g} ms from here on, which may miss short peaks", stacklevel=3)
        self._kernel = None
        self._source = "sampled"
        self._sample()


def _read_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise ValueError("no VmHWM line in /proc/self/status")


def max_rss_bytes(usage: resource.struct_rusage) -> int:
    """`ru_maxrss` of a `getrusage`/`wait4` result in bytes (the kernel gives KiB on Linux, bytes on macOS)."""
    return usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * KiB
