"""The report's figure: one panel per series a run logged (loss, gradient norm, memory by step and
phase, evaluation), one line per run when several are overlaid.

matplotlib is imported inside `draw` (it costs about a second), and through its Agg canvas only:
no pyplot, no display, no change to the caller's backend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .run_data import MB, MEMORY_KEYS, PEAK_KEYS, TABLE_COLUMNS, RunData, final_figures, run_labels, table_rows

__all__ = ["draw"]


# one line per module beyond this many adapter modules would be unreadable: grouped by module name
_MAX_MODULE_LINES = 8


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")


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
    # here: matplotlib is a heavy import, paid only by a run that draws its report
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
