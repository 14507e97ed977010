"""Load a model and tokenizer, quantize it, prepare it for training, and attach LoRA.

Steps, each usable on its own:
    load_model / load_tokenizer  ->  prepare_for_training  ->  apply_lora
`prepare_model` runs the last two for a model loaded anywhere (also for `transformers.Trainer`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

from .config import Config, LoraArgs, ModelArgs, QuantizationArgs, lora_args, resolve_path
from .device import resolve_precision
from .errors import ModelError
from .lm import model_kind
from .presets import PRESETS, preset_config

__all__ = [
    "PreparationReport",
    "apply_lora",
    "default_target_modules",
    "linear_module_names",
    "load_model",
    "load_tokenizer",
    "model_config",
    "model_kind",
    "prepare_for_training",
    "prepare_model",
    "resolve_kind",
    "trainable_parameters",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LoRA targets per model_type when the config names none.
DEFAULT_TARGETS = {
    "bloom": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt2": ["c_attn"],
    "falcon": ["query_key_value"],
}
FALLBACK_TARGETS = ["q_proj", "v_proj"]  # llama, opt, mistral, qwen, ...


def _offline_hint(what: str, name: str, err: Exception) -> ModelError:
    """The error for a model or tokenizer that did not load: a path that does not exist, a hub id
    that is not cached offline, or what the loader said."""
    if not os.path.exists(name) and (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name):
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
    if tok.pad_token is None:  # causal tokenizers often have none; padding is masked out of the loss
        tok.pad_token = tok.eos_token
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
    float32 here (no device is named)."""
    args, _ = _without_auto(args, QuantizationArgs(), None)
    config = model_config(args)
    kind = resolve_kind(args, config)
    torch.manual_seed(seed)
    try:
        # the configured attention, as from_pretrained gets it (eager keeps every attention matrix for backward)
        extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        model = _auto_class(kind).from_config(config, dtype=DTYPES[args.dtype], **extra)
    except ValueError as e:  # "Unrecognized configuration class": model.kind names the other kind
        raise ModelError(f"model.kind={kind} does not fit a {type(config).__name__} model ({str(e).splitlines()[0]}); "
                         "set model.kind=auto") from None
    _untie_lm_head_if_configured(model, args)
    return model


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
        model = build_from_config(args, seed=seed)
        if qconf is None:
            return model
        # bitsandbytes quantizes while loading weights: round-trip the random model through disk.
        kind = model_kind(model.config)
        head = model.get_output_embeddings()
        # an output layer of its own (flan-t5): the reload ties it to the input embedding again
        own_head = head.weight.detach() if head is not None and head.weight is not model.get_input_embeddings().weight \
            else None
        with tempfile.TemporaryDirectory(prefix="minitune-init-") as tmp:
            # Written by hand, not with save_pretrained: under torch.distributed transformers writes
            # only on rank 0, and every process needs its own copy to quantize.
            model.config.save_pretrained(tmp)
            save_model(model, os.path.join(tmp, "model.safetensors"))
            del model, head
            quantized = _from_pretrained(tmp, args, qconf, device, kind=kind)
        if own_head is not None:
            _untie_lm_head_if_configured(quantized, args)
            out = quantized.get_output_embeddings()
            if out.weight is not quantized.get_input_embeddings().weight:
                out.weight.data.copy_(own_head.to(out.weight.device, out.weight.dtype))
        return quantized
    return _from_pretrained(resolve_path(args.name_or_path, "model.name_or_path"), args, qconf, device)


def _from_pretrained(path: str, args: ModelArgs, qconf: Any, device: torch.device | None, kind: str | None = None):
    kind = kind or resolve_kind(args)
    kwargs: dict[str, Any] = {"dtype": DTYPES[args.dtype], "trust_remote_code": args.trust_remote_code}
    if args.gguf_file:
        kwargs["gguf_file"] = args.gguf_file
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
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


def _is_quantized(p: torch.Tensor) -> bool:
    return p.dtype in (torch.int8, torch.uint8) or type(p).__name__ in ("Params4bit", "Int8Params")


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in name


def _cast_norm_io(module: nn.Module, args: tuple) -> tuple:
    # norms computed in fp32 for stability; their input is upcast here ...
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _restore_dtype(module: nn.Module, args: tuple, out: Any) -> Any:
    # ... and their output goes back to the dtype of the surrounding (bf16/fp16) weights.
    if torch.is_tensor(out) and out.dtype != module._minitune_out_dtype:
        return out.to(module._minitune_out_dtype)
    return out


@dataclass
class PreparationReport:
    """What preparation did, with its memory cost."""

    fp32_cast_params: int = 0
    fp32_cast_bytes: int = 0  # bytes added by upcasting to fp32
    fp32_cast_modules: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    input_grads: bool = False
    trainable: int = 0
    total: int = 0
    lora_targets: list[str] = field(default_factory=list)

    @property
    def trainable_line(self) -> str:
        """peft's format: trainable params: X || all params: Y || trainable%: Z."""
        pct = 100 * self.trainable / self.total if self.total else 0.0
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {pct:.4f}"


