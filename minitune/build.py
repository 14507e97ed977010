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
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate.tracking
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, LoggerType, set_seed
from torch import nn

from . import device as dev
from .checkpoint import clean_debris, find_latest, load_checkpoint, restore_rng, save_checkpoint, verify_checkpoint
from .config import Config, yaml_load
from .data import DataBundle, build_data, make_dataloader
from .errors import CheckpointError, ConfigError, RunError
from .lm import model_kind
from .loop import LoopArgs
from .losses import LossFn, loss_fn_for
from .memory import MB, MemoryProfiler, format_bytes
from .model import PreparationReport, load_model, load_tokenizer, prepare_model, resolve_kind
from .optim import build_optimizer, build_scheduler, keep_settings, settings
from .planner import MicroBatch, Prediction, simulate
from .process_memory import ProcessPeak, process_peak, release_free_memory, rss_bytes, tune_malloc
from .report import RunLogger
from .state import TrainState

__all__ = ["Parts", "loop_args", "setup", "setup_accelerator", "setup_data", "setup_model", "train_loader",
           "with_split"]


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

    def save(self, state: TrainState) -> Path:
        """Save `state` as out/checkpoint-NNNNNN (what `fit` calls every training.save_every steps)."""
        path = self.out / f"checkpoint-{state.step:06d}"
        save_checkpoint(path, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, state=state, config=self.cfg, tokenizer=self.tokenizer,
                        keep_last=self.cfg.training.keep_last)
        self.logger.message(f"saved {path}")
        return path


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
    cfg, where = dev.setup_device(cfg)
    problems = _tracker_problems(cfg.logging.trackers)
    if problems:
        raise ConfigError(problems)
    resume_from, cfg = resolve_resume(cfg)
    out = check_output_dir(cfg)
    accelerator = setup_accelerator(cfg, where.device, project_dir=out)
    for note in where.notes:
        accelerator.print(f"warning: {note}")
    t = cfg.training
    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = setup_data(cfg, tokenizer)
    baseline = rss_bytes()  # the process before the model loads: libraries, tokenizer, data
    profiler = None  # logging.memory=false: no sampler, no records, no measured peak (the prediction stays)
    if cfg.logging.memory:
        profiler = MemoryProfiler(accelerator.device, window_steps=TRACE_STEPS,
                                  phases_every=cfg.logging.memory_phases_every or cfg.logging.log_every).start()
        profiler.phase("start")
    try:  # a failure from here on (bad weights, a checkpoint that does not fit) stops the sampler thread
        model, prep = setup_model(cfg, accelerator.device, on_phase=profiler.phase if profiler is not None else None)
        release_free_memory()  # loading's temporaries (file buffers, dequantized copies) go back to the system
        loss_fn = loss_fn_for(t.loss, t.loss_chunk_size, model)  # chunked only where it gives the model's loss
        predicted = predict_run(cfg, model, data, accelerator.device, loss_fn)
        process = (process_peak(accelerator.device.type, predicted.total, baseline=baseline, cuda_terms=predicted.cuda)
                   if predicted is not None else None)
        if t.compile:
            model = torch.compile(model)

        set_seed(t.seed)  # data order and dropout do not depend on how much randomness loading used
        loader = train_loader(cfg, data)
        eval_loader = None
        if data.validation is not None and len(data.validation):
            eval_loader = make_dataloader(data.validation, data.collator, batch_size=t.batch_size, shuffle=False,
                                          seed=t.seed, num_workers=cfg.data.num_workers)
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
            state = _resume(resume_from, cfg, accelerator, model, optimizer, scheduler)
        _prepare_output_dir(out, cfg, resume_from is not None, accelerator)
        if accelerator.is_main_process:
            cfg.save(out / "config.yaml")
        if cfg.logging.trackers:
            accelerator.init_trackers("minitune", config=_flat(cfg.to_dict()))
        logger = RunLogger(accelerator, out if cfg.logging.jsonl else None, total_steps, progress=cfg.logging.progress,
                           initial_step=state.step, trackers=bool(cfg.logging.trackers), append=resume_from is not None,
                           first_record={"precision": dataclasses.asdict(where.precision)})
        parts = Parts(cfg, accelerator, where.precision, model, tokenizer, data, loader, eval_loader, optimizer, scheduler, profiler,
                      logger, loss_fn, prep, predicted, total_steps, out,
                      resume_from,
                      state, process, malloc)
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
        return simulate(model, cfg, steps=_first_steps(cfg, data, model_kind(model)), device_type=device.type,
                        cuda_capability=capability, loss_fn=loss_fn)
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
    _reset_single_process_state()
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=cfg.training.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=cfg.logging.trackers or None,
        project_dir=str(project_dir) if project_dir is not None else None,
    )
    problems = dev.check_processes(accelerator, quantized=cfg.quantization.mode != "none",
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


def with_split(cfg: Config, batch_size: int, grad_accum: int) -> Config:
    """A copy of `cfg` with another micro-batch / accumulation split (`cfg` is left as it is).

    Args:
        cfg: the config.
        batch_size: the new training.batch_size.
        grad_accum: the new training.grad_accum.

    Returns:
        The new Config.
    """
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=batch_size,
                                                                 grad_accum=grad_accum))


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


