"""Precision table: training tokens/s, peak memory and eval loss per precision, one process per run.

    python bench/precision.py                          # bloom-560m LoRA 8x256 and the default job (~25 min, 2 CPU cores)
    python bench/precision.py --jobs bloom-560m --repeats 2
    python bench/precision.py --jobs default --precisions fp32,auto
    python bench/precision.py --dry-run                # tiny model, 2 steps per run: checks the script (the tests run it)

Each run is `minitune.train` on a config (so `auto` is resolved exactly as `train.py` resolves it),
in its own process (a clean allocator and a fresh Accelerate state), with the precision overrides
below. Runs alternate precisions within each repeat, so that a slow patch of the machine hits every
precision alike. Per run: the precision `auto` chose, training tokens/s over the timed steps (the
first `--warmup` steps are left out; evaluation time is not in it), the peak memory the run's
profiler measured (CPU: RSS above the process baseline; CUDA: max allocated), and the final eval
loss. The table shows the median over repeats and each precision against fp32.

Jobs:
- `bloom-560m`: the bloom-560m architecture (random init: the speed and memory of the real one),
  LoRA r=16 on query_key_value, batch 8 x 256 tokens with packing, english quotes.
- `default`: `configs/smollm2-quotes.yaml` as `make train` runs it (real SmolLM2 weights, 40 steps,
  same seed): its eval loss is the quality check of `auto` against fp32.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from minitune.config import merge_sections  # noqa: E402  (light: yaml only)

RESULTS = REPO / "bench" / "results"
GPT2 = str(REPO / "tests/fixtures/tokenizers/gpt2")
QUOTES = str(REPO / "data/english_quotes.jsonl")

PRECISIONS: dict[str, dict] = {
    "fp32": {"model": {"dtype": "float32"}, "training": {"mixed_precision": "no"}},
    "fp32+bf16-autocast": {"model": {"dtype": "float32"}, "training": {"mixed_precision": "bf16"}},
    "bf16-weights": {"model": {"dtype": "bfloat16"}, "training": {"mixed_precision": "no"}},
    "bf16-weights+autocast": {"model": {"dtype": "bfloat16"}, "training": {"mixed_precision": "bf16"}},
    "auto": {"model": {"dtype": "auto"}, "training": {"mixed_precision": "auto"}},
}


def _merge(*dicts: dict) -> dict:
    """Config dicts merged section by section, later ones winning (as `load_config` merges overrides)."""
    return functools.reduce(merge_sections, dicts, {})


def job_config(job: str, args: argparse.Namespace) -> dict:
    """The config of one job (before the precision overrides)."""
    if args.dry_run:
        steps = args.warmup + 2
        return {"model": {"preset": "tiny-llama", "tokenizer": GPT2},
                "data": {"path": QUOTES, "prompt": "{quote} ->: ", "response": "{tags}", "max_length": 32,
                         "max_samples": 64, "validation_fraction": 0.1},
                "training": {"max_steps": steps, "batch_size": 4, "eval_batches": 2, "seed": 0},
                "logging": {"progress": "none"}}
    if job == "bloom-560m":
        steps = args.warmup + (args.steps or 3)
        return {"model": {"preset": "bloom-560m", "tokenizer": GPT2},
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["query_key_value"]},
                "data": {"path": QUOTES, "prompt": "{quote} ->: ", "response": "{tags}", "max_length": 256,
                         "packing": True, "validation_fraction": 0.05},
                "optimizer": {"lr": 2e-4},
                "training": {"max_steps": steps, "batch_size": 8, "eval_batches": 2, "seed": 0},
                "logging": {"progress": "none"}}
    if job == "default":
        import yaml

        cfg = yaml.safe_load((REPO / "configs" / "smollm2-quotes.yaml").read_text())
        cfg["logging"] = {**cfg.get("logging", {}), "progress": "none"}
        if args.steps:
            cfg["training"]["max_steps"] = args.steps
        return cfg
    raise SystemExit(f"error: unknown job '{job}'; choose from bloom-560m, default")


def run_child(config: dict) -> dict:
    """One run (in this process): train, then read its log and memory summary."""
    from minitune import train

    result = train(config)
    records = [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]
    return {
        "precision": result.precision.__dict__,
        "records": [{k: r.get(k) for k in ("step", "loss", "tokens_per_s", "step_time_s", "tokens")} for r in records],
        "eval_loss": result.metrics.get("eval_loss"),
        "peak_mb": result.memory.get("peak_mb"),
        "peak_label": result.memory.get("peak_label"),
        "predicted_mb": result.memory.get("predicted", {}).get("total", 0) / 2**20,
        "device": result.memory.get("device"),
    }


def run_one(job: str, precision: str, args: argparse.Namespace) -> dict:
    """One run in a child process; failures are recorded, not raised."""
    with tempfile.TemporaryDirectory(prefix="minitune-precision-") as tmp:
        config = _merge(job_config(job, args), PRECISIONS[precision],
                        {"training": {"output_dir": f"{tmp}/run", "overwrite": True, "device": args.device}})
        out = Path(tmp) / "result.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, __file__, "--child", json.dumps(config), "--child-out", str(out)]
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"job": job, "precision_label": precision, "status": f"timeout (> {args.timeout:.0f} s)"}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return {"job": job, "precision_label": precision, "status": f"error: {tail[:200]}"}
        res = json.loads(out.read_text())
    timed = [r["tokens_per_s"] for r in res["records"][args.warmup:] if r.get("tokens_per_s")]
    res.update(job=job, precision_label=precision, status="ok",
               tokens_per_s=statistics.median(timed) if timed else None)
    return res


def summarise(results: list[dict]) -> list[dict]:
    """One row per (job, precision): medians over repeats, and ratios against the job's fp32 row."""
    rows = []
    for job in dict.fromkeys(r["job"] for r in results):
        ok = {}
        for r in results:
            if r["job"] == job:
                ok.setdefault(r["precision_label"], []).append(r)
        base = None
        for label, runs in ok.items():
            good = [r for r in runs if r["status"] == "ok"]
            row = {"job": job, "precision": label, "runs": len(runs), "status": "ok" if good else runs[0]["status"]}
            if good:
                chosen = good[0]["precision"]
                row.update(
                    dtype=chosen["dtype"], mixed_precision=chosen["mixed_precision"],
                    tokens_per_s=statistics.median(r["tokens_per_s"] for r in good if r["tokens_per_s"]),
                    peak_mb=statistics.median(r["peak_mb"] for r in good),
                    predicted_mb=good[0]["predicted_mb"],
                    eval_loss=statistics.median(r["eval_loss"] for r in good) if good[0]["eval_loss"] else None,
                    device=good[0]["device"],
                )
            if label == "fp32" and good:
                base = row
            rows.append(row)
        for row in rows:
            if row["job"] == job and base is not None and row["status"] == "ok":
                row["speedup_vs_fp32"] = row["tokens_per_s"] / base["tokens_per_s"]
                row["peak_vs_fp32"] = row["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
                if row.get("eval_loss") is not None and base.get("eval_loss"):
                    row["eval_loss_vs_fp32_pct"] = 100 * (row["eval_loss"] / base["eval_loss"] - 1)
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| job | precision | model.dtype | autocast | tokens/s | vs fp32 | peak MiB | vs fp32 | eval loss | vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['job']} | {r['precision']} | {r['status']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['job']} | {r['precision']} | {r['dtype']} | {r['mixed_precision']} | {_fmt(r['tokens_per_s'], ',.0f')} "
            f"| {_fmt(r.get('speedup_vs_fp32'), '.2f')}x | {_fmt(r['peak_mb'], ',.0f')} "
            f"| {_fmt(r.get('peak_vs_fp32'), '.2f')}x | {_fmt(r.get('eval_loss'), '.4f')} "
            f"| {_fmt(r.get('eval_loss_vs_fp32_pct'), '+.2f')}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="bloom-560m,default", help="comma-separated, of bloom-560m, default")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, of {', '.join(PRECISIONS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per precision, alternating precisions")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (bloom: timed steps, default 3; "
                   "default job: its 40 unless set)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of tokens/s")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="tiny model, 2 timed steps per run (checks the script)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--name", help="file stem (default precision-<device>-<date>)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_child(json.loads(args.child)), default=str))
        return 0
    jobs = [j for j in args.jobs.split(",") if j]
    labels = [x for x in args.precisions.split(",") if x]
    unknown = [x for x in labels if x not in PRECISIONS]
    if unknown:
        print(f"error: unknown precision {unknown}; choose from {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    results = []
    load_start = os.getloadavg()[0]
    for job in jobs:
        job_config(job, args)  # an unknown job fails before any run
        for repeat in range(args.repeats):
            order = labels if repeat % 2 == 0 else labels[::-1]
            for label in order:
                res = run_one(job, label, args)
                print(f"{job} {label} (run {repeat + 1}): {res['status']}"
                      + (f", {res['tokens_per_s']:,.0f} tok/s, peak {res['peak_mb']:,.0f} MiB, eval "
                         f"{_fmt(res['eval_loss'], '.4f')}, chose {res['precision']['dtype']}/"
                         f"{res['precision']['mixed_precision']}" if res["status"] == "ok" and res["tokens_per_s"]
                         else ""), flush=True)
                results.append(res)
    rows = summarise(results)
    device = next((r["device"] for r in rows if r.get("device")), args.device)
    name = args.name or f"precision-{str(device).split(':')[0]}-{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/precision.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    header = (f"# Precision table ({datetime.date.today().isoformat()}, {platform.machine()}, "
              f"{os.cpu_count()} CPUs, device {device})\n\n`{command.strip()}`\n\n"
              f"tokens/s: median over timed steps (first {args.warmup} left out) and over {args.repeats} run(s); "
              "peak: the run's profiler (CPU: RSS above the process baseline); eval loss: the run's final evaluation. "
              f"Load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end (2 cores: above ~2, other "
              "processes shared the CPU and the tokens/s are low and noisy).")
    (args.out / f"{name}.md").write_text(markdown(rows, header))
    (args.out / f"{name}.json").write_text(json.dumps({"command": command, "runs": results, "rows": rows}, default=str))
    fields = ["job", "precision", "dtype", "mixed_precision", "tokens_per_s", "speedup_vs_fp32", "peak_mb",
              "peak_vs_fp32", "predicted_mb", "eval_loss", "eval_loss_vs_fp32_pct", "runs", "status", "device"]
    with open(args.out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
