"""Where the memory goes: full fine-tuning vs LoRA vs 8-bit vs 4-bit, measured with minitune itself.

    python bench/memory_grid.py                   # the CPU grid (~12 min on 2 cores), or: make bench-memory
    python bench/memory_grid.py --grid gpu        # the full grid on a CUDA GPU (untested: no GPU here)
    python bench/memory_grid.py --models opt-125m --methods full,lora --parts grid   # a slice

Each cell (model x method x batch size x sequence length) runs in its own subprocess
(`bench/cell.py`): built from minitune's pieces (`load_model` from a preset with random init,
`prepare_model`, `build_optimizer`, `Accelerator`, `minitune.loop.fit` with `minitune.losses.default_loss` and the
`MemoryProfiler`), random token batches, `--warmup` steps then `--steps` timed ones. Recorded: the
training peak and its breakdown (`tensor_breakdown`), the prediction (`minitune.planner.simulate`) and the
measured/predicted ratio, step time, tokens/s, trainable parameters. Out of memory is recorded as
OOM, a process that dies or runs past `--timeout` as such, and the grid goes on.

Besides the grid (`--parts`, all by default):
    knobs     the cost of one knob at a time on one model: gradient checkpointing, fp32 norm casting
              on a bf16 model (none / norms / all), optimizer (AdamW 32-bit / 8-bit / paged 8-bit)
    overhead  step time with the memory profiler on vs off, alternating runs of the same cell
    rank      LoRA trainable parameters at r = 4, 8, 16, 32 on flan-t5-small q,v (meta device)
    alpha     gradient norms over a short real training (minitune.train, flan-t5-small, r=8) for
              alpha = 4, 8, 16, 32, with `logging.module_grad_norms=true`

CPU memory is the process RSS above its baseline (the RSS once Python and every library are
imported, before the model loads). Each cell fixes glibc's mmap threshold as every minitune run
does (`minitune.process_memory.tune_malloc`): without it glibc raises its mmap threshold after the
first large frees and keeps later freed tensors in its heap, so RSS drifts upwards step after step
by whatever the allocator keeps, not what training holds. Each cell starts as train.py restarts
itself (`process_memory.malloc_env`: glibc's thread cache off, the 2 MiB threshold); `--malloc lean`
gives the 128 KiB threshold instead, `--malloc default` glibc's own settings, to see the growth.
The column "RSS vs process" is the cell's whole-run peak RSS against
`minitune.process_memory.process_peak` (the RSS before loading + the higher of the predicted
training tensors with the allocator's overhead and glibc's heap, and loading's predicted peak,
`planner.load_peak`):
(predicted - measured) / measured.

Writes bench/results/<device>-<date>.{md,csv,json} and -peak.png, -steps.png, -alpha.png.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from minitune.config import LoraArgs, ModelArgs
from minitune.model import build_from_config
from minitune.prepare import apply_lora, trainable_parameters
from minitune.presets import PRESETS
from minitune.process_memory import malloc_env

REPO = Path(__file__).resolve().parents[1]
CELL = REPO / "bench" / "cell.py"
RESULTS = REPO / "bench" / "results"
T5_TOK = str(REPO / "tests/fixtures/tokenizers/t5_test_sentencepiece")
QUOTES = str(REPO / "data/english_quotes.jsonl")

# method -> (label, cell settings on top of bench/cell.py's DEFAULTS: fp32 weights, LoRA r=8
# alpha=16 on minitune's default targets, torch AdamW, fp32 norms, no checkpointing)
METHODS: dict[str, tuple[str, dict]] = {
    "full": ("full fine-tuning", {"lora": False}),
    "lora": ("LoRA", {}),
    "lora-gc": ("LoRA + grad checkpointing", {"gradient_checkpointing": True}),
    "lora-adam8": ("LoRA + AdamW 8-bit", {"optimizer": "adamw8bit"}),
    "int8-lora": ("8-bit base + LoRA", {"quant": "8bit"}),
    "qlora": ("4-bit nf4 base + LoRA (QLoRA)", {"quant": "4bit"}),
}

GRIDS: dict[str, dict] = {
    # 2 CPU cores: small shapes, a few steps; the models that fit in time
    "cpu": {"device": "cpu", "models": ["flan-t5-small", "opt-125m", "bloom-560m"], "batch_sizes": [2],
            "seq_lens": [64], "warmup": 1, "steps": 3, "timeout": 300, "mixed_precision": "no",
            "compute_dtype": "float32", "knob_model": "opt-125m", "overhead_repeats": 4, "overhead_steps": 8,
            "alpha_steps": 30,
            "skipped": {
                "gpt-neo-1.3b": "not run on CPU: full fine-tuning in fp32 with AdamW needs ~21 GB for weights, "
                                "gradients and optimizer state alone (this machine: 23 GB), and a step of the "
                                "1.3B model takes tens of seconds on 2 cores; run it with --grid gpu or "
                                "--models gpt-neo-1.3b",
                "t0-3b": "GPU only (2.85B parameters)",
            }},
    # a CUDA GPU: every model, two batch sizes and two lengths, bf16 autocast, bf16 4-bit compute
    "gpu": {"device": "cuda", "models": ["flan-t5-small", "opt-125m", "bloom-560m", "gpt-neo-1.3b", "t0-3b"],
            "batch_sizes": [4, 16], "seq_lens": [256, 512], "warmup": 2, "steps": 5, "timeout": 600,
            "mixed_precision": "bf16", "compute_dtype": "bfloat16", "knob_model": "gpt-neo-1.3b",
            "overhead_repeats": 4, "overhead_steps": 20, "alpha_steps": 60, "skipped": {}},
    # seconds: for tests of this script
    "smoke": {"device": "cpu", "models": ["tiny-llama"], "batch_sizes": [2], "seq_lens": [16], "warmup": 1,
              "steps": 1, "timeout": 120, "mixed_precision": "no", "compute_dtype": "float32",
              "knob_model": "tiny-llama", "overhead_repeats": 1, "overhead_steps": 2, "alpha_steps": 3,
              "skipped": {}},
}
PARTS = ("grid", "knobs", "overhead", "rank", "alpha")
MB = 2**20


# ------------------------------------------------------------------------------------------------
# running cells


def cell_env(malloc: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    if malloc in ("lean", "default"):
        env["MINITUNE_MALLOC"] = malloc  # lean: the 128 KiB threshold; default: tune_malloc leaves glibc as it is
    return malloc_env(env)  # minitune's own: started as train.py restarts itself (thread cache off)


def run_cell(spec: dict, *, timeout: float, env: dict | None = None, train: bool = False) -> dict:
    """Run one cell (or, with `train`, one minitune.train config) in a subprocess; never raises.

    Returns the cell's result dict; a process that dies or runs past `timeout` seconds gives
    {'status': 'died (...)'} or {'status': 'timeout (> N s)'} with the tail of its stderr.
    """
    with tempfile.TemporaryDirectory(prefix="minitune-cell-") as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, str(CELL), *(["--train"] if train else []), json.dumps(spec), str(out)]
        t0 = time.perf_counter()
        with open(err, "w") as ferr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=ferr, env=env or cell_env("fixed"),
                                    cwd=REPO, start_new_session=True)  # own group: a timeout kills its children too
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        wall = time.perf_counter() - t0
        tail = err.read_text(errors="replace").strip().splitlines()[-3:]
        if rc is None:
            result = {"status": f"timeout (> {timeout:.0f} s)"}
        elif out.exists():
            result = json.loads(out.read_text())
        elif rc < 0:
            name = signal.Signals(-rc).name
            why = ", likely out of memory (the kernel's OOM killer)" if name == "SIGKILL" else ""
            result = {"status": f"died ({name}{why})"}
        else:
            result = {"status": f"died (exit code {rc})"}
        if result["status"] != "ok" and tail:
            result.setdefault("stderr_tail", tail)
        result["wall_s"] = wall
        return result


def cell_spec(grid: dict, model: str, overrides: dict, batch_size: int, seq_len: int, loss: str) -> dict:
    """A cell of `grid` (`GRIDS`): its model, shape and the grid's precision, with `overrides` (a method's)."""
    return {"model": model, "batch_size": batch_size, "seq_len": seq_len, "warmup": grid["warmup"],
            "steps": grid["steps"], "device": grid["device"], "mixed_precision": grid["mixed_precision"],
            "compute_dtype": grid["compute_dtype"], "loss": loss, **overrides}


class Runner:
    """Runs cells once each (identical specs are shared between the grid and the knobs)."""

    def __init__(self, grid: dict, args: argparse.Namespace):
        self.grid, self.args = grid, args
        self.env = cell_env(args.malloc)
        self.cache: dict[str, dict] = {}

    def spec(self, model: str, overrides: dict, batch_size: int, seq_len: int) -> dict:
        return cell_spec(self.grid, model, overrides, batch_size, seq_len, self.args.loss)

    def run(self, spec: dict, label: str) -> dict:
        key = json.dumps(spec, sort_keys=True)
        if key not in self.cache:
            res = run_cell(spec, timeout=self.grid["timeout"], env=self.env)
            res.setdefault("spec", spec)
            res["label"] = label
            self.cache[key] = res
            peak = f"{res['peak_train_mb']:8.1f} MiB" if "peak_train_mb" in res else " " * 12
            step = f"{res['step_s']:7.3f} s/step" if "step_s" in res else ""
            print(f"  {spec['model']:14s} {label:34s} b{spec['batch_size']} s{spec['seq_len']}  "
                  f"{res['status'][:40]:8s} {peak} {step}  ({res['wall_s']:.0f} s)", flush=True)
        return self.cache[key]


def summarize(res: dict, group: str, method: str, label: str) -> dict:
    """One flat row (CSV / markdown) of a cell result."""
    s = res.get("spec", {})
    row = {"group": group, "model": s.get("model"), "method": label, "method_key": method,
           "batch_size": s.get("batch_size"), "seq_len": s.get("seq_len"), "status": res["status"]}
    if "trainable_params" in res:
        row["trainable_params"] = res["trainable_params"]
        row["total_params"] = res["total_params"]
        row["trainable_pct"] = 100 * res["trainable_params"] / max(1, res["total_params"])
    b = res.get("breakdown_mb")
    if b:
        row["weights_mb"] = sum(v for k, v in b.items() if k.startswith("frozen_weights/"))
        row["trainable_grads_mb"] = b["trainable_weights"] + b["gradients"]
        row["optimizer_mb"] = b["optimizer_state"]
        row["activations_mb"] = b["activations_and_temporaries"]
    for key in ("peak_train_mb", "peak_all_mb", "ratio", "step_s", "tokens_per_s", "load_s", "fp32_cast_mb",
                "optimizer_used", "wall_s", "rss_peak_mb",
                "process_peak_mb", "baseline_mb", "peak_load_mb", "predicted_loading_mb"):
        if key in res:
            row[key] = res[key]
    if "optimizer" in s:
        row["optimizer_requested"] = s["optimizer"]
    elif s:
        row["optimizer_requested"] = "adamw"
    if res.get("predicted"):
        row["predicted_mb"] = res["predicted"]["total"] / MB
    if "error" in res or "stderr_tail" in res:
        row["note"] = res.get("error") or " | ".join(res.get("stderr_tail", []))[-300:]
    return row


# ------------------------------------------------------------------------------------------------
# the parts


def part_grid(runner: Runner, models: list[str], methods: list[str]) -> tuple[list[dict], list[dict]]:
    g = runner.grid
    rows, cells = [], []
    for model in models:
        for b in runner.args.batch_sizes or g["batch_sizes"]:
            for s in runner.args.seq_lens or g["seq_lens"]:
                for m in methods:
                    label, overrides = METHODS[m]
                    res = runner.run(runner.spec(model, overrides, b, s), label)
                    rows.append(summarize(res, "grid", m, label))
                    cells.append(res)
    return rows, cells


def knob_specs(model: str) -> list[tuple[str, str, dict]]:
    """(knob, setting, cell overrides): one knob changed at a time from a baseline."""
    bf16 = {"dtype": "bfloat16"}
    return [
        ("gradient checkpointing", "LoRA, off", {}),
        ("gradient checkpointing", "LoRA, on", {"gradient_checkpointing": True}),
        ("gradient checkpointing", "full FT, off", {"lora": False}),
        ("gradient checkpointing", "full FT, on", {"lora": False, "gradient_checkpointing": True}),
        ("fp32 norm casting (bf16 model, LoRA)", "none", {**bf16, "fp32_norms": "none"}),
        ("fp32 norm casting (bf16 model, LoRA)", "norms", {**bf16, "fp32_norms": "norms"}),
        ("fp32 norm casting (bf16 model, LoRA)", "all", {**bf16, "fp32_norms": "all"}),
        ("optimizer (full FT)", "adamw (32-bit)", {"lora": False}),
        ("optimizer (full FT)", "adamw8bit", {"lora": False, "optimizer": "adamw8bit"}),
        ("optimizer (full FT)", "paged_adamw8bit", {"lora": False, "optimizer": "paged_adamw8bit"}),
        ("loss (LoRA)", "chunked (auto, the default)", {"loss": "auto"}),
        ("loss (LoRA)", "full logits", {"loss": "full"}),
    ]


def part_knobs(runner: Runner) -> list[dict]:
    g = runner.grid
    model = runner.args.knob_model or g["knob_model"]
    b, s = (runner.args.batch_sizes or g["batch_sizes"])[0], (runner.args.seq_lens or g["seq_lens"])[0]
    rows = []
    for knob, setting, overrides in knob_specs(model):
        res = runner.run(runner.spec(model, overrides, b, s), f"{knob}: {setting}")
        row = summarize(res, "knob", knob, setting)
        row["knob"] = knob
        rows.append(row)
    return rows


def part_overhead(runner: Runner) -> dict:
    """Alternating runs (on, off, off, on, ...) of one LoRA cell with the profiler on and off."""
    g = runner.grid
    model = runner.args.knob_model or g["knob_model"]
    b, s = (runner.args.batch_sizes or g["batch_sizes"])[0], (runner.args.seq_lens or g["seq_lens"])[0]
    runs: dict[str, list[float]] = {"on": [], "off": []}  # median step time of each run
    direct: list[dict] = []
    order = []
    for i in range(g["overhead_repeats"]):
        order += ["on", "off"] if i % 2 == 0 else ["off", "on"]
    for i, mode in enumerate(order):
        spec = runner.spec(model, {"profile": mode == "on", "steps": g["overhead_steps"], "warmup": 2}, b, s)
        spec["run"] = i  # distinct specs: never served from the cache
        res = runner.run(spec, f"overhead: profiler {mode} (run {i + 1})")
        if res["status"] == "ok":
            runs[mode].append(res["step_s_median"])
            if mode == "on":
                direct.append({"calls_pct": 100 * res["profiler_calls_s_per_step"] / res["step_s_median"],
                               "calls_ms": 1000 * res["profiler_calls_s_per_step"],
                               "sampler_pct": res.get("sampler_cost_pct", 0.0)})
    out: dict = {"model": model, "batch_size": b, "seq_len": s, "steps": g["overhead_steps"], "order": order,
                 "runs": runs}
    if runs["on"] and runs["off"]:
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        out.update(on_s=on, off_s=off, overhead_pct=100 * (on - off) / off,
                   spread_pct=100 * (max(runs["off"]) - min(runs["off"])) / off)
    if direct:
        out["calls_ms"] = statistics.mean(d["calls_ms"] for d in direct)
        out["calls_pct"] = statistics.mean(d["calls_pct"] for d in direct)
        out["sampler_pct"] = statistics.mean(d["sampler_pct"] for d in direct)
    return out


def part_rank(ranks=(4, 8, 16, 32), model: str = "flan-t5-small", targets=("q", "v")) -> list[dict]:
    """Trainable parameters of LoRA at each rank, on the meta device (no memory, no time)."""
    rows = []
    for r in ranks:
        with torch.device("meta"):
            net = build_from_config(ModelArgs(preset=model))
            net = apply_lora(net, LoraArgs(r=r, alpha=2 * r, target_modules=list(targets)))
        trainable, total = trainable_parameters(net)
        rows.append({"model": model, "targets": ",".join(targets), "r": r, "trainable_params": trainable,
                     "total_params": total, "trainable_pct": 100 * trainable / total,
                     "adapter_mb_fp32": trainable * 4 / MB})
    return rows


def compress_grad_norms(record: dict) -> dict:
    """A training-log record with its per-module LoRA grad norms reduced to their means over modules
    ('grad_norm/mean.lora_A', 'grad_norm/mean.lora_B'), to keep the saved JSON small."""
    out = {k: v for k, v in record.items() if not k.startswith("grad_norm/")}
    for part in ("lora_A", "lora_B"):
        vals = [v for k, v in record.items() if k.startswith("grad_norm/") and k.endswith(part)]
        if vals:
            out[f"grad_norm/mean.{part}"] = sum(vals) / len(vals)
            out["modules"] = len(vals)
    return out


def part_alpha(runner: Runner, alphas=(4, 8, 16, 32)) -> dict:
    """A short real training per alpha (minitune.train, r=8), logging per-module LoRA grad norms."""
    g = runner.grid
    steps = g["alpha_steps"]
    model = "tiny-t5" if runner.args.grid == "smoke" else "flan-t5-small"
    runs = {}
    with tempfile.TemporaryDirectory(prefix="minitune-alpha-") as tmp:
        for alpha in alphas:
            config = {
                "model": {"preset": model, "tokenizer": T5_TOK},
                "data": {"path": QUOTES, "prompt": "Tag this quote: {quote}", "response": "{tags}",
                         "max_length": 64, "max_target_length": 32, "validation_fraction": 0.0},
                "lora": {"r": 8, "alpha": alpha, "dropout": 0.0, "target_modules": ["q", "v"]},
                "optimizer": {"name": "adamw", "lr": 1e-3, "scheduler": "constant"},
                # no clipping: the per-module norms are logged after clipping, which would hide alpha's effect
                "training": {"max_steps": steps, "batch_size": 4, "seed": 0, "device": g["device"], "max_grad_norm": 0.0,
                             "mixed_precision": g["mixed_precision"], "output_dir": f"{tmp}/alpha{alpha}",
                             "overwrite": True},
                "logging": {"progress": "none", "memory": False, "module_grad_norms": True, "jsonl": True},
            }
            t0 = time.perf_counter()
            res = run_cell(config, timeout=g["timeout"] * 2, env=runner.env, train=True)
            print(f"  alpha sweep: alpha={alpha:<3} {res['status'][:60]} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            if res["status"] == "ok":
                runs[str(alpha)] = [compress_grad_norms(r) for r in res["records"]]
    return {"model": model, "steps": steps, "runs": runs, "lr": 1e-3,
            "title": f"LoRA alpha sweep: {model} (random init), r=8 on q,v, AdamW lr 1e-3 constant, no clipping, "
                     f"batch 4, english quotes; {steps} steps"}


# ------------------------------------------------------------------------------------------------
# reports


def _f(v, fmt: str = ".1f") -> str:
    return "" if v is None or v == "" else format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _error(r: dict) -> str:
    if not r.get("predicted_mb") or not r.get("peak_train_mb"):
        return ""
    return f"{100 * (r['predicted_mb'] - r['peak_train_mb']) / r['peak_train_mb']:+.1f}%"


def process_error(r: dict) -> str:
    """(process_peak - peak RSS) / peak RSS of a cell, or '-'."""
    if not r.get("rss_peak_mb") or not r.get("process_peak_mb"):
        return "-"
    return f"{(r['process_peak_mb'] - r['rss_peak_mb']) / r['rss_peak_mb']:+.1%}"


def rss_over_allocator(r: dict) -> float | None:
    """The whole run's peak RSS above the pre-load baseline / the allocator's peak (how much more the
    process held than its tensors), or None."""
    if not r.get("rss_peak_mb") or not r.get("peak_train_mb") or r.get("baseline_mb") is None:
        return None
    return (r["rss_peak_mb"] - r["baseline_mb"]) / r["peak_train_mb"]


def process_summary(data: dict) -> str:
    """One line: over the grid's measured cells, the worst RSS-over-allocator ratio and the worst
    error of process_peak against the peak RSS."""
    rows = [r for r in data["rows"] if r["group"] == "grid" and rss_over_allocator(r) is not None]
    if not rows:
        return ""
    waste = max(rows, key=rss_over_allocator)
    off = max(rows, key=lambda r: abs(r["process_peak_mb"] - r["rss_peak_mb"]) / r["rss_peak_mb"])
    return (f"**The whole process over {len(rows)} grid cells: peak RSS above the baseline is at most "
            f"{rss_over_allocator(waste):.2f}x the allocator's peak ({waste['model']} / {waste['method']}); "
            f"process_peak against the peak RSS: worst {process_error(off)} ({off['model']} / {off['method']}).**")


def worst_case(data: dict) -> str:
    """One line: the prediction's largest error over every measured cell (grid and knob rows)."""
    rows = [r for r in data["rows"] if r.get("predicted_mb") and r.get("peak_train_mb")]  # grid and knob rows
    if not rows:
        return "Prediction error: no measured cell."
    worst = max(rows, key=lambda r: abs(r["predicted_mb"] - r["peak_train_mb"]) / r["peak_train_mb"])
    ratios = [r["peak_train_mb"] / r["predicted_mb"] for r in rows]
    return (f"**Prediction error over {len(rows)} measured cells (grid and knobs): measured/predicted "
            f"{min(ratios):.3f} to {max(ratios):.3f}; worst {_error(worst)} "
            f"({worst['model']} / {worst.get('knob', '') + ' ' if worst.get('knob') else ''}{worst['method']}).**")


