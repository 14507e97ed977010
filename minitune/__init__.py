"""minitune: fine-tune language models with a short, instrumented loop on Hugging Face Accelerate.

Public API (everything else is private). Importing this package is light: torch, transformers,
peft, bitsandbytes and datasets load only when a function that needs them is first used.

    train(config, overrides, on_step=)  run a whole fine-tuning job from a Config, dict or YAML path
    fit(accelerator, model, ...)        the training loop, for your own model / data / optimizer
    LoopArgs                            the loop's settings (max_steps, grad_accum, log_every, ...)
    TrainState                          the loop's counters (what `fit` returns and resumes from)
    RunLogger                           log.jsonl + progress bar (+ Accelerate trackers) for `fit`
    save_checkpoint, load_checkpoint    atomic checkpoints of any model, and exact resume
    find_latest                         the newest complete checkpoint of an output folder
    prepare_model(model, lora)          freeze, fp32 norms, checkpointing and LoRA, for any loop
    load_model, load_tokenizer          models and tokenizers as a config's model section names them
    MemoryProfiler                      per-step memory records for any PyTorch loop
    tensor_breakdown, AllocatorTrace    where the memory goes: tensors by role, the CPU allocator exactly
    plan, simulate                      will it fit? the peak of a config or a model, predicted on fake tensors
    load_config, Config, LoraArgs       typed configuration
    write_report(runs, out)             report.png / report.html from run folders (one run, or several overlaid)

See docs/python-api.md and examples/.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "LoraArgs": "config",
    "load_config": "config",
    "train": "run",
    "TrainResult": "run",
    "fit": "loop",
    "LoopArgs": "loop",
    "TrainState": "loop",
    "RunLogger": "report",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "find_latest": "checkpoint",
    "prepare_model": "model",
    "PreparationReport": "model",
    "load_model": "model",
    "load_tokenizer": "model",
    "MemoryProfiler": "memory",
    "AllocatorTrace": "memory",
    "plan": "planner",
    "simulate": "planner",
    "tensor_breakdown": "memory",
    "write_report": "run_report",
}

__all__ = [
    "Config",
    "ConfigError",
    "LoopArgs",
    "LoraArgs",
    "MemoryProfiler",
    "PreparationReport",
    "RunLogger",
    "TrainResult",
    "TrainState",
    "__version__",
    "AllocatorTrace",
    "plan",
    "simulate",
    "find_latest",
    "fit",
    "load_checkpoint",
    "load_config",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "save_checkpoint",
    "tensor_breakdown",
    "train",
    "write_report",
]
assert set(__all__) == set(_EXPORTS) | {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minitune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import find_latest, load_checkpoint, save_checkpoint
    from .config import Config, ConfigError, LoraArgs, load_config
    from .loop import LoopArgs, TrainState, fit
    from .memory import AllocatorTrace, MemoryProfiler, tensor_breakdown
    from .model import PreparationReport, load_model, load_tokenizer, prepare_model
    from .planner import plan, simulate
    from .report import RunLogger
    from .run import TrainResult, train
    from .run_report import write_report
