"""Checkpoints: save atomically, find the newest complete one, and restore a run from it.

Layout of `<output_dir>/checkpoint-000120/` (and `<output_dir>/final/`):
    adapter_config.json, adapter_model.safetensors   LoRA, loadable by PeftModel.from_pretrained
    (or config.json + model.safetensors for full fine-tuning; model.safetensors alone for a plain
    nn.Module without `save_pretrained`)
    tokenizer files, config.yaml (the resolved run config)
    trainer_state.json        step counters, data position, pending log sums (TrainState) + num_processes
    training_state_{rank}.pt  optimizer, scheduler and GradScaler states (one file per process)
    rng_state_{rank}.pt       python / numpy / torch / cuda / mps RNG states (one file per process)
    COMPLETE                  written last: a folder without it is never resumed from

A checkpoint is written into `.tmp-<name>` beside its final place, flushed to disk, and renamed,
so a kill at any moment leaves either the previous checkpoint or the new one, whole. Replacing an
existing folder (`final` after a resume) goes through `.old-<name>`, which `find_latest` still
accepts if a kill lands between the two renames. Old step checkpoints are renamed away before they
are deleted, so a half-deleted folder never looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from .errors import CheckpointError, DiskFullError
from .files import fsync_dir, fsync_tree, remove_folder
from .launch import shards_weights
from .process_memory import format_bytes
from .rng import rng_state, set_rng_state
from .state import TrainState

__all__ = ["clean_debris", "find_latest", "is_complete", "list_checkpoints", "load_checkpoint",
           "load_weights", "restore_rng", "save_checkpoint", "verify_checkpoint", "weights_in"]

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
_DEBRIS = (".tmp-", ".old-", ".trash-")


def is_complete(path: str | Path) -> bool:
    """True if `path` is a checkpoint folder whose save finished."""
    return (Path(path) / MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step checkpoints in `output_dir`, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def _step_of(path: Path) -> int:
    """The optimizer step a complete checkpoint was saved at."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint '{path}' has an unreadable trainer_state.json ({type(e).__name__}); "
                              "delete that folder and resume from an earlier one") from None


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `output_dir` (step checkpoints or `final`), or None.

    A complete `.old-<name>` folder (a replacement that was killed between its two renames) counts
    in place of a missing `<name>`.

    Args:
        output_dir: a run's output folder (a missing folder gives None).

    Returns:
        The checkpoint folder with the highest step, or None when there is no complete one.

    Raises:
        CheckpointError: the newest candidate's trainer_state.json cannot be read.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    candidates = list_checkpoints(root)
    final = root / "final"
    if is_complete(final):
        candidates.append(final)
    for old in root.glob(".old-*"):
        name = old.name.removeprefix(".old-")
        if is_complete(old) and not is_complete(root / name) and (name == "final" or _STEP_DIR.match(name)):
            candidates.append(old)
    if not candidates:
        return None
    return max(candidates, key=_step_of)  # ties: the first (a step checkpoint before `final`)


def clean_debris(output_dir: str | Path) -> None:
    """Remove what killed saves left behind (`.tmp-*`, `.trash-*`, and `.old-*` whose new folder is in)."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if not p.is_dir() or not p.name.startswith(_DEBRIS):
            continue
        if p.name.startswith(".old-") and not is_complete(root / p.name.removeprefix(".old-")):
            continue  # still the only copy of that checkpoint
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    path: str | Path,
    *,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: Any = None,
    config: Any = None,
    tokenizer: Any = None,
    keep_last: int = 0,
) -> Path:
    """Write a checkpoint to `path` atomically (all processes call it; the main one writes weights).

    Every process writes its own optimizer and RNG files into the folder the main process creates,
    so with several machines `path` must be on a file system they all share.

    Args:
        path: the final folder, e.g. `<output_dir>/checkpoint-000120` or `<output_dir>/final`.
        accelerator: the run's Accelerator.
        model: the prepared model (unwrapped here): a transformers / peft model (`save_pretrained`) or
            any nn.Module (its state dict goes to model.safetensors).
        optimizer, scheduler: saved for resuming (None: weights only).
        state: the loop's TrainState.
        config: the run's Config (saved as config.yaml).
        tokenizer: saved beside the weights so the checkpoint is self-contained.
        keep_last: after saving a step checkpoint, delete older ones beyond this many (0 keeps all).

    Returns:
        The checkpoint folder.

    Raises:
        DiskFullError: the disk filled up while writing (the half-written copy is removed; the previous
            checkpoint stays untouched).
        OSError: the folder cannot be written otherwise (the previous checkpoint stays untouched).
    """
    path = Path(path)
    try:
        return _save(path, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                     state=state, config=config, tokenizer=tokenizer, keep_last=keep_last)
    except Exception as e:
        if not _disk_full(e):
            raise
        raise _disk_full_error(path, model, optimizer) from e


def _disk_full(err: BaseException) -> bool:
    """True if `err` (or what it arose from) is the disk or the quota running out: an OSError with
    ENOSPC / EDQUOT, or safetensors' error, which carries only the text ('... (os error 28)')."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if f"(os error {errno.ENOSPC})" in str(err) or f"(os error {errno.EDQUOT})" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _disk_full_error(path: Path, model: torch.nn.Module, optimizer: Any) -> DiskFullError:
    """The one-line error for a save into `path` that ran out of disk; removes the half-written copy
    first (its space is the user's again). The space needed: the last complete checkpoint's size (the
    same run writes the same files), else what the trainable weights and the optimizer state take."""
    folder = path.parent
    shutil.rmtree(folder / f".tmp-{path.name}", ignore_errors=True)
    last = None
    with contextlib.suppress(CheckpointError, OSError):
        last = find_latest(folder)
    if last is not None:
        needed = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    else:
        tensors = [p for p in model.parameters() if p.requires_grad]
        if optimizer is not None:
            tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        needed = sum(t.numel() * t.element_size() for t in tensors)
    free = shutil.disk_usage(folder).free
    then = (f"last good checkpoint: {last}; free some space there (or move the run folder to a larger disk) "
            "and resume with training.resume=auto" if last is not None else
            "no checkpoint was saved yet; free some space there and start the run again")
    return DiskFullError(f"no space left on the disk of '{folder}' while saving {path.name}: a checkpoint of this "
                         f"run needs about {format_bytes(needed)}, {format_bytes(free)} is free; {then}")


