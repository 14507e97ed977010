"""What loading the model holds at its peak, predicted per way of loading (`load_peak`): the
process's own memory while `model.load_model` runs, above the RSS it had before.

    preset or model.config_file   random init: the build replayed on the meta device under the
                                  ledger: the model is built on the meta device and then given one
                                  tensor per parameter and buffer (`model.finish_build`), which the
                                  ledger counts. Quantized, each block is made when the loader reads
                                  it and freed once quantized (`random_init.UnitBuild`): the quantized
                                  model, one block's weights before quantizing, one layer's quantizing.
    safetensors files             stored in the dtype the model loads in and not quantized: the tensors
                                  are views of the mapped file, the weights and no more. Converted:
                                  the file's pages, read once, beside the converted weights. Quantized:
                                  the file's pages (the quantized layers are far smaller).
    a GGUF file                   every tensor dequantized to float32 before the model takes it:
                                  4 bytes per parameter.
    anything else                 (.bin files, a hub id not in the local cache) the weights in the
                                  load dtype.

Checked: random init is exact in allocator bytes but for the init's own few-byte temporaries, and
quantized within 0.5% on tiny models
(`tests/test_process_memory.py::test_load_peak_of_a_random_init_model_is_the_allocators_peak_while_it_loads`);
at full size, `python bench/memory_grid.py --parts grid` puts `predicted_loading_mb` beside
loading's own allocator peak `peak_load_mb` (bench/results/cpu-2026-12-05-blockwise.csv: every
unquantized cell to the byte; quantized, opt-125m -0.01% and -0.06% (where the quantizing constants
were measured), bloom-560m and flan-t5-small within 0.03%). The rules for
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
from ..model import DTYPES, construct, finish_build
from ..random_init import unit_of_names
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


# bytes per weight of the layer being quantized that bitsandbytes' CPU quantization holds on top of
# its weights before and after (its fp16 copy and row statistics for 8-bit, the blocks for 4-bit):
# fitted to opt-125m's loading peak in the CPU allocator's trace, not derived (`peak_load_mb` beside
# `predicted_loading_mb` in `python bench/memory_grid.py --parts grid`; out of sample, bloom-560m and
# flan-t5-small: within 0.03%, bench/results/cpu-2026-12-05-blockwise.csv)
QUANTIZE_TRANSIENT = 10  # the same for 8-bit and 4-bit (two fitted constants came out equal)


def _quantized_layers(cfg: Config, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Of the layers bitsandbytes quantizes for `cfg` (the planner's meta model: transformers' own
    choice): (bytes of their weights in `dtype`, bytes of the quantized weights and their state, the
    most that one block's layers hold in `dtype` beyond their quantized form, weights of the largest
    layer)."""
    from .simulation import meta_model
    from .standins import QuantizedLinear, is_bnb_layer

    def make(shape: tuple, kind: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=kind, device="meta")

    model = meta_model(cfg)[0]
    named = dict(model.named_modules())
    units = unit_of_names(model, named)
    unquantized, packed, largest = 0, 0, 0
    per_block: dict[int, int] = {}
    for name, module in named.items():
        bits = is_bnb_layer(module)
        if bits:
            q = QuantizedLinear(module, bits, make)
            size = q.in_features * q.out_features * dtype.itemsize
            small = q.weight.nbytes + q.quant_state.nbytes
            unquantized, packed = unquantized + size, packed + small
            per_block[units[name]] = per_block.get(units[name], 0) + size - small
            largest = max(largest, q.in_features * q.out_features)
    return unquantized, packed, max(per_block.values(), default=0), largest


def load_peak(cfg: Config) -> LoadPeak:
    """The peak `load_model` reaches for the resolved `cfg` (bytes above the RSS before it starts).

    Raises:
        ModelError: the model's config cannot be read and no preset has its shapes.
    """
    args, _ = planned_args(cfg)
    uncached = bool(args.preset) and not cfg.model.preset  # a hub id planned from a preset's shapes
    model = construct(args)  # the modules, on the meta device: no memory
    head = model.get_output_embeddings()

    def tied() -> bool:
        return head is not None and head.weight is model.get_input_embeddings().weight

    tied_before = tied()
    ledger = Ledger(fake=False)
    with torch.device("meta"), ledger:
        finish_build(model, args, seed=cfg.training.seed)  # the tensors the build allocates
    built, weights = ledger.peak, ledger.live
    # an output layer the build unties (flan-t5's): made after a quantized load, from the embedding
    untied = head.weight.nbytes if tied_before and not tied() else 0
    quantized = cfg.quantization.mode != "none"
    if uncached:
        return LoadPeak(weights, f"the weights in {args.dtype} ({cfg.model.name_or_path} is not cached: its files unknown)")
    if args.preset or args.config_file:
        if quantized:
            unquantized, packed, block, largest = _quantized_layers(cfg, DTYPES[args.dtype])
            transient = QUANTIZE_TRANSIENT * largest
            final = weights - unquantized + packed
            return LoadPeak(max(final - untied + block + transient, final),
                            f"random init in {args.dtype}, quantized block by block: the quantized model, "
                            "one block's weights before quantizing, one layer's quantizing")
        return LoadPeak(built, f"random init in {args.dtype}: the build, one tensor per parameter")
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
