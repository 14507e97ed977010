"""Typed run configuration: dataclass sections, YAML loading, `key=value` overrides, validation.

A run is described by one :class:`Config` made of sections (model, quantization, lora, data,
optimizer, training, logging, generation). Every field has a default and a docstring-like ``help``
in its metadata. :func:`load_config` reads YAML (a file, or a config shipped with minitune by name:
see :func:`config_path`), applies dotted overrides such as ``optimizer.lr=1e-4``, and
:func:`validate` collects *every* problem into one :class:`ConfigError`, before any weights load.

    fields.py  the sections: each key's type, default, help    checks.py  ranges, choices, combinations
    load.py    YAML, shipped configs, overrides, load_config
"""

from __future__ import annotations

from .checks import check_fields, check_values
from .fields import (
    ATTENTION,
    CONFIGS,
    DTYPES,
    LOSSES,
    MIXED_PRECISION,
    OPTIMIZERS,
    SCHEDULERS,
    SECTIONS,
    SEED_MAX,
    TRACKERS,
    Config,
    DataArgs,
    GenerationArgs,
    LoggingArgs,
    LoraArgs,
    ModelArgs,
    OptimizerArgs,
    QuantizationArgs,
    TrainingArgs,
    choices_of,
    describe,
    with_split,
)
from .load import (
    config_path,
    describe_configs,
    generation_args,
    load_config,
    looks_like_path,
    lora_args,
    merge_sections,
    parse_overrides,
    resolve_path,
    shipped_configs,
    validate,
    yaml_load,
)

__all__ = [
    "ATTENTION",
    "CONFIGS",
    "DTYPES",
    "LOSSES",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "SCHEDULERS",
    "SECTIONS",
    "SEED_MAX",
    "TRACKERS",
    "Config",
    "DataArgs",
    "GenerationArgs",
    "LoggingArgs",
    "LoraArgs",
    "ModelArgs",
    "OptimizerArgs",
    "QuantizationArgs",
    "TrainingArgs",
    "check_fields",
    "choices_of",
    "check_values",
    "config_path",
    "describe",
    "describe_configs",
    "generation_args",
    "load_config",
    "looks_like_path",
    "lora_args",
    "merge_sections",
    "parse_overrides",
    "resolve_path",
    "shipped_configs",
    "validate",
    "with_split",
    "yaml_load",
]
