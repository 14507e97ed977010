"""The plan: a config on a device, its predicted peak and process peak, whether it fits, and the
cheapest changes that would make it fit (`plan`, `format_plan`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config
from ..device import resolve_precision
from ..errors import PlanError
from ..process_memory import ProcessPeak, format_bytes, process_peak
from .advice import Suggestion, candidates, combination, with_overrides
from .devices import Target, target
from .loading import load_peak
from .roofline import Peak, half_precision, peak_for, step_seconds
from .simulation import Prediction, meta_model, simulate


def predict(cfg: Config, device_type: str = "cpu", *, seq_len: int | None = None) -> Prediction:
    """The predicted peak of the resolved `cfg` on a device of type `device_type` (builds the meta
    model, then `simulate`)."""
    model, _, _ = meta_model(cfg)
    return simulate(model, cfg, seq_len=seq_len, device_type=device_type)


@dataclass
class Plan:
    target: Target
    precision: Any  # device.Precision
    prediction: Prediction
    fits: bool
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    process: ProcessPeak | None = None  # the whole process at the peak: what `fits` is decided on
    peak: Peak | None = None  # the device's matmul peak and bandwidth (None: no figure for this device)

    @property
    def step_seconds(self) -> float | None:
        """The planned step at the device's peaks (`roofline.step_seconds`): the least it can take."""
        return step_seconds(self.prediction.flops, self.prediction.moved, self.peak) if self.peak else None

    def to_dict(self) -> dict[str, Any]:
        tg = self.target
        process = self.process or self.prediction.process(tg.kind)
        return {
            "device": tg.name, "device_kind": tg.kind, "memory_bytes": tg.memory, "budget_bytes": tg.budget,
            "budget_note": tg.note, "precision": dataclasses.asdict(self.precision),
            "predicted": self.prediction.to_dict(), **process.to_dict(), "fits": self.fits,
            "headroom_bytes": tg.budget - process.total,
            "suggestions": [dataclasses.asdict(s) for s in self.suggestions], "notes": self.notes,
            "step": {"flops": self.prediction.flops, "memory_bound_bytes": self.prediction.moved,
                     "seconds_at_peak": self.step_seconds, "peak_flops": self.peak and self.peak.flops,
                     "bandwidth": self.peak and self.peak.bandwidth, "peak_source": self.peak and self.peak.source},
        }


def plan(cfg: Config, device: str | Target = "cpu", *, budget: int | None = None, suggest: bool = True,
         baseline: int | None = None) -> Plan:
    """Predict `cfg`'s peak on `device` and, if it does not fit the budget, what would.

    Args:
        cfg: a validated config ('auto' precision fields are resolved for the device).
        device: a name from `DEVICES` or a Target.
        budget: bytes the run may use (default: the device's budget).
        suggest: look for changes when it does not fit.
        baseline: CPU/MPS: the RSS a run has before its model loads (default: this process's now).

    Returns:
        The Plan: the tensor peak (prediction), the process peak (process) and whether that fits
        the budget, and the changes that make it fit, cheapest first.

    Raises:
        ConfigError: an unknown device name.
        PlanError: the config cannot be simulated (shapes torch refuses, a model whose code reads
            tensor values).
        ModelError: the model's config cannot be read (and no preset has its shapes), or LoRA
            targets that match nothing.
    """
    tg = device if isinstance(device, Target) else target(device, budget)
    if budget is not None and isinstance(device, Target):
        tg = dataclasses.replace(tg, budget=budget)
    resolved, precision = resolve_precision(cfg, tg.caps.device, caps=tg.caps)
    model, _, note = meta_model(resolved)
    try:
        prediction = _predicted(resolved, tg, model)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:  # the model's own code on fake tensors (torch's
        # data-dependent / unsupported-operator errors are RuntimeErrors), or shapes torch refuses; a bug
        # of the planner's own (TypeError, AttributeError, KeyError, ...) keeps its traceback
        raise PlanError(f"could not simulate this config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else 'no message'}); check the model and "
                        "batch settings, e.g. training.batch_size and data.max_length") from None
    if baseline is None:  # CPU/MPS: this process now, measured once for the plan and its suggestions
        baseline = process_peak(tg.kind, 0).terms.get("baseline")

    def whole(pred: Prediction) -> ProcessPeak:
        return pred.process(tg.kind, baseline)

    process = whole(prediction)
    peak = peak_for(tg, half_precision(resolved))
    result = Plan(tg, precision, prediction, process.total <= tg.budget, notes=[note] if note else [], process=process,
                  peak=peak)
    if not result.fits and suggest:
        result.suggestions = _advice(result, resolved, model, whole)
    return result