def _reset_single_process_state() -> None:
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


# ----------------------------------------------------------------------------------------------
# the output folder

_RUN_FILES = ("config.yaml", "log.jsonl", "final")


def check_output_dir(cfg: Config) -> Path:
    """Refuse a folder that holds another run (unless overwrite or resume) or that cannot be written.

    Creates nothing: a run that fails on bad input afterwards leaves no trace; `_prepare_output_dir`
    creates the folder once every input check has passed.

    Raises:
        RunError: the folder is a file, holds another run, or is not writable.
    """
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"training.output_dir '{out}' is a file, not a folder; choose another training.output_dir")
    holds_run = out.is_dir() and (any((out / f).exists() for f in _RUN_FILES)
                                  or any(p.name.startswith("checkpoint-") for p in out.iterdir()))
    if holds_run and not cfg.training.overwrite and not cfg.training.resume:
        raise RunError(f"output folder '{out}' already holds a run; pick another training.output_dir, "
                       "resume it with training.resume=auto, or set training.overwrite=true")
    if holds_run:
        _refuse_sheets_in_checkpoints(out)
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


def _refuse_sheets_in_checkpoints(out: Path) -> None:
    """Training deletes or replaces checkpoint folders (overwrite, keep_last, a resumed `final`): refuse,
    before that, to run over one that holds a human-evaluation sheet (eval.py writes to `<run>/eval/`
    now; an older minitune, `--out` or a user put it there), since its scores may be hours of work."""
    for folder in sorted([out / "final", *out.glob("checkpoint-*"), *out.glob(".old-*")]):
        sheets = sorted(folder.glob("human_eval*.csv")) if folder.is_dir() else []
        if sheets:
            raise RunError(f"'{sheets[0]}' is a human-evaluation sheet (or key) inside the checkpoint folder "
                           f"'{folder}', which training deletes or replaces: move the folder's human_eval*.csv "
                           f"files to '{out / 'eval' / folder.name}' first")


