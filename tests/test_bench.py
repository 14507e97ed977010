"""Smoke tests of the memory benchmark (bench/memory_grid.py): one tiny cell end to end next to one
that runs out of memory, and cells that fail or run too long recorded instead of stopping the grid."""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys

import pytest

from .conftest import REPO


def _grid_module():
    spec = importlib.util.spec_from_file_location("memory_grid", REPO / "bench" / "memory_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~25 s on 2 cores: a grid run and each cell in a process of its own
def test_one_tiny_cell_writes_tables_and_plots(tmp_path):
    # with the full loss, batch 20000 x 16 tokens asks for 64 GB of logits at once: the CPU allocator
    # refuses, the cell is recorded as OOM and the grid goes on
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memory_grid.py"), "--grid", "smoke", "--methods", "lora",
         "--loss", "full", "--batch-sizes", "2,20000", "--parts", "grid", "--out", str(tmp_path), "--name", "smoke"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for suffix in (".md", ".csv", ".json", "-peak.png", "-steps.png"):
        assert (tmp_path / f"smoke{suffix}").stat().st_size > 0, suffix
    with open(tmp_path / "smoke.csv") as f:
        row, oom = list(csv.DictReader(f))
    assert row["status"] == "ok", row
    assert oom["status"] == "OOM" and oom["batch_size"] == "20000" and "can't allocate memory" in oom["note"], oom
    # tiny-llama: 2 layers, hidden 32, 4 heads of 8, 2 KV heads; LoRA r=8 on q_proj (32->32) and v_proj (32->16)
    assert int(row["trainable_params"]) == 2 * 8 * ((32 + 32) + (32 + 16))
    assert float(row["peak_train_mb"]) > 0 and float(row["predicted_mb"]) > 0 and float(row["step_s"]) > 0
    # each part of the breakdown against a count made here from the model itself (the activations
    # are the peak minus these by construction, so they are only checked to lie inside the peak)
    from minitune.config import ModelArgs
    from minitune.model import build_from_config

    total = sum(p.numel() for p in build_from_config(ModelArgs(preset="tiny-llama")).parameters())
    trainable, mib = 2 * 8 * ((32 + 32) + (32 + 16)), 2**20
    assert int(row["total_params"]) == total + trainable
    assert float(row["weights_mb"]) == pytest.approx(total * 4 / mib, abs=1e-4)  # frozen, fp32
    assert float(row["trainable_grads_mb"]) == pytest.approx(2 * trainable * 4 / mib, abs=1e-4)  # weights + grads
    assert float(row["optimizer_mb"]) == pytest.approx(2 * trainable * 4 / mib, abs=1e-3)  # AdamW: 2 fp32 moments
    assert 0 < float(row["activations_mb"]) < float(row["peak_train_mb"])
    md = (tmp_path / "smoke.md").read_text()
    assert "peak held by the CPU allocator" in md and "| tiny-llama | LoRA | 2x16 | ok |" in md
    assert "| tiny-llama | LoRA | 20000x16 | OOM |" in md


def test_the_grid_says_how_far_the_process_is_above_its_tensors():
    grid = _grid_module()
    cell = {"group": "grid", "model": "m", "status": "ok", "baseline_mb": 500.0}
    rows = [{**cell, "method": "a", "rss_peak_mb": 1100.0, "peak_train_mb": 400.0, "process_peak_mb": 1000.0},
            {**cell, "method": "b", "rss_peak_mb": 800.0, "peak_train_mb": 250.0, "process_peak_mb": 840.0},
            {**cell, "method": "oom", "status": "OOM"}]
    line = grid.process_summary({"rows": rows})
    # a: (1100 - 500) / 400 = 1.50 (the worst); b: 1.20. process_peak: a -9.1%, b +5.0%
    assert "over 2 grid cells" in line and "at most 1.50x the allocator's peak (m / a)" in line, line
    assert "worst -9.1% (m / a)" in line, line
    assert grid.process_summary({"rows": rows[2:]}) == ""


def test_failed_and_slow_cells_are_recorded_not_raised():
    grid = _grid_module()
    res = grid.run_cell({"model": "no-such-preset"}, timeout=120)
    assert res["status"].startswith("error: KeyError") and "no-such-preset" in res["status"]
    res = grid.run_cell({"model": "tiny-llama", "steps": 10**6}, timeout=1)
    assert res["status"] == "timeout (> 1 s)"


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA device") and "--dry-run" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_check_process_part_dry_run_plans_the_cuda_terms(tmp_path):
    import argparse

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    (row,) = check.part_process(argparse.Namespace(dry_run=True, timeout=60), tmp_path)
    assert row["status"] == "planned (dry run: nothing measured)" and row["name"] == "tiny-llama 8bit"
    assert "reserved" in row["detail"] and "context" in row["detail"]
    # the process: the context, cuBLAS's two T4 workspaces, tensors and the allocator's cache, above 300 MiB
    assert row["predicted_mb"] > 300
    # a GPU's row: each measured figure against its prediction (allocated: tensors + workspaces, reserved:
    # + the cache, the driver's view: + the context)
    measured = {"allocated": 1.1 * 2**30, "reserved": 2**31, "context": 2**28, "driver": 2**31 + 2**28,
                "outside_after": 2**28}
    predicted = {"cuda_context": 2**28, "cublas_workspace": 2**29, "tensors": 2**29, "allocator_cache": 2**30}
    row = check._process_row("job", predicted, measured, 1.0)
    assert row["status"] == "measured" and row["detail"].count("(+0.0%)") == 3
    assert "max_memory_allocated 1,126 vs 1,024 predicted (+10.0%)" in row["detail"]
    # what the driver showed beyond the reserve after training (context and kernels) against the context term
    row = check._process_row("job", predicted, {**measured, "outside_after": 2**28 + 2**26}, 1.0)
    assert "context (mem_get_info at start) + kernels 320 vs 256 predicted (+25.0%)" in row["detail"]
    assert row["detail"].endswith("context alone at start 256")
    # a training row's prediction is what max_memory_allocated reads: on CUDA, cuBLAS's workspaces too
    assert check._predicted_allocated({"total": 2**20, "cuda": {"cublas_workspace": 64 * 2**20}}) == 65
    assert check._predicted_allocated({"total": 2**20, "cuda": {}}) == 1 and check._predicted_allocated(None) is None


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part(tmp_path):
    # ~2-3 min on 2 quiet cores: the CPU path of the script that `make gpu-check` runs on a GPU
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                           "--name", "dry"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "dry.csv") as f:
        rows = list(csv.DictReader(f))
    parts = {r["part"] for r in rows}
    assert parts == {"auto", "matrix", "optimizers", "memory", "trainer", "process", "speed"}
    (speed,) = [r for r in rows if r["part"] == "speed" and r["status"] == "measured"]
    assert "tokens/s" in speed["detail"] and "of the measured peak" in speed["detail"]
    assert not [r for r in rows if r["status"].startswith("FAILED")]
    assert sum(r["status"] == "trained" for r in rows) >= 5  # auto, 2 matrix cells, 2 optimizer runs
    assert any(r["part"] == "memory" and r["status"] == "ok" for r in rows)
    assert (tmp_path / "dry-trainer.md").stat().st_size and (tmp_path / "dry-memory.md").stat().st_size


