"""A run's report, drawn from its folder alone: `report.png` and a self-contained `report.html`.

The numbers come only from the files a run leaves (`log.jsonl`, `memory.json`, `config.yaml`, and
`eval.json` once eval.py has run), so `minitune report RUN` rebuilds the same report at any time,
and `minitune report RUN RUN ...` overlays several runs, labelled by the config keys that differ.

matplotlib is imported inside `draw` (it costs about a second), and through its Agg canvas only:
no pyplot, no display, no change to the caller's backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ReportError

__all__ = ["RunData", "draw", "final_figures", "load_run", "run_labels", "try_write_report",
           "write_report"]

MB = 2**20

# per-step memory keys of log.jsonl (see minitune.memory.MemoryProfiler.step) and how they are named
MEMORY_KEYS = {
    "mem/rss_mb": "RSS",
    "mem/peak_rss_mb": "peak RSS (sampled)",
    "mem/allocated_mb": "CUDA allocated",
    "mem/reserved_mb": "CUDA reserved",
    "mem/peak_allocated_mb": "CUDA peak allocated",
    "mem/current_mb": "MPS current allocated",
    "mem/driver_mb": "MPS driver allocated",
    "mem/max_sampled_mb": "MPS max sampled",
}
# the one memory series an overlay of several runs shows: each step's peak
PEAK_KEYS = ("mem/peak_allocated_mb", "mem/max_sampled_mb", "mem/peak_rss_mb")
# config keys that differ between runs without making them different experiments
_NOT_A_DIFFERENCE = {"training.output_dir", "training.overwrite", "training.resume", "logging.progress",
                     "logging.report"}
# one line per module beyond this many adapter modules would be unreadable: grouped by module name
_MAX_MODULE_LINES = 8
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")


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
            raise ReportError(f"'{folder / 'config.yaml'}' is not valid YAML ({_first_line(e)}): restore it "
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
        raise ReportError(f"'{path}' is not valid JSON ({_first_line(e)}): remove it (or rerun what wrote it) "
                          "to draw the rest") from None
    return data if isinstance(data, dict) else None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# -- labels and final figures --------------------------------------------------------------------

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


def _fmt(v: Any, spec: str = ".4f") -> str:
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
        rows.append([label, _fmt(f["steps"], "d") if isinstance(f["steps"], int) else "-", _fmt(f["loss"]),
                     _fmt(f["eval_loss"]), f"{task[0]} {task[1]:.3f}" if task else "-",
                     _fmt(f["tokens_per_s"], ",.0f"), _fmt(f["peak_measured_mb"], ",.1f"),
                     _fmt(f["peak_predicted_mb"], ",.1f")])
    return rows


# -- the picture ---------------------------------------------------------------------------------

def _module_series(run: RunData) -> dict[str, tuple[list[int], list[float]]]:
    """Per-adapter-module gradient norms (logging.module_grad_norms): one series per module, or,
    beyond _MAX_MODULE_LINES modules, one per module name over all layers (the L2 norm of their
    norms, i.e. the gradient norm of all those factors together)."""
    names = list(dict.fromkeys(k for r in run.records for k in r if k.startswith("grad_norm/")))
    if len(names) <= _MAX_MODULE_LINES:
        return {n.removeprefix("grad_norm/"): run.series(n) for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:  # 'grad_norm/model.layers.3.self_attn.q_proj.lora_A' -> 'q_proj.lora_A'
        groups.setdefault(".".join(n.split(".")[-2:]), []).append(n)
    out = {}
    for group, members in groups.items():
        steps, values = [], []
        for r in run.records:
            parts = [r[m] for m in members if isinstance(r.get(m), (int, float))]
            if parts and "step" in r:
                steps.append(r["step"])
                values.append(math.sqrt(sum(v * v for v in parts)))
        out[f"{group} (all {len(members)} layers)" if len(members) > 1 else group] = (steps, values)
    return out


def draw(runs: Sequence[RunData], labels: Sequence[str] | None = None) -> Any:
    """The report's figure (a matplotlib Figure on the Agg canvas; nothing is shown).

    One run: loss, learning rate, grad norm (per adapter module where logged), tokens/s, memory per
    step with the predicted and measured training peaks, the memory phases and eval.json's scores.
    Several runs: the same series overlaid, one colour per run, and their final figures in a table.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(labels) if labels is not None else run_labels(runs)
    single = len(runs) == 1
    panels = ["loss", "learning_rate", "grad_norm", "tokens_per_s", "memory"]
    if single and any(r.memory and r.memory.get("phases") for r in runs):
        panels.append("phases")
    if any(r.eval for r in runs):
        panels += ["perplexity", "task"]
    panels = [p for p in panels if _has(p, runs)]
    cols = 2
    rows = max(1, math.ceil(len(panels) / cols))
    table_h = 0.5 + 0.3 * len(runs)
    fig = Figure(figsize=(13, 3.4 * rows + table_h), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[3.4] * rows + [table_h])
    title = str(runs[0].folder) if single else f"{len(runs)} runs"
    fig.suptitle(f"minitune report: {title}", fontsize=13)
    for i, name in enumerate(panels):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.set_gid(name)
        _PANELS[name](ax, runs, labels)
        ax.grid(alpha=0.3)
    tax = fig.add_subplot(grid[rows, :])
    tax.set_gid("table")
    tax.axis("off")
    table = tax.table(cellText=table_rows(runs, labels), colLabels=TABLE_COLUMNS, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(TABLE_COLUMNS))))
    return fig


