"""`train(config)`: build every piece a config describes, run `fit`, save, and summarise.

The order is chosen so that everything that can be wrong with the input is found before any
weights load: config -> device checks -> output folder -> tokenizer -> data -> model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config

__all__ = ["RunError", "TrainResult", "train"]


class RunError(RuntimeError):
    """The run cannot start or continue; the message names the problem and the fix."""


@dataclass
class TrainResult:
    """What `train` returns."""

    output_dir: Path
    checkpoint: Path | None  # the final adapter / model folder
    state: Any  # the loop's TrainState
    metrics: dict[str, Any] = field(default_factory=dict)  # final loss, eval loss, tokens/s, ...
    memory: dict[str, Any] = field(default_factory=dict)  # the profiler's summary
    trainable_line: str = ""


_RUN_FILES = ("config.yaml", "log.jsonl", "final")


def _check_output_dir(cfg: Config) -> Path:
    out = Path(cfg.training.output_dir)
    holds_run = out.is_dir() and any((out / f).exists() for f in _RUN_FILES) or (
        out.is_dir() and any(p.name.startswith("checkpoint-") for p in out.iterdir()))
    if holds_run and not cfg.training.overwrite and not cfg.training.resume:
        raise RunError(f"output folder '{out}' already holds a run; pick another training.output_dir, "
                       "resume it with training.resume=auto, or set training.overwrite=true")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output folder '{out}' is not writable ({e.strerror}); choose another "
                       "training.output_dir") from None
    return out


def _total_steps(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.training.max_steps > 0:
        return cfg.training.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.training.grad_accum)
    return max(1, math.ceil(cfg.training.epochs * steps_per_epoch))


def train(config: Config | dict | str | Path, overrides: list[str] | dict | tuple = ()) -> TrainResult:
    """Fine-tune as `config` describes.

    Args:
        config: a Config, a nested dict, or a YAML path.
        overrides: `section.key=value` strings (or a nested dict) applied on top.

    Returns:
        TrainResult with the final checkpoint, metrics and memory summary.

    Raises:
        ConfigError: invalid config or a request this device cannot honour (before anything loads).
        RunError, minitune.data.DataError, minitune.model.ModelError: bad output folder, data or model.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from . import device as dev
    from .checkpoint import find_latest, save_checkpoint
    from .data import build_data, make_dataloader
    from .loop import TrainState, evaluate_loss, fit
    from .memory import MemoryProfiler, estimate_peak, format_bytes, tensor_breakdown
    from .model import apply_lora, load_model, load_tokenizer, prepare_for_training, trainable_parameters
    from .optim import build_optimizer, build_scheduler
    from .report import RunLogger, summary_table

    cfg = load_config(config, overrides)
    t = cfg.training
    try:
        device = dev.resolve_device(t.device)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    problems, notes = dev.check(cfg, device)
    if problems:
        raise ConfigError(problems)
    resume_from = _resolve_resume(cfg)
    out = _check_output_dir(cfg)

    _reset_single_process_state()
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=t.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=cfg.logging.trackers or None,
        project_dir=str(out),
    )
    for note in notes:
        accelerator.print(f"warning: {note}")
    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    kind = cfg.model.kind if cfg.model.kind != "auto" else _kind_of(cfg)
    data = build_data(cfg.data, tokenizer, seq2seq=kind == "seq2seq")

    profiler = MemoryProfiler(accelerator.device, phases_every=cfg.logging.memory_phases_every or cfg.logging.log_every)
    if cfg.logging.memory:
        profiler.start()
    profiler.phase("start")
    model = load_model(cfg.model, cfg.quantization, device=accelerator.device, seed=t.seed)
    profiler.phase("load" if cfg.quantization.mode == "none" else f"load+quantize ({cfg.quantization.mode})")
    full = not cfg.lora.enabled
    prep = prepare_for_training(model, train_all=full, fp32_norms=t.fp32_norms,
                                gradient_checkpointing=t.gradient_checkpointing, reentrant=t.checkpointing_reentrant)
    profiler.phase("prepare")
    if not full:
        model = apply_lora(model, cfg.lora)
        profiler.phase("lora")
    prep.trainable, prep.total = trainable_parameters(model)
    if t.compile:
        model = torch.compile(model)

    set_seed(t.seed)  # data order and dropout do not depend on how much randomness loading used
    train_loader = make_dataloader(data.train, data.collator, batch_size=t.batch_size, shuffle=True, seed=t.seed,
                                   group_by_length=cfg.data.group_by_length, num_workers=cfg.data.num_workers)
    eval_loader = None
    if data.validation is not None and len(data.validation):
        eval_loader = make_dataloader(data.validation, data.collator, batch_size=t.batch_size, shuffle=False,
                                      seed=t.seed, num_workers=cfg.data.num_workers)
    optimizer = build_optimizer(model, cfg.optimizer, accelerator.device)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    total_steps = _total_steps(cfg, len(train_loader))
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)

    state = TrainState()
    if resume_from is not None:
        state = _resume(resume_from, cfg, accelerator, model, optimizer, scheduler)
    cfg.save(out / "config.yaml")
    if cfg.logging.trackers:
        accelerator.init_trackers("minitune", config=_flat(cfg.to_dict()))

    predicted = estimate_peak(accelerator.unwrap_model(model), optimizer=dev.optimizer_name_for(cfg.optimizer.name, accelerator.device),
                              batch_size=t.batch_size, seq_len=cfg.data.max_length,
                              gradient_checkpointing=t.gradient_checkpointing, mixed_precision=t.mixed_precision)
    logger = RunLogger(accelerator, out, total_steps, progress=cfg.logging.progress, initial_step=state.step,
                       trackers=bool(cfg.logging.trackers), append=resume_from is not None)
    logger.message(prep.trainable_line)
    if prep.fp32_cast_params:
        logger.message(f"fp32 casting ({t.fp32_norms}): {prep.fp32_cast_params:,d} parameters in "
                       f"{len(prep.fp32_cast_modules)} modules, +{format_bytes(prep.fp32_cast_bytes)}")
    logger.message(f"data: {len(data.train):,d} train / {len(data.validation) if data.validation is not None else 0:,d} "
                   f"validation examples; {total_steps} optimizer steps of {t.batch_size}x{t.grad_accum}"
                   f"x{accelerator.num_processes} examples; predicted peak {format_bytes(predicted['total'])}")

    def save(st: TrainState) -> Path:
        path = out / f"checkpoint-{st.step:06d}"
        save_checkpoint(path, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                        state=st, config=cfg, tokenizer=tokenizer, keep_last=t.keep_last)
        logger.message(f"saved {path}")
        return path

    t0 = time.perf_counter()
    try:
        state = fit(
            accelerator, model, optimizer, train_loader, max_steps=total_steps, scheduler=scheduler,
            eval_loader=eval_loader, grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm,
            log_every=cfg.logging.log_every, eval_every=t.eval_every, eval_batches=t.eval_batches,
            save_every=t.save_every, max_bad_steps=t.max_bad_steps, profiler=profiler, logger=logger,
            save=save, state=state, module_grad_norms=cfg.logging.module_grad_norms,
        )
    finally:
        logger.close()
    elapsed = time.perf_counter() - t0
    if state.stop_reason == "nonfinite":
        profiler.stop()
        last = find_latest(out)
        raise RunError(f"stopped after {t.max_bad_steps} consecutive non-finite steps at step {state.step}; "
                       f"last good checkpoint: {last or 'none'}; lower optimizer.lr or use bf16/fp32")

    metrics: dict[str, Any] = dict(state.last)
    if eval_loader is not None and state.stop_reason != "signal":
        metrics["eval_loss"] = evaluate_loss(accelerator, model, eval_loader, max_batches=t.eval_batches)
    final = None
    if state.stop_reason != "signal":
        final = save_checkpoint(out / "final", accelerator=accelerator, model=model, optimizer=optimizer,
                                scheduler=scheduler, state=state, config=cfg, tokenizer=tokenizer)
    profiler.stop()
    breakdown = tensor_breakdown(accelerator.unwrap_model(model), optimizer, profiler.peak_bytes())
    profiler.breakdown = breakdown
    memory = profiler.summary()
    memory["predicted"] = predicted
    if accelerator.is_main_process:
        (out / "memory.json").write_text(json.dumps(memory, indent=1, default=str))
        rows = _summary_rows(state, metrics, elapsed, prep, predicted, profiler, final, out, accelerator)
        from rich.console import Console

        console = Console()
        console.print(summary_table(rows))
        console.print(profiler.table())
    accelerator.end_training()
    return TrainResult(out, final, state, metrics, memory, prep.trainable_line)


