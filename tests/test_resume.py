"""Exact resume: a run interrupted at any step and resumed ends bitwise equal to the uninterrupted one.

The reference run crosses an epoch boundary with a short last accumulation window (5 batches per
epoch, grad_accum 2: windows of 2, 2, 1), uses LoRA dropout (the RNG must be restored), a linear
schedule with warmup (the scheduler state must be restored) and logs every 2 steps (sums pending
between two logs must be restored). Checkpoints are taken at every step; a resumed run starts from a
copy of one of them, with the reference's log.jsonl (which also holds the records written after that
checkpoint, as an interrupted run's would), and must end with the same adapter and the same log.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from minitune.build import setup
from minitune.checkpoint import clean_debris, find_latest, list_checkpoints
from minitune.config import Config, load_config
from minitune.errors import CheckpointError
from minitune.resume import RESUME_FREE, RESUME_REFUSED, resolve_resume
from minitune.run import train

from .conftest import simulated, tiny_config

STEPS = 5


def exact_config(out, **sections) -> dict:
    cfg = tiny_config(
        "tiny-llama", out,
        lora={"dropout": 0.1},
        data={"max_samples": 10},
        optimizer={"scheduler": "linear", "warmup_steps": 1},
        training={"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "save_every": 1, "keep_last": 0,
                  "eval_batches": 1},
        logging={"log_every": 2},
    )
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def weights(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / "adapter_model.safetensors"
    return load_file(f if f.exists() else folder / "model.safetensors")


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max().item():.3g}"


def log_records(folder: Path) -> list[tuple]:
    keys = ("step", "loss", "grad_norm", "learning_rate", "tokens", "epoch", "skipped_steps")
    return [tuple(json.loads(line).get(k) for k in keys) for line in (folder / "log.jsonl").read_text().splitlines()]


def resume_copy(ref: Path, checkpoint: str, out: Path) -> Path:
    """A run folder holding one of the reference's checkpoints and its whole log (as after a kill)."""
    out.mkdir(parents=True)
    shutil.copytree(ref / checkpoint, out / checkpoint)
    for f in ("log.jsonl", "config.yaml"):
        shutil.copy(ref / f, out / f)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(exact_config(out))
    assert result.state.step == STEPS and result.state.epoch == 1  # crossed the epoch boundary
    assert [r[0] for r in log_records(out)] == [2, 4, 5]
    return out


def count_optimizer_steps(monkeypatch, cls=torch.optim.AdamW) -> list[int]:
    """Count the optimizer steps taken from now on (one list entry per `step()` call)."""
    calls: list[int] = []
    original = cls.step

    def step(self, *args, **kwargs):
        if not simulated(self.param_groups[0]["params"][0]):
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", step)
    return calls


def train_resumed(cfg: dict, monkeypatch, cls=torch.optim.AdamW):
    """train(cfg), returning (result, optimizer steps it took, steps its on_step saw)."""
    calls, seen = count_optimizer_steps(monkeypatch, cls), []
    result = train(cfg, on_step=lambda state, metrics: seen.append(state.step))
    monkeypatch.undo()
    return result, len(calls), seen


@pytest.mark.parametrize("step", [1, 3, 4])  # 3: on the epoch boundary; 1 and 3: between two logs
def test_resume_is_bitwise_exact(reference, tmp_path, step, monkeypatch, capsys):
    out = resume_copy(reference, f"checkpoint-{step:06d}", tmp_path / "run")
    result, optimizer_steps, seen = train_resumed(exact_config(out, training={"resume": "auto"}), monkeypatch)
    assert result.state.step == STEPS
    # it started at step `step` and trained only the remaining steps (a run that ignored the
    # checkpoint and started over would end with the same weights here, but not pass this)
    assert f"at step {step}" in capsys.readouterr().out
    assert optimizer_steps == STEPS - step
    assert seen == [s for s in (2, 4, 5) if s > step]  # its logged steps: only those after the checkpoint
    assert_bitwise(weights(reference / "final"), weights(out / "final"))
    assert log_records(out) == log_records(reference)  # losses, grad norms, lr, token counts
    for k in range(step + 1, STEPS + 1):  # the checkpoints written after resuming match too
        assert_bitwise(weights(reference / f"checkpoint-{k:06d}"), weights(out / f"checkpoint-{k:06d}"))


def test_final_is_a_resume_point(tmp_path, monkeypatch):
    """Train 3 steps, then resume from `final` for 2 more: the same as 5 steps at once (constant lr)."""
    constant = {"optimizer": {"scheduler": "constant", "warmup_steps": 0}, "training": {"save_every": 0}}
    short = tmp_path / "short"
    train(exact_config(short, **{**constant, "training": {"save_every": 0, "max_steps": 3}}))
    assert find_latest(short) == short / "final"
    _, optimizer_steps, seen = train_resumed(
        exact_config(short, **{**constant, "training": {"save_every": 0, "resume": "auto"}}), monkeypatch)
    assert optimizer_steps == 2 and seen == [4, 5]  # on from step 3, not over from 0
    full = tmp_path / "full"
    train(exact_config(full, **constant))
    assert_bitwise(weights(full / "final"), weights(short / "final"))
    assert log_records(short)[-1] == log_records(full)[-1]  # step 5: the loss of step 5 alone in both