def _has(panel: str, runs: Sequence[RunData]) -> bool:
    keys = {"loss": ("loss", "eval_loss"), "learning_rate": ("learning_rate",), "grad_norm": ("grad_norm",),
            "tokens_per_s": ("tokens_per_s",), "memory": tuple(MEMORY_KEYS)}.get(panel)
    if keys is None:
        return True
    return any(r.series(k)[0] for r in runs for k in keys)


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _panel_loss(ax: Any, runs: Sequence[RunData], labels: Sequence[str]) -> None:
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        name = "" if len(runs) == 1 else f"{label}: "
        ax.plot(*run.series("loss"), color=_color(i), label=f"{name}train loss", gid="loss")
        steps, values = run.series("eval_loss")
        if steps:
            ax.plot(steps, values, color=_color(i), linestyle="--", marker="o", markersize=4,
                    label=f"{name}eval loss", gid="eval_loss")
    ax.set(title="loss per step", xlabel="optimizer step", ylabel="loss (mean per target token)")
    ax.legend(fontsize=8)


def _line_panel(key: str, title: str, ylabel: str) -> Any:
    def panel(ax: Any, runs: Sequence[RunData], labels: Sequence[str]) -> None:
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            steps, values = run.series(key)
            ax.plot(steps, values, color=_color(i), label=label if len(runs) > 1 else key, gid=key)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    return panel


def _panel_grad_norm(ax: Any, runs: Sequence[RunData], labels: Sequence[str]) -> None:
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        ax.plot(*run.series("grad_norm"), color=_color(i), linewidth=2,
                label="total (before clipping)" if len(runs) == 1 else label, gid="grad_norm")
    modules = _module_series(runs[0]) if len(runs) == 1 else {}
    for j, (name, (steps, values)) in enumerate(modules.items()):
        ax.plot(steps, values, color=_color(j + 1), linewidth=1, alpha=0.8, label=name, gid=f"grad_norm/{name}")
    values = [v for r in runs for v in r.series("grad_norm")[1]] + [v for _, vs in modules.values() for v in vs]
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 30:  # a log scale only where it is needed
        ax.set_yscale("log")
    ax.set(title="gradient norm per step" + (" (per adapter module)" if modules else ""), xlabel="optimizer step",
           ylabel="L2 norm")
    ax.legend(fontsize=7 if modules else 8)