def _reset_single_process_state() -> None:
    """Accelerate keeps one global state per process; a second `train()` in the same Python process
    (a notebook, a test, an embedding codebase) may ask for another precision. Outside a distributed
    launch, start from a clean state."""
    import os

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _kind_of(cfg: Config) -> str:
    """'causal' or 'seq2seq' from the model's config, without loading weights."""
    from .model import model_kind, resolve_path
    from .presets import preset_config

    if cfg.model.preset:
        return model_kind(preset_config(cfg.model.preset))
    from transformers import AutoConfig

    path = cfg.model.config_file or resolve_path(cfg.model.name_or_path)
    kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    try:
        return model_kind(AutoConfig.from_pretrained(path, **kwargs))
    except Exception as e:
        from .model import _offline_hint

        raise _offline_hint("model", path, e) from None


def _resolve_resume(cfg: Config) -> Path | None:
    from .checkpoint import find_latest, is_complete

    r = cfg.training.resume
    if not r:
        return None
    if r == "auto":
        return find_latest(cfg.training.output_dir)  # nothing yet: start fresh
    path = Path(r)
    if not is_complete(path):
        raise RunError(f"training.resume='{r}' is not a complete checkpoint folder; "
                       "give a checkpoint-NNNNNN folder or training.resume=auto")
    return path