def test_evaluating_does_not_change_training(tmp_path):
    """Evaluation starts a data loader too; it must not move the dropout stream."""
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    train(exact_config(plain, training={"max_steps": 3, "save_every": 0}))
    train(exact_config(evaluated, training={"max_steps": 3, "save_every": 0, "eval_every": 1}))
    assert_bitwise(weights(plain / "final"), weights(evaluated / "final"))


def test_resume_8bit_optimizer_and_full_finetuning(tmp_path, monkeypatch):
    """bitsandbytes 8-bit optimizer state (quantized moments, absmax) and full weights resume exactly."""
    over = {"lora": {"enabled": False}, "optimizer": {"name": "adamw8bit"},
            "training": {"max_steps": 3, "keep_last": 0}}
    ref = tmp_path / "ref"
    train(exact_config(ref, **over))
    out = resume_copy(ref, "checkpoint-000001", tmp_path / "run")
    import bitsandbytes as bnb

    _, optimizer_steps, seen = train_resumed(
        exact_config(out, **{**over, "training": {**over["training"], "resume": "auto"}}), monkeypatch, bnb.optim.AdamW8bit)
    assert optimizer_steps == 2 and seen == [2, 3]  # steps 2 and 3 only
    assert_bitwise(weights(ref / "final"), weights(out / "final"))
    assert log_records(out) == log_records(ref)


def test_changed_config_is_refused_unless_forced(reference, tmp_path, capsys):
    out = resume_copy(reference, "checkpoint-000004", tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = {"training": {"resume": "auto", "batch_size": 4, "seed": 1}}
    with pytest.raises(CheckpointError) as e:
        train(exact_config(out, **changed))
    msg = str(e.value)
    assert "training.batch_size 2 -> 4" in msg and "training.seed 0 -> 1" in msg and "resume_force=true" in msg
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    # a longer run (max_steps) is not a change that is refused; forcing a refused change works
    result = train(exact_config(out, training={"resume": "auto", "seed": 1, "max_steps": 6, "resume_force": True}))
    assert result.state.step == 6
    assert "resuming from" in capsys.readouterr().out


def test_every_config_key_is_classified_for_resume():
    """Each key is free to change on resume or refused: a new field must be put in one of the two."""
    cfg = Config()
    keys = {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, section.name))}
    assert len(keys) > 80
    assert not RESUME_FREE & RESUME_REFUSED
    assert keys - (RESUME_FREE | RESUME_REFUSED) == set(), "classify these keys in resume.RESUME_FREE or RESUME_REFUSED"
    assert (RESUME_FREE | RESUME_REFUSED) - keys == set(), "these classified keys are not config keys"


def test_changed_optimizer_precision_clipping_and_loss_are_refused(reference, tmp_path):
    """The optimizer's settings are restored from the checkpoint by torch: a new lr would be ignored,
    so every key the numbers depend on is refused, each with its old and new value."""
    out = resume_copy(reference, "checkpoint-000004", tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    saved = yaml.safe_load((reference / "checkpoint-000004" / "config.yaml").read_text())
    changed = {"optimizer": {"lr": 5e-3, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1},
               "training": {"resume": "auto", "max_grad_norm": 0.5, "loss": "full", "fp32_norms": "all"}}
    with pytest.raises(CheckpointError) as e:
        train(exact_config(out, **changed))
    msg = str(e.value)
    for section, values in changed.items():
        for key, new in values.items():
            if key != "resume":
                assert f"{section}.{key} {saved[section][key]!r} -> {new!r}" in msg
    assert "another training.output_dir" in msg and "resume_force=true" in msg and "\n" not in msg
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_forced_optimizer_changes_take_effect(tmp_path):
    """2 steps at lr 1e-3, then resume_force with lr 5e-3 (constant schedule): steps 3 and 4 train at
    5e-3, and the new betas, eps and weight decay are the optimizer's, not the checkpoint's."""
    out = tmp_path / "run"
    first = {"optimizer": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
             "training": {"max_steps": 2, "save_every": 0}, "logging": {"log_every": 1}}
    train(exact_config(out, **first))
    new = {"lr": 5e-3, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1}
    again = exact_config(out, **{**first, "optimizer": {**first["optimizer"], **new},
                                 "training": {"max_steps": 4, "save_every": 0, "resume": "auto", "resume_force": True}})
    train(again)
    lrs = {r[0]: r[3] for r in log_records(out)}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 5e-3, 4: 5e-3}
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"]["lr"] == 5e-3  # and the record says so

    again["training"]["max_steps"] = 6  # the same, looked at inside: resume from final (step 4)
    again["logging"]["memory"] = False
    parts = setup(load_config(again))
    parts.logger.close()
    groups = parts.optimizer.param_groups
    assert [g["lr"] for g in groups] == [5e-3] * len(groups) and parts.scheduler.base_lrs == [5e-3] * len(groups)
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in groups)
    assert groups[0]["weight_decay"] == 0.1  # the decayed group (LoRA matrices); no-decay groups keep 0
    assert all(g["weight_decay"] == 0.0 for g in groups[1:])


