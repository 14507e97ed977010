"""What a run folder holds, read once (`load_run`): its log, memory summary, config and evaluation,
and the figures and table rows a report shows (`final_figures`, `table_rows`), with the labels
that tell several runs apart (`run_labels`: the config keys that differ)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ReportError

__all__ = ["MEMORY_KEYS", "PEAK_KEYS", "TABLE_COLUMNS", "RunData", "final_figures", "load_run", "run_labels",
           "table_rows"]


# per-step memory keys of log.jsonl (see minitune.memory.MemoryProfiler.step) and how they are named
MEMORY_KEYS = {
    "mem/rss_mb": "RSS",
    "mem/peak_rss_mb": "peak RSS",
    "mem/allocated_mb": "CUDA allocated",
    "mem/reserved_mb": "CUDA reserved",
    "mem/peak_allocated_mb": "CUDA peak allocated",
    "mem/current_mb": "MPS current allocated",
    "mem/driver_mb": "MPS driver allocated",
    "mem/max_sampled_mb": "MPS max sampled",
}


# the one memory series an overlay of several runs shows: each step's peak
PEAK_KEYS = ("mem/peak_allocated_mb", "mem/max_sampled_mb", "mem/peak_rss_mb")


MB = 2**20


# config keys that differ between runs without making them different experiments
_NOT_A_DIFFERENCE = {"training.output_dir", "training.overwrite", "training.resume", "logging.progress",
                     "logging.report"}


@dataclass
class RunData:
    """What a run folder holds, read once."""

    folder: Path
    records: list[dict[str, Any]]  # log.jsonl, one record per logged step
    memory: dict[str, Any] | None  # memory.json (None: not written, e.g. a run that failed)
    eval: dict[str, Any] | None  # eval.json of the run's final checkpoint, or of the folder itself
    config: dict[str, Any] | None  # config.yaml

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every logged record that holds `key`."""
        pairs = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float)) and "step" in r]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]


def load_run(folder: str | Path) -> RunData:
    """Read a run folder (or a checkpoint folder holding eval.json).

    Raises:
        ReportError: no such folder, nothing to report in it, or a file that is not valid JSON/YAML.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"'{folder}' is not a folder: give a run folder (a run's training.output_dir)")
    log = folder / "log.jsonl"
    # eval.py's default output for the final checkpoint is <run>/eval/final (evaluate.eval_dir_for);
    # final/eval.json is where eval.py wrote before it moved out of the checkpoint folder
    evals = [p for p in (folder / "eval.json", folder / "eval" / "final" / "eval.json", folder / "final" / "eval.json")
             if p.is_file()]
    if not log.is_file() and not evals:
        raise ReportError(f"'{folder}' holds no log.jsonl (nor eval.json): give a run folder (a run's "
                          "training.output_dir, with logging.jsonl=true)")
    records = _read_log(log) if log.is_file() else []
    if log.is_file() and not records and not evals:
        raise ReportError(f"'{log}' holds no logged step: the run stopped before its first step; nothing to draw")
    memory = _read_json(folder / "memory.json")
    config = None
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ReportError(f"'{folder / 'config.yaml'}' is not valid YAML ({first_line(e)}): restore it "
                              "from a checkpoint's config.yaml") from None
    return RunData(folder, records, memory, _read_json(evals[0]) if evals else None,
                   config if isinstance(config, dict) else None)


def _read_log(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ReportError(f"'{path}' is not text (UTF-8 JSON lines): it is not a minitune log") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"'{path}' line {n} is not a JSON record ({e.msg}): the log is damaged; "
                              "remove that line to draw the rest") from None
        if not isinstance(record, dict):
            raise ReportError(f"'{path}' line {n} is not a JSON object: the log is damaged; remove that line")
        records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"'{path}' is not valid JSON ({first_line(e)}): remove it (or rerun what wrote it) "
                          "to draw the rest") from None
    return data if isinstance(data, dict) else None


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_labels(runs: Sequence[RunData]) -> list[str]:
    """One label per run: the config keys whose values differ between the runs (`lora.r=8
    lora.alpha=16`); the folder name where configs are missing or the same."""
    flats = [_flat(r.config) if r.config else None for r in runs]
    keys: list[str] = []
    if len(runs) > 1 and all(f is not None for f in flats):
        for key in dict.fromkeys(k for f in flats for k in f):  # first-seen order: the config's own
            if key not in _NOT_A_DIFFERENCE and len({json.dumps(f.get(key), default=str) for f in flats}) > 1:
                keys.append(key)
    labels = []
    for run, flat in zip(runs, flats, strict=True):
        parts = [f"{k}={_short(flat.get(k))}" for k in keys] if flat is not None else []
        labels.append(" ".join(parts) or run.folder.name or str(run.folder))
    return labels


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 30 else text[:27] + "..."


def _task_headline(task: dict[str, Any] | None) -> tuple[str, float] | None:
    """(name, value) of a task-score dict's headline metric: tag F1 or ROUGE-L."""
    if not task:
        return None
    for key in ("tag_f1", "rouge_l", "exact_match"):
        if isinstance(task.get(key), (int, float)):
            return key, float(task[key])
    return None


