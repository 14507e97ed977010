"""Faults: non-finite steps, fp16 overflows, out of memory, signals, `kill -9` mid-run and mid-save.

The process-level tests start `train.py`'s entry point in a subprocess (through a small runner that
slows each logged step, or one checkpoint write, so that the test can strike at a known moment),
then resume in this process and compare with an uninterrupted run: bitwise-equal adapters and the
same log records.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from minitune.checkpoint import find_latest, is_complete, list_checkpoints
from minitune.errors import RunError
from minitune.run import train

from .conftest import REPO, simulated, tiny_config

# ---------------------------------------------------------------------------------------------
# numerical faults, in process


def fault_config(out, **sections) -> dict:
    cfg = tiny_config("tiny-llama", out, data={"max_samples": 16},
                      optimizer={"scheduler": "linear", "lr": 3e-3},
                      training={"max_steps": 5, "batch_size": 4, "eval_batches": 1})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def patch_forward(monkeypatch, at: set[int], how: str) -> None:
    """Make the training forward passes number `at` (1-based micro-batches) go wrong."""
    original = LlamaForCausalLM.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and not simulated(out.logits):
            calls[0] += 1
            if calls[0] in at:
                if how == "nan_loss":
                    out.logits = out.logits * float("nan")
                elif how == "nan_grad":  # the loss stays finite; its gradient does not
                    out.logits.register_hook(lambda g: g * float("nan"))
                elif how == "oom":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)


def logged(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("how", ["nan_loss", "nan_grad"])
def test_a_non_finite_step_is_skipped(tmp_path, monkeypatch, capsys, how):
    patch_forward(monkeypatch, {3}, how)
    result = train(fault_config(tmp_path / "run"))
    records = logged(tmp_path / "run")
    # the bad micro-batch is consumed but the step does not count: still 5 steps, in 6 micro-batches
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert result.state.micro_step == 6 and result.state.skipped_steps == 1
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    # the scheduler did not advance on the skipped step: linear decay over 5 counted steps
    assert [r["learning_rate"] for r in records] == pytest.approx([3e-3 * (5 - k) / 5 for k in range(1, 6)])
    assert all(torch.isfinite(t).all() for t in load_file(result.checkpoint / "adapter_model.safetensors").values())
    what = "loss" if how == "nan_loss" else "gradient"
    assert f"step 3: non-finite {what}, step skipped (1 in a row" in capsys.readouterr().out


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    patch_forward(monkeypatch, {3, 4, 5}, "nan_loss")
    with pytest.raises(RunError) as e:
        train(fault_config(out, training={"max_bad_steps": 3, "save_every": 1}))
    msg = str(e.value)
    assert "3 consecutive steps with a non-finite loss or gradient after step 2" in msg
    assert f"last good checkpoint: {out / 'checkpoint-000002'}" in msg and "lower optimizer.lr" in msg
    assert find_latest(out) == out / "checkpoint-000002" and not (out / "final").exists()
    adapter = load_file(out / "checkpoint-000002" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_out_of_memory_names_the_knobs(tmp_path, monkeypatch):
    patch_forward(monkeypatch, {2}, "oom")
    with pytest.raises(RunError) as e:
        train(fault_config(tmp_path / "run", training={"grad_accum": 1}))
    msg = str(e.value)
    assert msg.startswith("out of memory at step 2 (micro-batch 4 x up to 48 tokens)")
    for knob in ("training.batch_size=2 training.grad_accum=2", "training.gradient_checkpointing=true",
                 "optimizer.name=adamw8bit", "quantization.mode=4bit"):
        assert knob in msg
    assert "\n" not in msg


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_full_disk_while_saving_is_one_error_line(tmp_path, monkeypatch, capsys, writer):
    """The disk fills up while checkpoint-000002 is written: one `error:` line (exit 2) with the
    folder, the space a checkpoint needs, the last good checkpoint and how to resume; the half-written
    copy is gone, checkpoint-000001 is intact, and a resume after freeing space finishes the run."""
    import errno

    import peft.peft_model

    from minitune.checkpoint import verify_checkpoint
    from minitune.cli import run_cli
    from minitune.memory import format_bytes

    out = tmp_path / "run"
    real_torch_save, real_safe_save = torch.save, peft.peft_model.safe_save_file

    def full(real):
        def write(obj, f, *args, **kwargs):
            name = str(getattr(f, "name", f))
            if ".tmp-checkpoint-000002" in name:
                if writer == "torch.save":
                    raise OSError(errno.ENOSPC, "No space left on device")
                # what safetensors raises: a plain Exception subclass that carries the errno only as text
                raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(obj, f, *args, **kwargs)
        return write

    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", full(real_torch_save))
    else:
        monkeypatch.setattr(peft.peft_model, "safe_save_file", full(real_safe_save))
    cfg = fault_config(out, training={"max_steps": 3, "save_every": 1, "keep_last": 0})
    assert run_cli(lambda: train(cfg)) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the tokenizing progress bars, then the error
    err = lines[-1]
    print(err)
    assert [line for line in lines if line.startswith("error:")] == [err]
    first = out / "checkpoint-000001"
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    assert err.startswith("error: no space left on the disk of ")
    assert f"'{out}'" in err and f"needs about {format_bytes(size)}" in err
    assert f"last good checkpoint: {first}" in err and "training.resume=auto" in err
    assert not list(out.glob(".tmp-*")) and find_latest(out) == first
    verify_checkpoint(first)

    monkeypatch.undo()  # space freed: resume where it stopped
    result = train(fault_config(out, training={"max_steps": 3, "save_every": 1, "keep_last": 0, "resume": "auto"}))
    assert result.state.step == 3 and is_complete(out / "final")


def test_out_of_memory_split_keeps_an_odd_batch(tmp_path, monkeypatch):
    """batch_size 5: the advice is 1 x 5 (5 examples per step), not 5 // 2 = 2 x 2 (4 examples)."""
    patch_forward(monkeypatch, {1}, "oom")
    with pytest.raises(RunError) as e:
        train(fault_config(tmp_path / "run", training={"batch_size": 5, "grad_accum": 1}))
    assert "training.batch_size=1 training.grad_accum=5: micro-batch 1 x accumulation 5 (same examples per step)" \
        in str(e.value)