def test_free_changes_take_effect_and_keep_the_numbers(reference, tmp_path, monkeypatch):
    """Keys free to change on resume (reporting, saving, memory knobs) are not refused, take effect,
    and the run still ends bitwise equal to the uninterrupted one."""
    out = resume_copy(reference, "checkpoint-000002", tmp_path / "run")
    free = {"training": {"resume": "auto", "keep_last": 1, "gradient_checkpointing": True, "max_bad_steps": 2},
            "logging": {"log_every": 1}}
    result, optimizer_steps, seen = train_resumed(exact_config(out, **free), monkeypatch)
    assert optimizer_steps == 3 and seen == [3, 4, 5]  # logged at every step now, not every 2
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000005"]  # keep_last=1
    assert_bitwise(weights(reference / "final"), weights(out / "final"))


def test_explicit_resume_of_a_missing_or_incomplete_checkpoint(reference, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(exact_config(tmp_path / "a", training={"resume": str(tmp_path / "nope")}))
    half = tmp_path / "b" / "checkpoint-000002"
    shutil.copytree(reference / "checkpoint-000002", half)
    (half / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        train(exact_config(tmp_path / "b", training={"resume": str(half)}))


def _fake_checkpoint(path: Path, step: int, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (path / "COMPLETE").write_text("ok\n")
    return path


def test_find_latest_skips_half_written_folders_and_keeps_a_replaced_final(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-000002", 2)
    _fake_checkpoint(tmp_path / "checkpoint-000004", 4, complete=False)  # killed before its marker
    _fake_checkpoint(tmp_path / ".tmp-checkpoint-000006", 6)  # killed before its rename
    # killed between the two renames that replace `final`: only `.old-final` holds it
    old_final = _fake_checkpoint(tmp_path / ".old-final", 5)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-000002"]
    assert find_latest(tmp_path) == old_final
    clean_debris(tmp_path)  # what a new run does first: `.old-final` is still the only copy
    assert old_final.exists() and not (tmp_path / ".tmp-checkpoint-000006").exists()
    _fake_checkpoint(tmp_path / "final", 5)
    clean_debris(tmp_path)
    assert not old_final.exists() and find_latest(tmp_path) == tmp_path / "final"


def test_load_checkpoint_without_optimizer_gives_weights_and_counters(reference, tmp_path):
    """`minitune.load_checkpoint(..., optimizer=None)`: the adapter and the step counters only, checked
    for completeness first (an unmarked folder is refused before any weight is touched)."""
    from accelerate import Accelerator

    from minitune.checkpoint import load_checkpoint
    from minitune.config import LoraArgs, ModelArgs
    from minitune.model import build_from_config
    from minitune.prepare import prepare_model

    model, _ = prepare_model(build_from_config(ModelArgs(preset="tiny-llama")), LoraArgs(r=4, alpha=8))
    saved = weights(reference / "checkpoint-000003")
    state = load_checkpoint(reference / "checkpoint-000003", accelerator=Accelerator(cpu=True), model=model, rng=False)
    assert state.step == 3 and state.stop_reason == ""
    own = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert_bitwise({k: own[k] for k in saved}, saved)
    half = shutil.copytree(reference / "checkpoint-000003", tmp_path / "half")
    (half / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(half, accelerator=Accelerator(cpu=True), model=model, rng=False)


def test_resume_with_auto_batch_size_takes_the_checkpoints_split_without_mutating(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    saved = load_config(tiny_config(output_dir=run, training={"batch_size": 2, "grad_accum": 4}))
    saved.save(ckpt / "config.yaml")
    (ckpt / "trainer_state.json").write_text('{"step": 1, "num_processes": 1}')
    save_file({"w": torch.zeros(1)}, ckpt / "adapter_model.safetensors")  # only its header is read here
    for stem in ("training_state_0.pt", "rng_state_0.pt"):
        (ckpt / stem).write_bytes(b"")
    (ckpt / "COMPLETE").write_text("")
    cfg = load_config(tiny_config(output_dir=run, training={"batch_size": 8, "auto_batch_size": True,
                                                            "resume": str(ckpt)}))
    path, resumed = resolve_resume(cfg)
    assert path == ckpt
    assert (resumed.training.batch_size, resumed.training.grad_accum) == (2, 4)
    assert (cfg.training.batch_size, cfg.training.grad_accum) == (8, 1)