def final_figures(run: RunData) -> dict[str, Any]:
    """The run's closing figures, from its files: steps, final train and eval loss, tokens/s over the
    logged training time, the task metric and perplexity of eval.json, peak memory measured and
    predicted (memory.json; without it the highest per-step peak of the log)."""
    rec = run.records
    out: dict[str, Any] = {"steps": rec[-1].get("step") if rec else None}
    losses = run.series("loss")[1]
    out["loss"] = losses[-1] if losses else None
    evals = run.series("eval_loss")[1]
    out["eval_loss"] = evals[-1] if evals else None
    # training seconds: each logged record's mean step time times the steps it covers; tokens are
    # counted from the start of the run (a resumed run appends to its log)
    seconds, prev = 0.0, 0
    for r in rec:
        if isinstance(r.get("step_time_s"), (int, float)) and isinstance(r.get("step"), int):
            seconds += r["step_time_s"] * max(r["step"] - prev, 0)
            prev = r["step"]
    tokens = [r["tokens"] for r in rec if isinstance(r.get("tokens"), (int, float))]
    out["tokens_per_s"] = tokens[-1] / seconds if tokens and seconds > 0 else None
    mem = run.memory or {}
    out["peak_measured_mb"], out["peak_kind"] = mem.get("training_peak_mb"), mem.get("training_peak_kind")
    if out["peak_measured_mb"] is None:
        key = next((k for k in PEAK_KEYS if run.series(k)[1]), None)
        if key is not None:
            out["peak_measured_mb"], out["peak_kind"] = max(run.series(key)[1]), f"highest {MEMORY_KEYS[key]} logged"
    predicted = mem.get("predicted") or {}
    out["peak_predicted_mb"] = predicted["total"] / MB if isinstance(predicted.get("total"), (int, float)) else None
    ev = run.eval or {}
    for who in ("base", "tuned"):
        head = _task_headline((ev.get("task") or {}).get(who))
        out[f"task_{who}"] = head
        ppl = ((ev.get("perplexity") or {}).get(who) or {}).get("perplexity")
        out[f"ppl_{who}"] = ppl if isinstance(ppl, (int, float)) else None
    return out


def fmt_value(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


TABLE_COLUMNS = ("run", "steps", "final loss", "eval loss", "task (tuned)", "tokens/s", "peak measured (MiB)",
                 "peak predicted (MiB)")


def table_rows(runs: Sequence[RunData], labels: Sequence[str]) -> list[list[str]]:
    """The final-figures table, one row of TABLE_COLUMNS per run."""
    rows = []
    for run, label in zip(runs, labels, strict=True):
        f = final_figures(run)
        task = f["task_tuned"]
        rows.append([label, fmt_value(f["steps"], "d") if isinstance(f["steps"], int) else "-", fmt_value(f["loss"]),
                     fmt_value(f["eval_loss"]), f"{task[0]} {task[1]:.3f}" if task else "-",
                     fmt_value(f["tokens_per_s"], ",.0f"), fmt_value(f["peak_measured_mb"], ",.1f"),
                     fmt_value(f["peak_predicted_mb"], ",.1f")])
    return rows
