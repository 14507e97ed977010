"""`train(config)`: build every piece a config describes (`build.setup`), run `fit`, save, and summarise."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from rich.console import Console

from .build import Parts, loop_args, setup, train_loader
from .checkpoint import find_latest, save_checkpoint
from .config import Config, load_config, with_split
from .device import capabilities
from .errors import RunError
from .eval_loss import evaluate_during_run
from .lm import unwrap
from .loop import fit
from .memory import MB, format_bytes, tensor_breakdown
from .planner import smaller_split
from .planner.advice import candidates, overrides_text
from .report import summary_table
from .rng import rng_state, set_rng_state
from .run_report import try_write_report
from .state import TrainState

__all__ = ["TrainResult", "train"]


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
    # Whole run, resumed sessions included (TrainState.train_seconds / eval_seconds):
    train_seconds: float = 0.0  # in training steps: no evaluation, no checkpoint saving
    eval_seconds: float = 0.0  # in evaluations, the final one included
    tokens_per_s: float | None = None  # training tokens / train_seconds (None: the batches counted no tokens)


def train(config: Config | dict | str | Path, overrides: list[str] | dict | tuple = (), *,
          on_step: Callable[[Any, dict], Any] | None = None) -> TrainResult:
    """Fine-tune as `config` describes: build -> fit -> finish.

    Args:
        config: a Config, a nested dict, or a YAML path.
        overrides: `section.key=value` strings (or a nested dict) applied on top.
        on_step: `on_step(state, metrics)` after every logged step (main process and others alike);
            a true return value stops the run, which still saves its final checkpoint.

    Returns:
        TrainResult with the final checkpoint, metrics and memory summary.

    Raises:
        ConfigError: invalid config or a request this device cannot honour (before anything loads).
        RunError, DataError, ModelError: bad output folder, data or model (all in minitune.errors).
    """
    cfg = load_config(config, overrides)  # first: a bad config fails before anything is built
    try:
        parts = setup(cfg)
    except Exception as e:
        if not _is_oom(e):
            raise
        raise _out_of_memory_loading(cfg) from None
    started = time.perf_counter()
    try:
        try:
            state = _fit(parts, on_step)
        except BaseException:
            _phase(parts.profiler, None)  # stops the profiler (a sampler thread where there is one)
            raise
        finally:
            parts.logger.close()
        return _finish(parts, state, started)
    finally:  # finished, stopped by a signal, or failed: the report shows the steps taken
        _report(parts)


def _fit(parts: Parts, on_step: Callable[[Any, dict], Any] | None) -> TrainState:
    """`fit` on the parts; with training.auto_batch_size, an out-of-memory error before the first
    step retries with a smaller micro-batch and more accumulation (the same examples per step)."""
    rng_at_start = rng_state()  # a retry starts from the same randomness
    while True:
        try:
            return fit(parts.accelerator, parts.model, parts.optimizer, parts.train_loader,
                       loop_args(parts.cfg, parts.total_steps), scheduler=parts.scheduler,
                       eval_loader=parts.eval_loader, loss_fn=parts.loss_fn, profiler=parts.profiler,
                       logger=parts.logger, save=parts.save, on_step=on_step, state=parts.state)
        except Exception as e:
            if not _is_oom(e):
                raise
            smaller = _smaller_split(parts)
            if smaller is None:
                raise _out_of_memory(e, parts) from None
            # Nothing was stepped yet: drop this attempt and start again with the smaller split.
            del e
            parts.optimizer.zero_grad(set_to_none=True)
            clear_device_cache(garbage_collection=True)
            t = smaller.training
            parts.logger.message(f"out of memory with training.batch_size={parts.cfg.training.batch_size}: "
                                 f"retrying with batch_size={t.batch_size} grad_accum={t.grad_accum}")
            parts.cfg = smaller
            parts.train_loader = parts.accelerator.prepare(train_loader(smaller, parts.data))
            if parts.accelerator.is_main_process:
                smaller.save(parts.out / "config.yaml")  # what checkpoints will hold, and a resume will need
            parts.state = TrainState()
            set_rng_state(rng_at_start)


def _finish(parts: Parts, state: TrainState, started: float) -> TrainResult:
    """After the loop (which began at `started`, a perf_counter time): the final evaluation and
    checkpoint, memory.json and the closing tables.

    Raises:
        RunError: the run stopped on non-finite losses or gradients.
    """
    cfg, accelerator, profiler, out = parts.cfg, parts.accelerator, parts.profiler, parts.out
    if state.stop_reason == "nonfinite":
        _phase(profiler, None)
        raise RunError(f"stopped: {state.bad_streak} consecutive step{'s' if state.bad_streak != 1 else ''} with a non-finite loss or gradient "
                       f"after step {state.step} ({state.skipped_steps} skipped in all); last good checkpoint: "
                       f"{find_latest(out) or 'none'}; lower optimizer.lr (or use bf16/fp32 instead of fp16) and "
                       "resume with training.resume=auto")
    metrics: dict[str, Any] = dict(state.last)
    final = None
    if state.stop_reason != "signal":
        done = dict(state.eval_losses).get(state.step)  # the loop evaluated these very weights at its last step
        if done is not None:
            metrics["eval_loss"] = done
        elif parts.eval_loader is not None:
            metrics["eval_loss"] = evaluate_during_run(accelerator, parts.model, parts.eval_loader, state,
                                                       max_batches=cfg.training.eval_batches, loss_fn=parts.loss_fn)
        final = save_checkpoint(out / "final", accelerator=accelerator, model=parts.model, optimizer=parts.optimizer,
                                scheduler=parts.scheduler, state=state, config=cfg, tokenizer=parts.tokenizer)
    predicted = ({**parts.predicted.to_dict(), **(parts.process.to_dict() if parts.process else {})}
                 if parts.predicted else None)
    memory: dict[str, Any] = {"predicted": predicted}
    if profiler is not None:
        profiler.stop()
        peak, what = profiler.training_peak()
        profiler.breakdown = tensor_breakdown(accelerator.unwrap_model(parts.model), parts.optimizer, peak,
                                              assume_grads=True)
        measured = measured_process_peak(profiler)
        memory = {**profiler.summary(), "training_peak_mb": peak / MB, "training_peak_kind": what,
                  "process_peak_mb": measured[0] / MB if measured else None,
                  "process_peak_kind": measured[1] if measured else None, **memory}
    result = TrainResult(out, final, state, metrics, memory, parts.prep.trainable_line, parts.precision,
                         train_seconds=state.train_seconds, eval_seconds=state.eval_seconds,
                         tokens_per_s=state.tokens / state.train_seconds if state.tokens and state.train_seconds else None)
    if accelerator.is_main_process:
        if profiler is not None:
            (out / "memory.json").write_text(json.dumps(memory, indent=1, default=str))
        console = Console()
        console.print(summary_table(_summary_rows(parts, result, time.perf_counter() - started)))
        if profiler is not None:
            console.print(profiler.table())
    _end_processes(parts)
    return result


def _end_processes(parts: Parts) -> None:
    """Let go of the prepared model, then end the process group (`end_training`). Under several
    processes the model is a DDP wrapper that holds the group: destroyed while one is alive, a gloo
    group lives on until the interpreter's teardown, which now and then aborts the finished process
    (SIGABRT, "terminate called without an active exception": 2 of 50 two-process launches here)."""
    parts.model = None
    parts.accelerator.free_memory()  # its own references to the prepared objects, then a garbage collection
    parts.accelerator.end_training()


def _report(parts: Parts) -> None:
    """report.png and report.html in the run folder (logging.report), once a step was logged; a
    failure to draw is one warning line, never the run's failure."""
    if not (parts.cfg.logging.report and parts.cfg.logging.jsonl and parts.logger.records
            and parts.accelerator.is_main_process):
        return
    png = try_write_report(parts.out)
    if png is not None:
        print(f"report: {png} (and report.html)", flush=True)


