"""Shared test helpers: offline, tiny models built from presets, shipped tokenizers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist workers share the cores: each takes its share of math threads (torch reads this when
# it is first imported, and the processes a test starts inherit it), instead of every worker
# running as many threads as there are cores and their threads preempting each other's
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
GPT2 = str(REPO / "tests/fixtures/tokenizers/gpt2")
T5_TOK = str(REPO / "tests/fixtures/tokenizers/t5_test_sentencepiece")
QUOTES = str(REPO / "data/english_quotes.jsonl")
XSUM = str(REPO / "tests/fixtures/xsum_sample.json")


@dataclass
class CliResult:
    """What a command printed and returned (the fields of subprocess.CompletedProcess it is used for)."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(main: Callable[[list[str]], int], argv: list[str], capsys, monkeypatch) -> CliResult:
    """Run a CLI entry point (`minitune.cli.main_train`, `main_eval`, `main`, ...) in this process as
    its script runs it: from the repository root, argparse's exits counted as exit codes, stdout and
    stderr captured. Each `python train.py ...` subprocess pays ~6 s of imports on 2 cores; the
    scripts themselves are two lines (`sys.exit(main_...())`), each run once as a real process by
    the test of its entry point. An exception that escapes `main` fails the test with its traceback,
    as it would print one in the process."""
    monkeypatch.chdir(REPO)
    capsys.readouterr()  # what the test printed before
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help exits 0, a usage error 2
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return CliResult(code, out.out, out.err)


def simulated(t: Any) -> bool:
    """True for a fake tensor of the memory planner: every run simulates two steps at setup, on fake
    tensors, through the model's forward and the optimizer's step, which tests that count those
    calls must not count."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def tiny_config(preset: str = "tiny-llama", output_dir: str | Path = "runs/test", **sections) -> dict:
    """A nested config dict for a fast run of a tiny random model on the quotes data."""
    seq2seq = preset.endswith("t5")
    cfg = {
        # fp32 unless a test asks otherwise: numbers pinned here must not move with the device's
        # `auto` precision (tests/test_precision.py and test_device.py cover auto)
        "model": {"preset": preset, "tokenizer": T5_TOK if seq2seq else GPT2, "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": QUOTES, "prompt": "{quote} ->: ", "response": "{tags}", "max_length": 48,
                 "max_target_length": 16, "max_samples": 64, "validation_fraction": 0.1},
        "optimizer": {"lr": 3e-3, "scheduler": "constant"},
        # eval_batches: the final evaluation reads 2 batches, not the 251 held-out rows (about 60% of a
        # tiny run's time); a test that compares with the whole held-out split sets eval_batches=0
        "training": {"output_dir": str(output_dir), "max_steps": 8, "batch_size": 4, "seed": 0,
                     "mixed_precision": "no", "eval_batches": 2},
        # no report.png per test run (a second or two each); tests/test_run_report.py turns it on.
        # memory=false: no RSS records, heap walks or allocator trace (about 2 s of a tiny run); the
        # tests of memory records, memory.json and the profiler use measured_config (memory on)
        "logging": {"progress": "none", "report": False, "memory": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def measured_config(preset: str = "tiny-llama", output_dir: str | Path = "runs/test", **sections) -> dict:
    """tiny_config with logging.memory on, as a run is by default: the memory records, memory.json,
    the measured peak (the kernel's peak RSS, or a sampler thread)."""
    sections["logging"] = {"memory": True, **sections.get("logging", {})}
    return tiny_config(preset, output_dir, **sections)


class VirtualClock:
    """A stand-in for the `time` module of minitune.loop: the real clock plus virtual seconds, which
    `sleep` adds at once (a test can make an evaluation or a save "take" 100 s in no time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset

    def sleep(self, seconds: float) -> None:
        self.offset += seconds


def slow_evaluations(monkeypatch, seconds: float) -> VirtualClock:
    """Make every evaluation of minitune.loop "take" `seconds` (virtual); returns the clock."""
    from minitune import eval_loss, loop

    clock = VirtualClock()
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(eval_loss, "time", clock)
    evaluate = eval_loss.evaluate_loss

    def slow_evaluation(*args, **kwargs):
        clock.sleep(seconds)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(eval_loss, "evaluate_loss", slow_evaluation)
    return clock


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(preset, **sections) -> config dict writing into a temporary folder."""

    def make(preset: str = "tiny-llama", **sections):
        return tiny_config(preset, tmp_path / "run", **sections)

    return make


def pytest_collection_modifyitems(config, items):
    """The precision matrix's many short cells last. `make test` runs 2 pytest-xdist workers with
    `--dist load`, which hands out the first tests in turn and the rest as workers free up: the long
    tests (the slow suite's fuzzing, GGUF jobs, benchmark smoke runs) start at once on both workers
    and the short cells fill in around them, instead of one long test starting last while the other
    worker idles."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_precision.py"))  # stable: else as collected


_WORKER_FUZZ_COUNTS: list[dict[str, dict[str, int]]] = []  # under pytest-xdist: each worker's fuzz counts


def _fuzz_counts() -> dict[str, dict[str, int]]:
    fuzz = sys.modules.get("tests.test_fuzz")
    return {target: dict(counts) for target, counts in fuzz.COUNTS.items()} if fuzz is not None else {}


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its counts go to the controller
        session.config.workeroutput["fuzz_counts"] = _fuzz_counts()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, called in the controller as each worker ends
def pytest_testnodedown(node, error):
    _WORKER_FUZZ_COUNTS.append(getattr(node, "workeroutput", {}).get("fuzz_counts", {}))


def pytest_terminal_summary(terminalreporter):
    """One line per fuzz target that ran (tests/test_fuzz.py): examples tried and their outcomes,
    summed over pytest-xdist's workers."""
    merged: dict[str, dict[str, int]] = {}
    for counts in [_fuzz_counts(), *_WORKER_FUZZ_COUNTS]:
        for target, outcomes in counts.items():
            for outcome, n in outcomes.items():
                merged.setdefault(target, {})[outcome] = merged.get(target, {}).get(outcome, 0) + n
    if not merged:
        return
    total = sum(sum(c.values()) for c in merged.values())
    terminalreporter.write_sep("-", f"fuzz: {total} examples")
    for target, counts in sorted(merged.items()):
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"fuzz {target}: {sum(counts.values())} examples ({outcomes})")
