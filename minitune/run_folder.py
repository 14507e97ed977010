"""The run folder: refuse one that holds another run or a scored sheet, create it once every input
check has passed, and trim its log when a run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import clean_debris
from .config import Config
from .errors import RunError
from .files import write_atomic

__all__ = ["check_output_dir", "prepare_output_dir", "trim_log"]


_RUN_FILES = ("config.yaml", "log.jsonl", "final")


def check_output_dir(cfg: Config) -> Path:
    """Refuse a folder that holds another run (unless overwrite or resume) or that cannot be written.

    Creates nothing: a run that fails on bad input afterwards leaves no trace; `prepare_output_dir`
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


def prepare_output_dir(out: Path, cfg: Config, resuming: bool, accelerator: Any) -> None:
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


def trim_log(log: Path, step: int) -> None:
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
    write_atomic(log, "".join(f"{line}\n" for line in kept).encode())