def _panel_memory(ax: Any, runs: Sequence[RunData], labels: Sequence[str]) -> None:
    if len(runs) == 1:
        run = runs[0]
        for j, (key, name) in enumerate(MEMORY_KEYS.items()):
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, color=_color(j), marker=".", label=name, gid=key)
        f = final_figures(run)
        if f["peak_predicted_mb"] is not None:
            ax.axhline(f["peak_predicted_mb"], color="black", linestyle="--", gid="predicted",
                       label=f"predicted training peak (tensors): {f['peak_predicted_mb']:,.1f} MiB")
        if f["peak_measured_mb"] is not None and run.memory:
            ax.axhline(f["peak_measured_mb"], color="gray", linestyle=":", gid="measured",
                       label=f"measured: {f['peak_measured_mb']:,.1f} MiB ({f['peak_kind']})")
        baseline = (run.memory or {}).get("baseline_mb")
        if baseline:  # CPU: what the process held before loading (Python, torch), under every RSS value
            ax.axhline(baseline, color="#8c564b", linestyle="-.", linewidth=1, gid="baseline",
                       label=f"RSS before loading: {baseline:,.1f} MiB")
    else:
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            key = next((k for k in PEAK_KEYS if run.series(k)[0]), None)
            if key is not None:
                ax.plot(*run.series(key), color=_color(i), marker=".", label=f"{label}: {MEMORY_KEYS[key]}", gid=key)
            f = final_figures(run)
            if f["peak_predicted_mb"] is not None:
                ax.axhline(f["peak_predicted_mb"], color=_color(i), linestyle="--", linewidth=1, gid="predicted")
    ax.set(title="memory per step" + ("" if len(runs) == 1 else " (dashed: predicted training peak)"),
           xlabel="optimizer step", ylabel="MiB")
    ax.legend(fontsize=7)


def _panel_phases(ax: Any, runs: Sequence[RunData], labels: Sequence[str]) -> None:
    mem = runs[0].memory or {}
    phases = mem.get("phases") or {}
    names = list(phases)
    values = [phases[n].get("mem/current_mb", 0.0) for n in names]
    x = list(range(len(names)))
    ax.bar(x, values, color=_color(0), label="measured (current)", gid="phases")
    predicted = (mem.get("predicted") or {}).get("phases") or {}
    if predicted:
        px = [x[names.index(n)] + 0.3 for n in predicted if n in names]
        pv = [predicted[n] / MB for n in predicted if n in names]
        ax.bar(px, pv, width=0.3, color="black", label="predicted (tensors)", gid="predicted_phases")
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    kind = {"cpu": "RSS", "cuda": "CUDA allocated"}.get(str(mem.get("device", "")).split(":")[0], "current")
    ax.set(title=f"memory after each phase ({kind})", xlabel="start-up stages, then the last profiled step",
           ylabel="MiB")
    ax.legend(fontsize=8)


def _eval_bars(ax: Any, runs: Sequence[RunData], labels: Sequence[str], pick: Any, title: str, ylabel: str) -> None:
    width = 0.38
    names = []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        base, tuned = pick(run, "base"), pick(run, "tuned")
        names.append(label if len(runs) > 1 else "")
        for dx, value, who, color in ((-width / 2, base, "base", "#9e9e9e"), (width / 2, tuned, "fine-tuned", _color(i))):
            if value is not None:
                bar = ax.bar(i + dx, value, width, color=color, label=who if i == 0 else None, gid=f"{who}")
                ax.bar_label(bar, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(runs)), names, fontsize=8)
    ax.set_xlim(-0.9, len(runs) - 0.1)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)


def _panel_perplexity(ax: Any, runs: Sequence[RunData], labels: Sequence[str]) -> None:
    _eval_bars(ax, runs, labels, lambda r, who: final_figures(r)[f"ppl_{who}"],
               "eval.py: perplexity on the held-out rows (lower is better)", "perplexity")


def _panel_task(ax: Any, runs: Sequence[RunData], labels: Sequence[str]) -> None:
    heads = [final_figures(r)["task_tuned"] for r in runs]
    metric = next((h[0] for h in heads if h), "task metric")
    _eval_bars(ax, runs, labels, lambda r, who: (final_figures(r)[f"task_{who}"] or (None, None))[1],
               f"eval.py: {metric} of the generations (higher is better)", metric)