def _phase(profiler: Any, name: str | None) -> None:
    """Snapshot memory under `name` (None: stop the profiler); nothing with logging.memory=false."""
    if profiler is None:
        return
    if name:
        profiler.phase(name)
    else:
        profiler.stop()


def _is_oom(err: BaseException) -> bool:
    """Out of memory on any device: CUDA/XPU/MPS raise torch.OutOfMemoryError, the CPU allocator a
    RuntimeError (accelerate's `should_reduce_batch_size` knows the messages)."""
    return isinstance(err, torch.OutOfMemoryError) or should_reduce_batch_size(err)


def _smaller_split(parts: Parts) -> Config | None:
    """The config to retry with after an out-of-memory error (None: no retry): only with
    training.auto_batch_size, before the first step of a fresh run, while the micro-batch can shrink."""
    t = parts.cfg.training
    split = smaller_split(t.batch_size, t.grad_accum)
    if not (t.auto_batch_size and parts.state.step == 0 and parts.resume_from is None and split):
        return None
    return with_split(parts.cfg, *split)


def _out_of_memory(err: BaseException, parts: Parts) -> RunError:
    """One line: where memory ran out, how much was in use, and the settings that need less.
    The profiler's table (memory by phase up to this point) is printed above it."""
    cfg, state, profiler, device = parts.cfg, parts.state, parts.profiler, parts.accelerator.device
    t = cfg.training
    _phase(profiler, None)
    if parts.accelerator.is_main_process and profiler is not None:
        with contextlib.suppress(Exception):  # the error line below matters more than the table
            Console(stderr=True).print(profiler.table())
    now = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        now = (f"{format_bytes(torch.cuda.memory_allocated(device))} allocated, "
               f"{format_bytes(torch.cuda.memory_reserved(device))} reserved, {format_bytes(free)} free of "
               f"{format_bytes(total)} on {device}; ")
    peak = profiler.peak_bytes() if profiler is not None else 0
    if peak:
        now += f"peak so far {format_bytes(peak)}; "
    # the planner's list of changes that lower a peak, cheapest first (`minitune plan` simulates each)
    vocab = int(getattr(getattr(unwrap(parts.model), "config", None), "vocab_size", 0) or 0)
    knobs = [f"{overrides_text(over)}: {what}" for what, over, *_ in candidates(cfg, capabilities(device), vocab)]
    return RunError(f"out of memory at step {state.step + 1} (micro-batch {t.batch_size} x up to "
                    f"{cfg.data.max_length} tokens): {now}try {'; '.join(knobs) or 'a smaller model'}")


