"""Everything minitune claims about CUDA, checked in one command on one GPU (about 10 minutes on an H200).

    python bench/gpu_check.py                 # on a CUDA machine: writes bench/results/gpu-<date>.{md,csv}
    python bench/gpu_check.py --parts matrix,optimizers
    python bench/gpu_check.py --dry-run       # any machine: every part at toy size, to check the script

Parts:
1. `matrix`: the precision matrix (tests/test_precision.py's all-pairs cells: model.dtype x
   mixed_precision x loss x quantization x gradient checkpointing, causal and seq2seq) through
   `minitune.train` on the GPU. Expected: every cell trains (losses finite and falling, adapters
   fp32), except a mix of two 16-bit formats, refused up front (and bf16 where the GPU has none).
2. `optimizers`: 8-bit and 4-bit bases with every bitsandbytes optimizer, paged ones included
   (on CUDA they must stay paged: the optimizer class is recorded).
3. `memory`: the memory grid's GPU cells, gpt-neo-1.3B and a T0-3B-sized T5, full fine-tuning vs
   LoRA vs QLoRA at batch 4 x 256 (bench/memory_grid.py --grid gpu), with predicted vs measured
   peak (`max_memory_allocated`).
4. `trainer`: bench/compare_trainer.py on the GPU (minitune vs transformers.Trainer, each side with
   its default settings).
5. `auto`: what precision `auto` chooses on this GPU, and the default tiny run with it.
6. `speed`: achieved FLOP/s and MFU (the fraction of this GPU's bf16 matmul peak, probed with
   8192^3 products by `minitune.planner.roofline.probe`, and of its data sheet's) for bloom-560m
   LoRA r16 and gpt-neo-1.3B QLoRA r16, bf16, 8 x 256 tokens (gpt-neo: packed blocks; BLOOM cannot
   pack, so each quote twelve times over, cut at 256). FLOP per token: the run's own planner count of
   its first two steps (`predicted.flops` in memory.json: every matmul and attention product of
   forward, backward and recomputation) over their tokens. `--dry-run`: tiny-llama on CPU.
7. `process`: the process's device memory against the planner's CUDA terms
   (`minitune.cuda_memory.cuda_process_terms`): each job trains in a fresh process, which reads
   `torch.cuda.mem_get_info()` (the driver's view) right after creating its CUDA context and again
   after training, with `max_memory_allocated`, `max_memory_reserved` and `memory_reserved`. The
   run empties the allocator's cache when it ends, so what the driver shows beyond the reserve then
   is the context and the kernels loaded into it, and the driver's view at the peak is that plus the
   peak reserve. Predicted: the tensors (+ cuBLAS workspaces) against allocated, + the allocator's
   cache against reserved, the context term against the context and kernels, the sum against the
   driver's view at the peak. The opt-125m job packs its data, so that every batch is the plan's
   8 x 256. `--dry-run`: the prediction only (no CUDA to measure), for a T4.

Each part runs even if an earlier one failed; each check is one row of the CSV (part, name,
status, detail, seconds). `--dry-run` uses tiny models, two matrix cells, two optimizers, the
memory grid's smoke sizes and the Trainer comparison's tiny row, on whatever device is there.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# in order of what a short GPU lease should settle first (the results are written after every part)
PARTS = ("process", "speed", "auto", "matrix", "optimizers", "memory", "trainer")
BNB_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "paged_adamw32bit", "lion8bit", "paged_lion8bit")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _train_row(part: str, name: str, cfg: dict, expect_refusal: str = "") -> dict:
    """Run `minitune.train(cfg)`; one result row (trained / refused / failed, with the evidence)."""
    from minitune.errors import ConfigError
    from minitune.run import train

    t0 = time.perf_counter()
    try:
        result = train(cfg)
    except ConfigError as e:
        ok = bool(expect_refusal) and expect_refusal in str(e)
        return {"part": part, "name": name, "status": "refused as expected" if ok else "FAILED: refused",
                "detail": str(e).splitlines()[-1][:200], "seconds": time.perf_counter() - t0}
    except Exception as e:  # recorded, so that the other checks still run
        return {"part": part, "name": name, "status": "FAILED: error", "seconds": time.perf_counter() - t0,
                "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    losses = _losses(Path(cfg["training"]["output_dir"]))
    # the mean of the last three steps' losses below the first three's: each step is another batch, and
    # one batch's loss can sit above the first one's while the run learns
    falling = all(x == x and abs(x) != float("inf") for x in losses) and sum(losses[-3:]) < sum(losses[:3])
    status = "trained" if falling and not expect_refusal else ("FAILED: should be refused" if expect_refusal
                                                              else "FAILED: loss did not fall")
    return {"part": part, "name": name, "status": status, "seconds": time.perf_counter() - t0,
            "detail": f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; weights {result.precision.dtype}, autocast "
                      f"{result.precision.mixed_precision}",
            # the training peak of steps 1-2 (max_memory_allocated on CUDA) and the prediction for the same
            # steps; neither with logging.memory=false (tiny_config), which `markdown` shows as "-"
            "peak_mb": result.memory.get("training_peak_mb"),
            "predicted_mb": _predicted_allocated(result.memory.get("predicted"))}


def _predicted_allocated(predicted: dict | None) -> float | None:
    """What `max_memory_allocated` should read (MiB): the tensors, plus on CUDA cuBLAS's workspaces,
    which the allocator serves too (64 MiB on Hopper: a tiny model's whole peak is mostly them)."""
    if not predicted:
        return None
    return (predicted["total"] + (predicted.get("cuda") or {}).get("cublas_workspace", 0)) / 2**20


def part_auto(args: argparse.Namespace, tmp: Path) -> list[dict]:
    import torch

    from minitune import device as dev
    from tests.conftest import tiny_config

    device = dev.resolve_device("auto")
    chosen = dev.choose_precision(dev.capabilities(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    rows = [{"part": "auto", "name": f"choice on {name}", "status": "info", "detail": chosen.describe()}]
    # 40 steps: in 8, a random tiny model's loss moves less than one batch's from the next (bf16 weights
    # learn more slowly still: the H100 and H200 runs of 2026-12-04/05 were flagged on that alone)
    cfg = tiny_config("tiny-llama", tmp / "auto", model={"dtype": "auto"},
                      training={"mixed_precision": "auto", "max_steps": 40})
    rows.append(_train_row("auto", "tiny-llama with auto", cfg))
    return rows


def part_matrix(args: argparse.Namespace, tmp: Path) -> list[dict]:
    from minitune import device as dev
    from tests.test_precision import PAIRWISE, cell_config

    caps = dev.capabilities(dev.resolve_device("auto"))
    cells = PAIRWISE[:2] if args.dry_run else PAIRWISE
    rows = []
    for i, cell in enumerate(cells):
        _, dtype, mixed, _, quant, _ = cell
        halves = {dtype, {"bf16": "bfloat16", "fp16": "float16"}.get(mixed), quant.partition("-")[2]}
        if {"bfloat16", "float16"} <= halves:
            expect = "mixes bfloat16 and float16"
        elif "bfloat16" in halves and not caps.bf16:
            expect = "bfloat16 is not supported"
        elif mixed == "fp16" and not caps.fp16_autocast:
            expect = "training.mixed_precision=fp16"
        else:
            expect = ""
        cfg = cell_config(cell, tmp / f"cell{i}")
        cfg["training"]["device"] = "auto"
        rows.append(_train_row("matrix", "-".join(map(str, cell)), cfg, expect))
    return rows


def part_optimizers(args: argparse.Namespace, tmp: Path) -> list[dict]:
    from minitune import device as dev
    from tests.conftest import tiny_config

    device = dev.resolve_device("auto")
    names = ("paged_adamw8bit",) if args.dry_run else BNB_OPTIMIZERS
    rows = []
    for mode in ("8bit", "4bit"):
        for name in names:
            cfg = tiny_config("tiny-llama", tmp / f"opt-{mode}-{name}", quantization={"mode": mode},
                              lora={"target_modules": ["all-linear"], "dropout": 0.0},
                              data={"max_samples": 8}, optimizer={"name": name, "lr": 3e-3 if "lion" in name else 1e-2},
                              training={"max_steps": 6, "batch_size": 8})
            row = _train_row("optimizers", f"{mode} + {name}", cfg)
            row["detail"] = f"runs as {dev.optimizer_name_for(name, device)}; {row.get('detail', '')}"
            rows.append(row)
    return rows


def _script(part: str, cmd: list[str], timeout: float) -> tuple[dict, subprocess.CompletedProcess | None]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"part": part, "name": " ".join(cmd), "status": f"FAILED: timeout (> {timeout:.0f} s)",
                "seconds": time.perf_counter() - t0}, None
    status = "ran" if proc.returncode == 0 else f"FAILED: exit {proc.returncode}"
    detail = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return {"part": part, "name": "python " + " ".join(cmd), "status": status, "detail": detail,
            "seconds": time.perf_counter() - t0}, proc


def part_memory(args: argparse.Namespace, tmp: Path) -> list[dict]:
    if args.dry_run:
        sizes = ["--grid", "smoke", "--methods", "full,lora,qlora"]
    else:
        sizes = ["--grid", "gpu", "--models", "gpt-neo-1.3b,t0-3b", "--methods", "full,lora,qlora",
                 "--batch-sizes", "4", "--seq-lens", "256", "--steps", "3", "--warmup", "1"]
    row, proc = _script("memory", ["bench/memory_grid.py", *sizes, "--parts", "grid", "--out", str(tmp),
                                   "--name", "grid"], args.timeout)
    rows = [row]
    if proc is not None and proc.returncode == 0:
        with open(tmp / "grid.csv") as f:
            for cell in csv.DictReader(f):
                ratio = cell.get("ratio") or ""
                rows.append({"part": "memory", "name": f"{cell['model']} {cell['method']} {cell.get('batch_size')}x"
                             f"{cell.get('seq_len')}", "status": cell["status"],
                             "peak_mb": cell.get("peak_train_mb"), "predicted_mb": cell.get("predicted_mb"),
                             "detail": f"measured/predicted {ratio}" if ratio else cell.get("note", "")})
        (args.out_dir / f"{args.name}-memory.md").write_text((tmp / "grid.md").read_text())
    return rows


def part_trainer(args: argparse.Namespace, tmp: Path) -> list[dict]:
    sizes = ["--rows", "tiny-llama", "--steps", "2", "--repeats", "1"] if args.dry_run else ["--repeats", "1"]
    row, proc = _script("trainer", ["bench/compare_trainer.py", *sizes, "--threads", "0", "--out",
                                    str(tmp / "trainer")], args.timeout)
    if proc is not None and proc.returncode == 0:
        (args.out_dir / f"{args.name}-trainer.md").write_text((tmp / "trainer.md").read_text())
        row["detail"] = f"table in {args.name}-trainer.md"
    return [row]


# jobs of the `process` part: an 8-bit base (bitsandbytes' int8 kernels), and opt-125m in fp16 at 8 x 256.
# Packed, so that every batch is as wide as the plan's (which is for data.max_length): on the quotes as
# they are, padded to the longest in each batch, the widest batch is far shorter than 256 tokens (the
# -41% of bench/results/gpu-2026-12-04.md and gpu-2026-12-05.md was that, not the planner)
PROCESS_JOBS = {
    "tiny-llama 8bit": {"model": {"dtype": "float16"}, "quantization": {"mode": "8bit"}},
    "opt-125m lora 8x256": {"model": {"preset": "opt-125m", "dtype": "float16"},
                            "data": {"max_length": 256, "packing": True, "max_samples": 2000},
                            "training": {"batch_size": 8}},
}


def _process_terms(cfg: dict, device: str | None) -> dict:
    """The planner's CUDA terms for `cfg` on `device` (a planner device name), or on this GPU (None)."""
    import dataclasses

    import torch

    from minitune.config import load_config
    from minitune.planner import plan, target

    tg = target(device or "A100-80")
    if device is None:  # this GPU: its memory, capability and bf16 support
        total = torch.cuda.mem_get_info()[1]
        caps = dataclasses.replace(tg.caps, bf16=torch.cuda.is_bf16_supported(), fast_bf16=torch.cuda.is_bf16_supported())
        tg = dataclasses.replace(tg, name=torch.cuda.get_device_name(), memory=total, budget=total, caps=caps,
                                 capability=torch.cuda.get_device_capability())
    result = plan(load_config(cfg), tg, suggest=False)
    return {"predicted_allocated": result.prediction.total, **result.prediction.cuda}


def _process_child(spec: str) -> None:
    """In a fresh process: measure one job (the `process` part); prints one JSON line."""
    import torch

    from minitune.run import train

    cfg = json.loads(spec)
    torch.cuda.init()
    free0, total = torch.cuda.mem_get_info()  # the context just created (and any other process's memory)
    torch.cuda.reset_peak_memory_stats()
    train(cfg)
    free1, _ = torch.cuda.mem_get_info()
    # the run empties the allocator's cache when it ends (accelerator.free_memory): the driver's view at
    # the peak is the peak reserve plus what the driver shows beyond the reserve now (the context and
    # the kernels loaded into it, which stay)
    outside = total - free1 - torch.cuda.memory_reserved()
    measured = {"context": total - free0, "driver": torch.cuda.max_memory_reserved() + outside,
                "allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
                "outside_after": outside}
    print(json.dumps({"measured": measured, "predicted": _process_terms(cfg, None)}))


def _process_row(name: str, predicted: dict, measured: dict | None, seconds: float) -> dict:
    terms = {k: predicted[k] for k in ("cuda_context", "cublas_workspace", "tensors", "allocator_cache")}
    allocated = terms["tensors"] + terms["cublas_workspace"]
    reserved, process = allocated + terms["allocator_cache"], sum(terms.values())
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    if measured is None:
        detail = (f"predicted MiB: allocated {mib(allocated)}, reserved {mib(reserved)}, context "
                  f"{mib(terms['cuda_context'])}, process {mib(process)}")
        return {"part": "process", "name": name, "status": "planned (dry run: nothing measured)", "detail": detail,
                "predicted_mb": process / 2**20, "seconds": seconds}
    detail = "; ".join(f"{what} {mib(m)} vs {mib(p)} predicted ({(m - p) / p:+.1%})" for what, m, p in (
        ("max_memory_allocated", measured["allocated"], allocated), ("max_memory_reserved", measured["reserved"], reserved),
        ("context (mem_get_info at start) + kernels", measured["outside_after"],
         terms["cuda_context"]),
        ("driver's view at the peak (peak reserved + what it shows beyond the reserve)", measured["driver"], process)))
    detail += f"; context alone at start {mib(measured['context'])}"
    return {"part": "process", "name": name, "status": "measured", "detail": detail, "peak_mb": measured["driver"] / 2**20,
            "predicted_mb": process / 2**20, "seconds": seconds}


def part_process(args: argparse.Namespace, tmp: Path) -> list[dict]:
    from tests.conftest import tiny_config

    jobs = dict(list(PROCESS_JOBS.items())[:1]) if args.dry_run else PROCESS_JOBS
    rows = []
    for name, sections in jobs.items():
        cfg = tiny_config("tiny-llama", tmp / name.replace(" ", "-"), **sections)
        cfg["training"].update(device="auto", max_steps=4)
        t0 = time.perf_counter()
        if args.dry_run:
            rows.append(_process_row(name, _process_terms(cfg, "T4"), None, time.perf_counter() - t0))
            continue
        row, proc = _script("process", ["bench/gpu_check.py", "--child", json.dumps(cfg)], args.timeout)
        if proc is None or proc.returncode != 0:
            rows.append({**row, "name": name})
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(_process_row(name, out["predicted"], out["measured"], time.perf_counter() - t0))
    return rows


# jobs of the `speed` part: bf16 weights, LoRA r16, 8 x 256 tokens (packed where the model can:
# BLOOM's attention mask ignores position ids, so its rows are each quote twelve times over, cut at 256)
SPEED_JOBS = {
    "bloom-560m LoRA r16 bf16 8x256": {"model": {"preset": "bloom-560m"},
                                       "lora": {"target_modules": ["query_key_value"]},
                                       "data": {"packing": False, "prompt": " ".join(["{quote}"] * 12) + " ->: "}},
    "gpt-neo-1.3b QLoRA r16 bf16 8x256": {"model": {"preset": "gpt-neo-1.3b"}, "quantization": {"mode": "4bit"},
                                          "lora": {"target_modules": ["q_proj", "v_proj"]}},
}


def part_speed(args: argparse.Namespace, tmp: Path) -> list[dict]:
    import statistics

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import flop_per_token

    from minitune.planner.roofline import DATASHEETS, datasheet_name, probe
    from tests.conftest import tiny_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    measured = probe(device, torch.bfloat16)
    sheet_name = datasheet_name(torch.cuda.get_device_name()) if cuda else None
    sheet = DATASHEETS[sheet_name][0] if sheet_name else None
    peak = measured.flops
    rows = [{"part": "speed", "name": f"bf16 matmul peak on {device}", "status": "info",
             "detail": f"{peak / 1e12:,.1f} TFLOP/s measured ({measured.source})"
                       + (f"; data sheet of the {sheet_name} {sheet / 1e12:,.0f}" if sheet else "")}]
    jobs = {"tiny-llama LoRA (dry run)": {}} if args.dry_run else SPEED_JOBS
    block, steps, warmup = (32, 4, 2) if args.dry_run else (256, 20, 5)
    for name, sections in jobs.items():
        cfg = tiny_config("tiny-llama", tmp / name.split()[0], **sections)
        cfg["model"]["dtype"] = "bfloat16"
        cfg["lora"].update(r=16, alpha=32, dropout=0.0)
        cfg["data"].update(packing=sections.get("data", {}).get("packing", True), max_length=block, max_samples=None)
        cfg["training"].update(device="auto", batch_size=8, max_steps=steps, eval_every=0, mixed_precision="no")
        cfg["logging"]["memory"] = True  # memory.json's prediction carries the FLOPs of steps 1-2
        t0 = time.perf_counter()
        try:
            from minitune.run import train

            train(cfg)
            log = [json.loads(x) for x in (Path(cfg["training"]["output_dir"]) / "log.jsonl").read_text().splitlines()]
            log = [r for r in log if "tokens_per_s" in r]  # the training steps' records
            # each record's tokens_per_s: the tokens of its logging window over the window's time (its
            # "tokens" is the running total of real tokens)
            tokens_per_s = statistics.median(r["tokens_per_s"] for r in log[warmup:])
            per_token = flop_per_token(Path(cfg["training"]["output_dir"]))  # bench/speed.py's count
            achieved = tokens_per_s * per_token
            detail = (f"{tokens_per_s:,.0f} tokens/s (median of steps {warmup + 1}-{len(log)}), {achieved / 1e12:,.1f} "
                      f"TFLOP/s = {achieved / peak:.1%} of the measured peak"
                      + (f", {achieved / sheet:.1%} of the data sheet" if sheet else "")
                      + f"; {per_token / 1e9:,.2f} GFLOP/token (the planner's count of steps 1-2)")
            rows.append({"part": "speed", "name": name, "status": "measured", "detail": detail,
                         "seconds": time.perf_counter() - t0})
        except Exception as e:  # recorded, so that the other job still runs
            traceback.print_exc()
            rows.append({"part": "speed", "name": name, "status": f"FAILED: {type(e).__name__}",
                         "detail": str(e).splitlines()[0][:200] if str(e) else "", "seconds": time.perf_counter() - t0})
    return rows


def _num(v) -> str:
    try:
        return f"{float(v):,.0f}"
    except (TypeError, ValueError):
        return "-"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| part | check | status | detail | peak MiB | predicted MiB | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['name']} | {r['status']} | {r.get('detail', '')} | {_num(r.get('peak_mb'))} "
                     f"| {_num(r.get('predicted_mb'))} | {r.get('seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def write_results(args: argparse.Namespace, rows: list[dict], header: str) -> None:
    (args.out / f"{args.name}.md").write_text(markdown(rows, header))
    with open(args.out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["part", "name", "status", "detail", "peak_mb", "predicted_mb", "seconds"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on any device (checks the script)")
    p.add_argument("--timeout", type=float, default=300, help="seconds for each benchmark script")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--name", help="file stem (default gpu-<date>, or dry-run-<date>)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # the `process` part's fresh process: a job's config as JSON
    args = p.parse_args(argv)
    if args.child:
        _process_child(args.child)
        return 0
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        print(f"error: unknown part {unknown}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("error: no CUDA device is visible; run this on a GPU machine, or add --dry-run to check the script "
              "on this one", file=sys.stderr)
        return 2
    today = datetime.date.today().isoformat()
    args.name = args.name or (f"dry-run-{today}" if args.dry_run else f"gpu-{today}")
    args.out_dir = args.out
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
    command = f"python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    with tempfile.TemporaryDirectory(prefix="minitune-gpu-check-") as tmp:
        for i, part in enumerate(parts):
            print(f"== {part}", flush=True)
            folder = Path(tmp) / part
            folder.mkdir()
            try:
                new = globals()[f"part_{part}"](args, folder)
            except Exception as e:  # one broken part must not hide the others
                traceback.print_exc()
                new = [{"part": part, "name": part, "status": f"FAILED: {type(e).__name__}: {e}"[:200]}]
            for r in new:
                print(f"  {r['name']}: {r['status']} {r.get('detail', '')}", flush=True)
            rows += new
            # after every part: a run cut short by its time limit keeps what it measured
            failed = [r for r in rows if str(r["status"]).startswith("FAILED")]
            done = "" if i == len(parts) - 1 else f" (parts run so far: {', '.join(parts[:i + 1])})"
            header = (f"# GPU check ({today}, {gpu}, torch {torch.__version__}, {platform.machine()})\n\n"
                      f"`{command}` in {(time.perf_counter() - t0) / 60:.1f} min: {len(rows)} checks, "
                      f"{len(failed)} failed{done}.")
            write_results(args, rows, header)
    print(markdown(rows, header))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
