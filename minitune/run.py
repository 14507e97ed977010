"""`train(config)`: build every piece a config describes, run `fit`, save, and summarise.

The order is chosen so that everything that can be wrong with the input is found before any
weights load: config -> device checks -> output folder -> tokenizer -> data -> model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config, yaml_load

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
    precision: Any = None  # the device.Precision the run trained in (what 'auto' chose, and why)


_RUN_FILES = ("config.yaml", "log.jsonl", "final")


def _check_output_dir(cfg: Config) -> Path:
    """Refuse a folder that holds another run (unless overwrite or resume) or that cannot be written.

    Creates nothing: a run that fails on bad input afterwards leaves no trace; `_prepare_output_dir`
    creates the folder once every input check has passed.
    """
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"training.output_dir '{out}' is a file, not a folder; choose another training.output_dir")
    holds_run = out.is_dir() and (any((out / f).exists() for f in _RUN_FILES)
                                  or any(p.name.startswith("checkpoint-") for p in out.iterdir()))
    if holds_run and not cfg.training.overwrite and not cfg.training.resume:
        raise RunError(f"output folder '{out}' already holds a run; pick another training.output_dir, "
                       "resume it with training.resume=auto, or set training.overwrite=true")
    # the folder, or the nearest existing folder above it, must take a new entry
    probe_in = out
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(20, f"'{probe_in}' is a file")
        # one probe per process (ranks of a launch probe at once); removed at once
        os.rmdir(tempfile.mkdtemp(prefix=f".write-test-{os.getpid()}-", dir=probe_in))
    except OSError as e:
        raise RunError(f"output folder '{out}' is not writable ({e.strerror or e}); choose another "
                       "training.output_dir") from None
    return out


def _prepare_output_dir(out: Path, cfg: Config, resuming: bool, accelerator: Any) -> None:
    """Create the output folder (every input check has passed by now); with training.overwrite and no
    resume, remove the previous run's checkpoints, so that a later resume=auto cannot pick one of them."""
    from .checkpoint import clean_debris

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.training.overwrite and not resuming:
            for old in [out / "final", *out.glob("checkpoint-*")]:
                if old.is_dir():
                    shutil.rmtree(old)
        clean_debris(out)  # .tmp-* folders of saves that were killed
    accelerator.wait_for_everyone()


def _total_steps(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.training.max_steps > 0:
        return cfg.training.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.training.grad_accum)
    return max(1, math.ceil(cfg.training.epochs * steps_per_epoch))


