"""Validation: value ranges and choices of each key, and the combinations that can never work.
Device-specific checks live in minitune/device.py."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

from .fields import SECTIONS, Config, GenerationArgs, LoraArgs

# names other tools use for minitune's keys (peft's LoraConfig, Trainer's TrainingArguments)
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "learning_rate": "lr", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs"}


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    choices = list(choices)
    if _ALIASES.get(name) in choices:
        return f" (did you mean '{_ALIASES[name]}'?)"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _choice(p: list[str], where: str, value: Any, options: typing.Iterable[str]) -> None:
    options = list(options)
    if value not in options:
        p.append(f"{where}='{value}' is not one of {', '.join(options)}{suggest(str(value), options)}")


def check_fields(section: str, values: Any) -> list[str]:
    """Each key of a section against what its field declares (fields.py): its `choices` (each item of
    a list) and its `valid` Range. Values of the wrong type were reported when they were read."""
    p: list[str] = []
    for f in dataclasses.fields(values):
        value, meta, where = getattr(values, f.name), f.metadata, f"{section}.{f.name}"
        if meta.get("choices"):
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                if isinstance(item, str) and not (meta["free_form"] and meta["free_form"] in item):
                    _choice(p, where if i is None else f"{where}[{i}]", item, meta["choices"])
        valid = meta.get("valid")
        kind = float if str(f.type).startswith("float") else int  # a value of another type was reported when read
        number = isinstance(value, kind) and not isinstance(value, bool) and (kind is int or math.isfinite(value))
        if valid and number and value not in valid:
            hint = f" ({meta['hint']})" if meta.get("hint") else ""
            p.append(f"{where}={value} must be {valid.reads(isinstance(value, int))}{hint}")
    return p


def check_lora(lo: LoraArgs) -> list[str]:
    """The lora section (also used by `lora_args`)."""
    p = check_fields("lora", lo)
    if lo.target_modules is not None and not lo.target_modules:
        p.append("lora.target_modules is empty: leave it unset for the architecture default, or list module names")
    return p


def check_generation(g: GenerationArgs) -> list[str]:
    """The generation section (also used by eval.py's flags)."""
    p = check_fields("generation", g)
    if isinstance(g.stop, list) and any(isinstance(x, str) and not x for x in g.stop):
        p.append("generation.stop holds an empty string: list non-empty stop strings, or leave it empty")
    return p


def check_values(c: Config) -> list[str]:
    """Every key against its declared choices and range, then the combinations that can never work.
    Device-specific checks live in device.py."""
    p: list[str] = []
    for section in SECTIONS:
        check = {"lora": check_lora, "generation": check_generation}.get(section)
        p += check(getattr(c, section)) if check else check_fields(section, getattr(c, section))
    return p + _model_problems(c) + _data_problems(c) + _training_problems(c)


def _model_problems(c: Config) -> list[str]:
    p: list[str] = []
    m, q = c.model, c.quantization
    sources = [s for s in ("name_or_path", "preset", "config_file") if getattr(m, s)]
    if not sources:
        p.append("model: set one of model.name_or_path, model.preset or model.config_file")
    elif len(sources) > 1:
        p.append(f"model: set only one of {', '.join('model.' + s for s in sources)}")
    if m.gguf_file and not m.name_or_path:
        p.append("model.gguf_file needs model.name_or_path (the folder that holds it)")
    if q.mode != "none" and not c.lora.enabled:
        p.append(f"quantization.mode={q.mode} needs LoRA (quantized weights cannot be trained): "
                 "set lora.enabled=true or quantization.mode=none")
    if q.mode != "none" and m.gguf_file:
        p.append("quantization of a GGUF model is not supported: GGUF weights are dequantized on load; "
                 "set quantization.mode=none")
    halves = {f"{where}={v}": v.replace("bf16", "bfloat16").replace("fp16", "float16")
              for where, v in (("model.dtype", m.dtype), ("training.mixed_precision", c.training.mixed_precision),
                               ("quantization.compute_dtype", q.compute_dtype if q.mode == "4bit" else "auto"))
              if v in ("bfloat16", "float16", "bf16", "fp16")}
    if len(set(halves.values())) > 1:
        p.append(f"{' with '.join(halves)} mixes bfloat16 and float16 in one run (autocast cannot promote between "
                 "them, and each rounds the other's values): use one 16-bit format, e.g. model.dtype=bfloat16 "
                 "with training.mixed_precision=bf16, or leave them at auto")
    return p


def _data_problems(c: Config) -> list[str]:
    p: list[str] = []
    d = c.data
    if not d.path:
        p.append("data.path is not set: give a dataset (hub id or local file), e.g. data/english_quotes.jsonl")
    if d.chat_template and c.model.kind == "seq2seq":
        p.append("data.chat_template is for causal LMs (chat templates render one token stream): set "
                 "data.chat_template=false and use data.prompt / data.response for a seq2seq model")
    return p


def _training_problems(c: Config) -> list[str]:
    p: list[str] = []
    o, t = c.optimizer, c.training
    if isinstance(o.betas, list) and (len(o.betas) != 2 or not all(isinstance(b, float) and 0 <= b < 1 for b in o.betas)):
        p.append(f"optimizer.betas={o.betas} must be two numbers in [0, 1)")
    if isinstance(t.epochs, float) and t.epochs <= 0 and not (isinstance(t.max_steps, int) and t.max_steps > 0):
        p.append(f"training.epochs={t.epochs} must be > 0 (or set training.max_steps)")
    if not t.output_dir:
        p.append("training.output_dir is empty: name a folder for logs and checkpoints")
    return p
