"""Optimizer and learning-rate scheduler factories.

torch AdamW, or bitsandbytes' 8-bit / paged optimizers by name; weight decay is never applied to
biases and normalisation weights. Schedulers come from `transformers.get_scheduler`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from .config import OptimizerArgs
from .device import capabilities, optimizer_name_for
from .lm import unwrap
from .prepare import is_norm

__all__ = ["build_optimizer", "build_scheduler", "clip_grad_norm", "keep_settings", "module_grad_norms", "parameter_groups",
           "settings", "warmup_steps"]

# name -> bitsandbytes.optim class name
BNB_OPTIMIZERS = {
    "adamw8bit": "AdamW8bit",
    "paged_adamw8bit": "PagedAdamW8bit",
    "paged_adamw32bit": "PagedAdamW32bit",
    "adamw32bit": "AdamW32bit",  # what paged_adamw32bit falls back to off CUDA
    "lion8bit": "Lion8bit",
    "paged_lion8bit": "PagedLion8bit",
}


def _no_decay(name: str, param: torch.Tensor, norm_params: set[int]) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or id(param) in norm_params


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and a no-decay group (biases, norms, 1-D)."""
    norm_params = {
        id(p)
        for m in model.modules()
        if is_norm(m)
        for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p, norm_params) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, args: OptimizerArgs, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimizer named by `args.name` over the model's trainable parameters.

    Paged optimizers fall back to their unpaged version where paging is impossible (not CUDA);
    `device.check` has already warned about it.

    Raises:
        ValueError: no trainable parameters, or an unknown optimizer name.
    """
    groups = parameter_groups(model, args.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: enable LoRA or set lora.enabled=false")
    name = optimizer_name_for(args.name, device)
    betas = tuple(args.betas)
    if name == "adamw":
        fused = bool(args.fused and capabilities(device).fused_adamw)
        return torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=args.eps, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=args.lr)
    if name not in BNB_OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'")
    import bitsandbytes as bnb  # here, not at the top: heavy to import, and only these optimizers need it

    cls = getattr(bnb.optim, BNB_OPTIMIZERS[name])
    if "lion" in name:
        return cls(groups, lr=args.lr, betas=betas)
    return cls(groups, lr=args.lr, betas=betas, eps=args.eps)


def warmup_steps(args: OptimizerArgs, total_steps: int) -> int:
    """Warmup optimizer steps: `warmup_steps` if set, else `warmup_ratio` of the total."""
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, args: OptimizerArgs, total_steps: int) -> Any:
    """`transformers.get_scheduler(args.scheduler)` with warmup, over `total_steps` optimizer steps."""
    return get_scheduler(args.scheduler, optimizer, num_warmup_steps=warmup_steps(args, total_steps),
                         num_training_steps=total_steps)


def settings(optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """The hyperparameters a freshly built optimizer and scheduler hold (what `keep_settings` puts
    back after a checkpoint's states are loaded): each param group's settings, the peak lrs."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    peaks = list(scheduler.base_lrs) if scheduler is not None else [g["lr"] for g in optimizer.param_groups]
    return {"groups": groups, "base_lrs": peaks}


def keep_settings(optimizer: torch.optim.Optimizer, scheduler: Any, fresh: dict[str, Any]) -> None:
    """After `load_state_dict`, train on with this run's settings (`fresh`, from `settings` before
    loading), not the saved run's: torch's `Optimizer.load_state_dict` restores every param group's
    lr, betas, eps and weight decay, and the scheduler its peak lrs (`base_lrs`). The moments and step
    counts stay the checkpoint's; the current lr is the schedule's value at the restored step. With
    nothing changed this sets every value to what it already is.

    Args:
        optimizer: the optimizer, its state just loaded.
        scheduler: its LambdaLR (`build_scheduler`: a schedule of lr_lambdas), its state just loaded, or None.
        fresh: `settings(optimizer, scheduler)` taken before loading.
    """
    for group, new in zip(optimizer.param_groups, fresh["groups"], strict=True):
        group.update(new)
    peaks = fresh["base_lrs"]
    lrs = peaks
    if scheduler is not None:
        scheduler.base_lrs = list(peaks)
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(peaks, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if isinstance(group["lr"], torch.Tensor):  # a tensor lr (capturable/fused setups) is updated in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    if scheduler is not None:
        for group, base in zip(optimizer.param_groups, peaks, strict=True):
            group["initial_lr"] = base
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def clip_grad_norm(accelerator: Any, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm (clipped to `max_norm` when > 0). Unscales fp16 gradients first."""
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if not torch.is_tensor(norm):  # DeepSpeed clips in its engine and reports a float (None before its first step)
        norm = torch.tensor(math.nan if norm is None else float(norm), device=accelerator.device)
    return norm.float()


def module_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each LoRA factor's gradient, keyed 'grad_norm/<module>.lora_A'."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        if p.grad is not None and (".lora_A." in name or ".lora_B." in name):
            key = name.replace("base_model.model.", "").replace(".default.weight", "").replace(".weight", "")
            out[f"grad_norm/{key}"] = p.grad.detach().float().norm().item()
    return out
