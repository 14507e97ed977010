"""One cell of the memory benchmark, run in its own process (a clean allocator, RSS and CUDA context).

    python bench/cell.py '<cell spec as JSON>' result.json
    python bench/cell.py --train '<minitune config as JSON>' result.json   (a short real training)

A cell is a minitune `Config` built with the builders `minitune.run.train` uses (`minitune.build`):
`setup_device` + `setup_accelerator` -> `load_model` (a preset, random init; 8-bit / 4-bit through
bitsandbytes) -> `setup_model` (freeze, fp32 norms, gradient checkpointing, LoRA) ->
`build_optimizer` -> `accelerator.prepare` -> `minitune.loop.fit` with the configured loss and a
`MemoryProfiler` recording phases every step. The batches are random token ids (no tokenizer,
no padding): `batch_size x seq_len` inputs, and for seq2seq models `seq_len` targets too.

Memory: on CPU, `peak_train_mb` is the highest number of bytes the CPU allocator holds during the
training steps (warm-up included), counted from before the model loads (`AllocatorTrace`, exact);
`peak_all_mb` covers loading too, and `peak_load_mb` is loading's own (beside the planner's
`predicted_loading_mb`). RSS above the baseline taken once every library is imported is kept beside it
(`rss_peak_train_mb`). On CUDA the peak is `max_memory_allocated` (baseline 0).

Writes one JSON object to the result path: status ('ok', 'OOM' or 'error: ...'), the settings,
peaks, the tensor breakdown at the training peak, the prediction of `minitune.planner.simulate`, the
per-step records, the phase snapshots of every step and the step times.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from accelerate.utils.memory import should_reduce_batch_size

from minitune.build import setup_accelerator, setup_model
from minitune.config import Config, DataArgs, LoraArgs, ModelArgs, OptimizerArgs, QuantizationArgs, TrainingArgs
from minitune.cpu_allocator import AllocatorTrace
from minitune.device import optimizer_name_for, setup_device
from minitune.lm import model_kind
from minitune.loop import LoopArgs, fit
from minitune.losses import loss_fn_for
from minitune.memory import MemoryProfiler, tensor_breakdown
from minitune.model import load_model
from minitune.optim import build_optimizer
from minitune.planner import MicroBatch, load_peak, simulate
from minitune.presets import preset_config
from minitune.process_memory import release_free_memory, tune_malloc
from minitune.run import train

MB = 2**20

DEFAULTS = {
    "model": "tiny-llama",
    "method": "lora",  # a label only; the settings below decide
    "batch_size": 2,
    "seq_len": 64,
    "warmup": 1,
    "steps": 3,
    "device": "auto",
    "dtype": "float32",  # non-quantized weights
    "mixed_precision": "no",
    "quant": "none",  # none | 8bit | 4bit (nf4, double quant)
    "compute_dtype": "float32",  # 4-bit compute dtype
    "lora": True,
    "lora_r": 8,
    "lora_alpha": 16,
    "target_modules": None,  # None: minitune's default per architecture
    "gradient_checkpointing": False,
    "fp32_norms": "norms",
    "optimizer": "adamw",
    "loss": "auto",  # minitune's default: the chunked loss for these architectures
    "loss_chunk_size": 0,  # 0: automatic
    "grad_accum": 1,  # micro-batches per optimizer step
    "profile": True,  # False: no MemoryProfiler at all (for the overhead measurement)
    "seed": 0,
}


def _preimport(model_name: str) -> None:
    """Import what a cell touches and the module imports do not (bitsandbytes, an optional
    dependency; the model's modeling module) before the profiler takes its baseline."""
    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401  (optional: imported only where installed)
    model_type = preset_config(model_name).model_type
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    transformers.AutoModelForCausalLM  # noqa: B018  (resolve the lazy auto classes too)
    transformers.AutoModelForSeq2SeqLM  # noqa: B018


def _random_batches(n: int, vocab: int, batch_size: int, seq_len: int, seq2seq: bool, device, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["labels"] = torch.randint(3, vocab, (batch_size, seq_len), generator=g) if seq2seq else ids.clone()
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def run_cell(spec: dict) -> dict:
    """Build and run one cell; returns the result dict (raises on errors other than out-of-memory)."""
    s = {**DEFAULTS, **spec}
    _preimport(s["model"])
    cfg, where = setup_device(cell_config(s))
    accelerator = setup_accelerator(cfg, where.device)
    dev = accelerator.device
    result: dict = {"spec": s, "device": str(dev), "status": "ok"}
    if dev.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(dev)
    profiler = MemoryProfiler(dev, phases_every=1) if s["profile"] else None
    # CPU: the allocator's own account, from before the model loads (see AllocatorTrace)
    trace = AllocatorTrace().__enter__() if s["profile"] and dev.type == "cpu" else None
    if profiler is not None:
        profiler.start()
        profiler.phase("start")
    t0 = time.perf_counter()
    stage = "load"
    try:
        with trace.window("load") if trace is not None else contextlib.nullcontext():
            model = load_model(cfg.model, cfg.quantization, device=dev, seed=s["seed"])
        if profiler is not None:
            profiler.phase("load")
        seq2seq = model_kind(model) == "seq2seq"
        stage = "prepare"
        model, report = setup_model(cfg, dev, base=model)
        optimizer = build_optimizer(model, cfg.optimizer, dev)
        model, optimizer = accelerator.prepare(model, optimizer)
        if profiler is not None:
            profiler.phase("prepare")
        result["load_s"] = time.perf_counter() - t0
        bare = accelerator.unwrap_model(model)
        opt_name = optimizer_name_for(s["optimizer"], dev)
        result.update(trainable_params=report.trainable, total_params=report.total, optimizer_used=opt_name,
                      fp32_cast_mb=report.fp32_cast_bytes / MB, seq2seq=seq2seq)
        # the cell's batches: random ids, no padding, every position a target
        prediction = simulate(bare, cfg, steps=cell_steps(s, seq2seq), device_type=dev.type)
        predicted = {**prediction.breakdown, "total": prediction.total}
        result["predicted"] = predicted
        result["predicted_phases"] = prediction.phases
        n = s["warmup"] + s["steps"]
        batches = _random_batches(n * s["grad_accum"], bare.config.vocab_size, s["batch_size"], s["seq_len"], seq2seq,
                                  dev, s["seed"])
        gc.collect()
        release_free_memory()  # what loading freed goes back to the system, as a run does after loading
        spent = [0.0]  # seconds inside the profiler's calls during training (for the overhead)
        if profiler is not None:
            profiler.step(0)  # closes the load window: step records from here on cover training only

            def timed(fn):
                def wrapper(*a, **k):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        spent[0] += time.perf_counter() - t
                return wrapper

            profiler.phase, profiler.step = timed(profiler.phase), timed(profiler.step)
        stamps: list[float] = []
        phases: list[dict] = []
        metrics: list[dict] = []

        def on_step(state, m) -> None:
            stamps.append(time.perf_counter())
            metrics.append({k: v for k, v in m.items() if k in ("step", "loss", "grad_norm")})
            if profiler is not None:
                phases.append({k: v["mem/current_mb"] for k, v in profiler.phases.items()
                               if k in ("forward", "backward", "optimizer")})

        stage = "train"
        t_fit = time.perf_counter()
        with trace.window("train") if trace is not None else contextlib.nullcontext():
            fit(accelerator, model, optimizer, batches, LoopArgs(max_steps=n, log_every=1, grad_accum=s["grad_accum"]),
                profiler=profiler, on_step=on_step, loss_fn=loss_fn_for(s["loss"], s["loss_chunk_size"]))
        # the whole run's peak RSS, read before this cell's own trace (loading and every step, where a
        # run traces two steps) turns its events into results: those are the benchmark's, not the run's
        rss_peak = profiler.peak_bytes() if profiler is not None else None
        if trace is not None:
            trace.__exit__(None, None, None)
    except Exception as e:
        if trace is not None:
            trace.__exit__(None, None, None)
        if not should_reduce_batch_size(e):
            raise
        result["status"] = "OOM"
        result["oom_stage"] = stage
        result["error"] = str(e).splitlines()[0][:300]
        if profiler is not None:
            profiler.stop()
            result["peak_all_mb"] = profiler.peak_bytes(above_baseline=True) / MB
        return result

    times = [b - a for a, b in zip([t_fit, *stamps], stamps, strict=False)]
    timed = times[s["warmup"]:]
    step_s = sum(timed) / len(timed)
    tokens = s["batch_size"] * s["grad_accum"] * s["seq_len"] * (2 if seq2seq else 1)
    result.update(step_times_s=times, step_s=step_s, step_s_min=min(timed), step_s_median=statistics.median(timed),
                  tokens_per_step=tokens, tokens_per_s=tokens / step_s, metrics=metrics, phases=phases)
    if profiler is not None:
        profiler.stop()
        # The profiler's cost, measured directly: time inside its calls per step, and the cost of
        # one sample of the sampler thread (MPS; CPU without the kernel's peak) times its rate.
        result["profiler_calls_s_per_step"] = spent[0] / n
        if profiler.kind != "cuda" and profiler.rss_source == "sampled":
            t = time.perf_counter()
            for _ in range(1000):
                profiler._current()
            result["sampler_cost_pct"] = 100 * (time.perf_counter() - t) / 1000 / profiler.sample_interval_s
        baseline = profiler.baseline_bytes
        key = {"cuda": "mem/peak_allocated_mb", "mps": "mem/max_sampled_mb"}.get(profiler.kind, "mem/peak_rss_mb")
        sampled_peak = max(0, int(max(r[key] for r in profiler.records if r["step"] >= 1) * MB - baseline))
        if trace is not None:  # CPU: the allocator's account; RSS kept alongside
            train_peak, all_peak = trace.peak("train"), trace.peak()
            result.update(peak_load_mb=trace.peak("load") / MB, rss_peak_train_mb=sampled_peak / MB,
                          rss_peak_all_mb=max(0, rss_peak - baseline) / MB)  # read before the trace's read-back
            kind = "CPU allocator (torch profiler memory events), held since before loading"
        else:
            train_peak, all_peak = sampled_peak, profiler.peak_bytes(above_baseline=True)
            kind = profiler.summary()["peak_label"] + (" above baseline" if baseline else "")
        breakdown = tensor_breakdown(bare, optimizer, train_peak, assume_grads=True)
        result.update(
            peak_kind=kind,
            baseline_mb=baseline / MB,
            peak_train_mb=train_peak / MB,
            peak_all_mb=all_peak / MB,
            breakdown_mb={k: v / MB for k, v in breakdown.items()},
            records=profiler.records,
            ratio=train_peak / predicted["total"] if predicted["total"] else math.nan,
        )
        if profiler.kind == "cpu":  # the whole process: peak RSS of the cell against minitune's process_peak
            prediction.loading = load_peak(cfg).bytes
            process = prediction.process("cpu", baseline)
            result.update(rss_peak_mb=rss_peak / MB, process_peak_mb=process.total / MB,
                          predicted_loading_mb=prediction.loading / MB,  # beside peak_load_mb
                          process_terms_mb={k: v / MB for k, v in process.terms.items()})
    return result


def cell_steps(s: dict, seq2seq: bool) -> list[list[MicroBatch]]:
    """The micro-batches a cell trains, as the planner simulates them: random ids, no padding, every
    position a target; two optimizer steps (with accumulation, two micro-batches each)."""
    step = [MicroBatch(s["batch_size"], s["seq_len"], s["seq_len"] if seq2seq else None, padded=False)]
    return [step * min(2, s["grad_accum"])] * 2


def cell_config(s: dict) -> Config:
    """The minitune config of a cell spec (the data section is unused: batches are random ids)."""
    return Config(
        model=ModelArgs(preset=s["model"], dtype=s["dtype"]),
        quantization=QuantizationArgs(mode=s["quant"], compute_dtype=s["compute_dtype"]),
        lora=LoraArgs(enabled=s["lora"], r=s["lora_r"], alpha=s["lora_alpha"], target_modules=s["target_modules"]),
        optimizer=OptimizerArgs(name=s["optimizer"], lr=2e-4),
        data=DataArgs(max_length=s["seq_len"], max_target_length=s["seq_len"]),
        training=TrainingArgs(device=s["device"], mixed_precision=s["mixed_precision"], seed=s["seed"],
                              batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                              loss_chunk_size=s["loss_chunk_size"],
                              gradient_checkpointing=s["gradient_checkpointing"], fp32_norms=s["fp32_norms"],
                              loss=s["loss"]),
    )


def run_train(config: dict) -> dict:
    """A short real training through `minitune.train`; returns the logged records."""
    res = train(config)
    log = Path(res.output_dir) / "log.jsonl"
    return {"status": "ok", "records": [json.loads(line) for line in log.read_text().splitlines() if line.strip()],
            "trainable": res.trainable_line}


def main(argv: list[str]) -> int:
    tune_malloc()  # as a minitune run does (`--malloc default` in memory_grid.py sets MINITUNE_MALLOC=default)
    if argv and argv[0] == "--train":
        fn, payload, out = run_train, argv[1], argv[2]
    else:
        fn, payload, out = run_cell, argv[0], argv[1]
    try:
        result = fn(json.loads(payload))
    except Exception as e:  # recorded, so that the grid goes on
        traceback.print_exc()
        result = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    Path(out).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
