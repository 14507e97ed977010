"""The same fine-tuning job through minitune's loop and through transformers.Trainer + peft.

    python bench/compare_trainer.py                        # the three rows, alternating runs (~10 min on 2 CPU cores)
    python bench/compare_trainer.py --levers               # one row per optimization, and gradient checkpointing's cost
    python bench/compare_trainer.py --rows opt-125m --variants trainer,minitune --repeats 3 --steps 6

Every run is its own subprocess (a clean allocator and RSS), and the runs of a row alternate
between the sides (trainer, minitune, ... then the reverse order), so that a slow phase of a busy
machine hits both. Both sides get the very same pieces, built by minitune from one config: the
model (a preset, random init, seed 0), `prepare_model` + LoRA, the tokenized data and the
DataLoader (same seeded order: the Trainer subclass below returns it from `get_train_dataloader`),
the optimizer settings (torch AdamW, same decay groups, `optim="adamw_torch"` for the Trainer,
whose default on torch >= 2.8 is the fused kernel), schedule and clipping. Precision: by default
each side's own (`--precision defaults`: minitune's `auto`, which is bf16 weights on a CPU with
AVX512-BF16 and bf16 on an Ampere+ GPU, against Trainer's fp32 without bf16/fp16 flags);
`--precision no|bf16|fp16` gives both sides fp32 weights with that autocast, and `--precision
bf16-weights` both sides bf16 weights without autocast (what `auto` picks on this CPU): the
like-for-like loop races.

Measured per run, over the steps after `--warmup`: tokens/s (real tokens: attention-mask ones,
plus target tokens for seq2seq; the same batches on both sides, so the ratio is a time ratio),
peak memory (CPU: peak RSS of the process, and the peak RSS during training minus the RSS before it,
both from the kernel's high-water mark on Linux (`minitune.rss.PeakWatcher`; elsewhere
ru_maxrss and RSS sampled every 2 ms); CUDA: max_memory_allocated) and the loss of
every step (the Trainer's and minitune's full-loss losses agree: a check that both did the same work).

Results go to `bench/results/compare_trainer[_levers].{md,csv}` with the command that made them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import Trainer, TrainerCallback, TrainingArguments

from minitune.build import loop_args, setup_accelerator, setup_data, setup_model, train_loader
from minitune.config import load_config, merge_sections
from minitune.device import setup_device
from minitune.loop import fit
from minitune.losses import loss_fn_for
from minitune.model import load_model, load_tokenizer, resolve_kind
from minitune.optim import build_optimizer, build_scheduler
from minitune.rss import PeakWatcher, max_rss_bytes, rss_bytes

REPO = Path(__file__).resolve().parents[1]
GPT2 = str(REPO / "tests/fixtures/tokenizers/gpt2")
T5_TOK = str(REPO / "tests/fixtures/tokenizers/t5_test_sentencepiece")
QUOTES = str(REPO / "data/english_quotes.jsonl")

# One row = one job. Sizes keep the whole CPU run near 10 minutes on 2 cores; pass --batch-size /
# --max-length to scale them (e.g. on a GPU).
ROWS: dict[str, dict] = {
    "opt-125m": {"model": {"preset": "opt-125m", "tokenizer": GPT2},
                 "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                 "data": {"max_length": 64}, "training": {"batch_size": 8}},
    "bloom-560m": {"model": {"preset": "bloom-560m", "tokenizer": GPT2},
                   "lora": {"r": 8, "alpha": 16, "target_modules": ["query_key_value"]},
                   "data": {"max_length": 64}, "training": {"batch_size": 4}},
    "flan-t5-small": {"model": {"preset": "flan-t5-small", "tokenizer": T5_TOK},
                      "lora": {"r": 8, "alpha": 16, "target_modules": ["q", "v"]},
                      "data": {"max_length": 64, "max_target_length": 32,
                               "prompt": "Tag this quote: {quote}", "response": "{tags}"},
                      "training": {"batch_size": 8}},
    # for smoke tests of this script
    "tiny-llama": {"model": {"preset": "tiny-llama", "tokenizer": GPT2}, "lora": {"r": 4, "alpha": 8},
                   "data": {"max_length": 32}, "training": {"batch_size": 4}},
}

# variant -> (side, config overrides). "minitune" is the loop as configured by default (training.loss=auto:
# the chunked loss for these architectures); "minitune+full-loss" is the loop with the model's whole logits.
VARIANTS: dict[str, tuple[str, dict]] = {
    "trainer": ("trainer", {}),
    "minitune": ("minitune", {}),
    "minitune+full-loss": ("minitune", {"training": {"loss": "full"}}),
    # levers (--levers): each next to the run it changes
    "trainer+gc": ("trainer", {"training": {"gradient_checkpointing": True}}),
    "minitune+gc": ("minitune", {"training": {"gradient_checkpointing": True}}),
    "trainer+group_by_length": ("trainer", {"data": {"group_by_length": True}}),
    "minitune+group_by_length": ("minitune", {"data": {"group_by_length": True}}),
    "trainer+packing": ("trainer", {"data": {"packing": True}}),
    "minitune+packing": ("minitune", {"data": {"packing": True}}),
    "trainer+compile": ("trainer", {"training": {"compile": True}}),
    "minitune+compile": ("minitune", {"training": {"compile": True}}),
}
DEFAULT_VARIANTS = ["trainer", "minitune", "minitune+full-loss"]
LEVER_VARIANTS = {
    "opt-125m": ["trainer", "minitune", "trainer+gc", "minitune+gc", "trainer+group_by_length",
                 "minitune+group_by_length", "trainer+packing", "minitune+packing"],
    "bloom-560m": ["trainer", "minitune", "trainer+gc", "minitune+gc"],
    "flan-t5-small": ["trainer", "minitune", "trainer+gc", "minitune+gc"],
}


def _merge(*dicts: dict) -> dict:
    """Config dicts merged section by section, later ones winning (as `load_config` merges overrides)."""
    return functools.reduce(merge_sections, dicts, {})


def job_config(row: str, variant: str, args: argparse.Namespace) -> dict:
    """The minitune config dict of one run."""
    base = {
        "data": {"path": QUOTES, "prompt": "{quote} ->: ", "response": "{tags}", "max_samples": args.samples,
                 "validation_fraction": 0.0},
        "lora": {"dropout": 0.0},
        "optimizer": {"name": "adamw", "lr": 2e-4, "scheduler": "linear", "weight_decay": 0.0},
        "training": {"max_steps": args.steps, "seed": 0,
                     "device": args.device, "loss_chunk_size": args.chunk_size, "output_dir": "runs/bench"},
        "logging": {"progress": "none", "memory": False},
    }
    scale: dict = {"training": {}, "data": {}}
    if args.batch_size:
        scale["training"]["batch_size"] = args.batch_size
    if args.max_length:
        scale["data"]["max_length"] = args.max_length
    return _merge(base, ROWS[row], VARIANTS[variant][1], scale, precision_settings(VARIANTS[variant][0], args.precision))


def precision_settings(side: str, precision: str) -> dict:
    """'defaults': each side as a new user gets it: minitune's `auto` (bf16 weights on a CPU with
    AVX512-BF16, bf16 on an Ampere+ GPU, ...) against Trainer's fp32 weights without bf16/fp16 flags.
    'no' / 'bf16' / 'fp16': both sides fp32 weights with that autocast; 'bf16-weights': both sides bf16
    weights (LoRA adapters fp32, as `prepare_model` keeps them) without autocast (the like-for-like
    loop races)."""
    if precision == "bf16-weights":
        return {"model": {"dtype": "bfloat16"}, "training": {"mixed_precision": "no"}}
    if precision == "defaults":
        if side == "minitune":
            return {"model": {"dtype": "auto"}, "training": {"mixed_precision": "auto"}}
        return {"model": {"dtype": "float32"}, "training": {"mixed_precision": "no"}}
    return {"model": {"dtype": "float32"}, "training": {"mixed_precision": precision}}


# ------------------------------------------------------------------------------------------------
# one run (in its own process)


class _TrainingRss:
    """Peak RSS during training and of the whole process (`PeakWatcher`: the kernel's high-water
    mark, reset when training starts, so no thread runs beside the steps being timed; where it
    cannot be reset, RSS sampled every 2 ms and ru_maxrss)."""

    def __init__(self):
        self.before = rss_bytes()
        self._watch = PeakWatcher(interval_s=0.002)

    def stop(self) -> tuple[int, int]:
        """(peak during training, peak of the process from its start), bytes."""
        during = self._watch.stop()
        since_reset = max_rss_bytes(resource.getrusage(resource.RUSAGE_SELF))  # the kernel's mark, or from the start
        if self._watch.peak_before is None:  # sampled from the start: ru_maxrss is the process's peak
            return during, max(during, since_reset)
        if self._watch.source == "sampled":  # the kernel's mark failed mid-run: its last value is in ru_maxrss
            during = max(during, since_reset)
        return during, max(during, self._watch.peak_before)


def _no_dropout(model) -> None:
    """Dropout off (the rows' LoRA dropout is 0 too): the two sides start their DataLoaders at
    different points of the global RNG, so their dropout masks would differ, and their losses
    could not be compared step by step. Dropout costs the same on both sides."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "dropout_rate"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


def _batch_tokens(batch: dict, seq2seq: bool) -> int:
    n = int(batch["attention_mask"].sum())
    if seq2seq:
        n += int((batch["labels"] != -100).sum())
    return n


def run_one(spec: dict) -> dict:
    """Build the job from `spec['config']` (minitune's builders), train on `spec['side']`, return
    measurements. Every library either side uses is imported at the top of this file, before the
    RSS baseline: the deltas hold training only."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg, _ = setup_device(load_config(spec["config"]))  # minitune's 'auto' resolved as train() resolves it
    t, side, warmup = cfg.training, spec["side"], spec["warmup"]
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    seq2seq = resolve_kind(cfg.model) == "seq2seq"
    data = setup_data(cfg, load_tokenizer(cfg.model))
    base = load_model(cfg.model, cfg.quantization, seed=t.seed)
    _no_dropout(base)
    model, _ = setup_model(cfg, None, base=base)

    def loader():
        return train_loader(cfg, data)

    n_batches = t.max_steps * t.grad_accum
    step_tokens = []
    for i, b in enumerate(loader()):  # the same seeded order both sides will see
        if i >= n_batches:
            break
        step_tokens.append(_batch_tokens(b, seq2seq))
    if len(step_tokens) < n_batches:
        raise SystemExit(f"only {len(step_tokens)} batches for {n_batches}: raise --samples")

    if cuda:
        model.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = _TrainingRss()
    stamps: list[tuple[float, float]] = []  # (wall, process CPU) time at the end of each step
    losses: list[float] = []
    set_seed(t.seed)
    t_start, c_start = time.perf_counter(), time.process_time()
    if side == "minitune":
        _train_minitune(cfg, model, loader(), stamps, losses, cuda)
    else:
        _train_trainer(cfg, model, loader(), data, stamps, losses, cuda)
    if cuda:
        torch.cuda.synchronize()
    peak_training, peak_process = rss.stop()
    total_s = time.perf_counter() - t_start
    begin = stamps[warmup - 1] if warmup else (t_start, c_start)
    measured, cpu = stamps[-1][0] - begin[0], stamps[-1][1] - begin[1]
    tokens = sum(step_tokens[warmup * t.grad_accum:])
    return {
        "side": side,
        "steps": len(stamps),
        "tokens": tokens,
        "seconds": measured,
        "tokens_per_s": tokens / measured,
        "cpu_seconds": cpu,
        "tokens_per_cpu_s": tokens / cpu,
        "first_steps_s": (begin[0] - t_start),
        "total_s": total_s,
        "peak_rss_mb": peak_process / 2**20,
        "train_rss_delta_mb": (peak_training - rss.before) / 2**20,
        "rss_before_mb": rss.before / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "losses": losses,
    }


def _train_minitune(cfg, model, loader, stamps, losses, cuda) -> None:
    t = cfg.training
    accelerator = setup_accelerator(cfg, torch.device("cuda" if cuda else "cpu"))
    if t.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.optimizer, accelerator.device)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(optimizer, cfg.optimizer, t.max_steps)

    def on_step(state, metrics):
        stamps.append((time.perf_counter(), time.process_time()))  # fit logs every step: the device is done
        losses.append(metrics["loss"])

    fit(accelerator, model, optimizer, loader, replace(loop_args(cfg, t.max_steps), log_every=1), scheduler=scheduler,
        on_step=on_step, loss_fn=loss_fn_for(t.loss, t.loss_chunk_size))


def _train_trainer(cfg, model, loader, data, stamps, losses, cuda) -> None:
    t, o = cfg.training, cfg.optimizer
    micro: list[torch.Tensor] = []

    class _SameBatches(Trainer):
        def get_train_dataloader(self):
            return self.accelerator.prepare(loader)  # as Trainer does with its own loader

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            micro.append(loss)
            return loss

    class _Stamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_loss = torch.stack(micro).sum()  # what Trainer logs: the sum of training_step's returns
            micro.clear()
            losses.append(step_loss.item())  # host-device sync, as minitune's log_every=1
            stamps.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
            max_steps=t.max_steps, learning_rate=o.lr, lr_scheduler_type=o.scheduler, warmup_steps=o.warmup_steps,
            weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
            optim="adamw_torch", max_grad_norm=t.max_grad_norm, bf16=t.mixed_precision == "bf16",
            fp16=t.mixed_precision == "fp16", use_cpu=not cuda, seed=t.seed, data_seed=t.seed,
            torch_compile=t.compile, save_strategy="no", report_to="none", disable_tqdm=True,
            logging_strategy="no", remove_unused_columns=False, dataloader_num_workers=0,
        )
        trainer = _SameBatches(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                               callbacks=[_Stamps()])
        trainer.train()


# ------------------------------------------------------------------------------------------------
# the driver


def _child(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", out.name]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"run {spec['row']} / {spec['variant']} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(Path(out.name).read_text())


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def summarise(results: list[dict], rows: list[str], variants: dict[str, list[str]]) -> list[dict]:
    """One line per (row, variant): medians over repeats, ratios against the row's 'trainer' run
    (of the same gradient-checkpointing / data setting where there is one)."""
    table = []
    for row in rows:
        for variant in variants[row]:
            runs = [r for r in results if r["row"] == row and r["variant"] == variant]
            if not runs:
                continue
            line = {
                "row": row, "variant": variant, "repeats": len(runs),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "tokens_per_s_min": min(r["tokens_per_s"] for r in runs),
                "tokens_per_s_max": max(r["tokens_per_s"] for r in runs),
                "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in runs),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                "train_rss_delta_mb": statistics.median(r["train_rss_delta_mb"] for r in runs),
                "cuda_peak_mb": statistics.median(r["cuda_peak_mb"] for r in runs) if runs[0]["cuda_peak_mb"] else None,
                "first_steps_s": statistics.median(r["first_steps_s"] for r in runs),
                "final_loss": runs[0]["losses"][-1],
                "losses": runs[0]["losses"],
            }
            table.append(line)
    for line in table:
        suffix = line["variant"].split("+", 1)[1] if "+" in line["variant"] else ""
        for s in (suffix, ""):  # e.g. minitune+gc vs trainer+gc; minitune+full-loss vs trainer
            ref_name = "trainer" + (f"+{s}" if s else "")
            ref = next((x for x in table if x["row"] == line["row"] and x["variant"] == ref_name), None)
            if ref is not None:
                break
        line["vs"] = ref["variant"] if ref else ""
        line["speed_ratio"] = line["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        line["cpu_speed_ratio"] = line["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"] if ref else None
        line["peak_ratio"] = line["peak_rss_mb"] / ref["peak_rss_mb"] if ref else None
        line["delta_ratio"] = line["train_rss_delta_mb"] / ref["train_rss_delta_mb"] if ref else None
        if line["cuda_peak_mb"] and ref:
            line["peak_ratio"] = line["cuda_peak_mb"] / ref["cuda_peak_mb"]
        same = ref is not None and ref["variant"] != line["variant"] and len(ref["losses"]) == len(line["losses"])
        line["max_loss_diff"] = max(abs(a - b) for a, b in zip(ref["losses"], line["losses"], strict=True)) if same else None
    return table


def markdown(table: list[dict], header: str) -> str:
    cuda = any(x["cuda_peak_mb"] for x in table)
    peak_name = "peak CUDA alloc" if cuda else "peak RSS"
    lines = [header, "",
             f"| row | run | tokens/s wall (min-max) | tokens/CPU-s | {peak_name} | training Δ RSS | reference "
             "| speed (wall) | speed (CPU) | peak | Δ RSS | max abs Δloss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in table:
        peak = x["cuda_peak_mb"] if cuda else x["peak_rss_mb"]
        diff = "-" if x["max_loss_diff"] is None else f"{x['max_loss_diff']:.1e}"
        lines.append(
            f"| {x['row']} | {x['variant']} | {x['tokens_per_s']:,.0f} ({x['tokens_per_s_min']:,.0f}-"
            f"{x['tokens_per_s_max']:,.0f}) | {x['tokens_per_cpu_s']:,.0f} | {peak:,.0f} MiB | "
            f"{x['train_rss_delta_mb']:,.0f} MiB | {x['vs'] or '-'} | {_fmt_ratio(x['speed_ratio'])} | "
            f"{_fmt_ratio(x['cpu_speed_ratio'])} | {_fmt_ratio(x['peak_ratio'])} | {_fmt_ratio(x['delta_ratio'])} | "
            f"{diff} |")
    lines += ["", "Ratios are run / reference (the Trainer run of the same setting): speed above 1 and memory "
              "below 1 favour the run. `max abs Δloss`: largest difference of a step's loss from the reference's."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="opt-125m,bloom-560m,flan-t5-small", help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} "
                   f"(default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--levers", action="store_true", help="run each row's lever variants (gradient checkpointing, "
                   "length grouping, packing) and write compare_trainer_levers.*")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating sides")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--samples", type=int, default=400, help="training examples tokenized")
    p.add_argument("--batch-size", type=int, default=0, help="override every row's batch size")
    p.add_argument("--max-length", type=int, default=0, help="override every row's data.max_length")
    p.add_argument("--chunk-size", type=int, default=0, help="training.loss_chunk_size of chunked runs (0: auto)")
    p.add_argument("--precision", default="defaults", choices=["defaults", "no", "bf16", "fp16", "bf16-weights"],
                   help="'defaults': each side's own (minitune auto, Trainer fp32); 'bf16-weights': both sides bf16 "
                        "weights, no autocast; else both sides fp32 weights with this training.mixed_precision")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default). One by "
                   "default: on a shared machine, OpenMP threads that wait for each other make wall times erratic")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out", default=None, help="results stem (default bench/results/compare_trainer[_levers])")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        result = run_one(json.loads(args.child))
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in chosen if v not in VARIANTS]
        if bad:
            p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
        variants = {r: chosen for r in rows}
    elif args.levers:
        variants = {r: LEVER_VARIANTS.get(r, DEFAULT_VARIANTS) for r in rows}
    else:
        variants = {r: DEFAULT_VARIANTS for r in rows}
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")

    command = "python bench/compare_trainer.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    for rep in range(args.repeats):
        for row in rows:
            order = variants[row] if rep % 2 == 0 else list(reversed(variants[row]))
            for variant in order:
                spec = {"row": row, "variant": variant, "side": VARIANTS[variant][0], "warmup": args.warmup,
                        "threads": args.threads, "config": job_config(row, variant, args)}
                r = _child(spec, args.timeout)
                r.update(row=row, variant=variant, repeat=rep)
                results.append(r)
                print(f"[{time.perf_counter() - t0:6.0f} s] {row:14s} {variant:34s} {r['tokens_per_s']:8.0f} tok/s "
                      f"{r['tokens_per_cpu_s']:8.0f} tok/CPU-s  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MiB  train Δ {r['train_rss_delta_mb']:6.0f} MiB  "
                      f"loss {r['losses'][-1]:.4f}", flush=True)
    elapsed = time.perf_counter() - t0
    table = summarise(results, rows, variants)
    device = "cuda: " + torch.cuda.get_device_name() if (args.device != "cpu" and torch.cuda.is_available()) else (
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{args.threads or torch.get_num_threads()}")
    header = (f"`{command}`\n\n{device}; torch {torch.__version__}; {args.steps} steps per run, first {args.warmup} "
              f"untimed; {args.repeats} runs per line (median; min-max in brackets), alternating; precision "
              f"{args.precision}{' (minitune auto, Trainer fp32)' if args.precision == 'defaults' else ''}; load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
              f"{elapsed / 60:.1f} min in all.")
    md = markdown(table, header)
    print("\n" + md)
    stem = Path(args.out) if args.out else REPO / "bench/results" / ("compare_trainer_levers" if args.levers else "compare_trainer")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md + "\n")
    fields = ["row", "variant", "repeats", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "tokens_per_cpu_s",
              "peak_rss_mb", "train_rss_delta_mb", "cuda_peak_mb", "first_steps_s", "vs", "speed_ratio",
              "cpu_speed_ratio", "peak_ratio", "delta_ratio", "max_loss_diff", "final_loss"]
    with stem.with_suffix(".csv").open("w", newline="") as f:
        f.write(f"# {command}\n")
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    print(f"\nwrote {stem.with_suffix('.md')} and {stem.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
