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
    CPU   mem/rss_mb (process RSS now), mem/peak_rss_mb (max sampled since the last step; the
          kernel's ru_maxrss only ever grows, so it cannot give per-step peaks)
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import resource
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lm import model_kind

__all__ = ["AllocatorTrace", "MemoryProfiler", "estimate_peak", "format_bytes", "tensor_breakdown"]

MB = 2**20


def format_bytes(n: float) -> str:
    """Human-readable size: '812.4 MiB', '3.21 GiB'."""
    n = float(n)
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= MB:
        return f"{n / MB:.1f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


_RSS_FALLBACK_WARNED = False


def _rss_bytes() -> int:
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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# One small reader per device type: (current bytes for phases, per-step record builder)
def _cuda_current(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)


def _mps_current(device: torch.device) -> int:
    return torch.mps.current_allocated_memory()


def _cpu_current(device: torch.device) -> int:
    return _rss_bytes()


_CURRENT = {"cuda": _cuda_current, "mps": _mps_current}


class MemoryProfiler:
    """Per-step memory records for one device, plus named phases and an end-of-run summary.

    Args:
        device: the device to watch ('cuda', 'cuda:1', 'mps', 'cpu' or a torch.device).
        sample_interval_s: CPU/MPS sampler period (the thread sleeps between reads).
        phases_every: record in-step phases (forward/backward/optimizer) every N steps; 0 = never.
    """

    def __init__(self, device: torch.device | str = "cpu", *, sample_interval_s: float = 0.01, phases_every: int = 0):
        self.device = torch.device(device)
        self.kind = self.device.type if self.device.type in ("cuda", "mps") else "cpu"
        self.sample_interval_s = sample_interval_s
        self.phases_every = phases_every
        self.records: list[dict[str, float]] = []
        self.phases: dict[str, dict[str, float]] = {}
        self.breakdown: dict[str, int] | None = None
        self._max_sampled = 0  # running max since the last step() (CPU/MPS)
        # CPU: RSS when profiling started (Python, torch, libraries): not training memory
        self.baseline_bytes = 0
        self._overall_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> MemoryProfiler:
        """Start the sampler thread (CPU and MPS; CUDA has a hardware-backed peak counter)."""
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._thread is None:
            self._stop.clear()
            self._max_sampled = self._current()
            if self.kind == "cpu" and not self.baseline_bytes:
                self.baseline_bytes = self._max_sampled
            self._thread = threading.Thread(target=self._sample, name="minitune-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the sampler thread."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=1.0)
            self._thread = None

    def __enter__(self) -> MemoryProfiler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            value = self._current()
            with self._lock:
                if value > self._max_sampled:
                    self._max_sampled = value

    def _current(self) -> int:
        return _CURRENT.get(self.kind, _cpu_current)(self.device)

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
            with self._lock:
                peak = max(self._max_sampled, current)
                self._max_sampled = current
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
            with self._lock:
                peak = max(self._overall_peak, self._max_sampled)
        return max(0, peak - self.baseline_bytes) if above_baseline else peak

    # -- reports -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Device, overall peak, per-key means over steps, phases and the breakdown (if set)."""
        keys = sorted({k for r in self.records for k in r if k != "step"})
        means = {k: sum(r[k] for r in self.records if k in r) / len(self.records) for k in keys} if self.records else {}
        return {
            "device": str(self.device),
            "peak_label": {"cuda": "peak allocated", "mps": "max sampled (current allocated)",
                           "cpu": "peak RSS (sampled)"}[self.kind],
            "peak_mb": self.peak_bytes() / MB,
            "baseline_mb": self.baseline_bytes / MB,
            "steps": len(self.records),
            "step_means": means,
            "phases": self.phases,
            "breakdown": self.breakdown,
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
        self._events: list[tuple[int, int]] = []  # (time ns, +/- bytes)

    def __enter__(self) -> AllocatorTrace:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def window(self, name: str) -> Any:
        """A context manager marking a named part of the trace."""
        return torch.profiler.record_function(f"minitune/{name}")

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        cpu = torch.autograd.DeviceType.CPU
        for e in self._prof.profiler.kineto_results.events():
            name = e.name()
            if name == "[memory]" and e.device_type() == cpu:
                self._events.append((e.start_ns(), e.nbytes()))
            elif name.startswith("minitune/"):
                self._windows.setdefault(name.removeprefix("minitune/"), []).append((e.start_ns(), e.end_ns()))
        self._events.sort()
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


# bytes of optimizer state per trainable parameter (tensors >= 4096 elements; bitsandbytes keeps
# 32-bit state for smaller ones)
_STATE_BYTES = {"adamw": 8, "adamw32bit": 8, "paged_adamw32bit": 8, "adamw8bit": 2, "paged_adamw8bit": 2,
                "lion8bit": 1, "paged_lion8bit": 1, "sgd": 0}
_SMALL_STATE_BYTES = {"adamw8bit": 8, "paged_adamw8bit": 8, "lion8bit": 4, "paged_lion8bit": 4}


def _cfg(config: Any, *names: str, default: int = 0) -> int:
    for n in names:
        v = getattr(config, n, None)
        if v:
            return int(v)
    return default


def estimate_peak(model: nn.Module, *, optimizer: str = "adamw", batch_size: int, seq_len: int,
                  gradient_checkpointing: bool = False, mixed_precision: str = "no",
                  trainable_dtype_bytes: int | None = None, logits_positions: int | None = None) -> dict[str, int]:
    """Predicted peak training memory, from the model's tensors and config shape (no data touched:
    the model may live on the meta device).

    Activations per transformer layer and token, in fp32 bytes (halved under bf16/fp16 autocast, or
    when most of the weights are 16-bit):
    9*h (saved inputs of the attention linears, q/k/v, norms, residuals) + 2*ffn (the MLP's up
    projection before and after the activation), i.e. the 17*h of Korthikanti et al. (2022) for
    ffn = 4h, + 2*heads*seq (attention scores and probabilities, when the kernel materializes them).
    A gated MLP (SwiGLU, T5's gated-gelu: a `gate_proj` / `wi_0` module) keeps 4*ffn: gate and up
    projections, the activation's output and the product. Each decoder layer of an encoder-decoder
    adds cross-attention: 4*h + 2*heads*seq. With checkpointing only each layer's input (h) is
    kept, plus one layer's full activations during its recompute. Logits (fp32) and their gradient
    add 2 * positions * vocab * 4 bytes, where positions is every token for the full loss and one
    chunk for the chunked loss.

    Args:
        model: the prepared model (quantized, LoRA-wrapped or not; may live on the meta device).
        optimizer: 'adamw' (two fp32 moments), 'adamw8bit' / 'paged_adamw8bit' (two 8-bit moments),
            'lion8bit' (one), 'sgd' (none): any name from `optimizer.name`.
        batch_size: micro-batch size.
        seq_len: tokens per example (source tokens for seq2seq; targets are counted as many).
        gradient_checkpointing: keep only each layer's input, recomputing in backward.
        mixed_precision: 'no', 'bf16' or 'fp16' (autocast halves activations).
        trainable_dtype_bytes: bytes per trainable element for gradients (default: the weights' own).
        logits_positions: positions whose logits exist at once (None: batch_size x seq_len; the
            chunked loss: its chunk, see `minitune.losses.live_logit_positions`).

    Returns:
        weights, trainable_weights, gradients, optimizer_state, activations, total (bytes).

    Raises:
        Nothing: an unknown optimizer name is counted as two fp32 moments (AdamW).
    """
    weights = trainable = trainable_params = 0
    small_trainable = 0
    half_elements = full_elements = 0  # floating weights in 16 and 32 bits
    seen: set[tuple[int, int]] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        weights += _nbytes(t)
        if t.is_floating_point():
            if t.element_size() == 2:
                half_elements += t.numel()
            else:
                full_elements += t.numel()
        if isinstance(t, nn.Parameter) and t.requires_grad:
            trainable += _nbytes(t)
            if t.numel() < 4096:
                small_trainable += t.numel()
            else:
                trainable_params += t.numel()
    grads = trainable if trainable_dtype_bytes is None else (trainable_params + small_trainable) * trainable_dtype_bytes
    per_param = _STATE_BYTES.get(optimizer, 8)
    state = trainable_params * per_param + small_trainable * _SMALL_STATE_BYTES.get(optimizer, per_param)

    config = getattr(model, "config", None)
    h = _cfg(config, "hidden_size", "d_model", "n_embd", default=0)
    layers = _cfg(config, "num_hidden_layers", "num_layers", "n_layer", default=0)
    decoder_layers = 0  # an encoder-decoder's decoder layers (with cross-attention)
    if model_kind(config) == "seq2seq":
        decoder_layers = _cfg(config, "num_decoder_layers", default=layers)
        layers += decoder_layers
    heads = _cfg(config, "num_attention_heads", "num_heads", "n_head", default=1)
    ffn = _cfg(config, "intermediate_size", "ffn_dim", "d_ff", "n_inner", default=4 * h)
    vocab = _cfg(config, "vocab_size", default=0)
    tokens = batch_size * seq_len
    # 16-bit activations under autocast, or when most weights are 16-bit (model.dtype=bfloat16/float16)
    act_bytes = 2 if mixed_precision in ("bf16", "fp16") or half_elements > full_elements else 4
    gated = any(name.rsplit(".", 1)[-1] in ("gate_proj", "wi_0", "w1") for name, _ in model.named_modules())
    scores = batch_size * heads * seq_len * seq_len * 2 * act_bytes  # attention scores and probabilities
    per_layer = tokens * (9 * h + (4 if gated else 2) * ffn) * act_bytes + scores
    cross = tokens * 4 * h * act_bytes + scores  # an encoder-decoder's decoder layers: cross-attention
    if gradient_checkpointing:
        activations = layers * tokens * h * act_bytes + per_layer + (cross if decoder_layers else 0)
    else:
        activations = layers * per_layer + decoder_layers * cross
    positions = tokens if logits_positions is None else min(tokens, logits_positions)
    activations += 2 * positions * vocab * 4  # fp32 logits and their gradient
    total = weights + grads + state + activations
    return {"weights": weights, "trainable_weights": trainable, "gradients": grads, "optimizer_state": state,
            "activations": activations, "total": total}