def _out_of_memory_loading(cfg: Config) -> RunError:
    """One line for an out-of-memory error before the first step (loading, quantizing, preparing):
    the weights themselves do not fit, so the micro-batch cannot help; the settings that shrink the
    weights, and the planner's command for what would fit."""
    knobs = []
    if cfg.quantization.mode != "4bit":
        knobs.append("quantization.mode=4bit")
    if cfg.model.dtype in ("auto", "float32") and cfg.quantization.mode == "none":
        knobs.append("model.dtype=bfloat16 (or float16)")
    if not cfg.lora.enabled:
        knobs.append("lora.enabled=true")
    return RunError("out of memory while loading and preparing the model (before the first step): "
                    f"try {', '.join(knobs) or 'a smaller model'}, or see what fits with "
                    "`minitune plan --config CONFIG --device DEVICE`")


def _memory_rows(profiler: Any, predicted: Any) -> list[tuple[str, str]]:
    """The summary's memory rows: the training peak measured and predicted, and, when they differ
    by more than 5%, the component of the prediction that was off."""
    guess = f"{format_bytes(predicted.total)} predicted" if predicted is not None else "no prediction"
    if profiler is None:  # logging.memory=false: neither measured nor predicted
        return [("peak memory", "not measured or predicted (logging.memory=false; `minitune plan` predicts)")]
    peak, what = profiler.training_peak()
    text = f"{format_bytes(peak)} measured ({what}), {guess} for the same steps"
    error = (predicted.total - peak) / peak if predicted is not None and peak else None
    if error is not None:
        text += f" ({error:+.1%})"
    rows = [("peak memory", text)]
    if error is not None and abs(error) > 0.05 and profiler.breakdown:
        rows.append(("memory off by", off_component(predicted, profiler.breakdown, peak)))
    return rows


def measured_process_peak(profiler: Any) -> tuple[int, str] | None:
    """(bytes, what) the whole process reached over the steps `process_peak` predicts (loading and
    the measurement window, steps 1-2): on CPU the highest RSS (the kernel's peak on Linux), on MPS the kernel's peak RSS
    of the process (unified memory; ru_maxrss covers the whole run), on CUDA the caching allocator's
    peak reserved plus what the driver shows beyond the allocator's reserve now (the context and the
    kernels loaded into it, which stay; on a shared GPU other processes' memory too); None without a
    profiler."""
    if profiler is None:
        return None
    if profiler.kind == "cpu":
        if profiler.window_process_peak is not None:
            return profiler.window_process_peak, f"{profiler.peak_rss_label}, loading and steps 1-{profiler.window_steps}"
        return profiler.peak_bytes(), f"{profiler.peak_rss_label}, whole run"
    if profiler.kind == "mps":
        import resource  # Unix only

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "peak RSS of the process (ru_maxrss)"
    free, total = torch.cuda.mem_get_info(profiler.device)
    outside = max(0, total - free - torch.cuda.memory_reserved(profiler.device))
    return (torch.cuda.max_memory_reserved(profiler.device) + outside,
            "peak reserved + the context and kernels (the driver's view)")


