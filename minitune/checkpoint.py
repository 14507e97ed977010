"""Checkpoints: save atomically, find the newest complete one, and restore a run from it.

Layout of `<output_dir>/checkpoint-000120/` (and `<output_dir>/final/`):
    adapter_config.json, adapter_model.safetensors   LoRA, loadable by PeftModel.from_pretrained
    (or config.json + model.safetensors for full fine-tuning)
    tokenizer files, config.yaml (the resolved run config)
    trainer_state.json     step counters and data position (TrainState)
    training_state.pt      optimizer, scheduler, GradScaler and RNG states (one file per process)
    COMPLETE               written last: a folder without it is never resumed from

A checkpoint is written into a temporary folder beside its final place, flushed, and renamed, so
a kill at any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "find_latest", "is_complete", "list_checkpoints", "load_training_state",
           "save_checkpoint"]

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the fix."""


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


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (step checkpoints, or `final`), or None."""
    candidates = list_checkpoints(output_dir)
    final = Path(output_dir) / "final"
    if is_complete(final):
        candidates.append(final)
    if not candidates:
        return None
    return max(candidates, key=lambda p: json.loads((p / "trainer_state.json").read_text()).get("step", 0))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    Args:
        path: the final folder, e.g. `<output_dir>/checkpoint-000120` or `<output_dir>/final`.
        accelerator: the run's Accelerator.
        model: the prepared model (unwrapped here).
        optimizer, scheduler: saved for resuming (None: weights only).
        state: the loop's TrainState.
        config: the run's Config (saved as config.yaml).
        tokenizer: saved beside the weights so the checkpoint is self-contained.
        keep_last: after saving a step checkpoint, delete older ones beyond this many (0 keeps all).

    Returns:
        The checkpoint folder.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save that was killed
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        extra = {"save_embedding_layers": False} if hasattr(unwrapped, "peft_config") else {}
        unwrapped.save_pretrained(tmp, safe_serialization=True, save_function=accelerator.save, **extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if config is not None:
            config.save(tmp / "config.yaml")
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state.to_dict(), indent=1))
    if optimizer is not None:
        blob = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) else None,
            "rng": _rng_state(),
        }
        accelerator.wait_for_everyone()
        torch.save(blob, tmp / f"training_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text("ok\n")
        _fsync_tree(tmp)
        old = path.parent / f".old-{path.name}"
        if path.exists():  # replacing `final` (e.g. after resuming): keep it until the new one is in
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
        if keep_last and _STEP_DIR.match(path.name):
            for stale in list_checkpoints(path.parent)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_training_state(path: str | Path, *, accelerator: Any, optimizer: torch.optim.Optimizer,
                        scheduler: Any = None) -> dict[str, Any]:
    """Restore optimizer, scheduler, scaler and RNG states; return trainer_state.json as a dict.

    Raises:
        CheckpointError: the folder is incomplete or a file cannot be read.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"'{path}' is not a complete checkpoint (no {MARKER} marker); "
                              "resume from another one or use training.resume=auto")
    blob_path = path / f"training_state_{accelerator.process_index}.pt"
    try:
        counters = json.loads((path / "trainer_state.json").read_text())
        blob = torch.load(blob_path, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler") is not None and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(blob["scaler"])
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint '{path}' lacks {Path(e.filename).name}: it was saved without "
                              "training state (or with another number of processes)") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({type(e).__name__}: {e}); "
                              "delete it and resume from an earlier one") from None
    _set_rng_state(blob["rng"])
    return counters
