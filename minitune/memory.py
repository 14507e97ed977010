"""Per-step memory profiling for CUDA, MPS and CPU, a breakdown by tensor role, and a prediction.

Usable on its own inside any PyTorch loop (imports only torch and the standard library):

    prof = MemoryProfiler("cuda").start()
    for step, batch in enumerate(loader, 1):
        ...  # forward, backward, optimizer step
        record = prof.step(step)      # flat dict, MB units in the key names, peak since last call
    prof.stop()
    prof.breakdown = tensor_breakdown(model, optimizer, prof.peak_bytes())
    rich.print(prof.table())

Counters per device (peaks are "since the last `step()`", then reset; current values are never
called peaks):
    CUDA  mem/allocated_mb, mem/reserved_mb, mem/peak_allocated_mb (torch's peak counter, no sync)
    MPS   mem/current_mb, mem/driver_mb, mem/max_sampled_mb (running max from a sampler thread),
          mem/headroom_mb (recommended_max_memory - driver)
    CPU   mem/rss_mb (process RSS now), mem/peak_rss_mb (the highest RSS since the last step: on
          Linux the kernel's own high-water mark, read and reset each step, exact and with no
          thread; elsewhere the max of a sampler thread's reads: `rss.PeakWatcher`)
"""

from __future__ import annotations

import functools
import gc
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .cpu_allocator import AllocatorTrace, live_cpu_storages, live_cpu_tensor_bytes
from .process_memory import MB, format_bytes, release_free_memory
from .rss import PeakWatcher, rss_bytes

__all__ = ["MemoryProfiler", "format_bytes", "tensor_breakdown"]


# One small reader per device type: (current bytes for phases, per-step record builder)
def _cuda_current(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)


def _mps_current(device: torch.device) -> int:
    return torch.mps.current_allocated_memory()


def _cpu_current(device: torch.device) -> int:
    return rss_bytes()


_CURRENT = {"cuda": _cuda_current, "mps": _mps_current}