def _process_rows(profiler: Any, process: Any) -> list[tuple[str, str]]:
    """The summary's row for the whole process: measured beside `process_peak`."""
    measured = measured_process_peak(profiler)
    if process is None and measured is None:
        return []
    text = f"{format_bytes(measured[0])} measured ({measured[1]})" if measured else "not measured"
    if process is not None:
        text += f", {format_bytes(process.total)} predicted (process_peak)"
        if measured and measured[0]:
            text += f" ({(process.total - measured[0]) / measured[0]:+.1%})"
    if profiler is not None and profiler.kind == "cpu":
        text += f"; whole run {format_bytes(profiler.peak_bytes())} peak RSS"
    return [("process memory", text)]


def off_component(predicted: Any, measured: dict[str, int], peak: int) -> str:
    """Which part of the prediction was off: the tensors that can be counted after the run (weights,
    trainable weights, gradients, optimizer state, from `tensor_breakdown`) against their predicted
    sizes; when they agree, the rest (activations, logits and temporaries)."""
    p = predicted.breakdown
    pairs = {
        "weights": (sum(v for k, v in p.items() if k.startswith("weights/")),
                    sum(v for k, v in measured.items() if k.startswith("frozen_weights/"))),
        "trainable weights": (p.get("adapters", 0) + p.get("trainable weights", 0), measured.get("trainable_weights", 0)),
        "gradients": (p.get("gradients", 0), measured.get("gradients", 0)),
        "optimizer state": (p.get("optimizer_state", 0), measured.get("optimizer_state", 0)),
    }
    name, (guess, real) = max(pairs.items(), key=lambda kv: abs(kv[1][0] - kv[1][1]))
    if abs(guess - real) > 0.05 * peak:
        return f"{name}: {format_bytes(guess)} predicted, {format_bytes(real)} measured"
    rest = sum(v for k, v in p.items() if k in ("activations", "logits/loss", "temporaries"))
    held = max(0, peak - measured.get("total_tensors", 0))
    return (f"activations, logits and temporaries: {format_bytes(rest)} predicted, about {format_bytes(held)} "
            "measured (the peak less the weights, gradients and optimizer state)")


def _startup_text(seconds: dict[str, float]) -> str:
    """'6.2 s before step 1: setup 0.4, data 1.1, load 3.0, plan 1.2, prepare 0.5' (step 1's own time,
    compilation included, is log.jsonl's step_time_s of step 1)."""
    return (f"{sum(seconds.values()):.1f} s before step 1: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
            if seconds else "-")


def _summary_rows(parts: Parts, result: TrainResult, elapsed: float) -> list[tuple[str, str]]:
    """The closing table's rows; `elapsed`: this session's wall time from the loop's start to the final checkpoint."""
    profiler, predicted, prep, accelerator = parts.profiler, parts.predicted, parts.prep, parts.accelerator
    state, metrics, final = result.state, result.metrics, result.checkpoint
    spent = f"training {result.train_seconds:.1f} s, evaluation {result.eval_seconds:.1f} s"
    memory_rows = [*_memory_rows(profiler, predicted), *_process_rows(profiler, parts.process)]
    rows = [
        ("steps", f"{state.step} ({state.micro_step} micro-batches, {state.skipped_steps} skipped"
                  + (f", {state.scaler_skips} of them fp16 overflows)" if state.scaler_skips else ")")
                  + (f", stopped by {state.stop_reason}" if state.stop_reason not in ("", "max_steps") else "")),
        ("final loss", f"{metrics['loss']:.4f}" if "loss" in metrics else "-"),
        ("eval loss", f"{metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "-"),
        ("time", f"{elapsed:.1f} s this session (whole run: {spent})" if parts.resume_from
                 else f"{elapsed:.1f} s ({spent})"),
        ("tokens/s", f"{result.tokens_per_s:,.0f} (training time only)" if result.tokens_per_s else "-"),
        ("startup", _startup_text(parts.startup)),
        *memory_rows,
        ("trainable", prep.trainable_line),
        ("device", f"{accelerator.device} x{accelerator.num_processes}"),
        ("precision", parts.precision.describe()),
        ("adapter" if prep.lora_targets else "model",
         str(final) if final else f"not saved (stopped); resume with training.resume=auto in {parts.out}"),
    ]
    return rows
