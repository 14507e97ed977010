"""minitune: fine-tune language models with a short, instrumented loop on Hugging Face Accelerate.

Public API (everything else is private). Importing this package is light: torch, transformers,
peft, bitsandbytes and datasets load only when a function that needs them is first used.

    train(config, overrides)      run a whole fine-tuning job from a Config, dict or YAML path
    fit(accelerator, model, ...)  the training loop, for your own model / data / optimizer
    prepare_model(model, lora)    freeze, fp32 norms, checkpointing and LoRA, for any loop
    MemoryProfiler                per-step memory records for any PyTorch loop
    load_config, Config           typed configuration
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "train": "run",
    "TrainResult": "run",
    "fit": "loop",
    "TrainState": "loop",
    "prepare_model": "model",
    "PreparationReport": "model",
    "load_model": "model",
    "load_tokenizer": "model",
    "MemoryProfiler": "memory",
    "estimate_peak": "memory",
    "tensor_breakdown": "memory",
}

__all__ = [
    "Config",
    "ConfigError",
    "MemoryProfiler",
    "PreparationReport",
    "TrainResult",
    "TrainState",
    "__version__",
    "estimate_peak",
    "fit",
    "load_config",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "tensor_breakdown",
    "train",
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
    from .config import Config, ConfigError, load_config
    from .loop import TrainState, fit
    from .memory import MemoryProfiler, estimate_peak, tensor_breakdown
    from .model import PreparationReport, load_model, load_tokenizer, prepare_model
    from .run import TrainResult, train
