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

    Costs: the profiler records every operator while it runs (a few % of step time, and memory for
    the events): trace a few steps, not a whole run.
    """

    def __init__(self) -> None:
        self._prof: Any = None
        self._windows: dict[str, list[tuple[int, int]]] = {}
        self._events: list[tuple[int, int]] = []  # (time ns, +/- bytes) of blocks allocated in the trace

    def __enter__(self) -> AllocatorTrace:
        from torch.profiler import ProfilerActivity, profile  # here: kineto loads only when a trace starts

        # kineto (behind the profiler) logs a line at every start and stop unless told otherwise;
        # it reads this when the first profile starts (a value set by the user is kept)
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def window(self, name: str) -> Any:
        """A context manager marking a named part of the trace."""
        return torch.profiler.record_function(f"minitune/{name}")

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        events, live = [], {}
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation":
                if str(fields.device) == "cpu":
                    events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
            elif node.name.startswith("minitune/"):
                self._windows.setdefault(node.name.removeprefix("minitune/"), []).append(
                    (node.start_time_ns, node.end_time_ns))
        # Only blocks allocated while the trace ran count. c10 keeps the sizes of blocks allocated
        # under earlier traces, so it can report the release of a block allocated before this one
        # started: that release is not part of this trace's account.
        for t, ptr, size in sorted(events):
            if size > 0:
                live[ptr] = size
                self._events.append((t, size))
            elif ptr in live:
                self._events.append((t, -live.pop(ptr)))
        # torch's profile object sits in a reference cycle (its action table holds its own bound
        # methods), so it lives until the next full garbage collection; the events it holds
        # (~1.6 KiB each, ~300 MiB for two steps of a 135M model) are let go of here, now
        self._prof.profiler = None
        self._prof = None

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