def test_auto_batch_size_halves_until_a_step_fits(tmp_path, monkeypatch, capsys):
    """A forward pass of more than 2 examples 'runs out of memory': batch 8 x 1 becomes 2 x 4, the
    same examples per step; the run equals one started at 2 x 4, and resumes with the original config."""
    original = LlamaForCausalLM.forward

    def forward(self, input_ids=None, **kwargs):
        if self.training and input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    auto = tmp_path / "auto"
    written = {"batch_size": 8, "auto_batch_size": True, "max_steps": 3, "save_every": 1, "keep_last": 0}
    train(fault_config(auto, training=written))
    out = capsys.readouterr().out
    assert "out of memory with training.batch_size=8: retrying with batch_size=4 grad_accum=2" in out
    assert "retrying with batch_size=2 grad_accum=4" in out
    saved = yaml.safe_load((auto / "final" / "config.yaml").read_text())["training"]
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 4)
    direct = tmp_path / "direct"
    train(fault_config(direct, training={"batch_size": 2, "grad_accum": 4, "max_steps": 3}))
    # resuming with the config as written (8 x 1) continues at 2 x 4 instead of refusing
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(auto / "checkpoint-000002", resumed / "checkpoint-000002")
    train(fault_config(resumed, training={**written, "resume": "auto"}))
    assert "resuming with the checkpoint's batch_size=2 grad_accum=4" in capsys.readouterr().out
    a = load_file(direct / "final" / "adapter_model.safetensors")
    for run in (auto, resumed):
        b = load_file(run / "final" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def test_fp16_overflow_is_skipped_by_the_grad_scaler():
    """With fp16 the loop must hand non-finite gradients to the GradScaler (which skips the update
    and halves its scale), not skip `optimizer.step()` itself: the scaler has already unscaled the
    gradients for clipping and would refuse the next step. Run on CPU with a CPU GradScaler."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from minitune.loop import fit

    AcceleratorState._reset_state(reset_partial_state=True)  # other tests in this process used another precision
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True  # what Accelerate sets on CUDA for fp16
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = _Tiny()
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    torch.manual_seed(0)
    loader = [{"x": torch.randn(2, 4)} for _ in range(8)]
    calls = [0]

    def loss_fn(m, batch):
        calls[0] += 1
        h = m.lin(batch["x"])
        if calls[0] == 2:  # finite loss, infinite gradient: an fp16 overflow
            h.register_hook(lambda g: g * float("inf"))
        if calls[0] == 4:  # a non-finite loss is a bad step, with or without a scaler
            h = h * float("nan")
        return h.pow(2).sum(), torch.ones(())

    state = fit(accelerator, model, optimizer, loader, max_steps=5, max_grad_norm=1.0, max_bad_steps=2,
                loss_fn=loss_fn)
    assert state.step == 5 and state.micro_step == 7
    assert state.skipped_steps == 2 and state.scaler_skips == 1 and state.stop_reason == "max_steps"
    assert accelerator.scaler.get_scale() == 2.0**8  # halved for the overflow and for the NaN
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# process faults: signals, kill -9, a kill during a save

RUNNER = r"""
import os, sys, time
import minitune.checkpoint, minitune.report
pause = float(os.environ.get("PAUSE_AFTER_LOG", "0"))
if pause:  # slow each logged step, so that the test can strike mid-run
    log = minitune.report.RunLogger.log
    def slow_log(self, step, metrics):
        log(self, step, metrics)
        time.sleep(pause)
    minitune.report.RunLogger.log = slow_log
stall = int(os.environ.get("STALL_SAVE", "0"))
if stall:  # the n-th checkpoint stalls after writing training_state_0.pt, before rng_state_0.pt
    rng_state, calls = minitune.checkpoint.rng_state, []
    def stalled():
        if sys._getframe(1).f_globals.get("__name__") == "minitune.checkpoint":  # a save, not run.py's rng_state()
            calls.append(1)
            if len(calls) == stall:
                time.sleep(300)
        return rng_state()
    minitune.checkpoint.rng_state = stalled
from minitune.cli import main_train
sys.exit(main_train(sys.argv[1:]))
"""


def proc_config(out) -> dict:
    return tiny_config("tiny-llama", out, lora={"dropout": 0.1}, data={"max_samples": 10},
                       training={"max_steps": 6, "batch_size": 2, "grad_accum": 2, "save_every": 1,
                                 "keep_last": 2, "eval_batches": 1})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(proc_config(out))
    return out


def start(tmp_path: Path, out: Path, **env) -> subprocess.Popen:
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(proc_config(out)))
    log = open(tmp_path / "proc.log", "w")  # noqa: SIM115 - closed when the test's tmp_path goes
    return subprocess.Popen([sys.executable, "-c", RUNNER, "--config", str(cfg_file)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                      **{k: str(v) for k, v in env.items()}})


def wait_for(proc: subprocess.Popen, what, tmp_path: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not what():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) too early:\n{(tmp_path / 'proc.log').read_text()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out:\n{(tmp_path / 'proc.log').read_text()[-3000:]}")
        time.sleep(0.05)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume_and_compare(out: Path, reference: Path) -> None:
    """Resume `out` in this process; it must end as the uninterrupted run did."""
    result = train({**proc_config(out), "training": {**proc_config(out)["training"], "resume": "auto"}})
    assert result.state.step == 6
    a = load_file(reference / "final" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "grad_norm", "learning_rate", "tokens")
    assert [[r[k] for k in keys] for r in logged(out)] == [[r[k] for k in keys] for r in logged(reference)]
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-", ".trash-"))]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000005", "checkpoint-000006"]  # keep_last=2


@pytest.mark.slow  # ~25 s; the kill during a save below also kills -9 and resumes, in the default run
def test_kill_9_mid_run_then_resume_auto(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(tmp_path, out, PAUSE_AFTER_LOG=0.5)
    wait_for(proc, lambda: lines(out / "log.jsonl") >= 3, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "final").exists()
    assert find_latest(out) is not None and find_latest(out).name.startswith("checkpoint-")
    resume_and_compare(out, uninterrupted)


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(tmp_path, out, STALL_SAVE=3)
    half = out / ".tmp-checkpoint-000003"
    wait_for(proc, lambda: (half / "training_state_0.pt").exists(), tmp_path)
    before = files(out / "checkpoint-000002")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert half.is_dir() and not is_complete(half)  # the half-written one is never picked
    assert find_latest(out) == out / "checkpoint-000002"
    assert files(out / "checkpoint-000002") == before
    resume_and_compare(out, uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C
def test_sigterm_saves_at_the_step_boundary_and_exits_cleanly(tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    proc = start(tmp_path, out, PAUSE_AFTER_LOG=0.5)
    wait_for(proc, lambda: lines(out / "log.jsonl") >= 2, tmp_path)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    text = (tmp_path / "proc.log").read_text()
    assert f"{sig.name}: saving a checkpoint at the end of this step" in text and "Traceback" not in text
    assert "KeyboardInterrupt" not in text
    assert "stopped by signal" in text and not (out / "final").exists()
    last = find_latest(out)
    assert last.name == f"checkpoint-{lines(out / 'log.jsonl'):06d}"  # saved at the step it was on
    assert json.loads((last / "trainer_state.json").read_text())["stop_reason"] == "signal"
    resume_and_compare(out, uninterrupted)


def test_a_second_signal_exits_at_once_without_touching_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = start(tmp_path, out, STALL_SAVE=2)
    wait_for(proc, lambda: (out / ".tmp-checkpoint-000002" / "training_state_0.pt").exists(), tmp_path)
    before = files(out / "checkpoint-000001")
    proc.send_signal(signal.SIGTERM)  # noted; the stalled save goes on
    time.sleep(0.5)
    assert proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM and time.monotonic() - t0 < 10
    assert "SIGTERM again: exiting now, without saving" in (tmp_path / "proc.log").read_text()
    assert files(out / "checkpoint-000001") == before
    assert find_latest(out) == out / "checkpoint-000001"


def test_out_of_memory_while_loading_gets_the_advice_not_a_bad_input_line(tmp_path, monkeypatch):
    """An OOM while loading or quantizing is neither the user's bad input nor a bug: one RunError line
    with the settings that shrink the weights (the micro-batch cannot help before the first step)."""
    import minitune.build

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(minitune.build, "setup_model", oom)
    with pytest.raises(RunError) as e:
        train(fault_config(tmp_path / "run", lora={"enabled": False}))
    msg = str(e.value)
    assert msg.startswith("out of memory while loading and preparing the model (before the first step)")
    assert "quantization.mode=4bit" in msg and "lora.enabled=true" in msg and "minitune plan" in msg
    assert "\n" not in msg and e.value.__cause__ is None
