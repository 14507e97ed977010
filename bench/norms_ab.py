"""What casting the norms to fp32 costs per step: `training.fp32_norms=norms` (the default) against
`none`, the same job alternating (none, norms, norms, none, ...), each run its own `train.py` process.

    python bench/norms_ab.py                                   # the default job and opt-125m, 2 runs each
    python bench/norms_ab.py --jobs opt-125m --repeats 3 --steps 16
    python bench/norms_ab.py --jobs default,opt-125m,bloom-560m,gpt-neo-125m,flan-t5-small   # every family

Per run: the median `step_time_s` of log.jsonl over the steps after `--warmup` (training time only:
no loading, evaluation or saving). Per job: the median over runs of each setting and the ratio
norms / none. Results: bench/results/norms-ab-cpu-<date>[-<tag>].{md,csv}, with the command.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPT2 = str(REPO / "tests/fixtures/tokenizers/gpt2")
T5 = str(REPO / "tests/fixtures/tokenizers/t5_test_sentencepiece")
# job -> (--config, overrides); every job with bf16 frozen weights (where fp32 norms cost anything)
JOBS = {
    "default": ("smollm2-quotes", []),
    "opt-125m": ("tiny-llama", ["model.preset=opt-125m", f"model.tokenizer={GPT2}", "model.dtype=bfloat16",
                                "training.batch_size=8", "data.max_length=128", "data.max_samples=400"]),
    "bloom-560m": ("tiny-llama", ["model.preset=bloom-560m", f"model.tokenizer={GPT2}", "model.dtype=bfloat16",
                                  "lora.target_modules=[query_key_value]", "training.batch_size=8",
                                  "data.max_length=256", "data.max_samples=400"]),
    "gpt-neo-125m": ("tiny-llama", ["model.preset=gpt-neo-125m", f"model.tokenizer={GPT2}", "model.dtype=bfloat16",
                                    "training.batch_size=8", "data.max_length=128", "data.max_samples=400"]),
    "flan-t5-small": ("tiny-llama", ["model.preset=flan-t5-small", f"model.tokenizer={T5}", "model.dtype=bfloat16",
                                     "training.batch_size=8", "data.max_length=128", "data.max_target_length=32",
                                     "data.max_samples=400"]),
}


def run_once(job: str, setting: str, steps: int, warmup: int, out: Path) -> float:
    """One process; the median step time (s) of its steps after `warmup`."""
    config, overrides = JOBS[job]
    cmd = [sys.executable, "train.py", "--config", config, *overrides, f"training.fp32_norms={setting}",
           f"training.max_steps={steps}", "training.eval_every=0", "training.eval_batches=1", "training.save_every=0",
           "logging.memory=false", "logging.report=false", "logging.progress=none", "logging.log_every=1",
           f"training.output_dir={out}", "training.overwrite=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{job} {setting} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in records[warmup:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default="default,opt-125m", help=f"comma-separated, of {', '.join(JOBS)}")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting (alternating)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--tag", default="", help="added to the results' file name (norms-ab-cpu-<date>-<tag>)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minitune-norms-") as tmp:
        for job in args.jobs.split(","):
            times: dict[str, list[float]] = {"none": [], "norms": []}
            order = [("none", "norms"), ("norms", "none")]
            for i in range(args.repeats):
                for setting in order[i % 2]:
                    t = run_once(job, setting, args.steps, args.warmup, Path(tmp) / f"{job}-{setting}-{i}")
                    times[setting].append(t)
                    print(f"{job:12s} {setting:6s} run {i + 1}: {t:.3f} s/step", flush=True)
            none, norms = statistics.median(times["none"]), statistics.median(times["norms"])
            rows.append({"job": job, "none_s": none, "norms_s": norms, "ratio": norms / none,
                         "none_runs": " ".join(f"{x:.3f}" for x in times["none"]),
                         "norms_runs": " ".join(f"{x:.3f}" for x in times["norms"])})
    today = datetime.date.today().isoformat()
    command = "python bench/norms_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# fp32 norms: step time with `training.fp32_norms=norms` against `none` ({today})", "",
             f"`{command.strip()}`; {platform.machine()}, {os.cpu_count()} cores, {args.repeats} runs of each "
             f"setting alternating, median step time of steps {args.warmup + 1}-{args.steps} per run, then the "
             "median over runs.", "",
             "| job | none s/step | norms s/step | norms / none | runs (none) | runs (norms) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['job']} | {r['none_s']:.3f} | {r['norms_s']:.3f} | {r['ratio']:.3f} | {r['none_runs']} | "
              f"{r['norms_runs']} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"norms-ab-cpu-{today}" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    with open(args.out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