def markdown(data: dict) -> str:
    lab = data["peak_label"]
    lines = [f"# Memory benchmark: {data['device']}, {data['date']}", "",
             f"Command: `{data['command']}`  ", f"Machine: {data['machine']}  ",
             *([f"Note: {data['note']}  "] if data.get("note") else []),
             f"Peak = **{lab}**, over the training steps (warm-up included; loading is recorded apart, "
             "`peak_all_mb` in the CSV, loading's own `peak_load_mb` beside the planner's `predicted_loading_mb`). "
             + ("On CPU: the bytes PyTorch's CPU allocator holds, from the torch profiler's allocation and release "
                "events (`minitune.cpu_allocator.AllocatorTrace`), counted from before the model loads; RSS is in the CSV "
                "(`rss_peak_train_mb`)." if data["kind"] == "cpu" else ""),
             f"Each cell: its own process, random token batches, {data['warmup']} warm-up step(s) then "
             f"{data['steps']} timed; step time and tokens/s are means over the timed steps (tokens: inputs, "
             "plus targets for seq2seq); " + ("training.loss=auto, the default: the chunked cross-entropy for every "
             "model here" if data.get("loss", "full") == "auto" else f"training.loss={data.get('loss', 'full')}")
             + ". Predicted = `minitune.planner.simulate` (the same model, optimizer and loss on fake tensors); "
             "ratio = measured / predicted; error = (predicted - measured) / measured. "
             "Breakdown (`tensor_breakdown` at the peak): frozen weights | trainable weights + gradients | "
             "optimizer state | activations and temporaries (= peak minus the tensors)."
             + (" RSS = the cell's whole-run peak RSS (loading included; the kernel's own high-water mark on Linux, "
                "sampled every 10 ms elsewhere); process_peak = "
                "`minitune.process_memory.process_peak` (RSS before loading + the higher of the predicted training "
                "tensors with the allocator's overhead and glibc's heap, and loading's predicted peak); RSS above baseline / peak = (peak RSS - RSS before loading) / the allocator's peak, "
                "what the process held beyond its tensors (the cell's trace records every step, where a run's records "
                "two; the RSS is read before that trace is read back)."
                if data["kind"] == "cpu" else ""), ""]
    head = ("| model | method | batch x seq | status | trainable | trainable % | peak MiB | predicted MiB | ratio "
            "| error | RSS MiB | process_peak MiB | RSS vs process | RSS above baseline / peak | weights | train+grads "
            "| optim | activ. | s/step | tokens/s |")
    sep = "|" + "---|" * 20
    grid_rows = [r for r in data["rows"] if r["group"] == "grid"]
    lines += ["## Grid", "", head, sep] if grid_rows else []  # `--parts knobs` alone: no grid table
    for r in grid_rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['batch_size']}x{r['seq_len']} | {r['status']} | "
                     f"{_f(r.get('trainable_params'), ',d')} | {_f(r.get('trainable_pct'), '.2f')} | "
                     f"{_f(r.get('peak_train_mb'))} | {_f(r.get('predicted_mb'))} | {_f(r.get('ratio'), '.3f')} | "
                     f"{_error(r)} | {_f(r.get('rss_peak_mb'))} | {_f(r.get('process_peak_mb'))} | "
                     f"{process_error(r)} | {_f(rss_over_allocator(r), '.2f')} | {_f(r.get('weights_mb'))} | {_f(r.get('trainable_grads_mb'))} | {_f(r.get('optimizer_mb'))} | "
                     f"{_f(r.get('activations_mb'))} | {_f(r.get('step_s'), '.3f')} | {_f(r.get('tokens_per_s'), '.0f')} |")
    lines += ["", worst_case(data), "", process_summary(data)]
    notes = [r for r in data["rows"] if r.get("note")]
    for r in notes:
        lines.append(f"\n- {r['model']} / {r['method']}: {r['note']}")
    if data.get("skipped"):
        lines += ["", "Not run here:", ""]
        for model, why in data["skipped"].items():
            pred = data.get("skipped_predicted", {}).get(model)
            extra = ("; predicted peak (minitune.planner, meta device): " + ", ".join(
                f"{k} {v / 2**30:.1f} GiB" for k, v in pred.items())) if pred else ""
            lines.append(f"- {model}: {why}{extra}")
    if data.get("knobs"):
        lines += ["", f"## One knob at a time ({data['knobs'][0]['model']}, batch {data['knobs'][0]['batch_size']} x "
                  f"seq {data['knobs'][0]['seq_len']})", "",
                  "| knob | setting | status | peak MiB | predicted MiB | ratio | error | optim MiB | fp32 cast MiB | s/step | note |",
                  "|" + "---|" * 11]
        for r in data["knobs"]:
            note = ""
            if r.get("optimizer_used") and r["optimizer_used"] != r.get("optimizer_requested"):
                note = f"runs {r['optimizer_used']} (paging needs CUDA)"
            lines.append(f"| {r['knob']} | {r['method']} | {r['status']} | {_f(r.get('peak_train_mb'))} | "
                         f"{_f(r.get('predicted_mb'))} | {_f(r.get('ratio'), '.3f')} | {_error(r)} | {_f(r.get('optimizer_mb'))} | {_f(r.get('fp32_cast_mb'))} | {_f(r.get('step_s'), '.3f')} | "
                         f"{note} |")
    o = data.get("overhead")
    if o:
        lines += ["", f"## Profiler overhead ({o['model']}, LoRA, batch {o['batch_size']} x seq {o['seq_len']}, "
                  f"{o['steps']} timed steps per run)", "",
                  f"Alternating runs, order {', '.join(o['order'])}; 'on' = MemoryProfiler started (the kernel's "
                  "peak RSS read each step on Linux, a sampler thread elsewhere) with forward/backward/optimizer phases and a record every step, as `train()` does with "
                  "logging.memory=true; 'off' = no profiler at all.", "",
                  "| profiler | median s/step of each run (in run order) | median over runs |", "|---|---|---|"]
        for mode in ("on", "off"):
            vals = o["runs"][mode]
            med = statistics.median(vals) if vals else float("nan")
            lines.append(f"| {mode} | {', '.join(f'{v:.4f}' for v in vals)} | {med:.4f} |")
        if "overhead_pct" in o:
            lines += ["", f"Between runs: on vs off **{o['overhead_pct']:+.2f}%** of the step time; the spread "
                      f"between the 'off' runs alone is {o['spread_pct']:.1f}%"
                      + (", so this difference is within noise." if abs(o["overhead_pct"]) <= o["spread_pct"]
                         else ": the difference is larger than that noise.")]
        if "calls_pct" in o:
            lines += ["", f"Measured directly inside the 'on' runs: the profiler's calls (3 phase snapshots and one "
                      f"record per step) take {o['calls_ms']:.3f} ms per step = **{o['calls_pct']:.3f}%** of the "
                      + (f"step; the sampler thread (one /proc read every 10 ms) costs {o['sampler_pct']:.3f}% of a "
                         "core" if o["sampler_pct"] else "step; no sampler thread runs (the kernel keeps the peak)")
                      + f". Total **{o['calls_pct'] + o['sampler_pct']:.2f}%** (target < 2%)."]
    if data.get("rank"):
        r0 = data["rank"][0]
        lines += ["", f"## LoRA rank sweep ({r0['model']}, targets {r0['targets']}, meta device)", "",
                  "| r | trainable params | all params | trainable % | adapter MiB (fp32) |", "|---|---|---|---|---|"]
        for r in data["rank"]:
            lines.append(f"| {r['r']} | {r['trainable_params']:,d} | {r['total_params']:,d} | "
                         f"{r['trainable_pct']:.4f} | {r['adapter_mb_fp32']:.2f} |")
    a = data.get("alpha")
    if a and a["runs"]:
        lines += ["", f"## {a['title']}", "",
                  "Per-module norms are in the training log (`logging.module_grad_norms=true`); plot: -alpha.png.",
                  "",
                  "| alpha | scale alpha/r | grad norm step 1 | mean grad norm, last 5 steps | loss step 1 | "
                  "loss last step |", "|---|---|---|---|---|---|"]
        for alpha, recs in sorted(a["runs"].items(), key=lambda kv: float(kv[0])):
            tail = [r["grad_norm"] for r in recs[-5:]]
            lines.append(f"| {alpha} | {float(alpha) / 8:g} | {recs[0]['grad_norm']:.3g} | "
                         f"{sum(tail) / len(tail):.3g} | {recs[0]['loss']:.3f} | {recs[-1]['loss']:.3f} |")
    if data.get("pngs"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in data["pngs"]]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["group", "knob", "model", "method", "method_key", "batch_size", "seq_len", "status", "trainable_params",
              "total_params", "trainable_pct", "peak_train_mb", "peak_all_mb", "predicted_mb", "ratio", "weights_mb",
              "trainable_grads_mb", "optimizer_mb", "activations_mb", "fp32_cast_mb", "optimizer_used", "step_s",
              "tokens_per_s", "load_s", "wall_s", "peak_load_mb", "predicted_loading_mb", "note"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def device_info(device: str) -> tuple[str, str, str]:
    """(file-name slug, description, profiler kind) of the device the cells will use."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --grid gpu needs a CUDA GPU and none is visible; use --grid cpu")
        name = torch.cuda.get_device_name(0)
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        return slug, f"{name}, torch {torch.__version__}", "cuda"
    return "cpu", (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {version('torch')}, "
                   f"bitsandbytes {version('bitsandbytes')}"), "cpu"


def _predicted_unrun(model: str, b: int, s: int) -> dict:
    """Predicted peak (`minitune.planner.simulate`) of full fine-tuning and LoRA for a model that is not run."""
    sys.path.insert(0, str(CELL.parent))
    from cell import DEFAULTS, cell_config  # the cells' own settings

    from minitune.planner import predict

    out = {}
    for method, lora in (("full FT", False), ("LoRA", True)):
        cfg = cell_config({**DEFAULTS, "model": model, "lora": lora, "batch_size": b, "seq_len": s})
        out[method] = predict(cfg, "cpu", seq_len=s).total
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu", help="preset sizes and models (default cpu)")
    p.add_argument("--models", help="comma-separated presets (default: the grid's)")
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], help="e.g. 2,4")
    p.add_argument("--seq-lens", type=lambda v: [int(x) for x in v.split(",")], help="e.g. 64,128")
    p.add_argument("--steps", type=int, help="timed steps per cell")
    p.add_argument("--warmup", type=int, help="warm-up steps per cell")
    p.add_argument("--timeout", type=float, help="seconds per cell before it is killed and recorded")
    p.add_argument("--knob-model", help="the model of the knob and overhead parts")
    p.add_argument("--loss", choices=("auto", "full", "chunked"), default="auto",
                   help="training.loss of every cell (default auto, minitune's default)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--malloc", choices=("fixed", "lean", "default"), default="fixed",
                   help="fixed: minitune's malloc settings in each cell (as train.py starts); lean: MINITUNE_MALLOC=lean "
                        "(128 KiB threshold); default: glibc's own (CPU)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--name", help="file name stem (default <device>-<date>)")
    p.add_argument("--report", type=Path, metavar="JSON", help="only rewrite the .md, .csv and plots of a saved run")
    args = p.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        write_reports(data, args.report.with_suffix(""))
        return 0

    grid = dict(GRIDS[args.grid])
    for key in ("steps", "warmup", "timeout"):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    models = args.models.split(",") if args.models else grid["models"]
    methods = args.methods.split(",") if args.methods else list(METHODS)
    parts = args.parts.split(",")
    bad = ([f"unknown model preset '{m}' (known: {', '.join(PRESETS)})" for m in models if m not in PRESETS]
           + [f"unknown method '{m}' (known: {', '.join(METHODS)})" for m in methods if m not in METHODS]
           + [f"unknown part '{x}' (known: {', '.join(PARTS)})" for x in parts if x not in PARTS])
    if bad:
        p.error("; ".join(bad))
    slug, machine, kind = device_info(grid["device"])
    date = dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"{slug}-{date}")
    command = "python bench/memory_grid.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    runner = Runner(grid, args)
    peak_label = {"cpu": "peak held by the CPU allocator", "cuda": "peak allocated (max_memory_allocated)"}[kind]
    data: dict = {"device": slug, "machine": machine, "kind": kind, "date": date, "command": command.strip(),
                  "malloc": args.malloc, "loss": args.loss, "peak_label": peak_label, "warmup": grid["warmup"], "steps": grid["steps"],
                  "rows": [], "knobs": []}
    t0 = time.perf_counter()
    data["load_start"] = os.getloadavg()[0]
    if "grid" in parts:
        print(f"grid: {len(models)} models x {len(methods)} methods on {slug}", flush=True)
        rows, cells = part_grid(runner, models, methods)
        data["rows"] += rows
        skipped = {m: why for m, why in grid["skipped"].items() if m not in models}
        data["skipped"] = skipped
        b0, s0 = (args.batch_sizes or grid["batch_sizes"])[0], (args.seq_lens or grid["seq_lens"])[0]
        data["skipped_predicted"] = {m: _predicted_unrun(m, b0, s0) for m in skipped}
        steps_model = args.knob_model or grid["knob_model"]
        if steps_model not in models:
            steps_model = models[0]
        data["steps_model"] = steps_model
        data["steps_cells"] = [c for c in cells if c.get("spec", {}).get("model") == steps_model
                               and (c["spec"]["batch_size"], c["spec"]["seq_len"]) == (b0, s0)]
    if "knobs" in parts:
        print("knobs:", flush=True)
        data["knobs"] = part_knobs(runner)
        data["rows"] += data["knobs"]
    if "overhead" in parts:
        print("profiler overhead:", flush=True)
        data["overhead"] = part_overhead(runner)
    if "rank" in parts:
        data["rank"] = part_rank()
    if "alpha" in parts:
        print("alpha sweep:", flush=True)
        data["alpha"] = part_alpha(runner)
    data["elapsed_s"] = time.perf_counter() - t0
    data["load_end"] = os.getloadavg()[0]
    data["cells"] = list(runner.cache.values())
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    write_reports(data, stem)
    print(f"wrote {stem}.md, .csv, .json and {len(data['pngs'])} plots in {data['elapsed_s'] / 60:.1f} min")
    return 0


def write_reports(data: dict, stem: Path) -> None:
    """The plots, the CSV and the markdown of a run (`data` as saved in <stem>.json)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plots import plot_all  # bench/plots.py: importable once its folder is on the path (the line above)

    data["pngs"] = [Path(x).name for x in plot_all(data, stem)]
    write_csv(data["rows"], stem.with_suffix(".csv"))
    footer = f"\nTotal time: {data['elapsed_s'] / 60:.1f} min"
    if "load_start" in data:
        footer += f"; load average {data['load_start']:.1f} at the start, {data['load_end']:.1f} at the end"
    stem.with_suffix(".md").write_text(markdown(data) + footer + ".\n")


if __name__ == "__main__":
    sys.exit(main())
