"""Resuming a run: which checkpoint, whether this config may continue it, and restoring its state.

`resolve_resume` decides before anything loads (a refused change costs no loading time);
`restore_run` loads the checkpoint into the built parts. Every config key is classified once, in
`RESUME_FREE` or `RESUME_REFUSED` (tests/test_resume.py fails on a key in neither).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import find_latest, load_checkpoint, verify_checkpoint
from .config import Config, with_split, yaml_load
from .errors import CheckpointError
from .optim import keep_settings, settings
from .run_folder import trim_log
from .state import TrainState

__all__ = ["RESUME_FREE", "RESUME_REFUSED", "resolve_resume", "restore_run", "saved_config"]


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
    "data.fix_text", "data.pad_to_multiple_of",
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
    saved = saved_config(path)
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


def saved_config(path: Path) -> dict:
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


def restore_run(path: Path, cfg: Config, accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    """Load weights, optimizer, scheduler and scaler states and the counters from `path`; the optimizer
    then trains with this config's settings (lr, betas, eps, weight decay, schedule), not the saved ones
    (they differ only where `resolve_resume` allowed it: training.resume_force).

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
        trim_log(log, state.step)
    accelerator.print(f"resumed from {path} at step {state.step}")
    return state