class MemoryProfiler:
    """Per-step memory records for one device, plus named phases and an end-of-run summary.

    Args:
        device: the device to watch ('cuda', 'cuda:1', 'mps', 'cpu' or a torch.device).
        sample_interval_s: MPS sampler period (the thread sleeps between reads); CPU too where the
            kernel keeps no resettable peak (not Linux).
        phases_every: record in-step phases (forward/backward/optimizer) every N steps; 0 = never.
    """

    def __init__(self, device: torch.device | str = "cpu", *, sample_interval_s: float = 0.01, phases_every: int = 0,
                 window_steps: int = 0):
        self.device = torch.device(device)
        # the training peak is measured over optimizer steps 1..window_steps (0: over every step);
        # on CPU: the tensors alive when training starts plus an AllocatorTrace of those steps, so
        # that the peak is the allocator's exact account rather than sampled RSS
        self.window_steps = window_steps
        self.window_peak: int | None = None
        # CPU/MPS: the highest RSS / sampled value from the start (loading included) to the window's end
        self.window_process_peak: int | None = None
        self._steps_seen = 0
        self._trace: AllocatorTrace | None = None
        self._trace_window: Any = None
        self.trace_peaks: dict[str, int] = {}  # 'train': held when training started + the traced steps' peak
        self.held_at_start = 0  # CPU: bytes of the run's tensors alive when training started
        self._before: Any = None  # CPU: the storages alive before the run (weakly held)
        self._train_records_from = 0  # records before this index cover loading, not training
        self.kind = self.device.type if self.device.type in ("cuda", "mps") else "cpu"
        self.sample_interval_s = sample_interval_s
        self.phases_every = phases_every
        self.records: list[dict[str, float]] = []
        self.phases: dict[str, dict[str, float]] = {}
        self.breakdown: dict[str, int] | None = None
        # CPU/MPS while started: the peak since the last step() (on CPU the kernel's mark where it can)
        self._watch: PeakWatcher | None = None
        self._last_peak = 0  # CPU/MPS: the peak since the last step() when watching stopped
        self._last_source = "sampled"  # CPU/MPS: the watcher's source when it stopped
        self.peak_before_start: int | None = None  # CPU, kernel peak: the process's peak RSS before start()
        # CPU: RSS when profiling started (Python, torch, libraries): not training memory
        self.baseline_bytes = 0
        self._overall_peak = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> MemoryProfiler:
        """Start watching: CUDA's peak counter reset, on CPU the kernel's peak RSS reset (Linux),
        else a sampler thread (MPS, and CPU elsewhere)."""
        if self.window_steps and self.kind == "cpu" and self._before is None:
            # tensors that exist before the run (another model in this process) are not the run's
            self._before = WeakIdKeyDictionary(dict.fromkeys(live_cpu_storages(), True))
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self._watch is None:
            # the reader alone, not a bound method: no cycle keeps an unstopped profiler's counter alive
            current = functools.partial(_CURRENT.get(self.kind, _cpu_current), self.device)
            self._watch = PeakWatcher(current, self.sample_interval_s, kernel=self.kind == "cpu",
                                      what=f"{self.kind.upper()} memory")
            if self.peak_before_start is None:
                self.peak_before_start = self._watch.peak_before
        if self.kind == "cpu" and not self.baseline_bytes:
            self.baseline_bytes = self._current()
        return self

    @property
    def rss_source(self) -> str:
        """CPU: where peak RSS comes from: 'kernel peak' (exact) or 'sampled' (may miss a short peak)."""
        return self._watch.source if self._watch is not None else self._last_source

    def training_starts(self) -> None:
        """Mark the end of loading: the peak so far is the load's, later ones are the training's."""
        self.step(0)
        self._train_records_from = len(self.records)
        if self.window_steps and self.kind == "cpu" and self._trace is None:
            # what tensors hold now (the model, its optimizer), then the allocator's account of what
            # the steps add: tracing from here keeps the profiler's events to two steps' worth
            gc.collect()  # garbage is not held by the run
            self.held_at_start = live_cpu_tensor_bytes(exclude=self._before if self._before is not None else ())
            self._trace = AllocatorTrace().__enter__()
            self._trace_window = self._trace.window("train")
            self._trace_window.__enter__()

    def _end_trace(self) -> None:
        if self._trace is None:
            return
        if self._trace_window is not None:
            self._trace_window.__exit__(None, None, None)
        self._trace.__exit__(None, None, None)
        self.trace_peaks = {"train": self.held_at_start + self._trace.peak("train")}
        self._trace = self._trace_window = None
        release_free_memory()  # the profiler's event buffers, freed now, go back to the system

    def optimizer_stepped(self) -> None:
        """Count an optimizer step (a `register_step_post_hook` on the optimizer calls it); the
        measurement window closes after step `window_steps`."""
        self._steps_seen += 1
        if self._steps_seen == self.window_steps:
            self._close_window()

    def _close_window(self) -> None:
        key = {"cuda": "mem/peak_allocated_mb", "mps": "mem/max_sampled_mb"}.get(self.kind)
        if self.kind != "cuda":
            self.window_process_peak = max(self._overall_peak, self._peak_since_step(), self._current())
        if key is None:  # CPU: the allocator trace
            self._end_trace()
            self.window_peak = self.trace_peaks.get("train")
            return
        recorded = [int(r[key] * MB) for r in self.records[self._train_records_from:] if key in r]
        if self.kind == "cuda":
            now = torch.cuda.max_memory_allocated(self.device)
        else:
            now = max(self._peak_since_step(), self._current())
        self.window_peak = max([now, *recorded])

    def training_peak(self) -> tuple[int, str]:
        """(bytes, what they are) of the training steps: over steps 1..window_steps when that window
        closed (the CPU allocator's account on CPU), else over every recorded step (RSS above the
        baseline on CPU)."""
        label = {"cuda": "peak allocated", "mps": "max sampled current allocation",
                 "cpu": "held by the CPU allocator"}[self.kind]
        if self.window_peak is not None:
            return self.window_peak, f"{label}, steps 1-{self.window_steps}"
        key = {"cuda": "mem/peak_allocated_mb", "mps": "mem/max_sampled_mb"}.get(self.kind, "mem/peak_rss_mb")
        steps = [r[key] for r in self.records[self._train_records_from:] if key in r]
        peak = int(max(steps) * MB) if steps else self.peak_bytes()
        if self.kind == "cpu":
            return max(0, peak - self.baseline_bytes), "RSS above the process baseline, every step"
        return peak, f"{label}, every step"

    def stop(self) -> None:
        """Stop watching: the peaks read from here on are those up to now (an allocator trace still
        running ends, a sampler thread stops, the kernel's peak is read a last time)."""
        self._end_trace()
        if self._watch is not None:
            self._last_peak = self._watch.stop()
            self._last_source = self._watch.source  # after stop(): a last read that failed says 'sampled'
            self._overall_peak = max(self._overall_peak, self._last_peak)
            self._watch = None

    def __enter__(self) -> MemoryProfiler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _current(self) -> int:
        return _CURRENT.get(self.kind, _cpu_current)(self.device)

    def _peak_since_step(self) -> int:
        """CPU/MPS: the highest value since the last step() (or start; after stop(), up to stop())."""
        return self._watch.read() if self._watch is not None else self._last_peak

    def _new_step(self, current: int) -> None:
        """CPU/MPS: start the next step's peak from `current`."""
        if self._watch is not None:
            self._watch.reset(current)
        else:
            self._last_peak = current

    @property
    def peak_rss_label(self) -> str:
        """CPU: 'peak RSS', or 'peak RSS (sampled)' where it is sampled."""
        return "peak RSS" if self.rss_source == "kernel peak" else "peak RSS (sampled)"

    # -- records -----------------------------------------------------------------------------------
    def want_phases(self, step: int) -> bool:
        """True if in-step phases should be recorded at optimizer step `step`."""
        return bool(self.phases_every) and step % self.phases_every == 0

    def phase(self, name: str) -> dict[str, float]:
        """Snapshot current memory under `name` (start-up stages or forward/backward/optimizer)."""
        current = self._current()
        self._overall_peak = max(self._overall_peak, current)
        record = {"mem/current_mb": current / MB}
        if self.kind == "cuda":
            record["mem/reserved_mb"] = torch.cuda.memory_reserved(self.device) / MB
        self.phases[name] = record
        return record

    def step(self, step: int | None = None) -> dict[str, float]:
        """One record for the optimizer step just taken; peaks cover the time since the last call."""
        if self.kind == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            record = {
                "mem/allocated_mb": torch.cuda.memory_allocated(self.device) / MB,
                "mem/reserved_mb": torch.cuda.memory_reserved(self.device) / MB,
                "mem/peak_allocated_mb": peak / MB,
            }
        else:
            current = self._current()
            peak = max(self._peak_since_step(), current)
            self._new_step(current)
            if self.kind == "mps":
                driver = torch.mps.driver_allocated_memory()
                record = {
                    "mem/current_mb": current / MB,
                    "mem/driver_mb": driver / MB,
                    "mem/max_sampled_mb": peak / MB,
                    "mem/headroom_mb": (torch.mps.recommended_max_memory() - driver) / MB,
                }
            else:
                record = {"mem/rss_mb": current / MB, "mem/peak_rss_mb": peak / MB}
        self._overall_peak = max(self._overall_peak, peak)
        self.records.append({"step": step if step is not None else len(self.records) + 1, **record})
        return record

    def peak_bytes(self, *, above_baseline: bool = False) -> int:
        """Highest value seen so far (peak allocated on CUDA, sampled max on MPS, peak RSS on CPU).

        Args:
            above_baseline: CPU: subtract the RSS the process had when profiling started.
        """
        if self.kind == "cuda":
            peak = max(self._overall_peak, torch.cuda.max_memory_allocated(self.device))
        else:
            peak = max(self._overall_peak, self._peak_since_step())
        return max(0, peak - self.baseline_bytes) if above_baseline else peak

    # -- reports -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Device, overall peak, per-key means over steps, phases and the breakdown (if set)."""
        keys = sorted({k for r in self.records for k in r if k != "step"})
        means = {k: sum(r[k] for r in self.records if k in r) / len(self.records) for k in keys} if self.records else {}
        return {
            "device": str(self.device),
            "peak_label": {"cuda": "peak allocated", "mps": "max sampled (current allocated)",
                           "cpu": self.peak_rss_label}[self.kind],
            "peak_mb": self.peak_bytes() / MB,
            "baseline_mb": self.baseline_bytes / MB,
            "peak_before_start_mb": self.peak_before_start / MB if self.peak_before_start is not None else None,
            "steps": len(self.records),
            "step_means": means,
            "phases": self.phases,
            "breakdown": self.breakdown,
            "trace_peaks_mb": {k: v / MB for k, v in self.trace_peaks.items()},
            "records": self.records,
        }

    def save(self, path: str | Path) -> None:
        """Write the summary as JSON (memory.json)."""
        Path(path).write_text(json.dumps(self.summary(), indent=1))

    def table(self) -> Any:
        """A rich Table: memory after each phase, then the breakdown by tensor role."""
        from rich.table import Table  # lazy: this module needs only torch unless a table is asked for

        title = f"memory on {self.device} ({self.summary()['peak_label']}: {format_bytes(self.peak_bytes())}"
        if self.baseline_bytes:
            title += f", of which {format_bytes(self.baseline_bytes)} before loading"
        table = Table(title=title + ")", title_justify="left")
        table.add_column("phase / tensors")
        table.add_column("MiB", justify="right")
        for name, rec in self.phases.items():
            table.add_row(f"after {name}", f"{rec['mem/current_mb']:.1f}")
        if self.breakdown:
            table.add_section()
            for key, value in self.breakdown.items():
                table.add_row(key, f"{value / MB:.1f}")
        return table


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    if t.device.type == "meta":  # no storage: tied weights are the same Parameter object
        return (id(t), -1)
    try:
        return (t.untyped_storage().data_ptr(), t.device.index or 0)
    except (RuntimeError, NotImplementedError):  # meta tensors, tensor subclasses without storage
        return (id(t), -1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     peak_bytes: int | None = None, *, assume_grads: bool = False) -> dict[str, int]:
    """Bytes by role, computed from the tensors themselves (shared storage counted once).

    Keys: `frozen_weights/<dtype>` (buffers included; int8 and 4-bit packed uint8 show as such),
    `trainable_weights`, `gradients`, `optimizer_state` with `optimizer_state/8bit` and
    `optimizer_state/32bit` (bitsandbytes 8-bit states are uint8/int8 tensors), `total_tensors`,
    and with `peak_bytes`: `activations_and_temporaries` = peak minus everything else (>= 0).

    Args:
        model: the model (unwrapped or not).
        optimizer: its optimizer (None: no optimizer state).
        peak_bytes: the measured peak, to derive activations and temporaries.
        assume_grads: count a gradient for every trainable parameter even where `.grad` is None now
            (after `zero_grad(set_to_none=True)`; gradients exist at the peak, before the step).

    Returns:
        The flat dict of byte counts.

    Raises:
        Nothing: tensors on any device (meta included) are counted by size and dtype.
    """
    out: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    trainable = grads = 0
    for p in model.parameters():
        key = _storage_key(p)
        if key in seen:
            continue
        seen.add(key)
        if p.requires_grad:
            trainable += _nbytes(p)
        else:
            name = f"frozen_weights/{p.dtype}"
            out[name] = out.get(name, 0) + _nbytes(p)
        if p.grad is not None:
            grads += _nbytes(p.grad)
        elif assume_grads and p.requires_grad:
            grads += _nbytes(p)
    for b in model.buffers():
        key = _storage_key(b)
        if key not in seen:
            seen.add(key)
            name = f"frozen_weights/{b.dtype}"
            out[name] = out.get(name, 0) + _nbytes(b)
    out = dict(sorted(out.items()))
    out["trainable_weights"] = trainable
    out["gradients"] = grads
    low = high = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    if v.dtype in (torch.uint8, torch.int8):
                        low += _nbytes(v)
                    else:
                        high += _nbytes(v)
    out["optimizer_state"] = low + high
    out["optimizer_state/8bit"] = low
    out["optimizer_state/32bit"] = high
    total = sum(v for k, v in out.items() if k.startswith("frozen_weights/")) + trainable + grads + low + high
    out["total_tensors"] = total
    if peak_bytes is not None:
        out["activations_and_temporaries"] = max(0, int(peak_bytes) - total)
    return out
