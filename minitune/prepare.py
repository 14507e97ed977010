"""Preparing a model for training, for any loop (`transformers.Trainer` too): freeze the base, cast
norms (or everything) to fp32, gradient checkpointing, and LoRA adapters through peft.

    prepare_for_training  ->  apply_lora;  prepare_model runs both and reports what they did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn

from .config import LoraArgs, lora_args
from .errors import ModelError
from .lm import model_kind

__all__ = ["PreparationReport", "apply_lora", "default_target_modules", "is_norm", "linear_module_names",
           "prepare_for_training", "prepare_model", "trainable_parameters"]


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


def _is_quantized(p: torch.Tensor) -> bool:
    return p.dtype in (torch.int8, torch.uint8) or type(p).__name__ in ("Params4bit", "Int8Params")


def is_norm(module: nn.Module) -> bool:
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
            if not params or (fp32_norms == "norms" and not is_norm(module)):
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
