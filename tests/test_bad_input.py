"""Bad input: `python train.py ...` prints one `error:` line naming the problem and the fix, exits
with code 2, shows no traceback, and leaves an existing run folder byte-for-byte as it was.

Every case points the command at a copy of a real run folder (checkpoints, final adapter, log,
config). Cases whose error is found after the output-folder check also pass `training.overwrite=true`
(or resume), which must not remove anything before every input check has passed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minitune import device
from minitune.checkpoint import find_latest
from minitune.cli import main_train
from minitune.run import train

from .conftest import REPO, cli_in_process, tiny_config

# Runs train.py's entry point with minitune.device.capabilities patched (a machine without
# bitsandbytes support, or without bf16).
OVERWRITE = "training.overwrite=true"

# id -> (overrides, capabilities patch or None, what the error line must say)
CASES = {
    "malformed-yaml": ([], None, "is not valid YAML at line 3"),
    "unknown-key": (["training.batchsize=2"], None, "unknown key 'training.batchsize' (did you mean 'batch_size'?)"),
    "wrong-type": (["training.batch_size=two"], None, "training.batch_size: expected an integer, got 'two'"),
    "lora-r-zero": (["lora.r=0"], None, "lora.r=0 must be a positive integer"),
    "lr-zero": (["optimizer.lr=0"], None, "optimizer.lr=0.0 must be > 0"),
    "dropout-one": (["lora.dropout=1.0"], None, "lora.dropout=1.0 must be in [0, 1)"),
    "4bit-without-bnb": (["quantization.mode=4bit"], {"bnb_layers": False},
                         "quantization.mode=4bit needs bitsandbytes layers, which cannot run on cpu"),
    "8bit-optimizer-without-bnb": (["optimizer.name=adamw8bit"], {"bnb_optimizers": False},
                                   "optimizer.name=adamw8bit needs bitsandbytes optimizers"),
    "bf16-unsupported": (["training.mixed_precision=bf16"], {"bf16": False},
                         "training.mixed_precision=bf16 is not supported on"),
    "another-run-in-output": ([], None, "already holds a run; pick another training.output_dir, resume it with "
                                        "training.resume=auto, or set training.overwrite=true"),
    "unwritable-output": (["training.output_dir={tmp}/a-file/run"], None, "is not writable"),
    "missing-data-file": ([OVERWRITE, "data.path=data/no-such-file.jsonl"], None,
                          "data file 'data/no-such-file.jsonl' does not exist"),
    "hub-dataset-offline": ([OVERWRITE, "data.path=nobody/no-such-dataset"], None,
                            "dataset 'nobody/no-such-dataset' is not available offline"),
    "missing-column": ([OVERWRITE, "data.prompt='{nope} ->: '"], None,
                       "data.prompt uses column 'nope' but the data has columns: quote, author, tags"),
    "empty-after-filtering": ([OVERWRITE, "data.path={tmp}/empty.jsonl", "data.prompt='{quote}'", "data.response=''"],
                              None, "examples is empty: check that data.prompt"),
    "all-longer-than-max-length": ([OVERWRITE, "data.max_length=2"], None,
                                   "every example is longer than data.max_length=2 tokens"),
    "target-modules-match-nothing": ([OVERWRITE, "lora.target_modules=[nope]"], None,
                                     "its linear modules are: down_proj, gate_proj, k_proj"),
    "hub-model-offline": ([OVERWRITE, "model.preset=null", "model.name_or_path=nobody/no-such-model"], None,
                          "model 'nobody/no-such-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1"),
    "truncated-checkpoint-weights": (["training.resume=auto"], None,
                                     "adapter_model.safetensors is corrupt or truncated"),
    "truncated-training-state": (["training.resume=auto"], None, "training_state_0.pt is corrupt"),
    "incomplete-checkpoint": (["training.resume={run}/checkpoint-000002"], None, "is not a complete checkpoint"),
    "resume-with-another-seed": (["training.resume=auto", "training.seed=7"], None,
                                 "this run changes training.seed 0 -> 7"),
}


def run_config(out) -> dict:
    return tiny_config("tiny-llama", out, data={"max_samples": 8},
                       training={"max_steps": 2, "save_every": 1, "eval_batches": 1})


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("existing") / "run"
    train(run_config(out))
    assert (out / "checkpoint-000002" / "COMPLETE").exists() and (out / "final" / "COMPLETE").exists()
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, existing_run, tmp_path, capsys, monkeypatch):
    overrides, caps, expected = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(run)))
    # the broken pieces each case needs
    if case == "malformed-yaml":
        cfg_file.write_text("model:\n  preset: [tiny-llama\ntraining: {}\n")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "empty.jsonl").write_text('{"quote": ""}\n' * 3)
    if case == "truncated-checkpoint-weights":
        truncate(find_latest(run) / "adapter_model.safetensors")
    if case == "truncated-training-state":
        truncate(find_latest(run) / "training_state_0.pt")
    if case == "incomplete-checkpoint":
        (run / "checkpoint-000002" / "COMPLETE").unlink()
    before = snapshot(run)

    args = ["--config", str(cfg_file), *(o.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for o in overrides)]
    if caps is not None:  # a device without these capabilities
        real = device.capabilities
        monkeypatch.setattr(device, "capabilities", lambda d: dataclasses.replace(real(d), **caps))
    proc = cli_in_process(main_train, args, capsys, monkeypatch)

    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0]
    assert snapshot(run) == before  # no checkpoint, log or config touched


def test_train_py_exits_2_with_one_error_line_as_a_process(existing_run, tmp_path):
    """The cases above call train.py's `main_train` in this process; this one runs the script itself:
    the exit code and the output a shell sees."""
    run = shutil.copytree(existing_run, tmp_path / "run")
    before = snapshot(run)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(run)))
    proc = subprocess.run([sys.executable, "train.py", "--config", str(cfg_file), "training.batchsize=2"], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "unknown key 'training.batchsize' (did you mean 'batch_size'?)" in error
    assert snapshot(run) == before