def _prepare_output_dir(out: Path, cfg: Config, resuming: bool, accelerator: Any) -> None:
    """Create the output folder (every input check has passed by now); with training.overwrite and no
    resume, remove the previous run's checkpoints, so that a later resume=auto cannot pick one of them."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.training.overwrite and not resuming:
            for old in [out / "final", *out.glob("checkpoint-*")]:
                if old.is_dir():
                    shutil.rmtree(old)
        clean_debris(out)  # .tmp-* folders of saves that were killed
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# resuming

# Every config key is in exactly one of these two sets (tests/test_resume.py fails on a key in
# neither, so a new field cannot slip through). RESUME_FREE: a resumed run may change it, and the
# change takes effect: what the run reports, where and how often it evaluates and saves, how long it
# runs, memory knobs that recompute the same numbers, the device (its precision is compared through
# the resolved model.dtype and training.mixed_precision). RESUME_REFUSED: what the numbers depend on;
# a change is refused, naming old and new value, unless training.resume_force, and then it takes
# effect too (the optimizer's settings are put back over the checkpoint's: `optim.keep_settings`).
# A key in neither set is compared like a refused one.
RESUME_FREE = frozenset({
    "model.trust_remote_code",
    "data.num_workers",
    "training.output_dir", "training.overwrite", "training.resume", "training.resume_force", "training.epochs",
    "training.max_steps", "training.auto_batch_size", "training.gradient_checkpointing",
    "training.checkpointing_reentrant", "training.device", "training.eval_every", "training.eval_batches",
    "training.save_every", "training.keep_last", "training.max_bad_steps",
    "logging.log_every", "logging.progress", "logging.jsonl", "logging.trackers", "logging.memory", "logging.report",
    "logging.memory_phases_every", "logging.module_grad_norms",
    "generation.max_new_tokens", "generation.temperature", "generation.top_p", "generation.repetition_penalty",
    "generation.no_repeat_ngram_size", "generation.stop",
})
RESUME_REFUSED = frozenset({
    "model.name_or_path", "model.gguf_file", "model.tokenizer", "model.preset", "model.config_file", "model.kind",
    "model.dtype", "model.attn_implementation",
    "quantization.mode", "quantization.quant_type", "quantization.double_quant", "quantization.compute_dtype",
    "quantization.skip_modules",
    "lora.enabled", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.bias", "lora.modules_to_save",
    "lora.use_rslora", "lora.use_dora",
    "data.path", "data.split", "data.validation_split", "data.validation_fraction", "data.prompt", "data.response",
    "data.mask_prompt", "data.chat_template", "data.system_prompt", "data.assistant_only_loss", "data.add_eos",
    "data.max_length", "data.max_target_length", "data.packing", "data.group_by_length", "data.max_samples",
    "data.fix_text",
    "optimizer.name", "optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "optimizer.eps",
    "optimizer.scheduler", "optimizer.warmup_steps", "optimizer.warmup_ratio", "optimizer.fused",
    "training.batch_size", "training.grad_accum", "training.seed", "training.max_grad_norm",
    "training.mixed_precision", "training.fp32_norms", "training.compile", "training.loss", "training.loss_chunk_size",
})


def resolve_resume(cfg: Config) -> tuple[Path | None, Config]:
    """The checkpoint to resume from (None: start fresh), checked before anything loads, and the
    config to resume with (`cfg`, or a copy with the micro-batch split training.auto_batch_size
    settled on in the checkpoint's run).

    Raises:
        CheckpointError: the checkpoint is incomplete, unreadable, or from an incompatible config.
    """
    r = cfg.training.resume
    if not r:
        return None, cfg
    if r == "auto":
        path = find_latest(cfg.training.output_dir)
        if path is None:
            return None, cfg  # nothing saved yet: start fresh
    else:
        path = Path(r)
        if not path.is_dir():
            raise CheckpointError(f"training.resume='{r}' does not exist; give a checkpoint folder "
                                  "(e.g. runs/x/checkpoint-000100) or training.resume=auto")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    counters = verify_checkpoint(path, processes)
    saved = _saved_config(path)
    cfg = _auto_batch_split(saved, cfg)
    changes = _resume_changes(saved, cfg)
    if counters.get("num_processes", 1) != processes:
        changes.append(f"processes {counters.get('num_processes', 1)} -> {processes}")
    if changes and not cfg.training.resume_force:
        raise CheckpointError(f"cannot resume from '{path}' exactly: this run changes {'; '.join(changes)}; "
                              "undo the change, start a new run in another training.output_dir, or set "
                              "training.resume_force=true to resume anyway")
    if changes:
        print(f"warning: resuming from '{path}' with changes ({'; '.join(changes)}): they take effect from "
              "here on; the run will not match an uninterrupted one", flush=True)
    return path, cfg


def _saved_config(path: Path) -> dict:
    """The checkpoint's config.yaml as a dict ({} if it has none)."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return {}
    try:
        saved = yaml_load(saved_file.read_text()) or {}
        if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values() if v is not None):
            raise ValueError("not a mapping of sections")
        return saved
    except (yaml.YAMLError, ValueError):  # ValueError: also bytes that are not UTF-8 text
        raise CheckpointError(f"checkpoint '{path}' has an unreadable config.yaml; delete that folder and "
                              "resume from an earlier one") from None


