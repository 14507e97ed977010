"""What a run shows and writes: per-step JSONL, a progress bar, trackers, and the closing table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from tqdm.auto import tqdm

__all__ = ["RunLogger", "report_step", "say", "summary_table"]


class RunLogger:
    """Per-step records to `log.jsonl`, a progress bar, and Accelerate trackers (main process only).

    Args:
        accelerator: the run's Accelerator (only its main process writes and draws).
        output_dir: where `log.jsonl` goes (None: no file).
        total_steps: length of the progress bar.
        progress: 'rich', 'tqdm' or 'none'.
        initial_step: where a resumed run starts.
        trackers: also send metrics to the Accelerate trackers.
        append: append to an existing log.jsonl (resuming) instead of starting a new one.
        first_record: keys added to the first record logged (facts about the whole run, e.g. the
            precision it chose), so that every log says how it was made.
    """

    def __init__(self, accelerator: Any, output_dir: str | Path | None, total_steps: int, *,
                 progress: str = "rich", initial_step: int = 0, trackers: bool = False, append: bool = False,
                 first_record: dict[str, Any] | None = None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.trackers = trackers
        self.records: list[dict[str, Any]] = []
        self._file = None
        self._bar = None
        self._first = dict(first_record or {})
        if not self.main:
            return
        if output_dir is not None:
            # a resumed run appends to its log; a fresh (or overwriting) run starts a new one
            self._file = open(Path(output_dir) / "log.jsonl", "a" if append else "w", buffering=1)  # noqa: SIM115
        if progress == "tqdm":
            self._bar = _TqdmBar(tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True))
        elif progress == "rich":
            # no terminal (a log file, CI): a plain line per logged step instead of a live bar
            self._bar = _RichBar(total_steps, initial_step) if sys.stdout.isatty() else _Lines(total_steps)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one logged step."""
        if not self.main:
            return
        record = {k: _round(v) for k, v in metrics.items()}
        if self._first:  # facts about the whole run (e.g. its precision) ride on its first record
            record.update(self._first)
            self._first = {}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self._bar is not None:
            self._bar.update(step, progress_postfix(metrics))

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Stop the progress bar and close log.jsonl."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None


def report_step(state: Any, metrics: dict, logger: Any, on_step: Any) -> bool:
    """Hand a logged step's metrics to the logger and the callback; True if the callback asks to stop."""
    metrics.setdefault("step", state.step)
    state.last = metrics
    if logger is not None:
        logger.log(state.step, metrics)
    return on_step is not None and bool(on_step(state, metrics))


def say(logger: Any, accelerator: Any, text: str) -> None:
    """A line for the user, through the logger (which keeps the progress bar intact) if there is one."""
    if logger is not None and hasattr(logger, "message"):
        logger.message(text)
    else:
        accelerator.print(text)


def _round(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    return v


def progress_postfix(m: dict[str, Any]) -> str:
    parts = [f"loss {m['loss']:.4f}" if "loss" in m else ""]
    if "eval_loss" in m:
        parts.append(f"eval {m['eval_loss']:.4f}")
    if "learning_rate" in m:
        parts.append(f"lr {m['learning_rate']:.2e}")
    if "tokens_per_s" in m:
        parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    mem = next((m[k] for k in ("mem/peak_allocated_mb", "mem/peak_rss_mb", "mem/max_sampled_mb") if k in m), None)
    if mem is not None:
        parts.append(f"peak {mem:.0f} MiB")
    return " | ".join(p for p in parts if p)


class _TqdmBar:
    def __init__(self, bar: Any):
        self.bar = bar

    def update(self, step: int, text: str) -> None:
        self.bar.n = step
        self.bar.set_postfix_str(text, refresh=True)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    def __init__(self, total: int):
        self.total = total

    def update(self, step: int, text: str) -> None:
        print(f"step {step}/{self.total} | {text}", flush=True)

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


class _RichBar:
    def __init__(self, total: int, initial: int):
        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=initial, info="")
        self.progress.start()

    def update(self, step: int, text: str) -> None:
        self.progress.update(self.task, completed=step, info=text)

    def write(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()


def summary_table(rows: list[tuple[str, str]], title: str = "minitune run") -> Any:
    """A two-column rich Table from (label, value) rows."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in rows:
        table.add_row(label, value)
    return table