def _advice(result: Plan, resolved: Config, model: Any, whole: Any) -> list[Suggestion]:
    """The changes that lower the peak, each simulated and priced by the roofline: those that fit
    first (keeping what is trained, then the cheapest), then the rest; notes go to `result.notes`."""
    tg, prediction = result.target, result.prediction
    tried: list[Suggestion] = []
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
    # a change's cost: its step at the device's peaks x the current one's (FLOPs alone without a figure)
    rates = result.peak or Peak(1.0, float("inf"), "")

    def speed(pred: Prediction) -> float:
        return step_seconds(pred.flops, pred.moved, rates) / step_seconds(prediction.flops, prediction.moved, rates)

    for what, over, changes in candidates(resolved, tg.caps, vocab):
        changed = with_overrides(resolved, over)
        needs_model = any(k.split(".")[0] in ("quantization", "lora") or k == "training.gradient_checkpointing"
                          for k in over)
        try:
            changes_loading = any(k.startswith("quantization.") for k in over)  # LoRA, checkpointing: the same load
            changed_prediction = _predicted(changed, tg, None if needs_model else model,
                                            loading=None if changes_loading else prediction.loading)
        except Exception as e:  # a change this model cannot take (e.g. no checkpointing support): not offered
            result.notes.append(f"not offered: {what} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            continue
        lowered = changed_prediction.total
        if "optimizer.fused" in over and lowered >= prediction.total:  # advice only where it saves memory
            continue
        total = whole(changed_prediction).total
        tried.append(Suggestion(what, over, lowered, total <= tg.budget, round(speed(changed_prediction), 2), changes, total))
    fitting = sorted((s for s in tried if s.fits), key=lambda s: (s.changes_result, s.speed))
    lowering = [s for s in tried if s.peak < prediction.total]
    def predicted(changed: Config) -> Prediction:  # a combination of changes
        return _predicted(changed, tg)

    if not any(not s.changes_result for s in fitting):  # first: changes that keep what is trained, together
        combo = combination(resolved, tg, [s for s in lowering if not s.changes_result], whole, predicted, speed)
        fitting = ([combo] if combo is not None else []) + fitting
    if not fitting:
        combo = combination(resolved, tg, lowering, whole, predicted, speed)
        if combo is not None:
            fitting = [combo]
        else:
            result.notes.append("no combination of the changes below fits: choose a smaller model or a larger device")
    return fitting + sorted((s for s in tried if not s.fits), key=lambda s: s.peak)


def _predicted(cfg: Config, tg: Target, model: Any = None, *, loading: int | None = None) -> Prediction:
    """The Prediction of the resolved `cfg` on `tg` (its meta model unless `model` is given), with what
    loading holds (`process_peak` decides where it counts)."""
    pred = simulate(model if model is not None else meta_model(cfg)[0], cfg, device_type=tg.kind,
                    cuda_capability=tg.capability)
    pred.loading = loading if loading is not None else load_peak(cfg).bytes
    return pred


def format_plan(p: Plan) -> str:
    """The plan as the terminal shows it."""
    pred, tg = p.prediction, p.target
    lines = [f"plan for {tg.name} ({format_bytes(tg.memory)}; budget {format_bytes(tg.budget)}: {tg.note})"]
    lines.append(f"precision: {p.precision.describe()}")
    s = pred.shape
    lines.append(f"shape: micro-batch {s['batch_size']} x {s['seq_len']} tokens"
                 + (f" -> {s['target_len']} target tokens" if s.get("target_len") else "")
                 + f", accumulation {s['grad_accum']}, every position a target (the most a batch can need); "
                 f"optimizer {s['optimizer']}")
    if p.step_seconds is not None:
        lines.append(f"step time at the peak: {p.step_seconds:,.3g} s at least ({pred.flops / 1e12:,.3g} TFLOP"
                     + (f" + {format_bytes(int(pred.moved))} memory-bound" if pred.moved else "")
                     + f"; {p.peak.source}); real steps are slower (bench/speed.py measures by how much)")
    else:
        lines.append(f"step: {pred.flops / 1e12:,.3g} TFLOP (no peak known for {tg.name}: no step time)")
    lines.append("")
    process = p.process or pred.process(tg.kind)
    lines.append(f"predicted process peak{format_bytes(process.total):>19}   "
                 f"({'RSS' if tg.kind != 'cuda' else 'device memory'}: what fits is decided on)")
    why = {"baseline": "   (RSS before the model loads)",
           "malloc_heap": "   (freed memory glibc's heap keeps; MINITUNE_MALLOC=lean: none, slower steps)"}
    for name, value in process.terms.items():
        lines.append(f"  {name:<28}{format_bytes(value):>11}" + why.get(name, ""))
    lines.append(f"predicted tensor peak{format_bytes(pred.total):>20}   (the allocator's, in the {pred.peak_phase} pass)")
    for role, value in pred.breakdown.items():
        lines.append(f"  {role:<28}{format_bytes(value):>11}")
    if pred.loading:
        lines.append(f"predicted loading peak{format_bytes(pred.loading):>19}   (the allocator's, while the model loads"
                     + (", in host memory)" if tg.kind == "cuda" else ")"))
    lines.append("per phase (highest):")
    for phase, value in pred.phases.items():
        lines.append(f"  {phase:<28}{format_bytes(value):>11}")
    lines.append("")
    room = tg.budget - process.total
    if p.fits:
        lines.append(f"fits: {format_bytes(room)} of headroom ({100 * room / tg.budget:.0f}% of the budget)")
    else:
        lines.append(f"does not fit: {format_bytes(-room)} over the budget")
        fitting = [x for x in p.suggestions if x.fits]
        if fitting:
            lines.append("changes that make it fit, cheapest first (step time at the peak x now's):")
            for x in fitting:
                lines.append(f"  {x.what:<58} process {format_bytes(x.process_peak or x.peak):>10}  x{x.speed:.2f}"
                             + ("  (changes what is trained)" if x.changes_result else ""))
                lines.append(f"      {' '.join(f'{k}={v}' for k, v in x.overrides.items())}")
        rest = [x for x in p.suggestions if not x.fits]
        if rest:
            lines.append("not enough alone:")
            for x in rest:
                lines.append(f"  {x.what:<58} process {format_bytes(x.process_peak or x.peak):>10}")
    if s.get("paged_state_bytes"):
        lines.append(f"note: the paged optimizer's state ({format_bytes(s['paged_state_bytes'])}) is not in the peak: it "
                     "lives in CUDA unified memory, which the driver moves to CPU RAM when the GPU runs short")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
