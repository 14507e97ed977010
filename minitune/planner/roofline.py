"""The roofline of a training step: its FLOPs (counted by the simulation as it runs the step,
`Prediction.flops`), the bytes only memory bandwidth limits (dequantizing quantized weights, the
optimizer update: `memory_bytes`), and the device's peak for each: probed live on this machine
(`probe`), from the data sheet for a named GPU (`DATASHEETS`). `step_seconds` is the step at those
peaks: the least time it can take, what `minitune plan` prints and prices its advice with, and
what `bench/speed.py` measures runs against (achieved FLOP/s, the fraction of the peak).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Named GPUs: dense half-precision tensor FLOP/s (bf16, or fp16 where the card has no bf16),
# fp32 FLOP/s without tensor cores, memory bandwidth in bytes/s; NVIDIA's data sheets. The A10G
# (AWS's variant of the A10) has no NVIDIA data sheet of its own: no figure.
DATASHEETS: dict[str, tuple[float, float, float]] = {
    "T4": (65e12, 8.1e12, 320e9),
    "V100": (125e12, 15.7e12, 900e9),
    "L4": (121e12, 30.3e12, 300e9),
    "A100-40": (312e12, 19.5e12, 1555e9),
    "A100-80": (312e12, 19.5e12, 2039e9),
    "H100": (989e12, 67e12, 3350e9),
    "H200": (989e12, 67e12, 4800e9),
    "RTX4090": (165.2e12, 82.6e12, 1008e9),
}

# the probe's product: on CPU 2048 x 1024 @ 1024 x 4096, large enough for the matrix units to run at
# full speed, small enough to take a few milliseconds; a GPU needs 8192^3 to fill its tensor cores
_PROBE = {"cpu": (2048, 1024, 4096), "cuda": (8192, 8192, 8192)}


@dataclass(frozen=True)
class Peak:
    """What a device can do at best: matmul FLOP/s at the step's compute dtype and memory bandwidth."""

    flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    source: str  # how it was found: 'probed ...' or 'data sheet ...'


def half_precision(cfg: Any) -> bool:
    """Whether the step's matmuls run in 16 bits: 16-bit weights, autocast, or a 4-bit base with a
    16-bit compute dtype (an 8-bit base computes in its input's dtype: the other weights')."""
    return (cfg.model.dtype in ("bfloat16", "float16") or cfg.training.mixed_precision in ("bf16", "fp16")
            or (cfg.quantization.mode == "4bit" and cfg.quantization.compute_dtype in ("bfloat16", "float16")))


# bytes the update moves per trainable parameter (fp32), clipping's norm and scaling included (12):
# torch's AdamW, for-loop or for-each, runs weight decay (8), the first moment's lerp (12), the
# second's mul and addcmul (20), sqrt, division and eps for the denominator (24), and addcdiv into
# the weight (16); the fused kernel reads weight, gradient and both moments and writes three (28);
# bitsandbytes' 8-bit kernel the same with 1-byte moments (16)
_UPDATE_BYTES = {"adamw": 80 + 12, "fused": 28 + 12, "8bit": 16 + 12}


def memory_bytes(model: nn.Module, micro_batches: float, *, checkpointing: bool, optimizer: str,
                 fused: bool = False) -> float:
    """Bytes one optimizer step moves in memory-bound work: every quantized weight dequantized to 16
    bits for each pass over it (forward, backward, and the recomputed forward with checkpointing; per
    micro-batch): the packed weight read, the 16-bit copy written and read again; and the optimizer's
    update of each trainable parameter (`_UPDATE_BYTES`)."""
    passes = 2 + checkpointing
    dequantized = 0.0
    for module in model.modules():
        bits = {"Linear4bit": 4, "Linear8bitLt": 8}.get(type(module).__name__)
        if bits:
            dequantized += module.in_features * module.out_features * (bits / 8 + 4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    update = _UPDATE_BYTES["8bit" if "8bit" in optimizer else "fused" if fused else "adamw"]
    return micro_batches * passes * dequantized + trainable * update


def step_seconds(flops: float, moved: float, peak: Peak) -> float:
    """The step at the device's peaks: its FLOPs at the matmul peak plus its memory-bound bytes at
    the bandwidth (they run one after the other). A lower bound: real steps also pay per-operation
    overhead, elementwise work and matmuls too small for the peak (bench/speed.py measures how far)."""
    return flops / peak.flops + moved / peak.bandwidth


def peak_for(target: Any, half: bool) -> Peak | None:
    """The peak of a plan's target: this machine's CPU probed live, a named GPU from its data
    sheet, a CUDA device of this machine by the data sheet its name matches; None where no figure
    is known (Apple GPUs: Apple publishes none)."""
    if target.kind == "cpu":
        return probe("cpu", torch.bfloat16 if half else torch.float32)
    if target.kind != "cuda":
        return None
    name = target.name if target.name in DATASHEETS else datasheet_name(target.name)
    if name is None:
        return None
    half_flops, fp32_flops, bandwidth = DATASHEETS[name]
    return Peak(half_flops if half else fp32_flops, bandwidth,
                f"data sheet of the {name}: {'16-bit tensor' if half else 'fp32'} {(half_flops if half else fp32_flops) / 1e12:,.1f} "
                f"TFLOP/s, {bandwidth / 1e9:,.0f} GB/s")


def datasheet_name(device_name: str) -> str | None:
    """The DATASHEETS key a CUDA device name matches as a whole word ('NVIDIA H100 80GB HBM3' ->
    'H100', 'NVIDIA GeForce RTX 4090' -> 'RTX4090'; an L40S is not an L4), else None."""
    name = re.sub(r"RTX\s+", "RTX", device_name.upper())
    for key in DATASHEETS:
        model = key.split("-")[0]
        if re.search(rf"(?<![A-Z0-9]){model}(?![A-Z0-9])", name):
            if model == "A100":
                return "A100-80" if "80G" in name else "A100-40"
            return key
    return None


@functools.cache
def probe(device: str, dtype: torch.dtype) -> Peak:
    """This machine's peak, measured: the best of 5 timed products in `dtype` (after 3 warm-ups;
    CPU 2048 x 1024 @ 1024 x 4096, CUDA 8192^3), and the best of 5 copies of a 64 MiB tensor (read +
    write). Once per process (`probe.__wrapped__` measures again)."""
    m, k, n = _PROBE.get(device, _PROBE["cpu"])
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for i in range(8):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    flops = 2 * m * k * n / best
    src, dst = torch.empty(2**26, dtype=torch.uint8, device=device), torch.empty(2**26, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst.copy_(src)
    copy = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        copy = min(copy, time.perf_counter() - t0)
    bandwidth = 2 * src.numel() / copy
    name = str(dtype).removeprefix("torch.")
    return Peak(flops, bandwidth, f"probed on this {device.upper()}: {name} {m}x{k} @ {k}x{n} matmul "
                                  f"{flops / 1e9:,.0f} GFLOP/s, copy {bandwidth / 1e9:,.1f} GB/s")
