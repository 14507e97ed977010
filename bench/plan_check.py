"""The memory planner checked on this machine, beyond the grid: configs the grid does not hold, and
the advice it gives for configs over a budget.

    python bench/plan_check.py                      # ~15 min on 2 CPU cores
    python bench/plan_check.py --parts advice       # only the advice table

outside  configs the grid does not hold (a 4-bit base with gradient checkpointing, full fine-tuning
         with an 8-bit optimizer, LoRA on every linear layer under bf16 autocast, the default job's
         shape, an 8-bit base with accumulation): measured peak against `minitune.planner.simulate`.
advice   configs over a budget set 15% under their predicted peak: `minitune.planner.plan` with that
         budget, its first suggestion applied, a few steps run: is the measured peak under the budget?

Each run is a cell of the memory benchmark (`bench/cell.py`, its own process, random token batches
of the planned shape: every position a target); on CPU the peak is what the CPU allocator holds
(`minitune.cpu_allocator.AllocatorTrace`). Writes bench/results/plan-check-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cell import DEFAULTS, cell_config  # noqa: E402  (bench/ is not a package)
from memory_grid import RESULTS, cell_env, device_info, process_error, rss_over_allocator, run_cell  # noqa: E402

from minitune.config import load_config  # noqa: E402
from minitune.planner import plan  # noqa: E402

MB = 2**20

OUTSIDE = [
    ("bloom-560m: 4-bit base + gradient checkpointing",
     {"model": "bloom-560m", "quant": "4bit", "gradient_checkpointing": True}),
    ("flan-t5-small: full fine-tuning + AdamW 8-bit", {"model": "flan-t5-small", "lora": False, "optimizer": "adamw8bit"}),
    ("opt-125m: LoRA on every linear layer, bf16 autocast",
     {"model": "opt-125m", "target_modules": ["all-linear"], "mixed_precision": "bf16"}),
    ("smollm2-135m, the default job's shape: bf16 weights, LoRA r=16 on q,k,v,o, 8 x 128",
     {"model": "smollm2-135m", "dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32, "batch_size": 8, "seq_len": 128,
      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    ("gpt-neo-125m: 8-bit base, accumulation 4", {"model": "gpt-neo-125m", "quant": "8bit", "grad_accum": 4}),
]

ADVICE = [
    ("opt-125m, full fine-tuning, 4 x 128", {"model": "opt-125m", "lora": False, "batch_size": 4, "seq_len": 128}),
    ("bloom-560m, LoRA, 4 x 128", {"model": "bloom-560m", "batch_size": 4, "seq_len": 128}),
    ("flan-t5-small, full fine-tuning, 8 x 128", {"model": "flan-t5-small", "lora": False, "batch_size": 8,
                                                  "seq_len": 128}),
]
UNDER = 0.85  # the budget: this fraction of the predicted peak

# a planner override -> the cell setting it changes
_SPEC_KEYS = {"training.batch_size": "batch_size", "training.grad_accum": "grad_accum",
              "training.loss_chunk_size": "loss_chunk_size", "optimizer.name": "optimizer",
              "training.gradient_checkpointing": "gradient_checkpointing", "quantization.mode": "quant",
              "lora.enabled": "lora", "data.max_length": "seq_len"}


def _spec(settings: dict) -> dict:
    return {**DEFAULTS, "warmup": 1, "steps": 2, **settings}


def _measured(spec: dict, timeout: float) -> dict:
    res = run_cell(spec, timeout=timeout, env=cell_env("fixed"))
    row = {"status": res.get("status"), "spec": {k: v for k, v in spec.items() if DEFAULTS.get(k) != v}}
    if res.get("status") == "ok":
        row.update(measured_mb=res["peak_train_mb"], predicted_mb=res["predicted"]["total"] / MB,
                   load_mb=res.get("peak_all_mb"), step_s=res.get("step_s"),
                   # the whole process (CPU): peak RSS, the RSS before loading, and process_peak
                   rss_peak_mb=res.get("rss_peak_mb"), baseline_mb=res.get("baseline_mb"),
                   process_peak_mb=res.get("process_peak_mb"), peak_train_mb=res["peak_train_mb"])
        row["ratio"] = row["measured_mb"] / row["predicted_mb"]
    return row


def part_outside(timeout: float) -> list[dict]:
    rows = []
    for label, settings in OUTSIDE:
        t = time.time()
        row = {"config": label, **_measured(_spec(settings), timeout)}
        print(f"  {label:<80} {row['status']}  measured {row.get('measured_mb', 0):8.1f} MiB  predicted "
              f"{row.get('predicted_mb', 0):8.1f} MiB  ({time.time() - t:.0f} s)", flush=True)
        rows.append(row)
    return rows


def part_advice(timeout: float) -> list[dict]:
    rows = []
    for label, settings in ADVICE:
        spec = _spec(settings)
        cfg = load_config(cell_config(spec), {"data": {"path": "data/english_quotes.jsonl"}})  # a path, never read
        before = plan(cfg, "cpu", suggest=False).prediction.total
        budget = int(before * UNDER)
        result = plan(cfg, "cpu", budget=budget)
        first = next((s for s in result.suggestions if s.fits), None)
        row = {"config": label, "budget_mb": budget / MB, "predicted_before_mb": before / MB,
               "before": _measured(spec, timeout)}
        if first is not None:
            changed = {**spec, **{_SPEC_KEYS[k]: v for k, v in first.overrides.items()}}
            row.update(suggestion=first.what, overrides=first.overrides, predicted_after_mb=first.peak / MB,
                       after=_measured(changed, timeout))
            after = row["after"].get("measured_mb")
            row["under_budget"] = after is not None and after * MB <= budget
        print(f"  {label:<40} budget {budget / MB:8.1f} MiB; {row.get('suggestion', 'no suggestion')}: measured "
              f"{row.get('after', {}).get('measured_mb', 0):.1f} MiB, under: {row.get('under_budget')}", flush=True)
        rows.append(row)
    return rows


def _f(v, fmt=".1f") -> str:
    return "" if v is None else format(v, fmt)


def markdown(data: dict) -> str:
    lines = [f"# The memory planner checked: {data['device']}, {data['date']}", "",
             f"Command: `{data['command']}`  ", f"Machine: {data['machine']}  ",
             "Each run: one `bench/cell.py` process, random token batches (every position a target), 1 warm-up + 2 "
             "steps; peak = what the CPU allocator holds over the training steps (`AllocatorTrace`); predicted = "
             "`minitune.planner.simulate` of the same model and settings. error = (predicted - measured) / measured.",
             ""]
    if data.get("outside"):
        lines += ["## Configs outside the grid", "",
                  "RSS = the run's whole-process peak RSS (loading included; the kernel's own high-water mark on Linux); "
                  "process_peak = "
                  "`minitune.process_memory.process_peak` (RSS before loading + the higher of the predicted training "
                  "tensors with the allocator's overhead and glibc's heap, and loading's predicted peak); RSS above baseline / peak = (peak RSS - RSS before loading) / the allocator's peak.", "",
                  "| config | status | measured MiB | predicted MiB | ratio | error | RSS MiB | process_peak MiB "
                  "| RSS vs process | RSS above baseline / peak |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["outside"]:
            err = (r["predicted_mb"] - r["measured_mb"]) / r["measured_mb"] if r.get("measured_mb") else None
            lines.append(f"| {r['config']} | {r['status']} | {_f(r.get('measured_mb'))} | {_f(r.get('predicted_mb'))} | "
                         f"{_f(r.get('ratio'), '.3f')} | {_f(100 * err if err is not None else None, '+.1f')}% | "
                         f"{_f(r.get('rss_peak_mb'))} | {_f(r.get('process_peak_mb'))} | {process_error(r)} | "
                         f"{_f(rss_over_allocator(r), '.2f')} |")
    if data.get("advice"):
        lines += ["", f"## Advice that is checked (budget = {UNDER:.0%} of the predicted peak)", "",
                  "| config | budget MiB | measured before MiB | planner's first suggestion | predicted after MiB | "
                  "measured after MiB | under budget |", "|---|---|---|---|---|---|---|"]
        for r in data["advice"]:
            b, a = r["before"], r.get("after", {})
            over = " ".join(f"`{k}={v}`" for k, v in r.get("overrides", {}).items())
            lines.append(f"| {r['config']} | {_f(r['budget_mb'])} | {_f(b.get('measured_mb'))} | "
                         f"{r.get('suggestion', 'none')} ({over}) | {_f(r.get('predicted_after_mb'))} | "
                         f"{_f(a.get('measured_mb'))} | {'yes' if r.get('under_budget') else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="outside,advice", help="comma-separated: outside, advice")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    slug, machine, _ = device_info("cpu")
    date = dt.date.today().isoformat()
    data: dict = {"device": slug, "machine": machine, "date": date,
                  "command": "python bench/plan_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    t = time.time()
    if "outside" in parts:
        print("outside the grid:", flush=True)
        data["outside"] = part_outside(args.timeout)
    if "advice" in parts:
        print("advice:", flush=True)
        data["advice"] = part_advice(args.timeout)
    stem = Path(args.out) / f"plan-check-{slug}-{date}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(data))
    print(f"wrote {stem}.md and .json in {(time.time() - t) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