def _resume(path: Path, cfg: Config, accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> Any:
    from .checkpoint import load_training_state
    from .loop import TrainState

    _load_weights(path, accelerator.unwrap_model(model))
    counters = load_training_state(path, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    fields = set(TrainState.__dataclass_fields__)
    state = TrainState(**{k: v for k, v in counters.items() if k in fields})
    state.stop_reason = ""
    accelerator.print(f"resumed from {path} at step {state.step}")
    return state


def _load_weights(path: Path, model: Any) -> None:
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError

    adapter = path / "adapter_model.safetensors"
    try:
        if adapter.is_file():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(adapter))
            return
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint '{path}' holds no weights (adapter_model.safetensors or model.safetensors)")
        state = {}
        for f in files:
            state.update(load_file(f))
        model.load_state_dict(state, strict=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the weights in '{path}' ({type(e).__name__}: {e}); "
                              "the checkpoint is corrupt: resume from an earlier one") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _summary_rows(state, metrics, elapsed, prep, predicted, profiler, final, out, accelerator) -> list[tuple[str, str]]:
    from .memory import format_bytes

    peak = profiler.peak_bytes()
    rows = [
        ("steps", f"{state.step} ({state.micro_step} micro-batches, {state.skipped_steps} skipped)"
                  + (f", stopped by {state.stop_reason}" if state.stop_reason not in ("", "max_steps") else "")),
        ("final loss", f"{metrics['loss']:.4f}" if "loss" in metrics else "-"),
        ("eval loss", f"{metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "-"),
        ("time", f"{elapsed:.1f} s"),
        ("tokens/s", f"{state.tokens / elapsed:,.0f}" if elapsed > 0 else "-"),
        ("peak memory", f"{format_bytes(peak)} measured, {format_bytes(predicted['total'])} predicted"
                        + (f" (x{peak / predicted['total']:.2f})" if predicted.get("total") else "")),
        ("trainable", prep.trainable_line),
        ("device", f"{accelerator.device} x{accelerator.num_processes}, mixed precision {accelerator.mixed_precision}"),
        ("adapter" if prep.lora_targets or final and (final / "adapter_config.json").exists() else "model",
         str(final) if final else f"not saved (stopped); resume with training.resume=auto in {out}"),
    ]
    return rows
