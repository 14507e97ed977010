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
    MinituneError                       the base of every bad-input error: ConfigError, DataError,
                                        ModelError, CheckpointError, DiskFullError, RunError,
                                        EvalError, PlanError, ReportError (the message names the fix)

See docs/python-api.md and examples/.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (the one list: __all__ and the lazy import derive from it)
_EXPORTS = {
    "Config": "config",
    "LoraArgs": "config",
    "load_config": "config",
    "train": "run",
    "TrainResult": "run",
    "fit": "loop",
    "LoopArgs": "loop",
    "TrainState": "state",
    "RunLogger": "report",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "find_latest": "checkpoint",
    "prepare_model": "prepare",
    "PreparationReport": "prepare",
    "load_model": "model",
    "load_tokenizer": "model",
    "MemoryProfiler": "memory",
    "AllocatorTrace": "cpu_allocator",
    "tensor_breakdown": "memory",
    "plan": "planner",
    "simulate": "planner",
    "write_report": "run_report",
    "MinituneError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ModelError": "errors",
    "CheckpointError": "errors",
    "DiskFullError": "errors",
    "RunError": "errors",
    "EvalError": "errors",
    "PlanError": "errors",
    "ReportError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minitune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