_PANELS = {
    "loss": _panel_loss,
    "learning_rate": _line_panel("learning_rate", "learning rate", "learning rate"),
    "grad_norm": _panel_grad_norm,
    "tokens_per_s": _line_panel("tokens_per_s", "throughput (training time since the last log)", "tokens/s"),
    "memory": _panel_memory,
    "phases": _panel_phases,
    "perplexity": _panel_perplexity,
    "task": _panel_task,
}


# -- files -----------------------------------------------------------------------------------------

def write_report(runs: str | Path | Sequence[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Draw `report.png` and `report.html` for one run folder, or several overlaid.

    Args:
        runs: a run folder, or several.
        out: where the two files go (default: the run's folder; several runs: their common parent).

    Returns:
        (report.png, report.html).

    Raises:
        ReportError: a folder that is not a run folder, or a file in it that cannot be read.
    """
    folders = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    if not folders:
        raise ReportError("give at least one run folder")
    data = [load_run(f) for f in folders]
    if out is None:
        out = folders[0] if len(folders) == 1 else Path(os.path.commonpath([f.resolve() for f in folders]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(data)
    fig = draw(data, labels)
    buffer = io.BytesIO()
    # no "Software" stamp: the same folder gives the same bytes (a rebuild is identical)
    fig.savefig(buffer, format="png", metadata={"Software": None})
    png = buffer.getvalue()
    png_path, html_path = out / "report.png", out / "report.html"
    _write_atomic(png_path, png)
    _write_atomic(html_path, _html(data, labels, png).encode("utf-8"))
    return png_path, html_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def try_write_report(folder: str | Path, say: Any = None) -> Path | None:
    """`write_report(folder)` for the end of a run or an evaluation: a failure prints one warning
    line and returns None; it never raises (a report is never worth a failed run)."""
    try:
        return write_report(folder)[0]
    except Exception as e:  # noqa: BLE001 - any failure to plot is only a warning
        line = f"warning: no report drawn in {folder} ({type(e).__name__}: {_first_line(e)})"
        (say or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
        return None


def _html(runs: Sequence[RunData], labels: Sequence[str], png: bytes) -> str:
    esc = html.escape
    title = str(runs[0].folder) if len(runs) == 1 else ", ".join(str(r.folder) for r in runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>minitune report: {esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1250px}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}td.gen{white-space:pre-wrap;max-width:28em}img{max-width:100%}</style>",
        f"</head><body><h1>minitune report</h1><p>{esc(title)}</p>",
        f"<img alt='report' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>",
        "<h2>Final figures</h2>", _html_table(TABLE_COLUMNS, table_rows(runs, labels)),
    ]
    for run, label in zip(runs, labels, strict=True):
        ev = run.eval
        if not ev:
            continue
        head = f" ({esc(label)})" if len(runs) > 1 else ""
        rows = []
        for who in ("base", "tuned"):
            ppl = ((ev.get("perplexity") or {}).get(who) or {}).get("perplexity")
            task = {k: v for k, v in ((ev.get("task") or {}).get(who) or {}).items() if isinstance(v, float)}
            if ppl is not None or task:
                rows.append([who, _fmt(ppl, ".3f") if isinstance(ppl, (int, float)) else "-",
                             ", ".join(f"{k} {v:.3f}" for k, v in task.items()) or "-"])
        parts += [f"<h2>Evaluation{head}</h2>", f"<p>{esc(str(ev.get('checkpoint', '')))}</p>",
                  _html_table(("model", "perplexity", "task metrics"), rows)]
        gens = ev.get("generations") or []
        if gens:
            parts.append(f"<h3>Generations{head}</h3><table><tr><th>prompt</th><th>reference</th><th>base</th>"
                         "<th>fine-tuned</th></tr>")
            for g in gens:
                cells = (g.get("shown") or g.get("prompt"), g.get("reference"), g.get("base"), g.get("tuned"))
                parts.append("<tr>" + "".join(f"<td class='gen'>{esc('' if c is None else str(c))}</td>"
                                              for c in cells) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
