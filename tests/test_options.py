"""Options that must do what they say, and fallbacks that must not be silent: logging.jsonl,
logging.memory, the checkpoint's tokenizer in evaluation, the CPU RSS reader off Linux, and the
log trimming a resume does."""

from __future__ import annotations

import builtins
import json
import resource
import sys

import pytest

from minitune import rss
from minitune.errors import CheckpointError, RunError
from minitune.evaluate import evaluate_checkpoint
from minitune.run import train
from minitune.run_folder import trim_log

from .conftest import measured_config, tiny_config


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    """2 steps with logging.jsonl=false and logging.memory=false."""
    out = tmp_path_factory.mktemp("quiet") / "run"
    return train(tiny_config("tiny-llama", out, training={"max_steps": 2}, logging={"jsonl": False, "memory": False}))


def test_jsonl_false_writes_no_log_and_memory_false_records_no_memory(quiet_run, tmp_path):
    out = quiet_run.output_dir
    assert quiet_run.state.step == 2 and quiet_run.metrics["loss"] > 0  # it trained and logged in memory
    assert not (out / "log.jsonl").exists()
    assert not (out / "memory.json").exists()
    assert not any(k.startswith("mem/") for k in quiet_run.state.last), quiet_run.state.last
    assert quiet_run.memory == {"predicted": None}  # nor predicted: the simulation is skipped
    # the same run with both on (the defaults) writes both
    on = train(measured_config("tiny-llama", tmp_path / "on", training={"max_steps": 2}))
    assert len((tmp_path / "on" / "log.jsonl").read_text().splitlines()) == 2
    assert any(k.startswith("mem/") for k in on.state.last)
    assert json.loads((tmp_path / "on" / "memory.json").read_text())["baseline_mb"] > 0


def test_eval_refuses_a_checkpoint_tokenizer_that_does_not_load(quiet_run, tmp_path):
    """Falling back to the config's tokenizer would evaluate other token ids without a word."""
    import shutil

    ckpt = shutil.copytree(quiet_run.checkpoint, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="the tokenizer saved in .* does not load"):
        evaluate_checkpoint(ckpt, out_dir=tmp_path / "ev", num_prompts=0, max_samples=4)
    assert not (tmp_path / "ev").exists()


def test_rss_off_linux_uses_psutil_and_warns_when_it_must_use_ru_maxrss(monkeypatch):
    on_linux = rss.rss_bytes()
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/self/statm":  # as if not Linux (psutil reads /proc/<pid> itself here)
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    via_psutil = rss.rss_bytes()
    assert abs(via_psutil - on_linux) < 0.2 * on_linux  # the current RSS, from psutil
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    monkeypatch.setattr(rss, "_RSS_FALLBACK_WARNED", False)
    with pytest.warns(UserWarning, match="ru_maxrss, which only grows"):
        fallback = rss.rss_bytes()
    assert fallback == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _log(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_trim_log_drops_only_a_torn_last_line(tmp_path):
    log = _log(tmp_path / "log.jsonl", ['{"step": 1}', '{"step": 2}', '{"step": 3}', '{"ste'])
    trim_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_trim_log_refuses_a_damaged_line_in_the_middle(tmp_path):
    log = _log(tmp_path / "log.jsonl", ['{"step": 1}', 'edited by hand', '{"step": 2}', '{"step": 3}'])
    before = log.read_bytes()
    with pytest.raises(RunError, match="line 2 is not a JSON record"):
        trim_log(log, 2)
    assert log.read_bytes() == before  # nothing dropped


def test_progress_line_names_the_unit_it_prints():
    from minitune.report import progress_postfix

    # the mem/*_mb values are MiB (2**20 bytes): the line says so
    assert progress_postfix({"loss": 1.0, "mem/peak_rss_mb": 2792.4}).endswith("peak 2792 MiB")
