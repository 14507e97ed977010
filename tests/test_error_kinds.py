"""Only the user's errors become one `error:` line: the blocks that turn exceptions into ModelError,
PlanError or CheckpointError catch only what means bad input, and let internal failures (a bug, a
kernel error, out of memory) keep their type and traceback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from minitune import planner
from minitune.checkpoint import load_states
from minitune.config import ModelArgs
from minitune.errors import CheckpointError, ModelError, PlanError
from minitune.model import from_pretrained as load_pretrained
from minitune.planner import planning

from .conftest import tiny_config


@pytest.mark.parametrize("raised,shown_as_user_error", [
    (OSError("not a local folder and not a valid model identifier"), True),
    (ValueError("Unrecognized model"), True),
    (torch.OutOfMemoryError("CUDA out of memory while quantizing"), False),
    (RuntimeError("bitsandbytes: CUDA kernel failed"), False),
    (AttributeError("a bug"), False),
])
def test_model_loading_wraps_only_missing_or_bad_files(raised, shown_as_user_error, monkeypatch):
    def from_pretrained(*args, **kwargs):
        raise raised

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    expected = ModelError if shown_as_user_error else type(raised)
    with pytest.raises(expected) as info:
        load_pretrained("some/model", ModelArgs(name_or_path="some/model", kind="causal", dtype="float32"), None, None, "causal")
    assert (info.type is ModelError) == shown_as_user_error


@pytest.mark.parametrize("raised,shown_as_user_error", [
    (RuntimeError("shape '[2, -1]' is invalid for input of size 3"), True),
    (TypeError("a planner bug"), False),
    (KeyError("a planner bug"), False),
])
def test_the_plan_wraps_only_what_the_simulated_model_refuses(raised, shown_as_user_error, monkeypatch):
    from minitune.config import load_config

    def simulate(*args, **kwargs):
        raise raised

    monkeypatch.setattr(planning, "simulate", simulate)  # what plan() calls
    cfg = load_config(tiny_config("tiny-llama", "runs/unused"))
    with pytest.raises(PlanError if shown_as_user_error else type(raised)):
        planner.plan(cfg, "T4")


def _optimizer(sizes: list[int]) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.ones(n)) for n in sizes]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_an_optimizer_state_of_another_setup_is_not_called_corrupt(tmp_path):
    """A valid checkpoint whose optimizer state does not fit this run's optimizer must not be called
    corrupt (deleting it, as the old message said, loses a good checkpoint)."""
    accelerator = SimpleNamespace(process_index=0, scaler=None)
    torch.save({"optimizer": _optimizer([3, 4]).state_dict(), "scheduler": None, "scaler": None},
               tmp_path / "training_state_0.pt")
    load_states(tmp_path, accelerator, _optimizer([3, 4]), None)  # fits: no error
    with pytest.raises(CheckpointError, match="intact") as info:
        load_states(tmp_path, accelerator, _optimizer([3, 4, 5]), None)  # another parameter set
    assert "delete" not in str(info.value) and "keep the folder" in str(info.value)
    # a truncated file is corrupt
    blob = (tmp_path / "training_state_0.pt").read_bytes()
    (tmp_path / "training_state_0.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_states(tmp_path, accelerator, _optimizer([3, 4]), None)


def test_an_internal_failure_while_restoring_keeps_its_type(tmp_path, monkeypatch):
    accelerator = SimpleNamespace(process_index=0, scaler=None)
    torch.save({"optimizer": _optimizer([3]).state_dict()}, tmp_path / "training_state_0.pt")
    opt = _optimizer([3])

    def broken(state):
        raise AttributeError("a bug")

    monkeypatch.setattr(opt, "load_state_dict", broken)
    with pytest.raises(AttributeError):
        load_states(tmp_path, accelerator, opt, None)


def test_every_error_class_is_declared_once_under_one_base():
    """Bad-input errors live in minitune/errors.py under MinituneError (what the CLI prints as one
    `error:` line); no other module declares an exception class of its own."""
    import ast
    import inspect
    from pathlib import Path

    import minitune
    from minitune import errors

    package = Path(minitune.__file__).parent
    elsewhere = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (node.name.endswith(("Error", "Exception"))
                                                   or any(getattr(b, "id", "").endswith(("Error", "Exception"))
                                                          for b in node.bases)):
                elsewhere.append(f"{path.relative_to(package)}:{node.lineno} {node.name}")
    assert not elsewhere, elsewhere
    declared = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(declared) >= 9 and all(issubclass(c, errors.MinituneError) for c in declared)
    assert all(getattr(minitune, c.__name__) is c for c in declared)  # each one is public


def test_the_cli_prints_any_minitune_error_as_one_line(capsys, monkeypatch):
    from minitune import cli, errors

    class Planted(errors.MinituneError):
        pass

    def train(*args, **kwargs):
        raise Planted("a planted problem: do the fix")

    monkeypatch.setattr("minitune.run.train", train)
    assert cli.main_train(["--config", "smollm2-quotes"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: a planted problem: do the fix"
