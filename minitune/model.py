"""Load a model and tokenizer, and quantize it (preparing it for training: minitune/prepare.py).

    load_tokenizer, load_model (from the hub, a folder, a GGUF file, a preset or a config.json),
    model_config, resolve_kind, quantization_config, build_from_config
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

from .config import DTYPES as DTYPE_NAMES
from .config import Config, ModelArgs, QuantizationArgs, looks_like_path, resolve_path
from .device import resolve_precision
from .errors import ModelError
from .lm import ensure_pad_token, model_kind
from .presets import PRESETS, preset_config
from .random_init import UnitBuild, build_units

__all__ = [
    "load_model",
    "load_tokenizer",
    "model_config",
    "model_kind",
    "resolve_kind",
]

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names the config accepts, as torch dtypes


def _offline_hint(what: str, name: str, err: Exception) -> ModelError:
    """The error for a model or tokenizer that did not load: a path that does not exist, a hub id
    that is not cached offline, or what the loader said."""
    if not os.path.exists(name) and looks_like_path(name):
        return ModelError(f"{what} '{name}' does not exist (relative paths start from {os.getcwd()}): check the "
                          "path, or give a hub id such as owner/name")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not os.path.exists(name) and "/" in name and offline:
        return ModelError(f"{what} '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                          "download it once online or give a local folder")
    return ModelError(f"cannot load {what} '{name}': {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def load_tokenizer(args: ModelArgs) -> Any:
    """The tokenizer named by `model.tokenizer`, else the one beside the model.

    Args:
        args: the config's model section (`model.tokenizer`, `model.name_or_path`, `model.gguf_file`).

    Returns:
        A transformers tokenizer with a pad token (the EOS token where it had none).

    Raises:
        ModelError: nothing to load it from, or it cannot be loaded.
    """
    name = args.tokenizer or args.name_or_path
    if not name:
        raise ModelError("set model.tokenizer: a model built from a preset or config file has no tokenizer of its own")
    name = resolve_path(name, "model.tokenizer" if args.tokenizer else "model.name_or_path")
    try:
        kwargs = {"gguf_file": args.gguf_file} if (args.gguf_file and not args.tokenizer) else {}
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is missing
        raise _offline_hint("tokenizer", name, e) from None
    ensure_pad_token(tok)  # causal tokenizers often have none; padding is masked out of the loss
    return tok


def _auto_class(kind: str) -> Any:
    return transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM


def quantization_config(q: QuantizationArgs) -> Any:
    """transformers.BitsAndBytesConfig for the quantization section (None when mode is 'none')."""
    if q.mode == "none":
        return None
    skip = list(q.skip_modules) or None
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        llm_int8_skip_modules=skip,
    )


def model_config(args: ModelArgs) -> Any:
    """The transformers config of the model section (a preset, `model.config_file`, or the model's
    own config), without loading weights.

    Raises:
        ModelError: an unknown preset, or a config that cannot be read (offline, missing files).
    """
    if args.preset:
        try:
            return preset_config(args.preset)
        except KeyError as e:
            raise ModelError(str(e.args[0])) from None
    if args.config_file and not os.path.isfile(args.config_file):
        where = "is a folder, not a file" if os.path.isdir(args.config_file) else "does not exist"
        raise ModelError(f"model.config_file '{args.config_file}' {where}: give the path of a model's config.json")
    path = args.config_file or resolve_path(args.name_or_path, "model.name_or_path")
    extra = {"gguf_file": args.gguf_file} if args.gguf_file and not args.config_file else {}
    gguf = os.path.join(path, args.gguf_file) if extra and os.path.isdir(path) else None
    if gguf and os.path.isfile(gguf):
        stat = os.stat(gguf)
        key = (gguf, stat.st_size, stat.st_mtime_ns, args.trust_remote_code)
        if key not in _GGUF_CONFIGS:
            _GGUF_CONFIGS.clear()  # one file at a time: a process loads one model
            _GGUF_CONFIGS[key] = _read_config(args, path, extra)
        return copy.deepcopy(_GGUF_CONFIGS[key])  # callers may change theirs (use_cache, ...)
    return _read_config(args, path, extra)


# A GGUF file's config is parsed from its whole metadata (the tokenizer's vocabulary and merges too):
# seconds each time. A run asks for it from the planner, the loader and the evaluator: it is read once.
_GGUF_CONFIGS: dict[tuple, Any] = {}


def _read_config(args: ModelArgs, path: str, extra: dict) -> Any:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code, **extra)
    except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is missing
        if args.config_file:
            raise ModelError(f"model.config_file '{path}' is not a model config transformers can read "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        raise _offline_hint("model", path, e) from None


def resolve_kind(args: ModelArgs, config: Any = None) -> str:
    """'causal' or 'seq2seq': `model.kind`, or (when 'auto') what the model's config says.

    Args:
        args: the model section.
        config: its transformers config if already at hand (else read with `model_config`).

    Returns:
        'causal' or 'seq2seq'.

    Raises:
        ModelError: the config cannot be read.
    """
    if args.kind != "auto":
        return args.kind
    return model_kind(config if config is not None else model_config(args))


def _untie_lm_head_if_configured(model: nn.Module, args: ModelArgs) -> None:
    """T5 v1.1 / flan-t5 have an lm_head separate from the shared embedding; transformers 5 ties it
    regardless of `tie_word_embeddings`, which would lose 16M parameters on flan-t5-small."""
    if not args.preset or PRESETS[args.preset][1].get("tie_word_embeddings", True):
        return
    if model_kind(model.config) != "seq2seq":
        return
    keys = getattr(model, "_tied_weights_keys", None) or {}
    model._tied_weights_keys = {k: v for k, v in keys.items() if not k.startswith("lm_head")}
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())


def _without_auto(args: ModelArgs, quant: QuantizationArgs,
                  device: torch.device | str | None) -> tuple[ModelArgs, QuantizationArgs]:
    """The sections with 'auto' dtypes replaced by what a LoRA run on `device` uses, or float32 when
    no device is named (the choice is per device; `train` resolves its config before loading)."""
    if "auto" not in (args.dtype, quant.compute_dtype):
        return args, quant
    if device is None:
        return (dataclasses.replace(args, dtype="float32" if args.dtype == "auto" else args.dtype),
                dataclasses.replace(quant, compute_dtype="float32" if quant.compute_dtype == "auto"
                                    else quant.compute_dtype))
    resolved, _ = resolve_precision(Config(model=args, quantization=quant), device)
    return resolved.model, resolved.quantization


def build_from_config(args: ModelArgs, *, seed: int = 0) -> nn.Module:
    """A randomly initialised model from a preset or config file (seeded); model.dtype 'auto' is
    float32 here (no device is named). Built on the meta device, then given its tensors on the
    default device (the CPU; the meta device when the planner replays the build) and initialised
    block by block (`finish_build`)."""
    args, _ = _without_auto(args, QuantizationArgs(), None)
    model = construct(args)
    finish_build(model, args, seed=seed)
    return model


def construct(args: ModelArgs) -> nn.Module:
    """The model of a preset or config file on the meta device: its modules, no tensor memory."""
    config = model_config(args)
    kind = resolve_kind(args, config)
    try:
        # the configured attention, as from_pretrained gets it (eager keeps every attention matrix for backward)
        extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        with torch.device("meta"):
            return _auto_class(kind).from_config(config, dtype=DTYPES[args.dtype], **extra)
    except ValueError as e:  # "Unrecognized configuration class": model.kind names the other kind
        raise ModelError(f"model.kind={kind} does not fit a {type(config).__name__} model ({str(e).splitlines()[0]}); "
                         "set model.kind=auto") from None


def finish_build(model: nn.Module, args: ModelArgs, *, seed: int = 0) -> None:
    """A `construct`ed model's tensors on the default device, one per parameter or buffer however many
    modules share it, initialised from `seed` by transformers' own init, block by block
    (`random_init.build_units`; skipped on the meta device, where the planner replays the build).
    Built on the CPU instead, a model allocates and initialises every layer it later ties away (an
    output layer tied to the input embedding: 980 MiB of fp32 for bloom-560m's) and initialises every
    weight twice."""
    build_units(model, torch.get_default_device(), seed)
    model.tie_weights(recompute_mapping=False)
    _untie_lm_head_if_configured(model, args)


def load_model(args: ModelArgs, quant: QuantizationArgs | None = None, *, device: torch.device | None = None,
               seed: int = 0) -> nn.Module:
    """Load (or build) the model, quantized as asked.

    Args:
        args: the model section.
        quant: the quantization section (None: no quantization).
        device: where quantized weights are placed (bitsandbytes layers quantize on the device);
            unquantized models load on CPU and Accelerate moves them. Also what 'auto' dtypes are
            resolved for (`device.resolve_precision`); with no device, 'auto' means float32.
        seed: seed for random init (preset / config_file).

    Returns:
        The model (a transformers PreTrainedModel).

    Raises:
        ModelError: offline hub id, missing files, GGUF export problems.
    """
    args, quant = _without_auto(args, quant or QuantizationArgs(), device)
    qconf = quantization_config(quant)
    if args.preset or args.config_file:
        if qconf is None:
            return build_from_config(args, seed=seed)
        # bitsandbytes quantizes while loading weights: the random model's state dict goes through
        # from_pretrained, each block made and initialised when the loader first reads one of its
        # tensors and freed once quantized (no file; the fp32 model never exists whole)
        model = construct(args)
        state = UnitBuild(model, torch.device("cpu"), seed).deferred_state_dict()
        try:
            quantized = type(model).from_pretrained(None, config=model.config, state_dict=state,
                                                    **_pretrained_kwargs(args, qconf, device))
        finally:
            del state
        _disable_cpu_bf16_4bit_path(quantized)
        # an output layer of its own (flan-t5): the reload tied it to the input embedding, whose values
        # it had when built (`finish_build`)
        _untie_lm_head_if_configured(quantized, args)
        return quantized
    return from_pretrained(resolve_path(args.name_or_path, "model.name_or_path"), args, qconf, device)


def _pretrained_kwargs(args: ModelArgs, qconf: Any, device: torch.device | None) -> dict[str, Any]:
    """`from_pretrained`'s keyword arguments for `args` (dtype, GGUF file, attention, quantization)."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[args.dtype], "trust_remote_code": args.trust_remote_code}
    if args.gguf_file:
        kwargs["gguf_file"] = args.gguf_file
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    return kwargs


def from_pretrained(path: str, args: ModelArgs, qconf: Any, device: torch.device | None, kind: str | None = None):
    kind = kind or resolve_kind(args)
    kwargs = _pretrained_kwargs(args, qconf, device)
    if args.gguf_file:  # read once per process (model_config); transformers would parse the file again for it
        kwargs["config"] = model_config(args)
    try:
        model = _auto_class(kind).from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreadable or truncated files, an id not in
        # the cache, a bad config; anything else (out of memory while quantizing, a bitsandbytes kernel
        # error, a bug) keeps its own traceback
        raise _offline_hint("model", path, e) from None
    _disable_cpu_bf16_4bit_path(model)
    return model


def _disable_cpu_bf16_4bit_path(model: nn.Module) -> None:
    """bitsandbytes' AVX512-BF16 CPU path for 4-bit layers repacks the weight on the first no-grad
    forward, after which training forwards fail; the generic path is used instead."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ----------------------------------------------------------------------------------------------
# preparation


