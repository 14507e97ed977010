"""The precision matrix: model.dtype x training.mixed_precision x training.loss x quantization x
gradient checkpointing, causal and seq2seq, through `train()` on tiny models.

Every cell either trains (finite losses that fall on a batch it sees at every step; LoRA adapters
and their optimizer state in float32; the weights in the dtype asked for, quantized where asked) or
is refused before any weights load with one message naming the fix. Which cells this CPU refuses
is written out here (`refused_on_cpu`), independently of minitune/device.py, so that a change to
the device table shows up as a failing cell; tests/test_device.py covers the table on CUDA and MPS.

The default run trains an all-pairs subset (every pair of settings appears in some cell); the slow
run (`make test-slow`) trains every cell.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

import minitune.run
from minitune.build import setup
from minitune.errors import ConfigError
from minitune.lm import unwrap
from minitune.memory import tensor_breakdown
from minitune.run import train

from .conftest import measured_config

ARCHS = ("tiny-llama", "tiny-t5")  # causal, seq2seq
DTYPES = ("float32", "bfloat16", "float16")
MIXED = ("no", "bf16", "fp16")
LOSSES = ("auto", "chunked", "full")
QUANTS = ("none", "8bit", "4bit-float32", "4bit-bfloat16", "4bit-float16")
CHECKPOINTING = (False, True)
FACTORS = (ARCHS, DTYPES, MIXED, LOSSES, QUANTS, CHECKPOINTING)
ALL_CELLS = list(itertools.product(*FACTORS))


def all_pairs(cells: list[tuple], factors: tuple) -> list[tuple]:
    """A small subset of `cells` in which every pair of values of two factors appears (greedy,
    deterministic): the default run's share of the matrix."""
    uncovered = {((i, a), (j, b)) for i, j in itertools.combinations(range(len(factors)), 2)
                 for a in factors[i] for b in factors[j]}

    def pairs(cell: tuple) -> set:
        return {((i, cell[i]), (j, cell[j])) for i, j in itertools.combinations(range(len(cell)), 2)}

    chosen = []
    while uncovered:
        best = max(cells, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


PAIRWISE = all_pairs(ALL_CELLS, FACTORS)


def refused_on_cpu(cell: tuple) -> str:
    """The part of the refusal message expected on this CPU ('' when the cell must train)."""
    _, dtype, mixed, _, quant, _ = cell
    halves = {dtype, {"bf16": "bfloat16", "fp16": "float16"}.get(mixed), quant.partition("-")[2]}
    if {"bfloat16", "float16"} <= halves:  # on any device: one 16-bit format per run
        return "mixes bfloat16 and float16"
    if mixed == "fp16":  # Accelerate would silently train in fp32: no fp16 autocast on CPU
        return "training.mixed_precision=fp16"
    return ""


def cell_config(cell: tuple, out) -> dict:
    """The tiny config of one cell (also used by bench/gpu_check.py on CUDA)."""
    arch, dtype, mixed, loss, quant, checkpointing = cell
    mode, _, compute = quant.partition("-")
    # 4 examples, batch 4: every step sees the same batch, so its loss must fall if the step trained
    return measured_config(
        arch, out,
        model={"dtype": dtype},
        quantization={"mode": mode, **({"compute_dtype": compute} if compute else {})},
        lora={"target_modules": ["all-linear"], "dropout": 0.0},
        data={"max_samples": 4, "validation_fraction": 0.0},
        optimizer={"lr": 1e-2},
        training={"max_steps": 5, "batch_size": 4, "mixed_precision": mixed, "loss": loss,
                  "gradient_checkpointing": checkpointing},
    )


def check_cell(cell: tuple, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    cfg = cell_config(cell, out)
    # the census below comes from the run's own model and optimizer: the memory measurements and
    # the planner's simulation (about 40% of a tiny cell's time) are not what a cell checks
    cfg["logging"]["memory"] = False
    built = []  # (model, optimizer) as setup built them (the run lets go of its model at the end)

    def setup_and_keep(config):
        parts = setup(config)
        built.append((parts.model, parts.optimizer))
        return parts

    monkeypatch.setattr(minitune.run, "setup", setup_and_keep)
    expected_refusal = refused_on_cpu(cell)
    if expected_refusal:
        with pytest.raises(ConfigError) as err:
            train(cfg)
        assert expected_refusal in str(err.value) and " use " in str(err.value), err.value
        assert not out.exists()  # refused before anything was written (or loaded)
        return
    result = train(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.01, losses  # the same batch every step: updates took
    _, dtype, mixed, _, quant, _ = cell
    assert (result.precision.dtype, result.precision.mixed_precision) == (dtype, mixed)
    # adapters and their optimizer state in fp32, whatever the frozen weights are
    adapter = load_file(str(result.checkpoint / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    state = torch.load(result.checkpoint / "training_state_0.pt", weights_only=False)["optimizer"]["state"]
    assert {v.dtype for s in state.values() for v in s.values() if torch.is_tensor(v) and v.ndim} == {torch.float32}
    # the frozen weights really are in the asked dtype, and quantized where asked (the tensors' census)
    model, optimizer = built[-1]
    census = tensor_breakdown(unwrap(model), optimizer)
    frozen = {k.split("/", 1)[1]: v for k, v in census.items() if k.startswith("frozen_weights/") and v}
    assert f"torch.{dtype}" in frozen, frozen
    if quant == "8bit":
        assert "torch.int8" in frozen, frozen
    elif quant.startswith("4bit"):
        assert "torch.uint8" in frozen, frozen


@pytest.mark.parametrize("cell", PAIRWISE, ids=lambda c: "-".join(map(str, c)))
def test_precision_cell(cell, tmp_path, monkeypatch):
    check_cell(cell, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("cell", [c for c in ALL_CELLS if c not in PAIRWISE], ids=lambda c: "-".join(map(str, c)))
def test_precision_cell_full_matrix(cell, tmp_path, monkeypatch):
    check_cell(cell, tmp_path, monkeypatch)


def test_pairwise_subset_covers_every_pair():
    assert len(PAIRWISE) < len(ALL_CELLS) / 10
    for i, j in itertools.combinations(range(len(FACTORS)), 2):
        seen = {(c[i], c[j]) for c in PAIRWISE}
        assert seen == set(itertools.product(FACTORS[i], FACTORS[j]))
