"""Merging: a LoRA adapter merged into a standalone transformers model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import EvalError


def _is_bnb_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def merge_adapter(model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None) -> Path:
    """Merge a LoRA adapter into its base and save a standalone transformers model.

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` (or the seq2seq class),
    without peft. peft's ``merge_and_unload`` folds the adapter into the base weights *in place*:
    `model` is not usable as a peft model afterwards. A base loaded from GGUF refuses
    ``save_pretrained`` (transformers marks it not serializable), so its merged weights are moved
    into a model built ``from_config`` with the same config and saved from there.

    Args:
        model: a peft model (LoRA) on an unquantized base.
        out_dir: the folder to write (created; must be empty if it exists).
        tokenizer: saved beside the weights when given.

    Returns:
        `out_dir`.

    Raises:
        EvalError: `model` has no adapter, its base is 8/4-bit quantized (merge into an
            unquantized copy of the base instead), or `out_dir` is not empty.
    """
    out = Path(out_dir)
    if not hasattr(model, "merge_and_unload"):
        raise EvalError("merging needs a LoRA checkpoint: a full fine-tuning checkpoint already is a standalone model")
    if _is_bnb_quantized(model.get_base_model()):
        raise EvalError("cannot merge into an 8-bit/4-bit base: load the base unquantized, attach the adapter, and merge that")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvalError(f"--merge-to '{out}' exists and is not an empty folder: choose a new folder")
    merged = model.merge_and_unload()
    quantizer = getattr(merged, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_serializable():
        # GGUF: the weights are plain (dequantized) tensors, but save_pretrained refuses the model.
        config = copy.deepcopy(merged.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dtype = next(merged.parameters()).dtype
        standalone = type(merged)._from_config(config, dtype=dtype)
        standalone.load_state_dict(merged.state_dict(), strict=True)
        if getattr(merged, "generation_config", None) is not None:
            standalone.generation_config = copy.deepcopy(merged.generation_config)
        merged = standalone
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
