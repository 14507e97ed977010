"""The devices a plan can target: named GPUs and Macs from their data sheets, this machine read live,
and memory sizes as people write them ("12GiB")."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..device import Capabilities, capabilities
from ..errors import ConfigError
from ..process_memory import format_bytes

GiB = 2**30


MiB = 2**20


@dataclass(frozen=True)
class Target:
    """A device to plan for: its memory, the budget a run may use, and what it can do."""

    name: str
    kind: str  # 'cuda', 'mps' or 'cpu'
    memory: int  # bytes the device has
    budget: int  # bytes a run's process may use (see `DEVICES`)
    caps: Capabilities
    note: str = ""  # where the budget comes from
    capability: tuple[int, int] | None = None  # CUDA compute capability (cuBLAS's workspace size)


# CUDA: the card's memory as sold, all of it the budget; the CUDA context, cuBLAS workspaces and the
# caching allocator's unused blocks (none of which max_memory_allocated counts) are a term of the
# process peak (`process_memory.process_peak`), not a cut from the budget.
# Apple: unified memory; Metal lets one process use `recommendedMaxWorkingSetSize` of it, which
# macOS sets to about 2/3 of the RAM on 16 GB machines and 3/4 above (read live with --device mps).
_CUDA = {  # name: (GB, bf16)
    "T4": (16, False), "V100": (16, False), "A10G": (24, True), "L4": (24, True), "A100-40": (40, True),
    "A100-80": (80, True), "H100": (80, True), "RTX4090": (24, True),
}


_CAPABILITY = {"T4": (7, 5), "V100": (7, 0), "A10G": (8, 6), "L4": (8, 9), "A100-40": (8, 0), "A100-80": (8, 0),
               "H100": (9, 0), "RTX4090": (8, 9)}


_APPLE = {"M4-16": 16, "M4-24": 24}


DEVICES = (*_CUDA, *_APPLE, "cpu", "mps")


def _cuda_caps(name: str, bf16: bool) -> Capabilities:
    return Capabilities(torch.device("cuda"), bf16=bf16, fp16_autocast=True, bnb_layers=True, bnb_optimizers=True,
                        paged_optimizers=True, fused_adamw=True, fast_bf16=bf16,
                        label=f"a {name}")


def _apple_caps(name: str) -> Capabilities:
    mps = capabilities("mps")
    return dataclasses.replace(mps, bf16=True, fp16_autocast=True, fast_bf16=True, label=f"an Apple {name} (MPS)")


def _cpu_memory() -> tuple[int, int]:
    """(total, available) RAM of this machine, from /proc/meminfo (else psutil)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        import psutil  # off Linux

        vm = psutil.virtual_memory()
        return vm.total, vm.available


def target(name: str, budget: int | None = None) -> Target:
    """The Target called `name` (one of `DEVICES`), its budget overridden by `budget` bytes if given.

    Raises:
        ConfigError: an unknown device name (the message lists the known ones), or --device mps on
            a machine without MPS.
    """
    key = {k.lower(): k for k in DEVICES}.get(name.lower())
    if key in _CUDA:
        gb, bf16 = _CUDA[key]
        memory = gb * 10**9
        t = Target(key, "cuda", memory, memory, _cuda_caps(key, bf16), f"{gb} GB as sold", _CAPABILITY[key])
    elif key in _APPLE:
        memory = _APPLE[key] * GiB
        share = 2 / 3 if _APPLE[key] <= 16 else 3 / 4
        t = Target(key, "mps", memory, int(memory * share), _apple_caps(key),
                   f"unified memory: Metal's recommended working set, about {share:.0%} of {_APPLE[key]} GB")
    elif key == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(["--device mps: this machine has no MPS device; name an Apple model instead "
                               f"({', '.join(_APPLE)}) or give --budget"])
        total = int(torch.mps.recommended_max_memory())
        t = Target("mps", "mps", total, total, capabilities("mps"),
                   "this Mac: torch.mps.recommended_max_memory()")
    elif key == "cpu":
        total, available = _cpu_memory()
        t = Target("cpu", "cpu", total, available, capabilities("cpu"), "this machine: RAM available now")
    else:
        raise ConfigError([f"unknown device '{name}': choose one of {', '.join(DEVICES)}, or give --budget (e.g. 12GiB)"])
    if budget is not None:
        t = dataclasses.replace(t, budget=budget, note=f"--budget {format_bytes(budget)}")
    return t


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'12GiB', '16 GB', '800MiB', '2.5g' -> bytes (GB = 10**9, GiB = 2**30).

    Raises:
        ConfigError: not a size, or not positive.
    """
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    size = float(m.group(1)) * _UNITS[unit] if m and unit in _UNITS else 0.0
    if not 1 <= size < 2**62:  # no unit we know, zero, or more bytes than any machine (and than an int64)
        shown = text if len(str(text)) <= 40 else f"{str(text)[:30]}... ({len(str(text))} characters)"
        raise ConfigError([f"--budget '{shown}' is not a memory size: write it like 12GiB, 16GB or 800MiB"])
    return int(size)