def _auto_batch_split(saved: dict, cfg: Config) -> Config:
    """With training.auto_batch_size, continue with the smaller micro-batch the checkpoint's run
    settled on (same examples per step); else `cfg` as it is."""
    old_t = saved.get("training") or {}
    old_split = old_t.get("batch_size"), old_t.get("grad_accum")
    t = cfg.training
    if (t.auto_batch_size and None not in old_split and old_split != (t.batch_size, t.grad_accum)
            and old_split[0] * old_split[1] == t.batch_size * t.grad_accum):
        print(f"training.auto_batch_size: resuming with the checkpoint's batch_size={old_split[0]} "
              f"grad_accum={old_split[1]}", flush=True)
        return with_split(cfg, *old_split)
    return cfg


def _resume_changes(saved: dict, cfg: Config) -> list[str]:
    """'section.key: old -> new' for each setting that differs from the checkpoint's config.yaml."""
    if not saved:
        return []
    # this config as its config.yaml would read back (yaml_load keeps true/false as text): like with like
    now = yaml_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    missing = object()
    changes = []
    for section, values in now.items():
        old_section = saved.get(section) or {}
        for key, new in values.items():
            if f"{section}.{key}" in RESUME_FREE:
                continue
            old = old_section.get(key, missing)
            if old is not missing and old != new:
                changes.append(f"{section}.{key} {old!r} -> {new!r}")
    return changes


def _resume(path: Path, cfg: Config, accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    """Load weights, optimizer, scheduler and scaler states and the counters from `path`; the optimizer
    then trains with this config's settings (lr, betas, eps, weight decay, schedule), not the saved ones
    (they differ only where resolve_resume allowed it: training.resume_force).

    The RNG is restored separately, right before the loop (`checkpoint.restore_rng`), so that nothing
    in between draws from the restored streams. Log records after the checkpoint's step (written by
    the interrupted run after its last save) are dropped: the resumed run writes them again.
    """
    fresh = settings(optimizer, scheduler)  # this config's optimizer settings, before the saved ones replace them
    state = load_checkpoint(path, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                            rng=False)
    keep_settings(optimizer, scheduler, fresh)
    log = Path(cfg.training.output_dir) / "log.jsonl"
    if accelerator.is_main_process and log.is_file():
        _trim_log(log, state.step)
    accelerator.print(f"resumed from {path} at step {state.step}")
    return state


def _trim_log(log: Path, step: int) -> None:
    """Keep the records of steps <= `step` (and drop a last line cut short by a kill); atomic.

    Raises:
        RunError: a line other than the last is not a JSON record (the log was edited or damaged);
            nothing is changed.
    """
    kept = []
    lines = log.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # a write cut short by a kill: only ever the last line
                continue
            raise RunError(f"'{log}' line {number} is not a JSON record ({line[:40]!r}); fix or delete that line "
                           "(or the whole file) and resume again") from None
        if not isinstance(record, dict):
            raise RunError(f"'{log}' line {number} is not a JSON object; fix or delete that line and resume again")
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, log)
