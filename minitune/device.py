"""The one place that knows what each device supports: CUDA, MPS or CPU.

Everything else asks this module (`capabilities`, `check`) instead of branching on device types,
so the loop stays free of device and precision special cases.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Capabilities", "capabilities", "check", "resolve_device"]


@dataclass(frozen=True)
class Capabilities:
    """What a device can do for training."""

    device: torch.device
    bf16: bool
    fp16_autocast: bool
    bnb_layers: bool  # bitsandbytes 8-bit / 4-bit linear layers
    bnb_optimizers: bool  # bitsandbytes 8-bit optimizers
    paged_optimizers: bool  # paged (unified-memory) optimizer state: CUDA only
    fused_adamw: bool


def resolve_device(preference: str = "auto") -> torch.device:
    """The device a run uses: 'auto' is what Accelerate would pick (CUDA, then MPS, then CPU).

    Raises:
        ValueError: the requested device does not exist on this machine.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device=cuda but no CUDA device is visible; use training.device=auto or cpu")
    if preference == "mps" and not _mps_available():
        raise ValueError("training.device=mps but MPS is not available; use training.device=auto or cpu")
    return torch.device(preference)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _bnb_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb_version() -> tuple[int, ...]:
    from importlib.metadata import version

    try:
        return tuple(int(x) for x in version("bitsandbytes").split(".")[:2])
    except Exception:  # pragma: no cover - odd version strings
        return (0, 0)


def capabilities(device: torch.device | str) -> Capabilities:
    """Capabilities of `device` with the installed torch and bitsandbytes."""
    device = torch.device(device)
    bnb = _bnb_installed()
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return Capabilities(device, bf16=major >= 8, fp16_autocast=True, bnb_layers=bnb,
                            bnb_optimizers=bnb, paged_optimizers=bnb, fused_adamw=True)
    if device.type == "mps":
        # bitsandbytes gained an MPS backend only in recent releases; older ones cannot run there.
        bnb_mps = bnb and _bnb_version() >= (0, 49)
        return Capabilities(device, bf16=True, fp16_autocast=True, bnb_layers=bnb_mps,
                            bnb_optimizers=bnb_mps, paged_optimizers=False, fused_adamw=True)
    # CPU: bf16 autocast works; fp16 autocast is silently ignored by Accelerate; bitsandbytes
    # >= 0.45 runs its 8-bit optimizers and 8/4-bit layers on CPU; paging needs CUDA unified memory.
    bnb_cpu = bnb and _bnb_version() >= (0, 45)
    return Capabilities(device, bf16=True, fp16_autocast=False, bnb_layers=bnb_cpu,
                        bnb_optimizers=bnb_cpu, paged_optimizers=False, fused_adamw=False)


def check(cfg, device: torch.device | str) -> tuple[list[str], list[str]]:
    """Problems (fatal) and warnings for running `cfg` on `device`, before anything loads.

    Args:
        cfg: a minitune Config.
        device: the device the run will use.

    Returns:
        (problems, warnings): one line each, naming the fix.
    """
    caps = capabilities(device)
    kind = caps.device.type
    problems: list[str] = []
    notes: list[str] = []
    mp = cfg.training.mixed_precision
    if mp == "bf16" and not caps.bf16:
        problems.append(f"training.mixed_precision=bf16 is not supported on this {kind} device; use fp16 or no")
    if mp == "fp16" and not caps.fp16_autocast:
        problems.append(f"training.mixed_precision=fp16 would be silently ignored on {kind} (no fp16 autocast); "
                        "use bf16 or no")
    for name in ("model.dtype", "quantization.compute_dtype"):
        section, key = name.split(".")
        if getattr(getattr(cfg, section), key) == "bfloat16" and not caps.bf16:
            problems.append(f"{name}=bfloat16 is not supported on this {kind} device; use float16 or float32")
    if cfg.quantization.mode != "none" and not caps.bnb_layers:
        problems.append(f"quantization.mode={cfg.quantization.mode} needs bitsandbytes layers, which cannot run on "
                        f"{kind} with the installed bitsandbytes; set quantization.mode=none")
    opt = cfg.optimizer.name
    if opt != "adamw" and opt != "sgd" and not caps.bnb_optimizers:
        problems.append(f"optimizer.name={opt} needs bitsandbytes optimizers, which cannot run on {kind}; "
                        "use optimizer.name=adamw")
    if opt.startswith("paged_") and not caps.paged_optimizers:
        notes.append(f"optimizer.name={opt}: paged optimizers need CUDA; on {kind} it runs unpaged "
                     f"({opt.removeprefix('paged_')})")
    if cfg.optimizer.fused and not caps.fused_adamw:
        notes.append(f"optimizer.fused=true: no fused AdamW on {kind}; using the default implementation")
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
