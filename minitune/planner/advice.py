"""Advice: the changes that lower a peak (a smaller micro-batch split, chunked loss, 8-bit optimizer
state, checkpointing, quantization, LoRA, shorter sequences), each simulated, with its expected cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config, load_config
from ..device import Capabilities
from ..losses import auto_chunk_size
from .devices import Target
from .simulation import Prediction

# Changes that lower the peak, and whether each changes what is trained. What each costs in step
# time is the roofline's answer for the changed step (`planning.plan`: `roofline.step_seconds`).
_CHANGES = (
    ("fused", False), ("split", False), ("chunk", False), ("optimizer8", False), ("checkpointing", False),
    ("4bit", True), ("8bit", True), ("lora", True), ("seq", True),
)


def smaller_split(batch_size: int, grad_accum: int) -> tuple[int, int] | None:
    """The micro-batch split that needs less memory and trains on the same examples per step: the
    largest divisor of `batch_size` below it, and the accumulation that makes up the rest (8 x 1 ->
    4 x 2, 6 x 1 -> 3 x 2, 5 x 2 -> 1 x 10). None when batch_size is 1 (no smaller micro-batch).
    The one source of this advice: `minitune plan`, the out-of-memory line and auto_batch_size."""
    smaller = next((d for d in range(batch_size // 2, 0, -1) if batch_size % d == 0), 0)
    return (smaller, grad_accum * batch_size // smaller) if smaller else None


def overrides_text(overrides: dict[str, Any]) -> str:
    """Overrides as a user types them: `training.gradient_checkpointing=true training.batch_size=4`."""
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


def candidates(cfg: Config, caps: Capabilities, vocab: int) -> list[tuple[str, dict[str, Any], bool]]:
    """(what, overrides, changes the result) for each change that applies to `cfg`."""
    t, out = cfg.training, []
    for key, changes in _CHANGES:
        if key == "fused" and cfg.optimizer.name == "adamw" and not cfg.optimizer.fused and caps.fused_adamw:
            # torch documents fused as its fastest implementation: no cost expected
            over, what = {"optimizer.fused": True}, "fused AdamW (no for-each temporaries)"
        elif key == "split" and (split := smaller_split(t.batch_size, t.grad_accum)):
            over = {"training.batch_size": split[0], "training.grad_accum": split[1]}
            what = f"micro-batch {split[0]} x accumulation {split[1]} (same examples per step)"
        elif key == "chunk" and t.loss in ("auto", "chunked"):
            current = min(t.loss_chunk_size or auto_chunk_size(vocab), t.batch_size * cfg.data.max_length)
            if current <= 64:
                continue
            over = {"training.loss_chunk_size": max(64, current // 4)}
            what = f"loss chunks of {max(64, current // 4)} positions"
        elif key == "optimizer8" and "8bit" not in cfg.optimizer.name and caps.bnb_optimizers:
            over, what = {"optimizer.name": "adamw8bit"}, "8-bit AdamW (bitsandbytes)"
        elif key == "checkpointing" and not t.gradient_checkpointing:
            over, what = {"training.gradient_checkpointing": True}, "gradient checkpointing"
        elif key in ("4bit", "8bit") and cfg.lora.enabled and caps.bnb_layers and cfg.quantization.mode not in (key, "4bit"):
            over = {"quantization.mode": key}
            what = "4-bit NF4 base (QLoRA)" if key == "4bit" else "8-bit base (LLM.int8)"
        elif key == "lora" and not cfg.lora.enabled:
            over, what = {"lora.enabled": True}, "LoRA instead of full fine-tuning"
        elif key == "seq" and cfg.data.max_length > 64:
            over, what = {"data.max_length": cfg.data.max_length // 2}, f"sequences of {cfg.data.max_length // 2} tokens (longer ones truncated)"
        else:
            continue
        out.append((what, over, changes))
    return out


@dataclass
class Suggestion:
    what: str
    overrides: dict[str, Any]
    peak: int
    fits: bool
    speed: float  # step time at the device's peak x the current one's (`roofline.step_seconds`)
    changes_result: bool
    process_peak: int = 0  # the whole process with this change (what `fits` is decided on)


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return load_config(cfg, nested)


def combination(cfg: Config, tg: Target, useful: list[Suggestion], whole: Any, predict: Any, speed: Any) -> Suggestion | None:
    """No single change fits: add the changes that lower the peak, cheapest first, until it fits;
    then drop, most expensive first, every one it still fits without. `whole(prediction)` is the
    ProcessPeak of a prediction (what fitting is decided on); `predict(config)` the Prediction of a
    changed config; `speed(prediction)` its step time x the current one's."""

    def fits(pred: Prediction | None) -> bool:
        return pred is not None and whole(pred).total <= tg.budget

    def peak_of(chosen: list[Suggestion]) -> Prediction | None:
        changed = with_overrides(cfg, {k: v for s in chosen for k, v in s.overrides.items()})
        try:
            return predict(changed)
        except Exception:  # changes that cannot be combined on this model: never the answer
            return None

    chosen: list[Suggestion] = []
    peak = None
    for s in sorted(useful, key=lambda s: (s.changes_result, s.speed)):
        chosen.append(s)
        peak = peak_of(chosen)
        if fits(peak):
            break
    else:
        return None
    for s in sorted(chosen[:-1], key=lambda s: (not s.changes_result, -s.speed)):
        rest = [c for c in chosen if c is not s]
        without = peak_of(rest)
        if fits(without):
            chosen, peak = rest, without
    return Suggestion(" + ".join(s.what for s in chosen), {k: v for s in chosen for k, v in s.overrides.items()},
                      peak.total, True, round(speed(peak), 2), any(s.changes_result for s in chosen), whole(peak).total)
