"""The CPU allocator's exact account: the tensors alive now (a heap walk), and `AllocatorTrace`, every
allocation and release over a window as torch's profiler records them."""

from __future__ import annotations

import bisect
import gc
import itertools
import os
from typing import Any

import torch

__all__ = ["AllocatorTrace", "live_cpu_storages", "live_cpu_tensor_bytes"]


def live_cpu_storages() -> list[Any]:
    """The storage of every CPU tensor alive in Python, each once."""
    from torch._subclasses.fake_tensor import FakeTensor  # the planner's: shapes only, no memory

    seen: set[int] = set()
    out = []
    for obj in gc.get_objects():
        kind = type(obj)  # type(), not isinstance: no deprecated proxy object is woken
        if not issubclass(kind, torch.Tensor) or issubclass(kind, FakeTensor):
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta, fake and other storage-less tensors
            continue
        ptr = storage.data_ptr()
        if storage.device.type == "cpu" and ptr and ptr not in seen:
            seen.add(ptr)
            out.append(storage)
    return out


def live_cpu_tensor_bytes(exclude: Any = ()) -> int:
    """Bytes of the storages of every CPU tensor alive in Python (each once), except the storages in
    `exclude` (those that existed before a run began: another model in the same process is not the
    run's). On the memory grid's cells this equals the allocator trace's count, to the byte."""
    return sum(st.nbytes() for st in live_cpu_storages() if st not in exclude)


class AllocatorTrace:
    """What PyTorch's CPU allocator holds, exactly: every allocation and release while the trace runs.

    The torch profiler with `profile_memory=True` receives one event per allocation and per release
    from c10's CPU allocator; their running sum is the bytes that tensors (and kernels' internal
    buffers) hold, allocated since the trace started. Unlike RSS it has no page-cache, allocator
    slack or sampling noise, and it sees peaks that last microseconds. Windows name parts of the
    trace (`with trace.window("train"): ...`); `peak(name)` is the highest running sum inside one.

        with AllocatorTrace() as trace:
            model = load(...)
            with trace.window("train"):
                ...  # steps
        trace.peak("train"), trace.peak()   # bytes allocated since the start and alive at the peak

    Costs: only allocation events and `window` markers are recorded (the profiler's record-function
    callbacks run for user scopes alone, so no operator event is kept): a few hundred bytes per
    allocation while the trace runs. Trace a few steps, not a whole run.
    """

    def __init__(self) -> None:
        self._running = False
        self._windows: dict[str, list[tuple[int, int]]] = {}
        self._events: list[tuple[int, int]] = []  # (time ns, +/- bytes) of blocks allocated in the trace

    def __enter__(self) -> AllocatorTrace:
        from torch._C._profiler import ProfilerActivity, RecordScope
        from torch.autograd import profiler  # here: kineto loads only when a trace starts

        # kineto (behind the profiler) logs a line at every start and stop unless told otherwise;
        # it reads this when the first profile starts (a value set by the user is kept)
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        # The profiler's own entry points, as `torch.profiler.profile` calls them, but recording user
        # scopes only: an event per operator (and autograd node) cost ~200 bytes of RSS each, 8 MiB a
        # traced step of flan-t5-small (`bench/cell.py`'s LoRA + checkpointing cell at 861e28b: RSS
        # after each step 879.9, 888.3, 896.7, 905.0 MiB; flat since), more than its memory events.
        config = profiler.profile(use_cpu=True, profile_memory=True).config()
        activities = {ProfilerActivity.CPU}
        profiler._prepare_profiler(config, activities)
        profiler._enable_profiler(config, activities, {RecordScope.USER_SCOPE})
        self._running = True
        return self

    def window(self, name: str) -> Any:
        """A context manager marking a named part of the trace."""
        return torch.profiler.record_function(f"minitune/{name}")

    def __exit__(self, *exc: Any) -> None:
        from torch.autograd import profiler

        if not self._running:
            return
        self._running = False
        allocations, windows = _read_events(profiler._disable_profiler())
        for name, span in windows:
            self._windows.setdefault(name, []).append(span)
        # Only blocks allocated while the trace ran count. c10 keeps the sizes of blocks allocated
        # under earlier traces, so it can report the release of a block allocated before this one
        # started: that release is not part of this trace's account.
        live: dict[int, int] = {}
        for t, ptr, size in sorted(allocations):
            if size > 0:
                live[ptr] = size
                self._events.append((t, size))
            elif ptr in live:
                self._events.append((t, -live.pop(ptr)))

    def peak(self, window: str | None = None) -> int:
        """Highest bytes held (allocated since the trace started) inside `window` (all windows of
        that name; None: the whole trace); 0 if nothing was allocated."""
        spans = self._windows.get(window, []) if window is not None else [(-1, 2**63)]
        times = [t for t, _ in self._events]
        held = list(itertools.accumulate((n for _, n in self._events), initial=0))  # held[i]: before event i
        best = 0
        for a, b in spans:
            i, j = bisect.bisect_left(times, a), bisect.bisect_right(times, b)
            best = max(best, *held[i:j + 1])  # when the window opened, and after each of its events
        return best


def _read_events(results: Any) -> tuple[list[tuple[int, int, int]], list[tuple[str, tuple[int, int]]]]:
    """(time ns, address, +/- bytes) of each CPU allocation event, and (name, (start, end)) of each
    `window`, from the profiler's results; the events' Python wrappers (~1.6 KiB each) die on return."""
    allocations, windows = [], []
    stack = list(results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            if str(fields.device) == "cpu":
                allocations.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        elif node.name.startswith("minitune/"):
            windows.append((node.name.removeprefix("minitune/"), (node.start_time_ns, node.end_time_ns)))
    return allocations, windows