@pytest.mark.slow  # ~23 s on 2 cores: each job in a process of its own
def test_precision_bench_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "precision.py"), "--dry-run", "--jobs", "bloom-560m",
                           "--precisions", "fp32,auto", "--out", str(tmp_path), "--name", "p"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "p.csv") as f:
        fp32, auto = list(csv.DictReader(f))
    assert (fp32["precision"], fp32["dtype"], fp32["mixed_precision"], fp32["speedup_vs_fp32"]) == \
        ("fp32", "float32", "no", "1.0")
    assert auto["status"] == "ok" and float(auto["tokens_per_s"]) > 0 and float(auto["eval_loss"]) > 0
    assert "python bench/precision.py --dry-run" in (tmp_path / "p.md").read_text()


@pytest.mark.slow  # ~30 s on 2 cores: one tiny job in a process of its own
def test_speed_bench_reports_achieved_flops_against_the_probed_peak(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), "--jobs", "tiny-llama", "--steps", "4",
                           "--warmup", "1", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "s.csv") as f:
        (row,) = list(csv.DictReader(f))
    tokens_per_s, per_token, peak = float(row["tokens_per_s"]), float(row["flop_per_token"]), float(row["peak_gflops"])
    assert tokens_per_s > 0 and per_token > 0 and peak > 0
    assert float(row["achieved_gflops"]) == pytest.approx(tokens_per_s * per_token / 1e9, rel=0.01)
    assert float(row["fraction"]) == pytest.approx(float(row["achieved_gflops"]) / peak, rel=0.02)
    assert "python bench/speed.py --jobs tiny-llama" in (tmp_path / "s.md").read_text()


