"""minitune.build: the setup_* builders that train, evaluate_checkpoint and bench/ share."""

from __future__ import annotations

import pytest
import torch

from minitune.build import (
    Parts,
    loop_args,
    setup,
    setup_accelerator,
    setup_data,
    setup_model,
)
from minitune.config import load_config, with_split
from minitune.device import setup_device
from minitune.errors import ConfigError
from minitune.loop import LoopArgs
from minitune.model import load_tokenizer

from .conftest import measured_config, tiny_config


def test_setup_device_checks_the_config_against_the_device():
    cfg = load_config(tiny_config(training={"device": "cpu"}, model={"dtype": "auto"}))
    resolved, where = setup_device(cfg)
    assert where.device == torch.device("cpu") and isinstance(where.notes, list)
    assert cfg.model.dtype == "auto" and resolved.model.dtype == where.precision.dtype != "auto"
    with pytest.raises(ConfigError, match="fp16"):
        setup_device(load_config(tiny_config(training={"device": "cpu", "mixed_precision": "fp16"})))


def test_loop_args_take_the_training_and_logging_sections():
    cfg = load_config(tiny_config(training={"grad_accum": 3, "max_grad_norm": 0.5, "eval_every": 4, "save_every": 2,
                                            "max_bad_steps": 7, "eval_batches": 0},
                                  logging={"log_every": 5, "module_grad_norms": True}))
    assert loop_args(cfg, 11) == LoopArgs(max_steps=11, grad_accum=3, max_grad_norm=0.5, log_every=5, eval_every=4,
                                          eval_batches=0, save_every=2, max_bad_steps=7, module_grad_norms=True)


def test_with_split_returns_a_new_config():
    cfg = load_config(tiny_config(training={"batch_size": 8}))
    smaller = with_split(cfg, 2, 4)
    assert (smaller.training.batch_size, smaller.training.grad_accum) == (2, 4)
    assert (cfg.training.batch_size, cfg.training.grad_accum) == (8, 1)
    assert smaller.model == cfg.model and smaller.training.seed == cfg.training.seed


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-t5"])
def test_setup_data_and_model_follow_the_model_kind(preset):
    cfg = load_config(tiny_config(preset, lora={"target_modules": ["all-linear"]}))
    data = setup_data(cfg, load_tokenizer(cfg.model))
    assert data.collator.seq2seq == (preset == "tiny-t5") and len(data.train) > 0
    phases: list[str] = []
    model, report = setup_model(cfg, torch.device("cpu"), on_phase=phases.append)
    assert phases == ["load", "prepare", "lora"]
    assert report.lora_targets and 0 < report.trainable < report.total
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_setup_builds_every_part(tmp_path):
    cfg = load_config(measured_config(output_dir=tmp_path / "run", training={"max_steps": 3}))
    parts = setup(cfg)
    try:
        assert isinstance(parts, Parts) and parts.total_steps == 3 and parts.state.step == 0
        assert parts.eval_loader is not None and parts.resume_from is None
        assert (tmp_path / "run" / "config.yaml").is_file()
        assert sorted(parts.prep.lora_targets) == ["q_proj", "v_proj"]  # tiny-llama's default targets
        assert parts.predicted.total > parts.predicted.breakdown["weights/float32"] > 0
        accelerator = setup_accelerator(cfg, torch.device("cpu"))
        assert accelerator.device == torch.device("cpu")
    finally:
        parts.logger.close()
        parts.profiler.stop()