def train(config: Config | dict | str | Path, overrides: list[str] | dict | tuple = (), *,
          on_step: Callable[[Any, dict], Any] | None = None) -> TrainResult:
    """Fine-tune as `config` describes.

    Args:
        config: a Config, a nested dict, or a YAML path.
        overrides: `section.key=value` strings (or a nested dict) applied on top.
        on_step: `on_step(state, metrics)` after every logged step (main process and others alike);
            a true return value stops the run, which still saves its final checkpoint.

    Returns:
        TrainResult with the final checkpoint, metrics and memory summary.

    Raises:
        ConfigError: invalid config or a request this device cannot honour (before anything loads).
        RunError, minitune.data.DataError, minitune.model.ModelError: bad output folder, data or model.
    """
    cfg = load_config(config, overrides)  # first, before the heavy imports: a bad config fails in a blink
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from accelerate.utils.memory import clear_device_cache

    from . import device as dev
    from .checkpoint import find_latest, restore_rng, rng_state, save_checkpoint, set_rng_state
    from .data import build_data, make_dataloader
    from .loop import TrainState, evaluate_loss, fit
    from .losses import live_logit_positions, loss_fn_for
    from .memory import MemoryProfiler, estimate_peak, format_bytes, tensor_breakdown
    from .model import apply_lora, load_model, load_tokenizer, prepare_for_training, resolve_kind, trainable_parameters
    from .optim import build_optimizer, build_scheduler
    from .report import RunLogger, summary_table

    try:
        device = dev.resolve_device(cfg.training.device)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    cfg, precision = dev.resolve_precision(cfg, device)  # 'auto' -> this device's choice; saved as resolved
    t = cfg.training
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
    launch_problems = dev.check_processes(accelerator, quantized=cfg.quantization.mode != "none",
                                          grad_accum=t.grad_accum)
    if launch_problems:
        raise RunError("; ".join(launch_problems))
    for note in notes:
        accelerator.print(f"warning: {note}")
    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    kind = resolve_kind(cfg.model)
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
    _prepare_output_dir(out, cfg, resume_from is not None, accelerator)
    if accelerator.is_main_process:
        cfg.save(out / "config.yaml")
    if cfg.logging.trackers:
        accelerator.init_trackers("minitune", config=_flat(cfg.to_dict()))

    predicted = estimate_peak(accelerator.unwrap_model(model), optimizer=dev.optimizer_name_for(cfg.optimizer.name, accelerator.device),
                              batch_size=t.batch_size, seq_len=cfg.data.max_length,
                              gradient_checkpointing=t.gradient_checkpointing, mixed_precision=t.mixed_precision,
                              logits_positions=live_logit_positions(model, t.loss, t.loss_chunk_size))
    logger = RunLogger(accelerator, out, total_steps, progress=cfg.logging.progress, initial_step=state.step,
                       trackers=bool(cfg.logging.trackers), append=resume_from is not None,
                       first_record={"precision": dataclasses.asdict(precision)})
    logger.message(f"precision: {precision.describe()}")
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

    if resume_from is not None:
        restore_rng(resume_from, accelerator=accelerator)  # last, so nothing above draws from it
    rng_at_start = rng_state()  # training.auto_batch_size: a retry starts from the same randomness
    loss_fn = loss_fn_for(t.loss, t.loss_chunk_size)  # 'chunked': never the whole logits tensor (losses.py)
    t0 = time.perf_counter()
    try:
        while True:
            try:
                state = fit(
                    accelerator, model, optimizer, train_loader, max_steps=total_steps, scheduler=scheduler,
                    eval_loader=eval_loader, grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm,
                    log_every=cfg.logging.log_every, eval_every=t.eval_every, eval_batches=t.eval_batches,
                    save_every=t.save_every, max_bad_steps=t.max_bad_steps, profiler=profiler, logger=logger,
                    save=save, state=state, module_grad_norms=cfg.logging.module_grad_norms, loss_fn=loss_fn,
                    on_step=on_step,
                )
                break
            except Exception as e:
                if not _is_oom(e):
                    raise
                smaller = _smaller_batch(t.batch_size)
                if not (t.auto_batch_size and state.step == 0 and resume_from is None and smaller):
                    raise _out_of_memory(e, cfg, state, accelerator, profiler) from None
                # Nothing was stepped yet: drop this attempt and start again with a smaller micro-batch
                # and more accumulation, so that a step still takes the same examples.
                del e
                optimizer.zero_grad(set_to_none=True)
                clear_device_cache(garbage_collection=True)
                logger.message(f"out of memory with training.batch_size={t.batch_size}: retrying with "
                               f"batch_size={smaller} grad_accum={t.grad_accum * t.batch_size // smaller}")
                t.grad_accum, t.batch_size = t.grad_accum * t.batch_size // smaller, smaller
                train_loader = accelerator.prepare(make_dataloader(
                    data.train, data.collator, batch_size=t.batch_size, shuffle=True, seed=t.seed,
                    group_by_length=cfg.data.group_by_length, num_workers=cfg.data.num_workers))
                if accelerator.is_main_process:
                    cfg.save(out / "config.yaml")  # what checkpoints will hold, and a resume will need
                state = TrainState()
                set_rng_state(rng_at_start)
    finally:
        logger.close()
    elapsed = time.perf_counter() - t0
    if state.stop_reason == "nonfinite":
        profiler.stop()
        last = find_latest(out)
        raise RunError(f"stopped: {t.max_bad_steps} consecutive steps with a non-finite loss or gradient after step "
                       f"{state.step} ({state.skipped_steps} skipped in all); last good checkpoint: {last or 'none'}; "
                       "lower optimizer.lr (or use bf16/fp32 instead of fp16) and resume with training.resume=auto")

    metrics: dict[str, Any] = dict(state.last)
    if eval_loader is not None and state.stop_reason != "signal":
        metrics["eval_loss"] = evaluate_loss(accelerator, model, eval_loader, max_batches=t.eval_batches,
                                             loss_fn=loss_fn)
    final = None
    if state.stop_reason != "signal":
        final = save_checkpoint(out / "final", accelerator=accelerator, model=model, optimizer=optimizer,
                                scheduler=scheduler, state=state, config=cfg, tokenizer=tokenizer)
    profiler.stop()
    breakdown = tensor_breakdown(accelerator.unwrap_model(model), optimizer, profiler.peak_bytes(above_baseline=True),
                                 assume_grads=True)
    profiler.breakdown = breakdown
    memory = profiler.summary()
    memory["predicted"] = predicted
    if accelerator.is_main_process:
        (out / "memory.json").write_text(json.dumps(memory, indent=1, default=str))
        rows = _summary_rows(state, metrics, elapsed, prep, predicted, profiler, final, out, accelerator, precision)
        from rich.console import Console

        console = Console()
        console.print(summary_table(rows))
        console.print(profiler.table())
    accelerator.end_training()
    return TrainResult(out, final, state, metrics, memory, prep.trainable_line, precision)


