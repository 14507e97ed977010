"""The public API, used the way an embedding codebase uses it: each README example in examples/ runs
as a fresh script from a folder outside the package, and `import minitune` stays light."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import minitune

from .conftest import REPO

EXAMPLES = REPO / "examples"


def run_example(name: str, cwd: Path, *args: str, timeout: int = 300) -> str:
    """Run examples/<name> in `cwd` (outside the repo) and return its stdout; fail with its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_is_light_and_has_no_side_effects(tmp_path):
    probe = (
        "import logging, os, sys, warnings\n"
        "env, handlers, filters = dict(os.environ), list(logging.root.handlers), list(warnings.filters)\n"
        "import minitune\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'bitsandbytes',"
        " 'datasets', 'accelerate', 'yaml', 'rich', 'tqdm'})\n"
        "print(heavy, dict(os.environ) == env, logging.root.handlers == handlers, warnings.filters == filters)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True True True", out.stdout + out.stderr


def test_public_surface_is_listed_typed_and_documented():
    for name in minitune.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(minitune, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{name} has no docstring"
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            untyped = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty]
            assert not untyped and sig.return_annotation is not inspect.Signature.empty, (name, untyped)
            for section in ("Args:", "Returns:", "Raises:"):
                assert section in doc, f"{name}: no {section} section"


def test_train_from_python_with_a_yaml_path_and_a_dict(tmp_path):
    out = run_example("01_train_from_python.py", tmp_path, str(tmp_path / "runs"))
    for source in ("from-yaml", "from-dict"):
        run = tmp_path / "runs" / source
        assert (run / "final" / "adapter_model.safetensors").is_file()
        steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6]
    assert f"adapter in {tmp_path / 'runs' / 'from-dict' / 'final'}" in out
    assert "dict: trainable params: 896 || all params: 1,627,712" in out  # LoRA r=4 on q,v of tiny-llama
    assert "peak memory" in out


def test_own_model_data_and_optimizer_checkpoint_and_resume_exactly(tmp_path):
    """A plain nn.Module through `fit`: 20 + 20 steps in two processes (the second resumes from the
    checkpoint) end with the same weights, bit for bit, as 40 steps in one."""
    split, whole = tmp_path / "split", tmp_path / "whole"
    first = run_example("02_own_model_data_optimizer.py", tmp_path, str(split), "20")
    second = run_example("02_own_model_data_optimizer.py", tmp_path, str(split), "20")
    run_example("02_own_model_data_optimizer.py", tmp_path, str(whole), "40")
    assert "resuming" not in first and "resuming from checkpoint-000020 at step 20" in second
    a = load_file(split / "checkpoint-000040" / "model.safetensors")
    b = load_file(whole / "checkpoint-000040" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (split, whole)]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]
    losses = [r["loss"] for r in logs[1]]
    assert losses[-1] < 0.1 * losses[0]  # it learned
    assert all("mem/peak_rss_mb" in r and "tokens_per_s" not in r for r in logs[1])  # no token data here
    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-000030", "checkpoint-000040"]


def test_prepare_only_then_transformers_trainer(tmp_path):
    out = run_example("03_prepare_only.py", tmp_path, str(tmp_path / "trainer"))
    # tiny Llama (vocab 256, h 64, 2 layers, 4 heads of 16, 2 KV heads); LoRA r=8 on q (64->64), v (64->32)
    assert "trainable params: 3,584 || all params: 110,400 || trainable%: 3.2464" in out
    # 5 RMSNorms of 64 weights (2 per layer + the final one), bf16 -> fp32: 2 more bytes each
    assert "fp32 norm casting: 320 parameters in 5 modules, +640 bytes" in out
    assert "gradient checkpointing: True" in out and "Trainer took 4 steps" in out


def test_memory_profiler_alone_in_a_plain_loop(tmp_path):
    out = run_example("04_memory_profiler_only.py", tmp_path, str(tmp_path / "prof"))
    summary = json.loads((tmp_path / "prof" / "memory.json").read_text())
    assert [r["step"] for r in summary["records"]] == [1, 2, 3, 4, 5, 6]
    assert all(r["mem/peak_rss_mb"] >= r["mem/rss_mb"] > 0 for r in summary["records"])
    assert set(summary["phases"]) == {"model loaded", "forward", "backward"}
    # 512x2048 + 2048 + 2048x512 + 512 fp32 weights = 8.0 MiB; as much gradient; AdamW: two moments
    # per weight and a 4-byte step counter per parameter tensor
    b = summary["breakdown"]
    weights = (512 * 2048 + 2048 + 2048 * 512 + 512) * 4
    assert (b["trainable_weights"], b["gradients"], b["optimizer_state/32bit"]) == (weights, weights,
                                                                                    2 * weights + 4 * 4)
    assert "optimizer_state/32bit" in out and "activations_and_temporaries" in out


def test_memory_profiler_module_needs_only_torch(tmp_path):
    probe = ("import sys; import minitune.memory as m\n"
             "p = m.MemoryProfiler('cpu').start(); p.step(1); p.stop()\n"
             "print(sorted({k.split('.')[0] for k in sys.modules} & {'transformers', 'accelerate', 'peft', "
             "'bitsandbytes', 'datasets', 'yaml'}))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_on_step_callback_logs_and_stops_early(tmp_path):
    out = run_example("05_on_step_callback.py", tmp_path, str(tmp_path / "cb"))
    line = next(x for x in out.splitlines() if x.startswith("callback saw"))
    seen = ast.literal_eval(line.removeprefix("callback saw "))  # a printed list of (step, loss)
    logged = [json.loads(x) for x in (tmp_path / "cb" / "log.jsonl").read_text().splitlines()]
    assert [s for s, _ in seen] == [1, 2, 3] == [r["step"] for r in logged]
    assert [loss for _, loss in seen] == [round(r["loss"], 4) for r in logged]
    assert "stopped at step 3 (callback)" in out
    assert (tmp_path / "cb" / "final" / "adapter_model.safetensors").is_file()


def test_will_it_fit_from_python(tmp_path):
    out = run_example("06_will_it_fit.py", tmp_path)
    lines = out.splitlines()
    assert lines[0].startswith("T4: ") and lines[0].endswith("fits: True"), out
    roles = ast.literal_eval(lines[1])
    assert {"weights/float16", "adapters", "activations", "logits/loss"} <= set(roles)  # a T4 gets fp16 weights
    assert lines[2].startswith("over budget: first change that fits: "), out
    assert "own model, 16 x 128 tokens:" in lines[3] and lines[3].endswith("pass"), out


def test_prepare_model_rejects_a_bad_lora_dict():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(minitune.ConfigError, match=r"unknown key 'lora.rank' \(did you mean 'r'\?\)"):
        minitune.prepare_model(model, {"rank": 8})  # "rank": what the key is called elsewhere
    with pytest.raises(minitune.ConfigError, match=r"lora.dropout=1.0 must be in \[0, 1\)"):
        minitune.prepare_model(model, {"r": 8, "dropout": 1.0})