def _torch_save(obj: Any, file: Path) -> None:
    """`torch.save` through a Python file: a failed write then surfaces as its OSError (errno kept)
    rather than only as torch's 'unexpected pos' RuntimeError."""
    with open(file, "wb") as f:
        torch.save(obj, f)


def _save(path: Path, *, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: Any,
          config: Any, tokenizer: Any, keep_last: int) -> Path:
    """`save_checkpoint`'s work."""
    tmp = path.parent / f".tmp-{path.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save that was killed
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    full = shards_weights(accelerator)  # every process joins in gathering the weights
    state_dict = accelerator.get_state_dict(model) if full else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        extra = {"save_embedding_layers": False} if hasattr(unwrapped, "peft_config") else {}
        if state_dict is not None:
            extra["state_dict"] = state_dict
        if hasattr(unwrapped, "save_pretrained"):
            unwrapped.save_pretrained(tmp, safe_serialization=True, save_function=accelerator.save, **extra)
        else:  # a plain nn.Module (minitune.fit with your own model): its state dict, shared tensors once
            if state_dict is not None:
                save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / "model.safetensors")
            else:
                save_model(unwrapped, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if config is not None:
            config.save(tmp / "config.yaml")
        if state is not None:
            counters = {**state.to_dict(), "num_processes": accelerator.num_processes}
            (tmp / "trainer_state.json").write_text(json.dumps(counters, indent=1))
    if optimizer is not None:
        blob = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) else None,
        }
        accelerator.wait_for_everyone()
        _torch_save(blob, tmp / f"training_state_{accelerator.process_index}.pt")
        _torch_save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text("ok\n")
        fsync_tree(tmp)
        old = path.parent / f".old-{path.name}"
        if path.exists():  # replacing `final` (e.g. after resuming): keep it until the new one is in
            if old.exists():
                remove_folder(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            remove_folder(old)
        if keep_last and _STEP_DIR.match(path.name):
            for stale in list_checkpoints(path.parent)[:-keep_last]:
                remove_folder(stale)
    accelerator.wait_for_everyone()
    return path


def weights_in(path: str | Path) -> tuple[str | None, list[Path]]:
    """What weights a checkpoint folder holds, decided here only: ('lora', [adapter_model.safetensors]),
    ('full', its model*.safetensors shards), or (None, []) (minitune writes safetensors only)."""
    path = Path(path)
    adapter = path / "adapter_model.safetensors"
    if adapter.is_file():
        return "lora", [adapter]
    files = sorted(path.glob("model*.safetensors"))
    return ("full", files) if files else (None, [])


def verify_checkpoint(path: str | Path, num_processes: int = 1) -> dict[str, Any]:
    """Check that `path` is a complete, readable checkpoint without loading it; return its counters.

    Reads trainer_state.json and the weights' safetensors headers (cheap), and checks that each
    process has its training and RNG state file.

    Raises:
        CheckpointError: what is missing or unreadable, and what to do.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist; give a checkpoint-NNNNNN folder "
                              "or training.resume=auto")
    if not is_complete(path):
        raise CheckpointError(f"'{path}' is not a complete checkpoint (no {MARKER} marker: its save never "
                              "finished); resume from another one or use training.resume=auto")
    try:
        counters = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(counters, dict) or "step" not in counters:
            raise ValueError("no step counter")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' has a missing or unreadable trainer_state.json "
                              f"({type(e).__name__}); delete that folder and resume from an earlier one") from None
    _, weights = weights_in(path)
    if not weights:
        raise CheckpointError(f"checkpoint '{path}' holds no weights (adapter_model.safetensors or "
                              "model.safetensors); delete that folder and resume from an earlier one")
    for f in weights:
        try:
            with safe_open(f, framework="pt") as st:
                st.keys()
        except Exception as e:
            raise CheckpointError(f"checkpoint '{path}': {f.name} is corrupt or truncated ({type(e).__name__}); "
                                  "delete that folder and resume from an earlier one") from None
    saved_procs = int(counters.get("num_processes", 1))
    for rank in range(num_processes):
        for stem in ("training_state", "rng_state"):
            if not (path / f"{stem}_{rank}.pt").is_file():
                why = (f"it was saved by {saved_procs} process(es), this run has {num_processes}"
                       if saved_procs != num_processes else "it was saved without training state (weights only)")
                raise CheckpointError(f"checkpoint '{path}' lacks {stem}_{rank}.pt: {why}; resume with the same "
                                      "number of processes, or start a new run from these weights")
    return counters


def load_states(path: Path, accelerator: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """This process's optimizer, scheduler and scaler states (the checkpoint already verified).

    A file torch cannot read is corrupt; states torch reads but this optimizer refuses (other
    parameter groups or state keys) come from a valid checkpoint of another optimizer setup, which
    must not be called corrupt (deleting it would lose a good checkpoint). Anything else propagates.
    """
    name = f"training_state_{accelerator.process_index}.pt"
    try:
        blob = torch.load(path / name, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:  # truncated, not a torch file
        raise CheckpointError(f"checkpoint '{path}': {name} is corrupt ({type(e).__name__}: {str(e)[:200]}); "
                              "delete that folder and resume from an earlier one") from None
    if not isinstance(blob, dict) or "optimizer" not in blob:
        raise CheckpointError(f"checkpoint '{path}': {name} holds no optimizer state; delete that folder and "
                              "resume from an earlier one")
    try:
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler") is not None and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(blob["scaler"])
    except (ValueError, KeyError) as e:  # torch's words for "these states are of other parameters / groups"
        raise CheckpointError(f"checkpoint '{path}' is intact, but its optimizer state does not fit this run's "
                              f"optimizer ({type(e).__name__}: {str(e)[:200]}); keep the folder and resume with "
                              f"the settings it was saved with (its config.yaml)") from None


def restore_rng(path: str | Path, *, accelerator: Any) -> None:
    """Set every RNG (python, numpy, torch, cuda, mps) to where this process was when `path` was saved.

    Raises:
        CheckpointError: the RNG file cannot be read.
    """
    f = Path(path) / f"rng_state_{accelerator.process_index}.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
        set_rng_state(state)
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}': {f.name} is corrupt ({type(e).__name__}); delete that "
                              "folder and resume from an earlier one") from None


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load the adapter (or the full model) saved in `path` into `model`, checking that every
    trainable tensor is covered and nothing is left over.

    Raises:
        CheckpointError: unreadable weights, or weights of another model / adapter layout.
    """
    path = Path(path)
    kind, files = weights_in(path)
    try:
        if kind == "lora":
            from peft import set_peft_model_state_dict  # lazy: peft imports bitsandbytes; plain modules need neither

            result = set_peft_model_state_dict(model, load_file(files[0]))
            missing = [k for k in result.missing_keys if "lora_" in k]
        else:
            if not files:
                raise CheckpointError(f"checkpoint '{path}' holds no weights (adapter_model.safetensors or "
                                      "model.safetensors); delete that folder and resume from an earlier one")
            state = {}
            for f in files:
                state.update(load_file(f))
            result = model.load_state_dict(state, strict=False)
            # tied weights (e.g. lm_head = embed_tokens) are saved once
            own = model.state_dict()
            loaded = {own[k].data_ptr() for k in state if k in own}
            missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    except CheckpointError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"cannot load the weights in '{path}' ({type(e).__name__}: {first}); the "
                              "checkpoint is corrupt or from another model: resume from another one") from None
    problems = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise CheckpointError(f"the weights in '{path}' do not fit this model ({', '.join(problems)}): it was "
                              "saved from another model or LoRA setup; resume from a checkpoint of this config")


