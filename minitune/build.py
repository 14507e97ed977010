"""Builders: each `setup_*` makes one part of a run from its config, and `setup` makes them all into
one `Parts` (torchtune's `_setup_*` factories, litgpt's `main`). `train`, `evaluate_checkpoint` and
bench/ build with these, so a run is put together one way.

`setup` keeps the order in which everything that can be wrong with the input is found before any
weights load: device and precision -> device checks -> resume checkpoint -> output folder ->
tokenizer -> data -> model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate.tracking
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, LoggerType, set_seed
from torch import nn

from . import device as dev
from .checkpoint import restore_rng, save_checkpoint
from .config import Config
from .data import DataBundle, build_data, make_dataloader
from .errors import ConfigError, DataError, RunError
from .launch import check_processes
from .lm import PACKING_MODEL_TYPES, model_kind
from .loop import LoopArgs
from .losses import LossFn, loss_fn_for
from .memory import MB, MemoryProfiler, format_bytes
from .model import load_model, load_tokenizer, model_config, resolve_kind
from .optim import build_optimizer, build_scheduler
from .planner import MicroBatch, Prediction, load_peak, simulate
from .prepare import PreparationReport, prepare_model
from .process_memory import ProcessPeak, release_free_memory, tune_malloc
from .report import RunLogger
from .resume import resolve_resume, restore_run
from .rss import rss_bytes
from .run_folder import check_output_dir, prepare_output_dir
from .state import TrainState

__all__ = ["Parts", "loop_args", "setup", "setup_accelerator", "setup_data", "setup_model", "train_loader"]


@dataclass
class Parts:
    """Everything `fit` and the end of a run need, built from one config by `setup`."""

    cfg: Config  # the config the run trains with (precision resolved; saved in every checkpoint)
    accelerator: Accelerator
    precision: dev.Precision
    model: nn.Module  # prepared (DDP-wrapped under several processes)
    tokenizer: Any
    data: DataBundle
    train_loader: Any
    eval_loader: Any  # None without validation data
    optimizer: torch.optim.Optimizer
    scheduler: Any
    profiler: MemoryProfiler | None  # None with logging.memory=false
    logger: RunLogger
    loss_fn: LossFn
    prep: PreparationReport
    predicted: Prediction | None  # the predicted peak of steps 1-2 (None: the planner could not simulate this model)
    total_steps: int
    out: Path
    resume_from: Path | None
    state: TrainState
    process: ProcessPeak | None = None  # the predicted peak of the whole process (None without a prediction)
    malloc: str = ""  # what `tune_malloc` did
    startup: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds of each phase of `setup`

    def save(self, state: TrainState) -> Path:
        """Save `state` as out/checkpoint-NNNNNN (what `fit` calls every training.save_every steps)."""
        path = self.out / f"checkpoint-{state.step:06d}"
        save_checkpoint(path, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, state=state, config=self.cfg, tokenizer=self.tokenizer,
                        keep_last=self.cfg.training.keep_last)
        self.logger.message(f"saved {path}")
        return path


class _Laps:
    """The seconds between marks: the time before step 1, phase by phase (`Parts.startup`)."""

    def __init__(self) -> None:
        self.last, self.seconds = time.perf_counter(), {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.last, 3)
        self.last = now


def setup(cfg: Config) -> Parts:
    """Build every part of a training run from `cfg`: device and precision, accelerator, data, model,
    loaders, optimizer, scheduler, resumed state, profiler and logger, in that order.

    Args:
        cfg: a validated Config.

    Returns:
        The Parts, ready for `fit`; when resuming, every RNG is restored last.

    Raises:
        ConfigError, RunError, CheckpointError, DataError, ModelError: bad input, before any weights
            load where the input alone shows it.
    """
    malloc = tune_malloc()  # first: every allocation from here on is placed under these settings
    laps = _Laps()
    cfg, where = dev.setup_device(cfg)
    if problems := _tracker_problems(cfg.logging.trackers):
        raise ConfigError(problems)
    resume_from, cfg = resolve_resume(cfg)
    out = check_output_dir(cfg)
    accelerator = setup_accelerator(cfg, where.device, project_dir=out)
    for note in where.notes:
        accelerator.print(f"warning: {note}")
    t = cfg.training
    set_seed(t.seed)
    laps.mark("setup")  # device, precision, resume checks, the output folder, the accelerator
    tokenizer = load_tokenizer(cfg.model)
    data = setup_data(cfg, tokenizer)
    laps.mark("data")
    baseline = rss_bytes()  # the process before the model loads: libraries, tokenizer, data
    profiler = _start_profiler(cfg, accelerator.device)
    try:  # a failure from here on (bad weights, a checkpoint that does not fit) stops the profiler
        model, prep, loss_fn, predicted, process = _model_and_prediction(cfg, accelerator.device, data, profiler,
                                                                         baseline, laps)
        if t.compile:
            model = torch.compile(model)

        set_seed(t.seed)  # data order and dropout do not depend on how much randomness loading used
        loader, eval_loader = train_loader(cfg, data), _eval_loader(cfg, data)
        optimizer = build_optimizer(model, cfg.optimizer, accelerator.device)
        if profiler is not None:  # the window the prediction is compared with: the first TRACE_STEPS steps
            optimizer.register_step_post_hook(lambda *_: profiler.optimizer_stepped())
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if eval_loader is not None:
            eval_loader = accelerator.prepare(eval_loader)
        total_steps = _total_steps(cfg, len(loader))
        scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)

        state = TrainState()
        if resume_from is not None:
            state = restore_run(resume_from, cfg, accelerator, model, optimizer, scheduler)
        prepare_output_dir(out, cfg, resume_from is not None, accelerator)
        if accelerator.is_main_process:
            cfg.save(out / "config.yaml")
        if cfg.logging.trackers:
            accelerator.init_trackers("minitune", config=_flat(cfg.to_dict()))
        laps.mark("prepare")  # loaders, optimizer, accelerate's prepare, a resumed state, the output folder
        logger = RunLogger(accelerator, out if cfg.logging.jsonl else None, total_steps, progress=cfg.logging.progress,
                           initial_step=state.step, trackers=bool(cfg.logging.trackers), append=resume_from is not None,
                           first_record={"precision": dataclasses.asdict(where.precision), "startup_s": laps.seconds})
        parts = Parts(cfg, accelerator, where.precision, model, tokenizer, data, loader, eval_loader, optimizer,
                      scheduler, profiler, logger, loss_fn, prep, predicted, total_steps, out, resume_from, state,
                      process, malloc, laps.seconds)
        _startup_lines(parts)
        if profiler is not None:
            profiler.training_starts()  # what loading held is recorded apart from the training peak
        if resume_from is not None:
            restore_rng(resume_from, accelerator=accelerator)  # last, so nothing above draws from it
    except BaseException:
        if profiler is not None:
            profiler.stop()
        raise
    return parts


def _model_and_prediction(cfg: Config, device: torch.device, data: DataBundle, profiler: MemoryProfiler | None,
                          baseline: int, laps: _Laps) -> tuple:
    """The loaded and prepared model, its report and loss, and the predicted training and process
    peaks (None, None with logging.memory=false: the prediction is what the measurement is compared
    with, so without one the simulation is not worth its seconds; `minitune plan` predicts on demand)."""
    t = cfg.training
    model, prep = setup_model(cfg, device, on_phase=profiler.phase if profiler is not None else None)
    release_free_memory()  # loading's temporaries (file buffers, dequantized copies) go back to the system
    loss_fn = loss_fn_for(t.loss, t.loss_chunk_size, model)  # chunked only where it gives the model's loss
    laps.mark("load")
    predicted = predict_run(cfg, model, data, device, loss_fn) if cfg.logging.memory else None
    process = predicted.process(device.type, baseline) if predicted is not None else None
    laps.mark("plan")
    return model, prep, loss_fn, predicted, process


# The measured training peak that the prediction is compared with covers this many optimizer
# steps; on CPU the allocator is traced over loading and these steps (exact bytes; the profiler
# behind the trace costs a few % of those steps' time)
TRACE_STEPS = 2


def predict_run(cfg: Config, model: nn.Module, data: DataBundle, device: torch.device,
                loss_fn: LossFn | None = None) -> Prediction | None:
    """The run's predicted training peak for the micro-batches of its first TRACE_STEPS steps
    (`minitune.planner.simulate` on a fake copy of `model`): what the measurement of those steps
    is compared with. The most any step of this config can need is `minitune plan`'s answer.
    `loss_fn`: the loss the run uses (None: the one the config names, checked on the fake copy).

    Returns:
        The Prediction, or None, with a warning, when the model cannot be simulated (a custom
        architecture whose code reads tensor values): the run goes on without a prediction.
    """
    try:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        predicted = simulate(model, cfg, steps=_first_steps(cfg, data, model_kind(model)), device_type=device.type,
                             cuda_capability=capability, loss_fn=loss_fn)
        predicted.loading = load_peak(cfg).bytes  # process_peak decides where it counts (not on CUDA)
        return predicted
    except Exception as e:  # the planner must never stop a run: say why there is no prediction
        warnings.warn(f"no memory prediction for this model ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})", stacklevel=2)
        return None


def _first_steps(cfg: Config, data: DataBundle, kind: str) -> list[list[MicroBatch]]:
    """The micro-batches of the run's first TRACE_STEPS optimizer steps, from a fresh loader with the
    run's seeded order (no workers; the run's own loader is untouched). Per step the first
    micro-batch (it creates the gradients) and, with accumulation, the largest of the others."""
    one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    order = iter(train_loader(one, data).batch_sampler)  # the indices of each batch, in the run's order
    batches = (data.collator.collate([data.train[i] for i in idx]) for idx in order)
    steps = []
    for _ in range(TRACE_STEPS):
        window = [MicroBatch.of(b, kind) for b in itertools.islice(batches, cfg.training.grad_accum)]
        if not window:
            break
        rest = window[1:]
        steps.append(window[:1] + ([max(rest, key=lambda mb: (mb.tokens, mb.targets or 0))] if rest else []))
    return steps


def _tracker_problems(names: list[str]) -> list[str]:
    """logging.trackers that Accelerate does not know, or whose package is not installed (Accelerate
    itself drops those without a word, and the run would log nowhere)."""
    known, available = LoggerType.list(), {str(t) for t in accelerate.tracking.get_available_trackers()}
    problems = []
    for name in names:
        if str(name) not in known:
            problems.append(f"logging.trackers: unknown tracker '{name}'; choose from {', '.join(known)}")
        elif name != "all" and str(name) not in available:
            problems.append(f"logging.trackers: '{name}' is not installed (pip install {name}), or remove it "
                            "from logging.trackers")
    return problems


def setup_accelerator(cfg: Config, device: torch.device, *, project_dir: Path | None = None) -> Accelerator:
    """A fresh Accelerator for `device` and the config's precision, checked against the launch.

    Args:
        cfg: the config (precision resolved: `device.setup_device`).
        device: where to train.
        project_dir: the run folder (trackers write there).

    Returns:
        The Accelerator.

    Raises:
        RunError: a launch mode the config cannot run under (e.g. a quantized model under FSDP).
    """
    reset_accelerate_state()
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=cfg.training.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=cfg.logging.trackers or None,
        project_dir=str(project_dir) if project_dir is not None else None,
    )
    problems = check_processes(accelerator, quantized=cfg.quantization.mode != "none",
                                   grad_accum=cfg.training.grad_accum)
    if problems:
        raise RunError("; ".join(problems))
    return accelerator


def setup_data(cfg: Config, tokenizer: Any) -> DataBundle:
    """The tokenized train and validation data, for the model kind the config describes.

    Args:
        cfg: the config (data and model sections).
        tokenizer: the model's tokenizer.

    Returns:
        The DataBundle (train, validation, collator, stats).

    Raises:
        DataError: unreadable data, missing columns, no usable example.
        ModelError: the model's config (which says causal or seq2seq) cannot be read.
    """
    seq2seq = resolve_kind(cfg.model) == "seq2seq"
    if cfg.data.packing and not seq2seq:
        model_type = model_config(cfg.model).model_type
        if model_type not in PACKING_MODEL_TYPES:
            raise DataError(f"data.packing needs a model whose attention keeps packed examples apart; {model_type} "
                            "models' attention ignores the per-example positions, so examples would see each other: "
                            f"set data.packing=false (packing works for {', '.join(sorted(PACKING_MODEL_TYPES))})")
    return build_data(cfg.data, tokenizer, seq2seq=seq2seq)


def setup_model(cfg: Config, device: torch.device | None, *, on_phase: Any = None,
                base: nn.Module | None = None) -> tuple[nn.Module, PreparationReport]:
    """The model, loaded (quantized as asked) and prepared: frozen base, fp32 norms, gradient
    checkpointing, LoRA (`prepare_model`).

    Args:
        cfg: the config (model, quantization, lora and training sections).
        device: where quantized weights go (unquantized ones load on CPU; Accelerate moves them).
        on_phase: called with 'load' (or 'load+quantize (...)'), 'prepare' and 'lora' after each.
        base: an already loaded model to prepare instead of loading one.

    Returns:
        (model, report).

    Raises:
        ModelError: the model cannot be loaded, or LoRA targets match nothing.
    """
    t = cfg.training
    if base is None:
        base = load_model(cfg.model, cfg.quantization, device=device, seed=t.seed)
        if on_phase is not None:
            q = cfg.quantization.mode
            on_phase("load" if q == "none" else f"load+quantize ({q})")
    return prepare_model(base, cfg.lora, fp32_norms=t.fp32_norms, gradient_checkpointing=t.gradient_checkpointing,
                         reentrant=t.checkpointing_reentrant, on_phase=on_phase)


def train_loader(cfg: Config, data: DataBundle) -> Any:
    """The training DataLoader: seeded order (per epoch), micro-batches of training.batch_size.

    Args:
        cfg: the config (training.batch_size and seed, data.group_by_length and num_workers).
        data: the tokenized data (`setup_data`).

    Returns:
        The DataLoader, not yet prepared by the Accelerator.
    """
    t = cfg.training
    return make_dataloader(data.train, data.collator, batch_size=t.batch_size, shuffle=True, seed=t.seed,
                           group_by_length=cfg.data.group_by_length, num_workers=cfg.data.num_workers)


def _start_profiler(cfg: Config, device: torch.device) -> MemoryProfiler | None:
    """The memory profiler, watching from before the model loads (None with logging.memory=false: no
    records, no measured peak; the prediction stays)."""
    if not cfg.logging.memory:
        return None
    profiler = MemoryProfiler(device, window_steps=TRACE_STEPS,
                              phases_every=cfg.logging.memory_phases_every or cfg.logging.log_every).start()
    profiler.phase("start")
    return profiler


def _eval_loader(cfg: Config, data: DataBundle) -> Any:
    """The validation batches, in order (None without validation rows)."""
    if data.validation is None or not len(data.validation):
        return None
    return make_dataloader(data.validation, data.collator, batch_size=cfg.training.batch_size, shuffle=False,
                           seed=cfg.training.seed, num_workers=cfg.data.num_workers)


def loop_args(cfg: Config, total_steps: int) -> LoopArgs:
    """The loop settings a config gives (`fit`'s `args`).

    Args:
        cfg: the config (training and logging sections).
        total_steps: optimizer steps to reach (training.max_steps, or what the epochs come to).

    Returns:
        The LoopArgs.
    """
    t = cfg.training
    return LoopArgs(max_steps=total_steps, grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm,
                    log_every=cfg.logging.log_every, eval_every=t.eval_every, eval_batches=t.eval_batches,
                    save_every=t.save_every, max_bad_steps=t.max_bad_steps,
                    module_grad_norms=cfg.logging.module_grad_norms)


def _startup_lines(parts: Parts) -> None:
    """What was built: trainable parameters, fp32 casting, data and steps, the predicted peak."""
    cfg, prep, log = parts.cfg, parts.prep, parts.logger
    t = cfg.training
    log.message(f"precision: {parts.precision.describe()}")
    log.message(prep.trainable_line)
    if prep.fp32_cast_params:
        log.message(f"fp32 casting ({t.fp32_norms}): {prep.fp32_cast_params:,d} parameters in "
                    f"{len(prep.fp32_cast_modules)} modules, +{format_bytes(prep.fp32_cast_bytes)}")
    n_val = len(parts.data.validation) if parts.data.validation is not None else 0
    log.message(f"data: {len(parts.data.train):,d} train / {n_val:,d} validation examples; {parts.total_steps} "
                f"optimizer steps of {t.batch_size}x{t.grad_accum}x{parts.accelerator.num_processes} examples")
    p = parts.predicted
    if p is not None:
        log.message(f"predicted peak of steps 1-{TRACE_STEPS} {format_bytes(p.total)} (largest micro-batch "
                    f"{p.shape['batch_size']} x {p.shape['seq_len']} tokens; `minitune plan` gives the most any "
                    "step of this config can need): "
                    + ", ".join(f"{k} {format_bytes(v)}" for k, v in p.breakdown.items() if v >= MB))
    if parts.process is not None:
        which = "RSS" if parts.process.kind != "cuda" else "device memory"
        log.message(f"predicted process peak ({which}) {parts.process.describe()}")
    if parts.malloc:
        log.message(f"malloc: {parts.malloc}")


def _total_steps(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.training.max_steps > 0:
        return cfg.training.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.training.grad_accum)
    return max(1, math.ceil(cfg.training.epochs * steps_per_epoch))


def reset_accelerate_state() -> None:
    """Accelerate keeps one global state per process; a second `train()` in the same Python process
    (a notebook, a test, an embedding codebase) may ask for another precision. Outside a distributed
    launch, start from a clean state."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
