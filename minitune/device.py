"""The one place that knows what each device supports: CUDA, MPS or CPU.

Everything else asks this module (`capabilities`, `check`; the launch: `launch.py`) instead of branching
on device types, so the loop stays free of device and precision special cases.

What is supported where (with the installed torch and bitsandbytes):

    feature                    cuda                      mps                           cpu
    bf16 (weights, autocast)   compute capability >= 8   macOS 14+ and torch >= 2.6    yes
    fp16 autocast              yes                       torch >= 2.5                  no (Accelerate ignores it)
    bitsandbytes 8/4-bit       yes                       if bitsandbytes ships an      if bitsandbytes ships a
      layers                                             MPS backend                   CPU backend
    bitsandbytes 8-bit         yes                       if that backend has an        likewise
      optimizers                                         8-bit optimizer kernel
    paged optimizers           yes                       no: unpaged, one warning      no: unpaged, one warning

Precision `auto` (`choose_precision`, the default of model.dtype, training.mixed_precision and
quantization.compute_dtype): the fastest setting that is safe on the device.

    device                        LoRA / QLoRA: frozen weights, autocast   full fine-tuning: weights, autocast
    CUDA, compute capability >= 8 bfloat16, bf16                           float32, bf16
    CUDA below 8 (T4, V100)       float16, fp16 (+ GradScaler)             float32, fp16 (+ GradScaler)
    MPS                           bfloat16, bf16 where supported, else float16, fp16; float32 without either
    CPU with AVX512-BF16 or AMX   bfloat16, no autocast                    float32, no autocast
    other CPUs                    float32, no autocast                     float32, no autocast

LoRA adapters (and so their gradients and optimizer state) stay float32 whatever the frozen
weights are: peft upcasts them, and `check` refuses what would train half-precision weights with a
scaler or an optimizer that cannot handle them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["Capabilities", "DeviceChoice", "Precision", "capabilities", "check", "choose_precision", "optimizer_name_for",
           "resolve_device", "resolve_precision", "setup_device"]


@dataclass(frozen=True)
class Capabilities:
    """What a device can do for training."""

    device: torch.device
    bf16: bool  # bfloat16 weights and bf16 autocast
    fp16_autocast: bool
    bnb_layers: bool  # bitsandbytes 8-bit / 4-bit linear layers
    bnb_optimizers: bool  # bitsandbytes 8-bit optimizers
    paged_optimizers: bool  # paged (unified-memory) optimizer state: CUDA only
    fused_adamw: bool
    bnb_note: str = ""  # why bitsandbytes cannot run here (empty when it can)
    fast_bf16: bool = False  # bf16 matmuls run faster than fp32 (tensor cores, AVX512-BF16 / AMX)
    label: str = ""  # how reasons name the device (a planned device that is not this machine's)


def resolve_device(preference: str = "auto") -> torch.device:
    """The device a run uses, before the Accelerator exists (to check the config against it).

    'auto' is what Accelerate picks: CUDA (this process's GPU under `accelerate launch`), then
    MPS, then CPU. 'cpu' overrides an accelerator that is present.

    Raises:
        ValueError: the requested device does not exist on this machine.
    """
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        # Accelerate gives process `LOCAL_RANK` the GPU `LOCAL_RANK % device_count`
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if preference in ("auto", "mps") and _mps_available():
        return torch.device("mps")
    if preference == "cuda":
        raise ValueError("training.device=cuda but no CUDA device is visible; use training.device=auto or cpu")
    if preference == "mps":
        raise ValueError("training.device=mps but MPS is not available (needs Apple silicon and a torch built "
                         "with MPS); use training.device=auto or cpu")
    return torch.device("cpu")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _macos_at_least(major: int) -> bool:
    try:
        return bool(torch.backends.mps.is_macos_or_newer(major, 0))
    except Exception:  # not macOS, or a torch without the query
        return False


def _torch_at_least(major: int, minor: int) -> bool:
    found = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return found >= (major, minor)


def _bnb_version() -> str | None:
    """The installed bitsandbytes version, or None (read from metadata: importing it is slow)."""
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


@functools.cache
def bnb_backend(device_type: str) -> frozenset[str] | None:
    """Names of the ops the installed bitsandbytes implements for `device_type`, read from its
    `backends/<type>/ops.py` without importing it; None when it ships no backend for that device.

    bitsandbytes grew CPU and MPS backends release by release, so asking the installed files is
    exact where a version table would be a guess.
    """
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return None
    ops = Path(next(iter(spec.submodule_search_locations))) / "backends" / device_type / "ops.py"
    if not ops.is_file():
        return None
    return frozenset(re.findall(r"bitsandbytes::(\w+)", ops.read_text(encoding="utf-8")))


def fused_adamw_devices() -> set[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # private: may be absent

        return set(_get_fused_kernels_supported_devices())
    except Exception:  # pragma: no cover - older or newer torch without the helper
        return {"cuda"}


def capabilities(device: torch.device | str) -> Capabilities:
    """Capabilities of `device` with the installed torch and bitsandbytes."""
    device = torch.device(device)
    version = _bnb_version()
    fused = device.type in fused_adamw_devices()
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        bnb = version is not None
        return Capabilities(device, bf16=major >= 8, fp16_autocast=True, bnb_layers=bnb, bnb_optimizers=bnb,
                            paged_optimizers=bnb, fused_adamw=fused,
                            bnb_note="" if bnb else "bitsandbytes is not installed (pip install bitsandbytes)",
                            fast_bf16=major >= 8)
    if device.type == "mps":
        # bf16 on MPS needs macOS 14; Accelerate asks torch >= 2.6 for bf16 and >= 2.5 for fp16 autocast
        bf16 = _macos_at_least(14) and _torch_at_least(2, 6)
        fp16 = _torch_at_least(2, 5)
        fast = bf16
    else:
        # CPU: bf16 autocast works; Accelerate silently ignores fp16 autocast on CPU
        bf16, fp16 = True, False
        fast = _cpu_has_fast_bf16()
    ops = bnb_backend(device.type) if version is not None else None
    layers = ops is not None
    optimizers = layers and "optimizer_update_8bit_blockwise" in ops
    if version is None:
        note = "bitsandbytes is not installed (pip install bitsandbytes)"
    elif not layers:
        note = f"bitsandbytes {version} has no {device.type.upper()} backend (upgrade bitsandbytes)"
    elif not optimizers:
        note = f"bitsandbytes {version} has no 8-bit optimizer kernel for {device.type.upper()}"
    else:
        note = ""
    return Capabilities(device, bf16=bf16, fp16_autocast=fp16, bnb_layers=layers, bnb_optimizers=optimizers,
                        paged_optimizers=False, fused_adamw=fused, bnb_note=note, fast_bf16=fast)


def _cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls ~3.8x faster than fp32 here (2048x1024 @ 1024x4096: 785 vs
    207 GFLOP/s); without them bf16 is emulated and slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(cpu, probe)():
                return True
        except Exception:  # a torch without the probe
            continue
    return False


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in, with the reason shown to the user."""

    dtype: str  # model.dtype: the non-quantized (frozen, or full fine-tuning) weights
    mixed_precision: str  # training.mixed_precision: Accelerate's autocast ('no', 'bf16', 'fp16')
    compute_dtype: str  # quantization.compute_dtype: what 4-bit layers compute in
    reason: str

    def describe(self) -> str:
        """One line: what was chosen and why."""
        return (f"model.dtype={self.dtype} training.mixed_precision={self.mixed_precision} "
                f"quantization.compute_dtype={self.compute_dtype} ({self.reason})")


def choose_precision(caps: Capabilities, *, full_finetune: bool = False) -> Precision:
    """What `auto` means on a device: the fastest precision that is safe there (table in the module
    docstring). Full fine-tuning keeps float32 weights (its updates would round away in 16 bits)
    and gets the speed from autocast where the device has it.

    Args:
        caps: the device's capabilities (`capabilities(device)`).
        full_finetune: every weight trains (lora.enabled=false).

    Returns:
        The Precision, with the reason for it.
    """
    kind = caps.device.type
    where = caps.label or _describe(caps.device)
    if kind in ("cuda", "mps") and caps.bf16:
        half, autocast, why = "bfloat16", "bf16", f"{where} has bf16"
    elif kind in ("cuda", "mps") and caps.fp16_autocast:
        half, autocast, why = "float16", "fp16", f"{where} has no bf16: fp16 with a GradScaler"
    elif kind == "cpu" and caps.fast_bf16:
        # bf16 weights: 3.2x fp32's tokens/s on bloom-560m LoRA 8x256 (bench/results/precision-cpu-*).
        # bf16 autocast over fp32 weights was slower than fp32 on the default job; over bf16 weights it
        # measured faster once on bloom (busy machine), and within the run-to-run spread on the default
        # job (quiet: 311 vs 292 tok/s, precision-cpu-2026-12-01-default-chat): not clearly worth it yet.
        half, autocast, why = "bfloat16", "no", "this CPU has AVX512-BF16/AMX: bf16 weights, no autocast"
    else:
        return Precision("float32", "no", "float32", f"{where} has no fast 16-bit matmuls")
    if full_finetune:
        return Precision("float32", autocast, half if autocast != "no" else "float32",
                         f"{why}; full fine-tuning keeps float32 weights"
                         + (f" under {autocast} autocast" if autocast != "no" else ""))
    return Precision(half, autocast, half, f"{why}; LoRA adapters stay float32")


_HALF = {"bf16": "bfloat16", "fp16": "float16"}  # autocast mode -> its dtype


def resolve_precision(cfg: Any, device: torch.device | str, caps: Capabilities | None = None) -> tuple[Any, Precision]:
    """`cfg` with every 'auto' precision field replaced by `choose_precision`'s value for `device`.

    Settings the user gave explicitly are kept; the 4-bit compute dtype follows the 16-bit dtype the
    run uses (the weights', else the autocast's), else float32.

    Args:
        cfg: a minitune Config (not modified).
        device: the device the run will use.
        caps: its capabilities, when it is not this machine's (`minitune.planner` plans for a T4 here).

    Returns:
        (resolved copy of cfg, the Precision that was applied, with its reason).
    """
    auto = choose_precision(caps or capabilities(device), full_finetune=not cfg.lora.enabled)
    m, t, q = cfg.model, cfg.training, cfg.quantization
    # an 'auto' field never brings a second 16-bit format next to one the user set (config/checks.py
    # refuses bf16 and fp16 together: CPU autocast cannot even promote between them)
    if m.dtype != "auto":
        dtype = m.dtype
    elif t.mixed_precision in _HALF:
        dtype = _HALF[t.mixed_precision] if auto.dtype != "float32" and cfg.lora.enabled else "float32"
    else:
        dtype = auto.dtype
    if t.mixed_precision != "auto":
        mixed = t.mixed_precision
    elif dtype != "float32" and auto.mixed_precision != "no":
        mixed = {v: k for k, v in _HALF.items()}[dtype]
    else:
        mixed = auto.mixed_precision
    if q.compute_dtype != "auto":
        compute = q.compute_dtype
    elif dtype != "float32":
        compute = dtype
    else:
        compute = _HALF.get(mixed, "float32")
    given = [f"{k}={v}" for k, v in (("model.dtype", m.dtype), ("training.mixed_precision", t.mixed_precision))
             if v != "auto"]
    reason = auto.reason if not given else f"{', '.join(given)} as configured; auto: {auto.reason}"
    chosen = Precision(dtype, mixed, compute, reason)
    resolved = dataclasses.replace(
        cfg, model=dataclasses.replace(m, dtype=dtype), training=dataclasses.replace(t, mixed_precision=mixed),
        quantization=dataclasses.replace(q, compute_dtype=compute))
    return resolved, chosen


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"this CUDA device (compute capability {major}.{minor})"
    return device.type


def check(cfg: Any, device: torch.device | str) -> tuple[list[str], list[str]]:
    """Problems (fatal) and notes (warnings) for running `cfg` on `device`, before anything loads.

    The only fallback is a paged optimizer running unpaged off CUDA (a note); every other request
    the device cannot honour is a problem naming the fix.

    Args:
        cfg: a minitune Config.
        device: the device the run will use (see `resolve_device`).

    Returns:
        (problems, notes): one line each.
    """
    caps = capabilities(device)
    where = _describe(caps.device)
    problems: list[str] = []
    notes: list[str] = []
    mp = cfg.training.mixed_precision
    if mp == "bf16" and not caps.bf16:
        problems.append(f"training.mixed_precision=bf16 is not supported on {where}; use fp16 or no")
    if mp == "fp16" and not caps.fp16_autocast:
        problems.append(f"training.mixed_precision=fp16 would be silently ignored on {where} (no fp16 autocast "
                        "there: it would train in fp32); use bf16 or no")
    quantized = cfg.quantization.mode != "none"
    for name, value in (("model.dtype", cfg.model.dtype),
                        ("quantization.compute_dtype", cfg.quantization.compute_dtype if quantized else None)):
        if value == "bfloat16" and not caps.bf16:
            problems.append(f"{name}=bfloat16 is not supported on {where}; use float16 or float32")
    if cfg.model.dtype == "float16" and not cfg.lora.enabled:
        problems.append("model.dtype=float16 with full fine-tuning (lora.enabled=false): fp16 weights cannot be "
                        "trained (AdamW's updates underflow and the fp16 GradScaler refuses fp16 gradients); use "
                        "model.dtype=float32 with training.mixed_precision=fp16 (or bf16), or enable LoRA")
    if quantized and not caps.bnb_layers:
        problems.append(f"quantization.mode={cfg.quantization.mode} needs bitsandbytes layers, which cannot run on "
                        f"{where}: {caps.bnb_note}; or set quantization.mode=none")
    opt = optimizer_name_for(cfg.optimizer.name, caps.device)
    if opt not in ("adamw", "sgd") and not caps.bnb_optimizers:
        problems.append(f"optimizer.name={cfg.optimizer.name} needs bitsandbytes optimizers, which cannot run on "
                        f"{where}: {caps.bnb_note}; or use optimizer.name=adamw")
    elif opt != cfg.optimizer.name:
        notes.append(f"optimizer.name={cfg.optimizer.name}: paged optimizers need CUDA; on {where} it runs "
                     f"unpaged ({opt})")
    if cfg.optimizer.fused and cfg.optimizer.name == "adamw" and not caps.fused_adamw:
        notes.append(f"optimizer.fused=true: torch has no fused AdamW for {where}; using the default implementation")
    return problems, notes


def optimizer_name_for(name: str, device: torch.device | str) -> str:
    """The optimizer that actually runs: paged ones fall back to unpaged where paging is impossible."""
    if name.startswith("paged_") and not capabilities(device).paged_optimizers:
        return name.removeprefix("paged_")
    return name


def warn_all(notes: list[str]) -> None:
    """Emit each note once as a UserWarning."""
    for note in notes:
        warnings.warn(note, stacklevel=2)


@dataclass
class DeviceChoice:
    """Where a run trains and in what precision (`setup_device`)."""

    device: torch.device
    precision: Precision  # what 'auto' chose, and why
    notes: list[str]  # warnings to show (e.g. a paged optimizer running unpaged)


def setup_device(cfg: Any) -> tuple[Any, DeviceChoice]:
    """The device the config runs on and the precision it trains in there, checked against what the
    config asks for (before anything loads).

    Args:
        cfg: a validated Config (training.device, precision settings, quantization, optimizer).

    Returns:
        (cfg with every 'auto' precision resolved for the device (`cfg` is not modified), DeviceChoice).

    Raises:
        ConfigError: the device does not exist, or cannot honour the config (dtype, bitsandbytes, ...).
    """
    try:
        device = resolve_device(cfg.training.device)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    cfg, precision = resolve_precision(cfg, device)  # 'auto' -> this device's choice; saved as resolved
    problems, notes = check(cfg, device)
    if problems:
        raise ConfigError(problems)
    if device.type == "cpu" and (note := cpu_threads_note()):
        notes = [*notes, note]
    return cfg, DeviceChoice(device, precision, notes)


def cpu_threads_note() -> str | None:
    """Why a one-process CPU run computes on one core of several, or None.

    `accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1 for the process it starts (so torch
    uses one thread) unless it is given `--num_cpu_threads_per_process N` or OMP_NUM_THREADS is set:
    `time make train` on a 2-core CPU ran the default job at 95 tokens/s on one thread and at 120 with both cores
    (2026-12-05). The setting may be the user's, so it is reported, not changed.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ  # set by `accelerate launch` for what it starts
    if not launched or os.environ.get("OMP_NUM_THREADS") != "1" or torch.get_num_threads() != 1:
        return None
    share = cores // max(processes, 1)
    if share < 2:
        return None
    return (f"torch computes on 1 thread of the {share} cores this process could use: `accelerate launch` sets "
            f"OMP_NUM_THREADS=1 on CPU unless told otherwise; pass `--num_cpu_threads_per_process {share}` "
            "(or set OMP_NUM_THREADS) to use them")


