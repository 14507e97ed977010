"""Plots of the memory benchmark (matplotlib, Agg backend: no display needed).

    python bench/plots.py bench/results/cpu-2026-01-01.json     # redraw the PNGs of a saved run

`peaks`: the training peak of each method, stacked by where it goes (weights, trainable weights +
gradients, optimizer state, activations and temporaries), one panel per model, the prediction of
the prediction (`minitune.planner.simulate`) as a black tick. `steps`: memory after each phase of each step (forward, backward,
optimizer step) and the per-step peaks, one line per method. `alpha`: gradient norms over a short
real training for each LoRA alpha.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CATEGORIES = [  # (column of a summary row, legend label, colour)
    ("weights_mb", "frozen weights", "#8da0cb"),
    ("trainable_grads_mb", "trainable weights + grads", "#66c2a5"),
    ("optimizer_mb", "optimizer state", "#fc8d62"),
    ("activations_mb", "activations + temporaries", "#e5c494"),
]


def plot_peaks(rows: list[dict], path: Path, *, peak_label: str, title: str) -> Path:
    """Stacked bars of the training peak per method, one panel per model (first batch x seq only)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(max(7.0, 4.2 * len(models)), 5.0), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        shape = (mine[0]["batch_size"], mine[0]["seq_len"])
        mine = [r for r in mine if (r["batch_size"], r["seq_len"]) == shape]
        labels = [r["method"] for r in mine]
        xs = range(len(mine))
        bottom = [0.0] * len(mine)
        for key, label, colour in CATEGORIES:
            vals = [float(r.get(key) or 0) if r["status"] == "ok" else 0.0 for r in mine]
            ax.bar(xs, vals, bottom=bottom, color=colour, label=label, width=0.7)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        top = max([b for b in bottom] + [float(r.get("predicted_mb") or 0) for r in mine] + [1.0])
        for x, r in zip(xs, mine, strict=True):
            if r["status"] == "ok" and r.get("predicted_mb"):
                ax.plot([x - 0.35, x + 0.35], [r["predicted_mb"]] * 2, color="black", lw=1.6,
                        label="predicted (minitune.planner)" if x == 0 else None)
            if r["status"] != "ok":
                ax.text(x, top * 0.02, r["status"].split(":")[0].split(" ")[0], rotation=90, ha="center",
                        va="bottom", fontsize=8, color="firebrick")
        ax.set_xticks(list(xs), labels, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{model} (batch {shape[0]} x seq {shape[1]})", fontsize=9)
        ax.set_ylabel(f"MiB ({peak_label})", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5 if len(models) > 2 else 3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_steps(cells: list[dict], path: Path, *, peak_label: str, title: str) -> Path:
    """Memory after forward / backward / optimizer of every step (lines) and each step's peak (dots)."""
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for i, cell in enumerate(cells):
        if cell.get("status") != "ok" or not cell.get("phases"):
            continue
        colour = f"C{i % 10}"
        base = cell.get("baseline_mb", 0.0)
        xs, ys = [], []
        for step, ph in enumerate(cell["phases"], 1):
            for frac, name in ((-2 / 3, "forward"), (-1 / 3, "backward"), (0.0, "optimizer")):
                if name in ph:
                    xs.append(step + frac)
                    ys.append(ph[name] - base)
        ax.plot(xs, ys, ("-", "--", ":", "-.")[i % 4], color=colour, lw=1.6, label=cell["label"])
        key = next((k for k in ("mem/peak_allocated_mb", "mem/max_sampled_mb", "mem/peak_rss_mb")
                    if k in cell["records"][0]), None)
        steps = [r for r in cell["records"] if r["step"] >= 1]
        ax.plot([r["step"] for r in steps], [r[key] - base for r in steps], "^", color=colour, ms=6)
    n = max((len(c.get("phases") or []) for c in cells), default=1)
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("optimizer step (line: after forward, backward, optimizer step; triangle: peak of the step)",
                  fontsize=8)
    ax.set_ylabel(f"MiB ({peak_label})", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_alpha(runs: dict, path: Path, *, title: str) -> Path:
    """Total grad norm, and the mean lora_A / lora_B gradient norms over modules, per alpha."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for i, (alpha, records) in enumerate(sorted(runs.items(), key=lambda kv: float(kv[0]))):
        colour = f"C{i}"
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["grad_norm"] for r in records], color=colour, label=f"alpha={alpha}")
        for ax, part in ((axes[1], "lora_A"), (axes[2], "lora_B")):
            means = []
            for r in records:
                vals = [v for k, v in r.items() if k.startswith("grad_norm/") and k.endswith(part)]
                mean = sum(vals) / len(vals) if vals else 0.0
                means.append(mean if mean > 0 else float("nan"))  # lora_A's gradient is 0 while lora_B is 0
            ax.plot(steps, means, color=colour, label=f"alpha={alpha}")
    for ax, name in zip(axes, ("total grad norm (before clipping)", "mean lora_A grad norm per module",
                               "mean lora_B grad norm per module"), strict=True):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(data: dict, stem: Path) -> list[Path]:
    """Every plot of a saved run (the JSON `memory_grid.py` writes); returns the PNG paths."""
    label = data["peak_label"]
    out = []
    grid_rows = [r for r in data.get("rows") or [] if r["group"] == "grid"]
    if grid_rows:  # `--parts knobs` alone has knob rows only
        out.append(plot_peaks(grid_rows, stem.with_name(stem.name + "-peak.png"), peak_label=label,
                              title=f"Training peak by method and where it goes, {data['device']}"))
    cells = data.get("steps_cells") or []
    if cells:
        out.append(plot_steps(cells, stem.with_name(stem.name + "-steps.png"), peak_label=label,
                              title=f"Memory over steps: {data['steps_model']}, {data['device']}"))
    if data.get("alpha"):
        out.append(plot_alpha(data["alpha"]["runs"], stem.with_name(stem.name + "-alpha.png"),
                              title=data["alpha"]["title"]))
    return out


if __name__ == "__main__":
    src = Path(sys.argv[1])
    for p in plot_all(json.loads(src.read_text()), src.with_suffix("")):
        print(p)
