"""minitune.optim: decay groups, optimizers by name, warmup and schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minitune.config import OptimizerArgs
from minitune.optim import build_optimizer, build_scheduler, parameter_groups, warmup_steps


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_decay_for_biases_norms_and_frozen_weights_left_out():
    model = Block()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [id(p) for p in decay["params"]] == [id(model.proj.weight)]
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}


def test_optimizer_by_name_and_no_trainable_parameters_refused():
    model = Block()
    opt = build_optimizer(model, OptimizerArgs(name="adamw", lr=1e-3, weight_decay=0.01))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-3
    assert isinstance(build_optimizer(model, OptimizerArgs(name="sgd", lr=0.1)), torch.optim.SGD)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimizerArgs())


def test_warmup_steps_win_over_the_ratio_and_the_schedule_follows():
    assert warmup_steps(OptimizerArgs(warmup_steps=3, warmup_ratio=0.5), 10) == 3
    assert warmup_steps(OptimizerArgs(warmup_ratio=0.25), 10) == 3  # rounded up
    opt = build_optimizer(Block(), OptimizerArgs(lr=1.0))
    sched = build_scheduler(opt, OptimizerArgs(lr=1.0, scheduler="linear", warmup_steps=2), total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