def load_checkpoint(path: str | Path, *, accelerator: Any, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, rng: bool = True) -> Any:
    """Restore a run saved by `save_checkpoint`: weights (adapter or full), optimizer, scheduler,
    GradScaler and RNG states; returns the `TrainState` to pass to `fit(state=...)`.

    Args:
        path: a complete checkpoint folder (see `find_latest`).
        accelerator: the run's Accelerator (same number of processes as the saving run).
        model: the prepared model, built as it was when saved.
        optimizer, scheduler: prepared like the saving run's (None: weights and counters only).
        rng: restore every RNG too (do it last, right before `fit`, so nothing else draws from them).

    Returns:
        The loop's TrainState at the checkpoint (step, epoch, data position, pending log sums).

    Raises:
        CheckpointError: incomplete, corrupt or mismatched checkpoint (the message says what to do).
    """
    path = Path(path)
    # first make sure the folder is whole (per-process state files only when they will be read)
    counters = verify_checkpoint(path, accelerator.num_processes if optimizer is not None else 0)
    load_weights(path, accelerator.unwrap_model(model))
    if optimizer is not None:
        load_states(path, accelerator, optimizer, scheduler)
    if rng:
        restore_rng(path, accelerator=accelerator)
    state = TrainState.from_dict(counters)
    state.stop_reason = ""
    return state