def prepare_for_training(
    model: nn.Module,
    *,
    train_all: bool = False,
    fp32_norms: str = "norms",
    gradient_checkpointing: bool = False,
    reentrant: bool = False,
    report: PreparationReport | None = None,
) -> PreparationReport:
    """Freeze the base (unless `train_all`), upcast norms (or all float weights) to fp32, enable
    gradient checkpointing and, where the reentrant implementation needs them, input gradients.

    Unlike peft's `prepare_model_for_kbit_training`, the default upcasts only normalisation layers:
    upcasting every non-quantized weight (embeddings, lm_head) can cost gigabytes. The bytes the
    cast added are reported.

    Args:
        model: a loaded model (quantized or not).
        train_all: full fine-tuning: every float parameter stays trainable.
        fp32_norms: 'norms', 'all' (every non-quantized floating weight) or 'none'.
        gradient_checkpointing: recompute activations in backward.
        reentrant: use the reentrant checkpoint implementation (needs input gradients).
        report: a report to fill in (a new one by default).

    Returns:
        The PreparationReport.
    """
    report = report or PreparationReport()
    for p in model.parameters():
        p.requires_grad_(train_all and p.is_floating_point() and not _is_quantized(p))

    if fp32_norms != "none":
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p.is_floating_point() and not _is_quantized(p)]
            if not params or (fp32_norms == "norms" and not _is_norm(module)):
                continue
            low = [p for p in params if p.dtype != torch.float32]
            if not low:
                continue
            out_dtype = low[0].dtype
            for p in low:
                report.fp32_cast_params += p.numel()
                report.fp32_cast_bytes += p.numel() * (4 - p.element_size())
                p.data = p.data.float()
            report.fp32_cast_modules.append(name)
            if fp32_norms == "norms":
                module._minitune_out_dtype = out_dtype
                module.register_forward_pre_hook(_cast_norm_io)
                module.register_forward_hook(_restore_dtype)

    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ModelError(f"{type(model).__name__} does not support gradient checkpointing; "
                             "set training.gradient_checkpointing=false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # the KV cache is useless in training and conflicts with recompute
        report.gradient_checkpointing = True
        # The reentrant implementation only backpropagates into a checkpointed block if its input
        # requires grad; with frozen embeddings it does not, so make the embedding output require it.
        if reentrant and not train_all and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
            report.input_grads = True
    report.trainable, report.total = trainable_parameters(model)
    return report


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last-name parts of the linear-like modules (what lora.target_modules may name)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit", "Conv1D"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def default_target_modules(model: nn.Module) -> list[str]:
    """Sensible LoRA targets for the model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return list(DEFAULT_TARGETS.get(model_type, FALLBACK_TARGETS))


def apply_lora(model: nn.Module, args: LoraArgs) -> nn.Module:
    """Wrap `model` in a peft LoRA model.

    Raises:
        ModelError: target modules that match nothing (the message lists the model's linear modules), or
            a rank larger than every linear layer.
    """
    widest = max((max(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)), default=0)
    if widest and args.r > widest:  # peft would try to allocate r x width matrices (overflowing for huge r)
        raise ModelError(f"lora.r={args.r} is larger than any linear layer of this model (the widest has {widest} "
                         f"features): choose lora.r <= {widest} (8 to 64 is usual)")

    targets: list[str] | str = list(args.target_modules) if args.target_modules else default_target_modules(model)
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's shorthand: every linear layer except the output head
    available = set(linear_module_names(model))
    missing = [t for t in targets if t not in available] if isinstance(targets, list) else []
    if missing:
        raise ModelError(f"lora.target_modules {missing} match no linear module of this model; "
                         f"its linear modules are: {', '.join(sorted(available))}")
    task = TaskType.SEQ_2_SEQ_LM if model_kind(model.config) == "seq2seq" else TaskType.CAUSAL_LM
    config = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets, bias=args.bias,
        modules_to_save=list(args.modules_to_save) or None, use_rslora=args.use_rslora, use_dora=args.use_dora,
        task_type=task,
    )
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counted as peft counts them (4-bit packed weights x2)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def prepare_model(
    model: nn.Module,
    lora: LoraArgs | dict | None = None,
    *,
    fp32_norms: str = "norms",
    gradient_checkpointing: bool = False,
    reentrant: bool = False,
    on_phase: Callable[[str], Any] | None = None,
) -> tuple[nn.Module, PreparationReport]:
    """Prepare a loaded model for training and attach LoRA: usable with any loop, `Trainer` included.

    Args:
        model: a transformers model, quantized or not.
        lora: LoRA settings, a `LoraArgs` or a dict of its fields (r, alpha, dropout, target_modules,
            bias, modules_to_save, use_rslora, use_dora); None or `enabled=False` means full fine-tuning.
        fp32_norms: 'norms' (default), 'all' or 'none'.
        gradient_checkpointing: enable activation checkpointing.
        reentrant: reentrant checkpointing (input gradients are enabled for it).
        on_phase: called with 'prepare' after the preparation and 'lora' after LoRA is attached
            (e.g. `MemoryProfiler.phase`, to see what each costs).

    Returns:
        (model, report): the (peft-wrapped) model and what was done, with `report.trainable_line`.

    Raises:
        ConfigError: a LoRA dict with unknown keys or values out of range.
        ModelError: LoRA targets match nothing, or checkpointing is unsupported.
    """
    if isinstance(lora, dict):
        lora = lora_args(lora)  # the config's own checks: unknown keys, r > 0, dropout in [0, 1)
    full = lora is None or not lora.enabled
    report = prepare_for_training(model, train_all=full, fp32_norms=fp32_norms,
                                  gradient_checkpointing=gradient_checkpointing, reentrant=reentrant)
    if on_phase is not None:
        on_phase("prepare")
    if not full:
        model = apply_lora(model, lora)
        if on_phase is not None:
            on_phase("lora")
        report.lora_targets = list(model.peft_config["default"].target_modules)
        report.trainable, report.total = trainable_parameters(model)
    return model, report
