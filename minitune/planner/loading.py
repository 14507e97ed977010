"""What loading the model holds at its peak, predicted per way of loading (`load_peak`): the
process's own memory while `model.load_model` runs, above the RSS it had before.

    preset or model.config_file   random init: the build replayed on the meta device under the
                                  ledger, every tensor the constructors allocate counted until it is
                                  freed (an output layer built, then tied to the input embedding,
                                  counts until the tie drops it). Quantized, the built model's state
                                  dict is read in place, so the build holds the peak.
    safetensors files             stored in the dtype the model loads in and not quantized: the tensors
                                  are views of the mapped file, the weights and no more. Converted:
                                  the file's pages, read once, beside the converted weights. Quantized:
                                  the file's pages (the quantized layers are far smaller).
    a GGUF file                   every tensor dequantized to float32 before the model takes it:
                                  4 bytes per parameter.
    anything else                 (.bin files, a hub id not in the local cache) the weights in the
                                  load dtype.

Checked: random init is exact in allocator bytes
(`tests/test_process_memory.py::test_load_peak_of_a_random_init_model_is_the_allocators_peak_while_it_loads`;
the memory grid's `peak_all_mb`, `python bench/memory_grid.py --parts grid`: opt-125m fp32 625.0 MiB,
flan-t5-small 419.1, bloom-560m 3,113.2, the same for their 8-bit and 4-bit loads). The rules for
files and GGUF are only checked for their arithmetic (`test_load_peak_of_a_safetensors_folder_...`),
not yet against a measured load by a benchmark.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import Config, resolve_path
from ..model import build_from_config
from .ledger import Ledger
from .simulation import planned_args

__all__ = ["LoadPeak", "load_peak"]

# safetensors' dtype names, for the dtypes a model loads in
_STORED = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class LoadPeak:
    """Bytes loading holds at its peak, and how the peak was reckoned."""

    bytes: int
    how: str


def _weight_files(name: str) -> list[Path]:
    """The safetensors files of a local folder or a hub id in the local cache (none: not found)."""
    path = Path(os.path.expanduser(resolve_path(name, "model.name_or_path")))
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.safetensors*"]))
        except Exception:  # not a hub id, or not cached: the caller falls back to the weights alone
            return []
    return sorted(path.glob("*.safetensors"))


def _stored_dtypes(files: list[Path]) -> set[str]:
    """The dtypes of the floating-point tensors in safetensors files (their headers: no data read)."""
    dtypes = set()
    for f in files:
        with safe_open(f, framework="pt") as fh:
            names = fh.keys()  # noqa: SIM118  (a safe_open handle is not iterable)
            dtypes |= {d for d in (fh.get_slice(k).get_dtype() for k in names) if d.startswith(("F", "BF"))}
    return dtypes


def load_peak(cfg: Config) -> LoadPeak:
    """The peak `load_model` reaches for the resolved `cfg` (bytes above the RSS before it starts).

    Raises:
        ModelError: the model's config cannot be read and no preset has its shapes.
    """
    args, _ = planned_args(cfg)
    uncached = bool(args.preset) and not cfg.model.preset  # a hub id planned from a preset's shapes
    ledger = Ledger(fake=False)
    with torch.device("meta"), ledger:
        model = build_from_config(args, seed=cfg.training.seed)
    built, weights = ledger.peak, ledger.live
    quantized = cfg.quantization.mode != "none"
    if uncached:
        return LoadPeak(weights, f"the weights in {args.dtype} ({cfg.model.name_or_path} is not cached: its files unknown)")
    if args.preset or args.config_file:
        return LoadPeak(built, f"random init in {args.dtype}: the build, tensors tying frees included")
    if args.gguf_file:
        params = sum(p.numel() for p in {id(t): t for t in model.parameters()}.values())
        return LoadPeak(4 * params, "GGUF: every tensor dequantized to float32 first")
    files = _weight_files(args.name_or_path)
    if not files:
        return LoadPeak(weights, f"the weights in {args.dtype} (no safetensors file found to read)")
    size = sum(f.stat().st_size for f in files)
    if quantized:
        return LoadPeak(size, "safetensors, quantized while read: the file's pages")
    if _stored_dtypes(files) <= {_STORED.get(args.dtype, "")}:
        return LoadPeak(weights, f"safetensors in {args.dtype}: views of the mapped file")
    return LoadPeak(size + weights, f"safetensors converted to {args.dtype}: the file's pages and the weights")
