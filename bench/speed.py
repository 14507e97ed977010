"""Speed against the hardware: each job's achieved FLOP/s and its fraction of this machine's peak.

    python bench/speed.py                                   # both jobs (~16 min on 2 cores, 11 of it bloom-560m)
    python bench/speed.py --jobs default --steps 20 --tag packing data.packing=true   # one job, a variant
    python bench/speed.py --grid bench/results/cpu-2026-12-04.csv   # `minitune plan`'s step time vs the grid's

Per job, one `minitune.train` run in its own process (evaluation and checkpoints off), started with
the environment train.py restarts itself with (`process_memory.malloc_env`: glibc's thread cache
off, so minitune's 2 MiB mmap threshold applies, as in `make train`), then:
- the peak: `minitune.planner.roofline.probe` in the step's dtype (a 2048 x 1024 @ 1024 x 4096
  product, best of 5) before and after the job; the higher of the two counts (a probe taken while
  something else shares the cores reads low);
- tokens/s: the median over the logged steps after `--warmup` of the run's own tokens_per_s
  (attention-mask tokens: padding is not counted);
- FLOP per token: what the run's own planner simulation counted for its first two steps (their
  real batch shapes: `memory.json`'s `predicted.flops`, every matmul and attention product of
  forward, backward and recomputation as torch's flop formulas count them; the output layer only on
  the positions the loss reads), over those steps' tokens. Padding is computed, so it is in the
  FLOPs: achieved FLOP/s = tokens/s x FLOP per token is what the hardware did, useful or not;
- the target, from #25: bloom-560m 8 x 256 at least 35% of the bf16 peak, the default job 12%.

`--grid CSV` runs nothing: for each cell of a memory-grid result (bench/memory_grid.py) it builds
the cell's config (bench/cell.py), takes the planner's FLOPs and memory-bound bytes of one step
(`minitune.planner.simulate`) and the step time at this CPU's probed peak
(`roofline.step_seconds`, what `minitune plan` prints), and sets it beside the step time the grid
measured: how far real steps are from the roofline, and whether the plan's price of each change
(its step over LoRA's) has the measured order.

Writes bench/results/speed-cpu-<date>[-<tag>].{md,csv} (`--grid`: speed-cpu-<date>-plan-vs-grid.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# name: (config, overrides, target fraction of the peak)
JOBS: dict[str, tuple[str, list[str], float]] = {
    "default": ("smollm2-quotes", [], 0.12),  # make train: SmolLM2-135M GGUF, LoRA r16, 8 x <=128 chat examples
    # #25's bloom job: bloom-560m (random init, the real shapes), bf16 weights, LoRA r16 on
    # query_key_value, 8 x 256 tokens: each quote twelve times over, cut at 256 (BLOOM cannot pack)
    # smoke tests of this script (tests/test_bench.py)
    "tiny-llama": ("tiny-llama", ["data.max_samples=64"], 0.0),
    "bloom-560m": ("bloom", ["model.name_or_path=null", "model.preset=bloom-560m", "model.dtype=bfloat16",
                             "model.tokenizer=" + str(REPO / "tests/fixtures/tokenizers/gpt2"),
                             "quantization.mode=none", "lora.dropout=0.0", "data.max_length=256",
                             "data.prompt=" + " ".join(["{quote}"] * 12) + " ->: ", "data.max_samples=400",
                             "training.batch_size=8", "training.grad_accum=1",
                             "training.gradient_checkpointing=false"], 0.35),
}


def flop_per_token(out_dir: Path) -> float:
    """FLOP per real token of a finished run in `out_dir`: its planner count of steps 1-2
    (memory.json's `predicted.flops`, per step; padding included) over those steps' tokens
    (log.jsonl's running total). Also used by bench/gpu_check.py's speed part."""
    from minitune.build import TRACE_STEPS

    log = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in log if "tokens_per_s" in r]
    predicted = json.loads((out_dir / "memory.json").read_text())["predicted"]
    simulated = min(TRACE_STEPS, len(tokens))
    return predicted["flops"] * simulated / tokens[simulated - 1]


def run_job(name: str, steps: int, warmup: int, extra: list[str], out_dir: Path) -> dict:
    """Train the job in this process and measure it (called in a child process: `--child`)."""
    import torch

    from minitune.config import load_config
    from minitune.device import resolve_precision
    from minitune.planner.roofline import half_precision, probe
    from minitune.run import train

    config, overrides, target = JOBS[name]
    overrides = [*overrides, f"training.max_steps={steps}", "training.eval_every=0", "training.save_every=0",
                 "training.overwrite=true", f"training.output_dir={out_dir}", "logging.log_every=1",
                 "logging.progress=none", "logging.report=false", "logging.memory=true", "training.device=cpu", *extra]
    cfg, _ = resolve_precision(load_config(REPO / "configs" / f"{config}.yaml", overrides), torch.device("cpu"))
    dtype = torch.bfloat16 if half_precision(cfg) else torch.float32
    before = probe.__wrapped__("cpu", dtype)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    after = probe.__wrapped__("cpu", dtype)
    log = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    steps_log = [r for r in log if "tokens_per_s" in r and "step" in r]
    timed = steps_log[warmup:]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    step_s = statistics.median(r["step_time_s"] for r in timed)
    examples = cfg.training.batch_size * cfg.training.grad_accum
    tokens_at = {r["step"]: r["tokens"] for r in steps_log}
    first, last = timed[0]["step"], timed[-1]["step"]
    per_example = (tokens_at[last] - tokens_at.get(first - 1, 0)) / (examples * (last - first + 1))
    per_token = flop_per_token(out_dir)
    peak = max(before, after, key=lambda p: p.flops)
    achieved = tokens_per_s * per_token
    return {"job": name, "config": config, "overrides": " ".join(extra), "dtype": str(dtype).removeprefix("torch."),
            "steps": steps, "warmup": warmup, "tokens_per_s": tokens_per_s, "step_s": step_s,
            "tokens_per_example": round(per_example, 1),
            "flop_per_token": per_token, "achieved_gflops": achieved / 1e9,
            "peak_gflops": peak.flops / 1e9, "peak_before_gflops": before.flops / 1e9,
            "peak_after_gflops": after.flops / 1e9, "fraction": achieved / peak.flops,
            "target": target, "wall_s": round(wall, 1)}


def write(rows: list[dict], meta: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Speed against this machine's peak: cpu, {meta['date']}", "",
             f"Command: `{meta['command']}`  ", f"Code: commit {meta['commit']}  ",
             f"Machine: {meta['machine']}; torch {meta['torch']}; load average {meta['load_before']} before, "
             f"{meta['load_after']} after; each job's process started as train.py restarts itself "
             "(`process_memory.malloc_env`: minitune's malloc setting unless MINITUNE_MALLOC says otherwise)", "",
             "Peak: `minitune.planner.roofline.probe` in the job's dtype before and after the job, the higher "
             "counted. Tokens/s: median of the run's logged tokens_per_s after the warm-up steps (real tokens, "
             "no padding). FLOP/token: the run's own planner count of its first two steps (`predicted.flops` in "
             "memory.json: their real shapes, padding included; forward, backward through the frozen weights, "
             "adapters' gradients, recomputation, attention; the output layer on the loss's positions) over "
             "their tokens. Achieved = tokens/s x FLOP/token: what the hardware computed, padding included.", "",
             "| job | dtype | tokens/s | s/step | tokens/example | GFLOP/token | achieved GFLOP/s | peak GFLOP/s "
             "(before / after) | of the peak | target | |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = "met" if r["fraction"] >= r["target"] else "NOT met"
        lines.append(f"| {r['job']}{' ' + r['overrides'] if r['overrides'] else ''} | {r['dtype']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_s']:.2f} | {r['tokens_per_example']:.0f} | {r['flop_per_token'] / 1e9:.3f} | "
                     f"{r['achieved_gflops']:,.0f} | {r['peak_gflops']:,.0f} ({r['peak_before_gflops']:,.0f} / "
                     f"{r['peak_after_gflops']:,.0f}) | {r['fraction']:.1%} | {r['target']:.0%} | {ok} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plan_vs_grid(grid_csv: Path, meta: dict, stem: Path) -> None:
    """The plan's step time at the probed peak beside each grid cell's measured step time."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from cell import DEFAULTS, cell_config
    from memory_grid import METHODS

    from minitune.lm import model_kind
    from minitune.planner import meta_model, simulate, worst_case_steps
    from minitune.planner.roofline import half_precision, probe, step_seconds

    with open(grid_csv) as f:
        cells = [r for r in csv.DictReader(f) if r["group"] == "grid" and r["status"] == "ok"]
    rows = []
    for c in cells:
        spec = {**DEFAULTS, **METHODS[c["method_key"]][1], "model": c["model"], "batch_size": int(c["batch_size"]),
                "seq_len": int(c["seq_len"]), "device": "cpu"}
        cfg = cell_config(spec)
        model, _, _ = meta_model(cfg)
        pred = simulate(model, cfg, steps=worst_case_steps(cfg, seq2seq=model_kind(model) == "seq2seq"))
        peak = probe("cpu", torch.bfloat16 if half_precision(cfg) else torch.float32)
        at_peak = step_seconds(pred.flops, pred.moved, peak)
        rows.append({"model": c["model"], "method": c["method"], "key": c["method_key"], "flops": pred.flops,
                     "moved": pred.moved, "at_peak": at_peak, "measured": float(c["step_s"]),
                     "peak": peak.source})
    lora = {r["model"]: r for r in rows if r["key"] == "lora"}
    lines = [f"# `minitune plan`'s step time against the grid's measured: cpu, {meta['date']}", "",
             f"Command: `{meta['command']}`  ", f"Code: commit {meta['commit']}  ",
             f"Machine: {meta['machine']}; torch {meta['torch']}; load average {meta['load_before']}", "",
             f"Grid: `{grid_csv.relative_to(REPO) if grid_csv.is_relative_to(REPO) else grid_csv}` (its own "
             "command and machine state are in its .md; the cells run with the memory profiler on). Peaks, "
             "probed now: " + "; ".join(sorted({r['peak'] for r in rows})) + ".", "",
             "At the peak = the planner's FLOPs of one step at the probed matmul peak + its memory-bound "
             "bytes (dequantization, the optimizer update) at the probed copy bandwidth: the step time "
             "`minitune plan` prints. Measured / at the peak: how many times slower the real step is. "
             "Price = the step over the same model's LoRA step, planned and measured.", "",
             "| model | method | GFLOP/step | memory-bound MiB | at the peak s | measured s | measured / at the peak "
             "| price planned | price measured |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = lora.get(r["model"])
        planned = r["at_peak"] / base["at_peak"] if base else float("nan")
        measured = r["measured"] / base["measured"] if base else float("nan")
        lines.append(f"| {r['model']} | {r['method']} | {r['flops'] / 1e9:,.1f} | {r['moved'] / 2**20:,.0f} | "
                     f"{r['at_peak']:.3f} | {r['measured']:.3f} | {r['measured'] / r['at_peak']:.1f}x | "
                     f"x{planned:.2f} | x{measured:.2f} |")
    slow = [r["measured"] / r["at_peak"] for r in rows]
    lines += ["", f"Real steps take {min(slow):.1f}x to {max(slow):.1f}x the step at the peak "
              f"(median {statistics.median(slow):.1f}x) over {len(rows)} cells."]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="default,bloom-560m", help=f"comma-separated, from {', '.join(JOBS)}")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="logged steps left out of the median")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/speed-cpu-<date>[-<tag>])")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--grid", type=Path, default=None, help="a memory-grid CSV: the plan's step time beside its cells'")
    ap.add_argument("overrides", nargs="*", help="section.key=value settings for every job")
    args = ap.parse_args(argv)
    if args.child:  # one job, in this process: its result as the last line of stdout
        with tempfile.TemporaryDirectory(prefix="minitune-speed-") as tmp:
            print(json.dumps(run_job(args.child, args.steps, args.warmup, args.overrides, Path(tmp) / "run")))
        return 0
    import torch

    from minitune.process_memory import malloc_env  # each job starts as train.py restarts itself

    date = dt.date.today().isoformat()
    meta = {"date": date, "command": "python bench/speed.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=REPO).stdout.strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "load_before": f"{os.getloadavg()[0]:.1f}"}
    if args.grid:
        stem = args.out or RESULTS / f"speed-cpu-{date}-plan-vs-grid"
        plan_vs_grid(args.grid.resolve(), meta, stem)
        print(f"wrote {stem}.md")
        return 0
    rows = []
    for name in args.jobs.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), *args.overrides], capture_output=True, text=True,
                              env=malloc_env({**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}))
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"error: job {name} failed (exit {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, {rows[-1]['achieved_gflops']:,.0f} GFLOP/s = "
              f"{rows[-1]['fraction']:.1%} of {rows[-1]['peak_gflops']:,.0f}", flush=True)
    meta["load_after"] = f"{os.getloadavg()[0]:.1f}"
    stem = args.out or RESULTS / f"speed-cpu-{date}{'-' + args.tag if args.tag else ''}"
    write(rows, meta, stem)
    print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