def _is_oom(err: BaseException) -> bool:
    """Out of memory on any device: CUDA/XPU/MPS raise torch.OutOfMemoryError, the CPU allocator a
    RuntimeError (accelerate's `should_reduce_batch_size` knows the messages)."""
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(err, torch.OutOfMemoryError) or should_reduce_batch_size(err)


def _smaller_batch(batch_size: int) -> int:
    """The largest divisor of `batch_size` below it (0 if none): accumulation then keeps the examples
    per step exact (8 -> 4, 6 -> 3, 5 -> 1)."""
    return next((d for d in range(batch_size // 2, 0, -1) if batch_size % d == 0), 0)


def _out_of_memory(err: BaseException, cfg: Config, state: Any, accelerator: Any, profiler: Any) -> RunError:
    """One line: where memory ran out, how much was in use, and the settings that need less.
    The profiler's table (memory by phase up to this point) is printed above it."""
    import torch

    from .memory import format_bytes

    t, device = cfg.training, accelerator.device
    profiler.stop()
    if accelerator.is_main_process:
        try:
            from rich.console import Console

            Console(stderr=True).print(profiler.table())
        except Exception:  # the error line below matters more than the table
            pass
    now = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        now = (f"{format_bytes(torch.cuda.memory_allocated(device))} allocated, "
               f"{format_bytes(torch.cuda.memory_reserved(device))} reserved, {format_bytes(free)} free of "
               f"{format_bytes(total)} on {device}; ")
    peak = profiler.peak_bytes() if profiler is not None else 0
    if peak:
        now += f"peak so far {format_bytes(peak)}; "
    knobs = []
    if t.batch_size > 1:
        smaller = t.batch_size // 2
        knobs.append(f"training.batch_size={smaller} training.grad_accum={t.grad_accum * t.batch_size // smaller} "
                     "(the same examples per step)")
    if not t.gradient_checkpointing:
        knobs.append("training.gradient_checkpointing=true")
    if cfg.optimizer.name in ("adamw", "paged_adamw32bit"):
        knobs.append("optimizer.name=adamw8bit")
    if not cfg.lora.enabled:
        knobs.append("lora.enabled=true")
    elif cfg.quantization.mode != "4bit":
        knobs.append("quantization.mode=4bit")
    if cfg.data.max_length > 128:
        knobs.append(f"data.max_length={cfg.data.max_length // 2}")
    return RunError(f"out of memory at step {state.step + 1} (micro-batch {t.batch_size} x up to "
                    f"{cfg.data.max_length} tokens): {now}try {', '.join(knobs) or 'a smaller model'}")


def _reset_single_process_state() -> None:
    """Accelerate keeps one global state per process; a second `train()` in the same Python process
    (a notebook, a test, an embedding codebase) may ask for another precision. Outside a distributed
    launch, start from a clean state."""
    import os

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


# What a resumed run must share with the checkpoint's run to continue it exactly: section -> keys
# (None: every key), minus keys that change nothing about the numbers.
_RESUME_KEYS: dict[str, tuple[str, ...] | None] = {
    "model": None, "quantization": None, "lora": None, "data": None,
    "optimizer": ("name",), "training": ("batch_size", "grad_accum", "seed"),
}
_RESUME_FREE = {"data.num_workers"}


def _resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from (None: start fresh), checked before anything loads.

    Raises:
        CheckpointError: the checkpoint is incomplete, unreadable, or from an incompatible config.
    """
    from .checkpoint import CheckpointError, find_latest, verify_checkpoint

    r = cfg.training.resume
    if not r:
        return None
    if r == "auto":
        path = find_latest(cfg.training.output_dir)
        if path is None:
            return None  # nothing saved yet: start fresh
    else:
        path = Path(r)
        if not path.is_dir():
            raise CheckpointError(f"training.resume='{r}' does not exist; give a checkpoint folder "
                                  "(e.g. runs/x/checkpoint-000100) or training.resume=auto")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    counters = verify_checkpoint(path, processes)
    changes = _resume_changes(path, cfg)
    if counters.get("num_processes", 1) != processes:
        changes.append(f"processes {counters.get('num_processes', 1)} -> {processes}")
    if changes and not cfg.training.resume_force:
        raise CheckpointError(f"cannot resume from '{path}' exactly: this run changes {'; '.join(changes)}; "
                              "undo the change, start a new run in another training.output_dir, or set "
                              "training.resume_force=true to resume anyway")
    if changes:
        print(f"warning: resuming from '{path}' with changes ({'; '.join(changes)}): "
              "the run will not match an uninterrupted one", flush=True)
    return path


def _resume_changes(path: Path, cfg: Config) -> list[str]:
    """'section.key: old -> new' for each setting that differs from the checkpoint's config.yaml."""
    import yaml

    from .checkpoint import CheckpointError

    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return []
    try:
        saved = yaml_load(saved_file.read_text()) or {}
    except yaml.YAMLError:
        raise CheckpointError(f"checkpoint '{path}' has an unreadable config.yaml; delete that folder and "
                              "resume from an earlier one") from None
    now = cfg.to_dict()
    missing = object()
    changes = []
    old_t = saved.get("training") or {}
    old_split = old_t.get("batch_size"), old_t.get("grad_accum")
    t = cfg.training
    if (t.auto_batch_size and None not in old_split and old_split != (t.batch_size, t.grad_accum)
            and old_split[0] * old_split[1] == t.batch_size * t.grad_accum):
        # training.auto_batch_size settled on a smaller micro-batch: continue with it
        print(f"training.auto_batch_size: resuming with the checkpoint's batch_size={old_split[0]} "
              f"grad_accum={old_split[1]}", flush=True)
        t.batch_size, t.grad_accum = old_split
        now = cfg.to_dict()
    for section, keys in _RESUME_KEYS.items():
        old_section = saved.get(section) or {}
        for key in keys or now[section]:
            if f"{section}.{key}" in _RESUME_FREE:
                continue
            old, new = old_section.get(key, missing), now[section][key]
            if old is not missing and old != new:
                changes.append(f"{section}.{key} {old!r} -> {new!r}")
    return changes


def _resume(path: Path, cfg: Config, accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> Any:
    """Load weights, optimizer, scheduler and scaler states and the counters from `path`.

    The RNG is restored separately, right before the loop (`checkpoint.restore_rng`), so that nothing
    in between draws from the restored streams. Log records after the checkpoint's step (written by
    the interrupted run after its last save) are dropped: the resumed run writes them again.
    """
    from .checkpoint import load_checkpoint

    state = load_checkpoint(path, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                            rng=False)
    log = Path(cfg.training.output_dir) / "log.jsonl"
    if accelerator.is_main_process and log.is_file():
        _trim_log(log, state.step)
    accelerator.print(f"resumed from {path} at step {state.step}")
    return state


def _trim_log(log: Path, step: int) -> None:
    """Keep the records of steps <= `step` (and drop a line cut short by a kill); atomic."""
    kept = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, log)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _summary_rows(state, metrics, elapsed, prep, predicted, profiler, final, out, accelerator,
                  precision) -> list[tuple[str, str]]:
    from .memory import format_bytes

    # on CPU the measured peak is RSS above what the process held before loading (Python, libraries)
    peak = profiler.peak_bytes(above_baseline=True)
    label = "measured" + (" above the process baseline" if profiler.baseline_bytes else "")
    rows = [
        ("steps", f"{state.step} ({state.micro_step} micro-batches, {state.skipped_steps} skipped"
                  + (f", {state.scaler_skips} of them fp16 overflows)" if state.scaler_skips else ")")
                  + (f", stopped by {state.stop_reason}" if state.stop_reason not in ("", "max_steps") else "")),
        ("final loss", f"{metrics['loss']:.4f}" if "loss" in metrics else "-"),
        ("eval loss", f"{metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "-"),
        ("time", f"{elapsed:.1f} s"),
        ("tokens/s", f"{state.tokens / elapsed:,.0f}" if elapsed > 0 else "-"),
        ("peak memory", f"{format_bytes(peak)} {label}, {format_bytes(predicted['total'])} predicted"
                        + (f" (measured/predicted {peak / predicted['total']:.2f})" if predicted.get("total") else "")),
        ("trainable", prep.trainable_line),
        ("device", f"{accelerator.device} x{accelerator.num_processes}"),
        ("precision", precision.describe()),
        ("adapter" if prep.lora_targets or final and (final / "adapter_config.json").exists() else "model",
         str(final) if final else f"not saved (stopped); resume with training.resume=auto in {out}"),
    ]
    return rows
