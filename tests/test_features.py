"""Documented features, each run and checked for its effect: --help-config, per-module gradient
norms, memory phases, trackers, fused AdamW, rsLoRA / DoRA / bias, 4-bit skip_modules and
compute_dtype, packing and length grouping through `train()`, eval's --prompts / --split /
--no-sheet; and (slow) torch.compile, bench/compare_trainer.py and the default GGUF job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from minitune.cli import main_eval, main_train
from minitune.config import ModelArgs, OptimizerArgs, QuantizationArgs
from minitune.errors import ConfigError
from minitune.run import train

from .conftest import REPO, cli_in_process, measured_config, simulated, tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}


def _run(*args, timeout=300):
    """A script as a real process (the slow tests); train.py's and eval.py's entry points are called
    in this process (conftest.cli_in_process), their scripts run as processes in test_train and
    test_evaluate."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_help_config_lists_every_key_with_its_default_and_help(capsys, monkeypatch):
    import dataclasses

    from minitune.config import Config

    proc = cli_in_process(main_train, ["--help-config"], capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr
    listed: dict[str, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            section = listed.setdefault(line[:-1], {})
        elif line.startswith("  ") and ": " in line:
            key, rest = line.strip().split(": ", 1)
            section[key] = rest
    for sec in dataclasses.fields(Config):
        keys = {f.name: f for f in dataclasses.fields(sec.default_factory)}
        assert set(listed[sec.name]) == set(keys), sec.name
        for name, f in keys.items():
            default, _, help_text = listed[sec.name][name].partition("  # ")
            assert help_text.strip(), f"{sec.name}.{name} has no help"
            if f.default is not dataclasses.MISSING:
                assert default == repr(f.default), (sec.name, name, default)


def test_module_grad_norms_show_lora_b_alone_moving_at_step_one(tmp_path):
    """At step 1 lora_B is zero, so lora_A gets no gradient: a real per-module norm shows exactly that."""
    out = tmp_path / "run"
    train(tiny_config("tiny-llama", out, training={"max_steps": 2, "mixed_precision": "no"}, model={"dtype": "float32"},
                      logging={"module_grad_norms": True}))
    first, second = _log(out)
    a = {k: v for k, v in first.items() if k.startswith("grad_norm/") and k.endswith("lora_A")}
    b = {k: v for k, v in first.items() if k.startswith("grad_norm/") and k.endswith("lora_B")}
    assert len(a) == len(b) == 4  # 2 layers x q_proj, v_proj
    assert all(v == 0 for v in a.values()) and all(v > 0 for v in b.values()), first
    assert all(second[k] > 0 for k in a)  # once B has moved, A gets a gradient too
    # the total gradient norm is the norm of the per-module norms
    assert math.hypot(*b.values()) == pytest.approx(first["grad_norm"], rel=1e-3)


def test_memory_phases_every(tmp_path, monkeypatch):
    from minitune.memory import MemoryProfiler

    names: list[str] = []
    original = MemoryProfiler.phase
    monkeypatch.setattr(MemoryProfiler, "phase", lambda self, name: (names.append(name), original(self, name))[1])
    train(measured_config("tiny-llama", tmp_path / "run", training={"max_steps": 6}, logging={"memory_phases_every": 3}))
    assert names.count("forward") == names.count("backward") == names.count("optimizer") == 2  # steps 3 and 6
    phases = json.loads((tmp_path / "run" / "memory.json").read_text())["phases"]
    assert {"start", "load", "lora", "forward", "backward", "optimizer"} <= set(phases)


def test_trackers_receive_every_logged_step_and_a_missing_one_is_refused(tmp_path, monkeypatch):
    import accelerate.tracking as tracking
    from accelerate.utils import LoggerType

    with pytest.raises(ConfigError, match="'tensorboard' is not installed"):  # not in this environment
        train(tiny_config("tiny-llama", tmp_path / "x", logging={"trackers": ["tensorboard"]}))
    with pytest.raises(ConfigError, match=r"logging.trackers\[0\]='tensorbored' is not one of"):  # config check
        train(tiny_config("tiny-llama", tmp_path / "x", logging={"trackers": ["tensorbored"]}))
    assert not (tmp_path / "x").exists()

    logged: list[tuple[int, dict]] = []

    class FakeBoard(tracking.GeneralTracker):  # stands in for tensorboard
        name, requires_logging_directory, main_process_only = "tensorboard", True, True

        def __init__(self, run_name, logging_dir=None, **kwargs):
            super().__init__()
            self.run_name = run_name

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            logged.append((-1, values))

        def log(self, values, step=None, **kwargs):
            logged.append((step, values))

    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeBoard)
    train(tiny_config("tiny-llama", tmp_path / "run", training={"max_steps": 3}, logging={"trackers": ["tensorboard"]}))
    assert logged[0][0] == -1 and logged[0][1]["lora.r"] == 4  # the flat config
    assert [s for s, _ in logged[1:]] == [1, 2, 3]
    assert [v["loss"] for _, v in logged[1:]] == pytest.approx([r["loss"] for r in _log(tmp_path / "run")], rel=1e-5)


def test_fused_adamw_is_built_and_trains_like_the_unfused_one(tmp_path, monkeypatch):
    from minitune.device import capabilities
    from minitune.optim import build_optimizer

    fused = build_optimizer(nn.Linear(4, 4), OptimizerArgs(fused=True), "cpu")
    assert fused.defaults["fused"] is (True if capabilities("cpu").fused_adamw else None)
    assert build_optimizer(nn.Linear(4, 4), OptimizerArgs(), "cpu").defaults["fused"] is None
    # the run's optimizer steps go through torch's fused kernel exactly when optimizer.fused asks for it
    # (the planner's simulated steps on fake tensors are not counted)
    fused_steps = []
    kernel = torch._fused_adamw_

    def counting_kernel(params, *args, **kwargs):
        if not any(simulated(p) for p in params):
            fused_steps.append(len(params))
        return kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting_kernel)
    runs = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        fused_steps.clear()
        train(tiny_config("tiny-llama", out, training={"max_steps": 3}, optimizer={"fused": flag},
                          model={"dtype": "float32"}))
        runs[flag] = [r["loss"] for r in _log(out)]
        expected = 3 if flag and capabilities("cpu").fused_adamw else 0
        assert len(fused_steps) == expected, (flag, fused_steps)
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_rslora_dora_and_bias_reach_the_adapter(tmp_path):
    from peft import PeftModel

    from minitune.model import build_from_config

    result = train(tiny_config("tiny-llama", tmp_path / "run", training={"max_steps": 2},
                               lora={"r": 4, "alpha": 8, "use_rslora": True, "use_dora": True, "bias": "lora_only"}))
    saved = json.loads((result.checkpoint / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["use_dora"] is True and saved["bias"] == "lora_only"
    model = PeftModel.from_pretrained(build_from_config(ModelArgs(preset="tiny-llama")), result.checkpoint)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r), not alpha / r
    assert "default" in q.lora_magnitude_vector  # DoRA's magnitude
    trained = result.trainable_line
    plain = train(tiny_config("tiny-llama", tmp_path / "plain", training={"max_steps": 1}, lora={"r": 4, "alpha": 8}))
    assert trained != plain.trainable_line  # DoRA magnitudes and biases are trainable too


def test_4bit_skip_modules_and_compute_dtype():
    import bitsandbytes as bnb

    from minitune.model import load_model

    model = load_model(ModelArgs(preset="tiny-llama"), QuantizationArgs(mode="4bit", compute_dtype="bfloat16",
                                                                        skip_modules=["v_proj", "lm_head"]))
    attn = model.model.layers[0].self_attn
    assert type(attn.v_proj) is nn.Linear  # kept in full precision
    assert isinstance(attn.q_proj, bnb.nn.Linear4bit) and attn.q_proj.compute_dtype == torch.bfloat16


def _recorded_batches(monkeypatch) -> list[tuple[int, int]]:
    """(positions, real tokens) of every batch the collator builds from now on."""
    from minitune.data import Collator

    seen: list[tuple[int, int]] = []
    original = Collator.__call__

    def record(self, examples):
        batch = original(self, examples)
        seen.append((batch["input_ids"].numel(), int(batch["attention_mask"].sum())))
        return batch

    monkeypatch.setattr(Collator, "__call__", record)
    return seen


def test_packing_cuts_padding_through_train(tmp_path, monkeypatch):
    padding = {}
    for packing in (False, True):
        seen = _recorded_batches(monkeypatch)
        result = train(tiny_config("tiny-llama", tmp_path / str(packing), data={"packing": packing, "max_length": 128,
                                                                                "mask_prompt": True},
                                   training={"max_steps": 3, "batch_size": 2}))
        monkeypatch.undo()
        assert result.state.tokens == sum(real for _, real in seen[:3])  # real tokens counted, not positions
        padding[packing] = sum(n - real for n, real in seen[:3]) / sum(n for n, _ in seen[:3])
    assert padding[True] < padding[False] / 2, padding


def test_length_grouping_cuts_padding_through_train(tmp_path, monkeypatch):
    padding = {}
    for group in (False, True):
        seen = _recorded_batches(monkeypatch)
        train(tiny_config("tiny-llama", tmp_path / str(group), data={"group_by_length": group, "max_samples": 48},
                          training={"max_steps": 6, "batch_size": 4, "eval_batches": 1}))
        monkeypatch.undo()
        padding[group] = sum(n - real for n, real in seen[:6])
    assert padding[True] < padding[False] / 2, padding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "run"
    return train(tiny_config("tiny-llama", out, training={"max_steps": 2})).checkpoint


def test_eval_prompts_split_and_no_sheet(checkpoint, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt ->: \nsecond prompt ->: \n")
    proc = cli_in_process(main_eval, ["-p", str(checkpoint), "--out", str(tmp_path / "ev"), "--prompts", str(prompts),
                                      "--split", "train", "--max-samples", "5", "--max-new-tokens", "3", "--no-sheet"],
                          capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [g["prompt"] for g in saved["generations"]] == ["first prompt ->: ", "second prompt ->: "]
    assert saved["data"]["rows"] == 5
    assert not list((tmp_path / "ev").glob("human_eval*"))
    # --split train reads the training rows: held out by default, these are others
    held_out = cli_in_process(main_eval, ["-p", str(checkpoint), "--out", str(tmp_path / "ev2"), "--max-samples", "5",
                                          "--num-prompts", "0", "--no-sheet"], capsys, monkeypatch)
    assert held_out.returncode == 0, held_out.stderr[-2000:]
    other = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert other["perplexity"]["tuned"]["tokens"] != saved["perplexity"]["tuned"]["tokens"]


@pytest.mark.slow  # torch.compile on CPU: inductor builds C++ kernels (a minute or more)
def test_compile_trains_like_eager(tmp_path):
    """training.compile=true trains through graphs torch.compile captured (none without it), to the
    same losses as eager."""
    from torch._dynamo.utils import counters

    runs = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        torch._dynamo.reset()
        counters.clear()
        train(tiny_config("tiny-llama", out, training={"max_steps": 2, "compile": flag}, model={"dtype": "float32"}))
        runs[flag] = [r["loss"] for r in _log(out)]
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) if flag else graphs == 0, (flag, dict(counters["stats"]))
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


@pytest.mark.slow  # two processes per side, tiny model
@pytest.mark.parametrize("precision", ["defaults", "bf16-weights"])
def test_compare_trainer_smoke(tmp_path, precision):
    proc = _run("bench/compare_trainer.py", "--rows", "tiny-llama", "--variants", "trainer,minitune", "--repeats", "1",
                "--steps", "2", "--warmup", "1", "--samples", "40", "--precision", precision,
                "--out", str(tmp_path / "cmp"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "cmp.md").read_text()
    assert "| tiny-llama | trainer |" in md and "| tiny-llama | minitune |" in md
    assert f"precision {precision}" in md
    import csv

    lines = (tmp_path / "cmp.csv").read_text().splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))  # the command comes first
    assert len(rows) == 2
    for row in rows:  # the process's peak RSS covers training's, which is counted above the RSS before it
        assert float(row["peak_rss_mb"]) > float(row["train_rss_delta_mb"]) >= 0, row


@pytest.mark.slow  # the default job (SmolLM2-135M from its GGUF file), 2 steps instead of 40
def test_default_gguf_job_short(tmp_path):
    out = tmp_path / "smollm2"
    proc = _run("train.py", "--config", "configs/smollm2-quotes.yaml", f"training.output_dir={out}",
                "training.max_steps=2", "training.eval_every=0", "logging.progress=none", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in _log(out)]
    # real pretrained weights: far below ln(49152) = 10.8 of an untrained model
    assert len(losses) == 2 and all(2 < x < 7 for x in losses), losses
    assert (out / "final" / "adapter_model.safetensors").is_file()