def test_replan_gpu_predicts_the_measured_cells_of_a_memory_table_again(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("replan_gpu", REPO / "bench" / "replan_gpu.py")
    replan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replan)
    table = tmp_path / "run-memory.md"
    table.write_text("| model | method | batch x seq | status | trainable | trainable % | peak MiB | predicted MiB |\n"
                     "|---|---|---|---|---|---|---|---|\n"
                     "| tiny-llama | LoRA | 2x16 | ok | 1 | 0.1 | 50.0 | 40.0 |\n"
                     "| tiny-llama | full fine-tuning | 2x16 | timeout (> 5 s) | | | | |\n")
    assert replan.main([str(table), "--out", str(tmp_path / "out.md")]) == 0
    (row,) = [line for line in (tmp_path / "out.md").read_text().splitlines() if line.startswith("| tiny-llama")]
    cols = [c.strip() for c in row.strip("|").split("|")]
    now = float(cols[5].replace(",", ""))
    assert cols[:5] == ["tiny-llama", "LoRA", "2x16", "50", "40"] and now > 0
    assert float(cols[6]) == pytest.approx(50.0 / now, rel=0.05)  # "now" is shown rounded to MiB
    table.write_text("no table here\n")
    assert replan.main([str(table)]) == 2 and "error: no measured cells" in capsys.readouterr().err


@pytest.mark.slow  # ~25 s on 2 cores: two tiny runs, each a process of its own
def test_profiler_cost_alternates_runs_with_the_memory_profiler_on_and_off(tmp_path):
    import yaml

    from .conftest import tiny_config

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config("tiny-llama", tmp_path / "unused")))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "profiler_cost.py"), "--config", str(config),
                           "--steps", "3", "--pairs", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[2].strip() for r in rows] == ["on", "off"], proc.stdout
    assert all(float(r.split("|")[7]) > 0 for r in rows)  # a peak RSS read for each run
    assert "steps after the trace" in proc.stdout
    assert re.search(r"step\(\) \d+ us, phase\(\) \d+ us", proc.stdout), proc.stdout  # its calls, timed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2 and /proc/self/smaps: Linux only")
def test_heap_stats_runs_a_grid_cell_and_shows_the_heap_at_each_phase():
    # ~15 s: the cell restarts itself with glibc's thread cache off, as train.py does
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "heap_stats.py"), "--cell",
                           '{"model": "tiny-llama", "steps": 2}'], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    phases = [line.split(":")[0] for line in lines if line.startswith("heap at")]
    assert phases[:2] == ["heap at phase start", "heap at phase load"] and "heap at phase backward" in phases, phases
    resident = [int(m) for m in re.findall(r"main heap resident (\d+)", proc.stdout)]
    assert len(re.findall(r"file-backed \d+$", proc.stdout, re.M)) == len(phases)
    rss = [int(m) for m in re.findall(r": RSS (\d+) MiB", proc.stdout)]
    assert len(resident) == len(rss) == len(phases) and all(0 < h <= r for h, r in zip(resident, rss, strict=True))
    above, peak, ratio = re.search(r"peak RSS above the baseline ([\d.]+) MiB, allocator's training peak ([\d.]+) "
                                   r"MiB: ([\d.]+)x", lines[-1]).groups()
    assert float(peak) > 0 and abs(float(above) / float(peak) - float(ratio)) < 0.01


def test_heap_stats_refuses_a_cell_without_its_spec():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "heap_stats.py"), "--cell"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --cell takes one cell spec"), proc.stderr[-500:]
