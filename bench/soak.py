"""Soak: does the process RSS level off over a long run? (a benchmark, not a unit test)

    python bench/soak.py --job opt-125m --steps 1000          # opt-125m preset, bf16, LoRA, batch 4 x <=128, 2,000 quotes
    python bench/soak.py --job default --steps 1000           # the default job (`make train`'s config)
    python bench/soak.py --job opt-125m --steps 300 --malloc default   # without minitune's malloc settings
    python bench/soak.py --job default --steps 1000 --malloc lean      # MINITUNE_MALLOC=lean (128 KiB threshold)

One `minitune.train` run in this process, on real variable-length data (the quotes, padded per
batch, so every batch has another shape), evaluation off, no checkpoint before the end. After
every optimizer step the process RSS (/proc/self/statm) is recorded. Every 25 steps, and at the
end (and on SIGTERM / Ctrl-C), it writes bench/results/soak-<job>-cpu-<date>.{md,csv,png}: so a
soak stopped early (time, a shared machine) still leaves the steps it ran, and says how many.

The script restarts itself as train.py does (`process_memory.restart_with_malloc_env`: glibc's
thread cache off, the 2 MiB threshold). `--malloc lean` / `--malloc default` set MINITUNE_MALLOC
before minitune is imported: lean fixes the mmap threshold at 128 KiB instead; default keeps
glibc's own settings (`minitune.process_memory.tune_malloc` does nothing), to see the growth it fixes.

Verdict: RSS at the last step within 5% of RSS at step 100 (the issue's target: step 1,000 vs 100).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MB = 2**20

JOBS = {
    # the opt-125m case: random-init preset (the real checkpoint's shapes), bf16 weights, LoRA
    "opt-125m": {
        "model": {"preset": "opt-125m", "tokenizer": str(REPO / "tests/fixtures/tokenizers/gpt2"), "dtype": "bfloat16"},
        "lora": {"enabled": True},
        "data": {"path": str(REPO / "data/english_quotes.jsonl"), "prompt": "{quote} ->: ", "response": "{tags}",
                 "max_length": 128, "max_samples": 2000, "validation_fraction": 0},
        "training": {"batch_size": 4},
        "optimizer": {"lr": 2e-4},
    },
    "default": "smollm2-quotes",  # make train
}


def write(rows: list[dict], meta: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "rss_mb", "seconds"])
        w.writeheader()
        w.writerows(rows)
    by_step = {r["step"]: r["rss_mb"] for r in rows}
    last = rows[-1]["step"] if rows else 0
    lines = [f"# Soak: RSS per step, {meta['job']} ({meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; malloc: {meta['malloc']}; "
             f"RSS before any import {meta['baseline_mb']:.0f} MiB.", "",
             f"Steps run: {last} of {meta['steps']} asked" + ("" if last >= meta["steps"] else
                                                             " (stopped early: the table covers the steps that ran)"),
             ""]
    if 100 in by_step and last > 100:
        change = (by_step[last] - by_step[100]) / by_step[100]
        verdict = "within" if abs(change) <= 0.05 else "NOT within"
        lines += [f"RSS at step {last} vs step 100: {by_step[last]:.0f} vs {by_step[100]:.0f} MiB "
                  f"({change:+.1%}): {verdict} 5%.", ""]
    lines += ["| step | RSS MiB | s/step (mean since previous row) |", "|---:|---:|---:|"]
    marks = [s for s in (1, 2, 5, 10, 25, 50) if s in by_step] + [s for s in sorted(by_step) if s % 50 == 0]
    if last not in marks:
        marks.append(last)
    prev_t, prev_s = 0.0, 0
    secs = {r["step"]: r["seconds"] for r in rows}
    for s in marks:
        rate = (secs[s] - prev_t) / (s - prev_s) if s > prev_s else 0.0
        lines.append(f"| {s} | {by_step[s]:.0f} | {rate:.2f} |")
        prev_t, prev_s = secs[s], s
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in rows], [r["rss_mb"] for r in rows], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("process RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"soak: {meta['job']}, malloc {meta['malloc']}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", choices=sorted(JOBS), default="opt-125m")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--malloc", choices=["minitune", "lean", "default"], default="minitune",
                    help="lean: MINITUNE_MALLOC=lean (128 KiB mmap threshold); default: keep glibc's own settings")
    ap.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/soak-<job>-cpu-<date>)")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value settings")
    args = ap.parse_args(argv)
    if args.malloc != "minitune":
        os.environ["MINITUNE_MALLOC"] = args.malloc
    from minitune.process_memory import restart_with_malloc_env  # light: no torch yet
    from minitune.rss import rss_bytes  # light too

    restart_with_malloc_env()  # as train.py: a no-op once restarted, or with MINITUNE_MALLOC set
    baseline = rss_bytes()  # before minitune, torch and the libraries are imported
    import torch

    import minitune

    out_dir = f"/tmp/minitune-soak-{args.job}-{os.getpid()}"
    overrides = [f"training.max_steps={args.steps}", "training.eval_every=0", "training.save_every=0",
                 "training.overwrite=true", f"training.output_dir={out_dir}", "logging.log_every=1",
                 "logging.progress=none", "training.device=cpu", *args.overrides]
    date = dt.date.today().isoformat()
    suffix = {"minitune": "", "lean": "-lean-malloc", "default": "-glibc-default"}[args.malloc]
    stem = args.out or RESULTS / f"soak-{args.job}-cpu-{date}{suffix}"
    meta = {"job": args.job, "date": date, "steps": args.steps, "malloc": args.malloc, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads", "baseline_mb": baseline / MB,
            "command": "python bench/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    rows: list[dict] = []
    started = time.perf_counter()

    def on_step(state, metrics) -> None:
        rows.append({"step": state.step, "rss_mb": round(rss_bytes() / MB, 1),
                     "seconds": round(time.perf_counter() - started, 2)})
        if state.step % 25 == 0:
            write(rows, meta, stem)
            print(f"soak step {state.step}: RSS {rows[-1]['rss_mb']:.0f} MiB", flush=True)

    # SIGTERM / Ctrl-C: minitune ends the run after the current step, and the table is written below
    minitune.train(JOBS[args.job], overrides, on_step=on_step)
    write(rows, meta, stem)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
