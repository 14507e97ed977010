"""Evaluation: perplexity, generations and a blind human-evaluation sheet, base vs fine-tuned.

Each piece works on its own, with any model and loader:
    perplexity(model, loader)          exp of the mean token NLL over every target token (fp32)
    generate(model, tokenizer, ...)    greedy or sampled continuations, batched and seeded
    compare(model, loader, ...)        both of the above for the base and the fine-tuned model
    write_sheet / summarize_scores     a blind A/B sheet for people to score, and its summary
    merge_adapter(model, out_dir)      LoRA merged into a standalone transformers model
:func:`evaluate_checkpoint` puts them together for a minitune checkpoint (what `eval.py` runs): the
base model, tokenizer, data and templates come from the checkpoint's saved `config.yaml`.

For a LoRA checkpoint the base is the very same model with its adapter disabled (peft's
``disable_adapter()``), so the base is loaded once. A full fine-tuning checkpoint is compared with
a base rebuilt from the config. A preset (random init) base is rebuilt from `training.seed`, which
gives the weights the adapter was trained on (``load_model`` seeds the init the same way).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from rich.markup import escape
from rich.table import Table
from torch import nn
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from .checkpoint import MARKER, load_weights
from .config import Config, GenerationArgs, QuantizationArgs, load_config
from .data import (
    Collator,
    ensure_pad_token,
    generation_prompt,
    load_rows,
    make_dataloader,
    stop_token_ids,
    tokenize,
    user_prompt,
)
from .device import setup_device
from .errors import CheckpointError, DataError, EvalError
from .lm import model_kind
from .losses import default_loss
from .metrics import detect_kind, task_scores
from .model import load_model, load_tokenizer, resolve_kind

__all__ = [
    "EvalResult",
    "compare",
    "evaluate_checkpoint",
    "generate",
    "load_checkpoint_config",
    "merge_adapter",
    "perplexity",
    "eval_dir_for",
    "sheet_path_in",
    "summarize_scores",
    "write_sheet",
]

SCORE_RANGE = (0.0, 5.0)
SHEET_COLUMNS = ["id", "prompt", "output_a", "output_b", "score_a", "score_b"]
KEY_COLUMNS = ["id", "a", "b", "prompt_index"]
MODELS = ("base", "tuned")  # names used in results, the key file and the score summary

OnBatch = Callable[[], None] | None


# ----------------------------------------------------------------------------------------------
# perplexity


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # dropout (LoRA dropout included) off
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity(model: nn.Module, loader: Any, *, max_batches: int = 0, on_batch: OnBatch = None) -> dict[str, Any]:
    """Perplexity of `model` on the batches of `loader`: ``exp(sum of token NLL / target tokens)``.

    Every target token counts once, whatever the batching: padding and masked prompt tokens
    (labels -100) are excluded. Logits are upcast to fp32 before the log-softmax and the sum is
    kept in fp64. Causal LMs predict ``labels[1:]`` from the ids before them; seq2seq models
    (T5) get their decoder inputs built from the labels, as in training (``losses.default_loss``).

    Args:
        model: a transformers (or peft) model; its mode is restored afterwards.
        loader: batches with ``input_ids``, ``attention_mask`` and ``labels`` (see minitune.data).
        max_batches: stop after this many batches (0: all).
        on_batch: called after each batch (progress bars).

    Returns:
        ``{"perplexity": float, "nll": mean NLL per token (nats), "tokens": target tokens}``.

    Raises:
        DataError: the loader holds no target token.
    """
    device = _device_of(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with _eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, n = default_loss(model, batch)  # fp32 cross-entropy, summed over target tokens
            total += loss_sum.double()
            count += n
            if on_batch is not None:
                on_batch()
    tokens = int(count.item())  # host-device sync, once
    if tokens == 0:
        raise DataError("no target tokens to evaluate (every label is -100): check data.response and data.mask_prompt")
    nll = float(total.item()) / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}


# ----------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    gen: GenerationArgs | None = None,
    *,
    chat: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    on_batch: OnBatch = None,
) -> list[str]:
    """Continuations of `prompts`, batched; greedy unless ``gen.temperature`` > 0.

    Causal prompts are left-padded (so every continuation starts right after its prompt) and
    only the new tokens are decoded; seq2seq prompts go to the encoder and the decoder's output
    is decoded. Prompts are encoded as in training: with the tokenizer's special tokens, or, for
    `chat` prompts (rendered by the chat template, :func:`minitune.data.generation_prompt`), as
    written. A generation stops at EOS, at the end of an assistant turn (`chat`), or before the
    first of ``gen.stop``. The global torch RNG is seeded with `seed` first, so sampled outputs are
    reproducible and the base and fine-tuned models see the same random stream.

    Args:
        model: a transformers (or peft) model.
        tokenizer: its tokenizer (a pad token is set to EOS if it has none).
        prompts: the texts to continue.
        gen: decoding settings (None: the defaults of :class:`minitune.config.GenerationArgs`).
        chat: the prompts were rendered with the tokenizer's chat template.
        seed: seed of the sampling.
        batch_size: prompts per `generate` call.
        max_length: cut prompts to this many tokens (None: no cut).
        on_batch: called after each batch.

    Returns:
        One decoded string per prompt (special tokens removed, cut before a stop string, surrounding
        space stripped).
    """
    gen = gen or GenerationArgs()
    pad_id = ensure_pad_token(tokenizer)
    seq2seq = model_kind(model) == "seq2seq"
    device = _device_of(model)
    options: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "pad_token_id": pad_id,
                               "repetition_penalty": gen.repetition_penalty,
                               "no_repeat_ngram_size": gen.no_repeat_ngram_size}
    if gen.temperature > 0:
        options.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0)
    else:  # override sampling defaults a model's generation_config may carry (SmolLM2's does)
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    stop_ids = stop_token_ids(tokenizer, chat)
    if stop_ids:
        options["eos_token_id"] = stop_ids
    torch.manual_seed(seed)  # seeds every device's generator
    outputs: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if seq2seq else "left"
    try:
        with _eval_mode(model):
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start: start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=max_length is not None,
                                max_length=max_length, add_special_tokens=not chat)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                stop = [_StopStrings(tokenizer, gen.stop, 0 if seq2seq else enc["input_ids"].shape[1])] if gen.stop else []
                out = model.generate(**enc, **options, stopping_criteria=StoppingCriteriaList(stop))
                new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
                outputs += [_cut_at(t, gen.stop).strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
                if on_batch is not None:
                    on_batch()
    finally:
        tokenizer.padding_side = old_side
    return outputs


class _StopStrings(StoppingCriteria):
    """Stop each sequence once its new text holds a stop string. (transformers' own `stop_strings`
    also match a string that starts in the prompt: a prompt ending in "\\n" stops at once on "\\n\\n".)"""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, list(stop), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def _cut_at(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop string (generate() stops after one, and keeps it)."""
    cut = min((i for i in (text.find(x) for x in stop) if i >= 0), default=len(text))
    return text[:cut]


# ----------------------------------------------------------------------------------------------
# base vs fine-tuned


@contextlib.contextmanager
def _base_of(model: nn.Module, base: nn.Module | None) -> Iterator[nn.Module]:
    """The base model: `base` if given, else `model` with its adapter disabled (no second copy)."""
    if base is not None:
        yield base
        return
    if not hasattr(model, "disable_adapter"):
        raise TypeError("compare(): give `base`, or a peft model whose adapter can be disabled")
    with model.disable_adapter():
        yield model


def compare(
    model: nn.Module,
    loader: Any,
    tokenizer: Any,
    prompts: Sequence[str] = (),
    *,
    base: nn.Module | None = None,
    references: Sequence[str] | None = None,
    shown: Sequence[str] | None = None,
    gen: GenerationArgs | None = None,
    chat: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    max_batches: int = 0,
    progress: Callable[[str, int], OnBatch] | None = None,
) -> dict[str, Any]:
    """Perplexity and generations of the base and the fine-tuned model, side by side.

    Args:
        model: the fine-tuned model. A peft model serves as its own base (adapter disabled
            inside ``disable_adapter()``) unless `base` is given.
        loader: evaluation batches (see :func:`perplexity`).
        tokenizer: for the generations.
        prompts: prompts to generate from (may be empty).
        base: the base model, for full fine-tuning (None: `model` with its adapter disabled).
        references: the expected output of each prompt (shown beside the generations).
        shown: each prompt as a person reads it (default: the prompt; a chat prompt's user turn).
        gen, chat, seed, batch_size: see :func:`generate`.
        max_batches: limit the perplexity to this many batches (0: all).
        progress: ``progress(label, total)`` returns the callback for one task's batches.

    Returns:
        ``{"perplexity": {"base": {...}, "tuned": {...}}, "generations": [{"id", "prompt",
        "reference", "base", "tuned"}, ...], "task": {"base": {...}, "tuned": {...}}}``; perplexity
        entries as :func:`perplexity` returns; "task" (with references) as
        :func:`minitune.metrics.task_scores` returns, the kind of task detected once for both.

    Raises:
        TypeError: no `base` and `model` is not a peft model.
    """
    n_batches = min(len(loader), max_batches) if max_batches else len(loader)
    n_gen = math.ceil(len(prompts) / batch_size)
    options = dict(gen=gen, chat=chat, seed=seed, batch_size=batch_size)

    def task(label: str, total: int) -> OnBatch:
        return progress(label, total) if progress is not None else None

    result: dict[str, Any] = {"perplexity": {}, "generations": []}
    outputs: dict[str, list[str]] = {}
    with _base_of(model, base) as base_model:
        result["perplexity"]["base"] = perplexity(base_model, loader, max_batches=max_batches,
                                                  on_batch=task("perplexity (base)", n_batches))
        if prompts:
            outputs["base"] = generate(base_model, tokenizer, prompts, on_batch=task("generate (base)", n_gen),
                                       **options)
    result["perplexity"]["tuned"] = perplexity(model, loader, max_batches=max_batches,
                                               on_batch=task("perplexity (fine-tuned)", n_batches))
    if prompts:
        outputs["tuned"] = generate(model, tokenizer, prompts, on_batch=task("generate (fine-tuned)", n_gen),
                                    **options)
    for i, prompt in enumerate(prompts):
        result["generations"].append({
            "id": i, "prompt": shown[i] if shown else prompt, "reference": references[i] if references else None,
            "base": outputs["base"][i], "tuned": outputs["tuned"][i],
        })
    if prompts and references and any(r.strip() for r in references):
        kind = detect_kind(references)  # one kind for both sides
        result["task"] = {name: task_scores(outputs[name], references, kind) for name in MODELS}
    return result


# ----------------------------------------------------------------------------------------------
# human evaluation sheet


def key_path_for(sheet: str | Path) -> Path:
    """Where the key of a sheet lives by default: ``human_eval.csv`` -> ``human_eval_key.csv``."""
    sheet = Path(sheet)
    return sheet.with_name(f"{sheet.stem}_key.csv")


def _sheet_texts(generations: Sequence[dict[str, Any]], seed: int, models: tuple[str, str]) -> tuple[str, str]:
    """The sheet's and the key's CSV text: rows in a seeded order, a seeded coin per row for A/B."""
    rng = random.Random(seed)
    order = list(range(len(generations)))
    rng.shuffle(order)
    sheet_buf, key_buf = io.StringIO(), io.StringIO()
    sheet, key = csv.writer(sheet_buf), csv.writer(key_buf)
    sheet.writerow(SHEET_COLUMNS)
    key.writerow(KEY_COLUMNS)
    for row_id, index in enumerate(order, start=1):
        g = generations[index]
        a, b = models if rng.random() < 0.5 else models[::-1]
        sheet.writerow([row_id, g["prompt"], g[a], g[b], "", ""])
        key.writerow([row_id, a, b, g.get("id", index)])
    return sheet_buf.getvalue(), key_buf.getvalue()


def _create(path: Path, text: str) -> None:
    """Write a new file; never replace one (`x`: fails if it exists, even if created a moment ago)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", newline="", encoding="utf-8") as f:
        f.write(text)


def write_sheet(generations: Sequence[dict[str, Any]], path: str | Path, *, key_path: str | Path | None = None,
                seed: int = 0, models: tuple[str, str] = MODELS) -> tuple[Path, Path]:
    """A blind A/B sheet for people to score, and its key in a separate file; neither ever replaces a file.

    Rows come in a seeded random order, and for each row a seeded coin decides which model's
    output is A; the sheet names neither model. Raters fill `score_a` and `score_b` with a number
    from 0 to 5 (empty: not scored). A sheet may be out with raters while its key stays here, so a
    sheet or key that exists (scored or not, readable or not) is never overwritten.

    Args:
        generations: as :func:`compare` returns them (``prompt`` and one entry per model).
        path: the sheet (CSV: id, prompt, output_a, output_b, score_a, score_b).
        key_path: the key (CSV: id, a, b, prompt_index); default :func:`key_path_for`.
        seed: seeds the order and the A/B assignment.
        models: the two entries of each generation to compare.

    Returns:
        (sheet path, key path).

    Raises:
        EvalError: `path` or `key_path` exists (nothing is written then).
    """
    path = Path(path)
    key_path = Path(key_path) if key_path else key_path_for(path)
    for p in (path, key_path):
        if p.exists():
            raise EvalError(f"'{p}' exists; a sheet and its key are never replaced (the sheet may be out with "
                            "raters): write the new sheet under another name, or move the old pair away")
    sheet_text, key_text = _sheet_texts(generations, seed, models)
    _create(path, sheet_text)
    try:
        _create(key_path, key_text)
    except BaseException:
        path.unlink()  # the sheet written a moment ago, without a key: useless
        raise
    return path, key_path


def sheet_path_in(folder: str | Path, generations: Sequence[dict[str, Any]], *, seed: int = 0,
                  models: tuple[str, str] = MODELS) -> Path:
    """Where eval.py puts the sheet of these generations: ``human_eval-<hash>.csv`` in `folder`,
    named by the sheet's and key's contents. Another seed or other outputs give another name, so a
    new evaluation adds a sheet and key beside the old ones instead of replacing the key of a sheet
    that may be out with raters; the same evaluation again gives the same name (the files exist: kept)."""
    sheet_text, key_text = _sheet_texts(generations, seed, models)
    digest = hashlib.sha256(f"{sheet_text}\0{key_text}".encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return Path(folder) / f"human_eval-{digest}.csv"


def _read_csv(path: Path, columns: Sequence[str], what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {what} '{path}' as CSV ({e})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{what} '{path}' lacks the column(s) {', '.join(missing)}; its columns are: "
                        f"{', '.join(header) or 'none'} (expected {', '.join(columns)})")
    # a short row leaves its last columns None, a long one puts the extra cells under None: both read as empty
    return [{k: v or "" for k, v in row.items() if k is not None} for row in rows]


def _score(value: str, where: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    lo, hi = SCORE_RANGE
    if not lo <= x <= hi:
        raise DataError(f"{where}: score '{value}' is not a number from {lo:g} to {hi:g}; fix it or leave it empty")
    return x


def summarize_scores(sheet: str | Path, key: str | Path | None = None) -> dict[str, Any]:
    """Mean score and count per model of a filled-in sheet, unblinded with its key.

    Empty score cells are skipped. A row where both outputs are scored also counts as a win for
    the higher score (or a tie).

    Args:
        sheet: the CSV written by :func:`write_sheet`, with scores filled in.
        key: its key (default :func:`key_path_for`).

    Returns:
        ``{"models": {name: {"mean": float | None, "count": int}}, "wins": {name: int, "tie": int},
        "rows": int, "sheet": str, "key": str}``.

    Raises:
        DataError: a missing file or column, a score outside 0-5, or an id the key lacks.
    """
    sheet = Path(sheet)
    key = Path(key) if key else key_path_for(sheet)
    rows = _read_csv(sheet, SHEET_COLUMNS, "sheet")
    key_rows = _read_csv(key, KEY_COLUMNS, "key file")
    assignment = {r["id"].strip(): (r["a"].strip(), r["b"].strip()) for r in key_rows}
    names = sorted({n for pair in assignment.values() for n in pair}, key=lambda n: (n not in MODELS, n))
    scores: dict[str, list[float]] = {n: [] for n in names}
    wins: dict[str, int] = {**{n: 0 for n in names}, "tie": 0}
    for line, row in enumerate(rows, start=2):
        row_id = (row["id"] or "").strip()
        if row_id not in assignment:
            raise DataError(f"{sheet}, line {line}: id '{row_id}' is not in the key '{key}': is it the key of this sheet?")
        a, b = assignment[row_id]
        sa = _score(row["score_a"], f"{sheet}, line {line}, score_a")
        sb = _score(row["score_b"], f"{sheet}, line {line}, score_b")
        for name, s in ((a, sa), (b, sb)):
            if s is not None:
                scores[name].append(s)
        if sa is not None and sb is not None:
            wins[a if sa > sb else b if sb > sa else "tie"] += 1
    models = {n: {"mean": sum(v) / len(v) if v else None, "count": len(v)} for n, v in scores.items()}
    return {"models": models, "wins": wins, "rows": len(rows), "sheet": str(sheet), "key": str(key)}


# ----------------------------------------------------------------------------------------------
# merging


def _is_bnb_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def merge_adapter(model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None) -> Path:
    """Merge a LoRA adapter into its base and save a standalone transformers model.

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` (or the seq2seq class),
    without peft. peft's ``merge_and_unload`` folds the adapter into the base weights *in place*:
    `model` is not usable as a peft model afterwards. A base loaded from GGUF refuses
    ``save_pretrained`` (transformers marks it not serializable), so its merged weights are moved
    into a model built ``from_config`` with the same config and saved from there.

    Args:
        model: a peft model (LoRA) on an unquantized base.
        out_dir: the folder to write (created; must be empty if it exists).
        tokenizer: saved beside the weights when given.

    Returns:
        `out_dir`.

    Raises:
        EvalError: `model` has no adapter, its base is 8/4-bit quantized (merge into an
            unquantized copy of the base instead), or `out_dir` is not empty.
    """
    out = Path(out_dir)
    if not hasattr(model, "merge_and_unload"):
        raise EvalError("merging needs a LoRA checkpoint: a full fine-tuning checkpoint already is a standalone model")
    if _is_bnb_quantized(model.get_base_model()):
        raise EvalError("cannot merge into an 8-bit/4-bit base: load the base unquantized, attach the adapter, and merge that")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvalError(f"--merge-to '{out}' exists and is not an empty folder: choose a new folder")
    merged = model.merge_and_unload()
    quantizer = getattr(merged, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_serializable():
        # GGUF: the weights are plain (dequantized) tensors, but save_pretrained refuses the model.
        config = copy.deepcopy(merged.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dtype = next(merged.parameters()).dtype
        standalone = type(merged)._from_config(config, dtype=dtype)
        standalone.load_state_dict(merged.state_dict(), strict=True)
        if getattr(merged, "generation_config", None) is not None:
            standalone.generation_config = copy.deepcopy(merged.generation_config)
        merged = standalone
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# checkpoints


def _weights_kind(path: Path) -> str | None:
    if (path / "adapter_model.safetensors").is_file() or (path / "adapter_model.bin").is_file():
        return "lora"
    if any(path.glob("model*.safetensors")):
        return "full"
    return None


def load_checkpoint_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint was trained with (its `config.yaml`), with `key=value` overrides.

    Raises:
        CheckpointError: `path` is not a complete minitune checkpoint.
        ConfigError: the saved config or an override is invalid.
    """
    path = Path(path)
    hint = "give a checkpoint folder such as runs/<name>/final"
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist: {hint}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a file, not a folder: {hint}")
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"'{path}' is not a minitune checkpoint (no config.yaml): {hint}")
    if _weights_kind(path) is None:
        if (path / "final").is_dir() or any(path.glob("checkpoint-*")):
            raise CheckpointError(f"'{path}' is a run folder, not a checkpoint: give {path / 'final'} "
                                  "or one of its checkpoint-NNNNNN folders")
        raise CheckpointError(f"checkpoint '{path}' holds no weights (adapter_model.safetensors or "
                              f"model.safetensors): {hint}")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {MARKER} marker: its save was "
                              "interrupted); use another checkpoint")
    return load_config(path / "config.yaml", list(overrides))


def _checkpoint_model_kind(path: Path, cfg: Config) -> str:
    """'causal' or 'seq2seq', read from the checkpoint (no base model needed)."""
    if cfg.model.kind != "auto":
        return cfg.model.kind
    adapter = path / "adapter_config.json"
    config = path / "config.json"
    try:
        for file in (adapter, config):
            if file.is_file():
                saved = json.loads(file.read_text(encoding="utf-8"))
                if not isinstance(saved, dict):
                    raise ValueError(f"{file.name} holds a JSON {type(saved).__name__}, not an object")
                if file is adapter:
                    return "seq2seq" if saved.get("task_type") == "SEQ_2_SEQ_LM" else "causal"
                return model_kind(saved)
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8, not an object
        raise CheckpointError(f"checkpoint '{path}' has an unreadable config ({e}); it is corrupt") from None
    return resolve_kind(cfg.model)


def _load_tokenizer(path: Path, cfg: Config) -> Any:
    """The tokenizer saved in the checkpoint (the one training used), else the one the config names.

    Raises:
        CheckpointError: the checkpoint holds a tokenizer that does not load. Not replaced quietly by
            the config's: another tokenizer would give other token ids, hence other numbers.
    """
    if (path / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise CheckpointError(f"the tokenizer saved in '{path}' does not load ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); restore its tokenizer files, or "
                                  "delete them (tokenizer*.json) to use the config's model.tokenizer") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return load_tokenizer(cfg.model)


@dataclass
class EvalResult:
    """What :func:`evaluate_checkpoint` returns (and writes to eval.json)."""

    checkpoint: str
    method: str  # 'lora' or 'full'
    data: dict[str, Any]
    perplexity: dict[str, dict[str, Any]]
    generations: list[dict[str, Any]]
    generation: dict[str, Any]
    device: str
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    task: dict[str, dict[str, Any]] = field(default_factory=dict)  # base / tuned task metrics, with references

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _prompts_from_file(path: str | Path) -> list[str]:
    """One prompt per line (the line break is removed, spaces are kept); blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts file '{p}' does not exist")
    prompts = [line.rstrip("\r\n") for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise DataError(f"--prompts file '{p}' holds no prompt: write one prompt per line")
    return prompts


def evaluate_checkpoint(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    data_path: str | None = None,
    split: str | None = None,
    max_samples: int | None = None,
    batch_size: int | None = None,
    num_prompts: int = 8,
    prompts_file: str | Path | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    sheet: bool = True,
    merge_to: str | Path | None = None,
    progress: Callable[[str, int], OnBatch] | None = None,
) -> EvalResult:
    """Compare a checkpoint with its base on the held-out data; write eval.json, eval.md and a sheet.

    The checkpoint's config.yaml gives the base model, tokenizer, data and templates. The rows
    are the validation rows training held out (``data.load_rows``: a named validation split, or
    the seeded ``validation_fraction`` hold-out), then tokenized as in training.

    Args:
        path: the checkpoint folder (e.g. runs/smollm2-quotes/final).
        overrides: ``section.key=value`` overrides of the saved config.
        data_path: evaluate on another dataset (same templates and hold-out rules).
        split: evaluate on every row of this split (sets data.validation_split).
        max_samples: use the first N held-out rows.
        batch_size: examples per batch (default: training.batch_size).
        num_prompts: how many held-out rows (seeded choice) to generate from.
        prompts_file: generate from these prompts instead (one per line; a user turn with
            data.chat_template).
        seed: seed of the prompt choice, the sampling and the sheet's order. Decoding settings are
            the config's ``generation`` section (override them as ``generation.key=value``).
        out_dir: where eval.json, eval.md and the sheet go (default :func:`eval_dir_for`); never a
            checkpoint folder, which training deletes or replaces.
        sheet: write the human-evaluation sheet and its key.
        merge_to: also write the merged model (LoRA checkpoints) to this folder.
        progress: ``progress(label, total)`` -> per-batch callback.

    Returns:
        The :class:`EvalResult`.

    Raises:
        CheckpointError, ConfigError, DataError, ModelError, EvalError: bad input, one line each.
    """
    t0 = time.perf_counter()
    path = Path(path)
    extra = list(overrides)
    if data_path:
        extra.append(f"data.path={json.dumps(data_path)}")
    if split:
        extra.append(f"data.validation_split={json.dumps(split)}")
    cfg = load_checkpoint_config(path, extra)
    out = Path(out_dir) if out_dir else eval_dir_for(path)
    method = _check_request(path, out, merge_to)
    cfg, where = setup_device(cfg)  # 'auto' precision resolved for this device, as training does
    device = where.device

    # data first: bad data is found before any weights load
    seq2seq = _checkpoint_model_kind(path, cfg) == "seq2seq"
    rows, examples, tokenizer = _held_out(path, cfg, seq2seq, max_samples)
    bs = batch_size or cfg.training.batch_size
    loader = make_dataloader(examples, Collator(tokenizer, seq2seq=seq2seq), batch_size=bs, shuffle=False, seed=seed)
    if prompts_file:
        shown, references = _prompts_from_file(prompts_file), None
        prompts = [user_prompt(text, cfg.data, tokenizer) for text in shown]
    else:
        prompts, shown, references = _held_out_prompts(cfg, rows, tokenizer, num_prompts, seed)

    loaded = progress("load model", 1) if progress is not None else None
    model, base = _load_models(path, cfg, method, device)
    if loaded is not None:
        loaded()
    comparison = compare(model, loader, tokenizer, prompts, base=base, references=references,
                         shown=shown, gen=cfg.generation, chat=cfg.data.chat_template, seed=seed,
                         batch_size=bs, progress=progress)
    files: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    if sheet and comparison["generations"]:
        s = sheet_path_in(out, comparison["generations"], seed=seed)
        if not s.exists() and not key_path_for(s).exists():  # both there: this very sheet, kept as it is
            write_sheet(comparison["generations"], s, seed=seed)
        files.update(sheet=str(s), key=str(key_path_for(s)))
    if merge_to is not None:
        if cfg.quantization.mode != "none":  # merge into an unquantized copy of the base: a quantized merge is lossy
            del model, base
            model = PeftModel.from_pretrained(load_model(cfg.model, QuantizationArgs(), seed=cfg.training.seed),
                                              str(path))
        files["merged"] = str(merge_adapter(model, merge_to, tokenizer=tokenizer))

    data_info = {
        "path": cfg.data.path,
        "split": (f"split '{cfg.data.validation_split}'" if cfg.data.validation_split
                  else f"{cfg.data.validation_fraction:g} of split '{cfg.data.split}' held out (seed 0)"),
        "rows": len(rows),
        "examples": len(examples),
        "prompt": cfg.data.prompt,
        "response": cfg.data.response,
    }
    generation = {"prompts": "file " + str(prompts_file) if prompts_file else f"{len(prompts)} held-out rows",
                  **dataclasses.asdict(cfg.generation), "seed": seed, "chat_template": cfg.data.chat_template,
                  "decoding": "sampling" if cfg.generation.temperature > 0 else "greedy"}
    result = EvalResult(str(path), method or "", data_info, comparison["perplexity"], comparison["generations"],
                        generation, str(device), time.perf_counter() - t0, files, comparison.get("task", {}))
    json_path, md_path = out / "eval.json", out / "eval.md"
    result.files.update(json=str(json_path), markdown=str(md_path))
    json_path.write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    md_path.write_text(to_markdown(result))
    report = _report_after_eval(path, out, cfg)
    if report is not None:  # after eval.json, which the report is drawn from
        result.files["report"] = str(report)
    return result


def _report_after_eval(path: Path, out: Path, cfg: Config) -> Path | None:
    """Add the scores to the run's report (logging.report): the run folder's when eval.json went to
    the final checkpoint's default eval folder (`eval_dir_for`), else a report of the scores alone
    beside eval.json. A failure to draw is one warning line."""
    if not cfg.logging.report:
        return None
    from .run_report import try_write_report  # matplotlib loads only here

    run = path.parent
    in_run = (out.resolve() == eval_dir_for(path).resolve() and path.name == "final"
              and (run / "log.jsonl").is_file())
    return try_write_report(run if in_run else out)



def eval_dir_for(checkpoint: str | Path) -> Path:
    """Where eval.py writes by default: ``<run>/eval/<checkpoint name>`` (``runs/x/final`` ->
    ``runs/x/eval/final``), beside the checkpoint rather than in it. Training deletes checkpoint
    folders (``training.overwrite``, ``keep_last``) and replaces ``final`` (a resumed run), never
    ``eval/``, so scored sheets and their keys survive every later training command."""
    checkpoint = Path(checkpoint)
    if checkpoint.name in ("", ".", ".."):
        checkpoint = Path(os.path.abspath(checkpoint))
    return checkpoint.parent / "eval" / checkpoint.name


def _in_checkpoint_folder(out: Path) -> Path | None:
    """The checkpoint folder `out` is or lies in (or will be: `final` or `checkpoint-N` in a run folder), else None."""
    out = Path(os.path.abspath(out))  # no system call: any string a user typed is fine here
    for p in (out, *out.parents):
        if (p / MARKER).is_file():
            return p
    run_folder = any((out.parent / f).exists() for f in ("config.yaml", "log.jsonl"))
    if run_folder and (out.name == "final" or re.fullmatch(r"checkpoint-\d+", out.name)):
        return out
    return None


def _check_request(path: Path, out: Path, merge_to: str | Path | None) -> str | None:
    """Refuse, before any work, an output folder that training would delete or a merge that cannot be
    done; returns the checkpoint's method ('lora', 'full')."""
    inside = _in_checkpoint_folder(out)
    if inside is not None:
        raise EvalError(f"--out '{out}' is in the checkpoint folder '{inside}', which the next training run "
                        f"deletes or replaces (with any scored sheet): write beside it, e.g. the default "
                        f"--out {eval_dir_for(path)}")
    if merge_to is not None:
        m = Path(merge_to)
        if m.exists() and (not m.is_dir() or any(m.iterdir())):
            raise EvalError(f"--merge-to '{m}' exists and is not an empty folder: choose a new folder")
    method = _weights_kind(path)
    if merge_to is not None and method != "lora":
        raise EvalError("--merge-to needs a LoRA checkpoint: a full fine-tuning checkpoint already is a standalone model")
    return method


def _held_out(path: Path, cfg: Config, seq2seq: bool, max_samples: int | None) -> tuple[Any, Any, Any]:
    """(rows, tokenized examples, tokenizer) of the rows training held out, tokenized as in training.

    Raises:
        DataError: no held-out rows, or none usable.
    """
    _, rows = load_rows(cfg.data)
    if rows is None or len(rows) == 0:
        raise DataError(f"no held-out rows to evaluate on in '{cfg.data.path}' (data.validation_fraction="
                        f"{cfg.data.validation_fraction}, data.validation_split={cfg.data.validation_split}): "
                        "name a split with --split, or set data.validation_fraction=0.1")
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    tokenizer = _load_tokenizer(path, cfg)
    try:
        examples = tokenize(rows, cfg.data, tokenizer, seq2seq=seq2seq)
    except DataError as e:
        raise DataError(f"held-out split: {e}") from e
    if len(examples) == 0:
        raise DataError(f"the held-out split of '{cfg.data.path}' has no usable example (all empty or cut away)")
    return rows, examples, tokenizer


def _held_out_prompts(cfg: Config, rows: Any, tokenizer: Any, num_prompts: int,
                      seed: int) -> tuple[list[str], list[str], list[str]]:
    """(prompts, as shown, references) of a seeded choice of `num_prompts` held-out rows, rendered as
    training renders them (:func:`minitune.data.generation_prompt`); rows with an empty prompt are skipped."""
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(num_prompts, len(rows))))
    prompts, shown, references = [], [], []
    for i in picked:
        text, readable, reference = generation_prompt(rows[i], cfg.data, tokenizer)
        if readable.strip():
            prompts.append(text)
            shown.append(readable)
            references.append(reference)
    return prompts, shown, references


def _load_models(path: Path, cfg: Config, method: str | None, device: torch.device) -> tuple[nn.Module, Any]:
    """(fine-tuned model, base or None): one load for LoRA (the base is the adapter disabled), two
    for full fine-tuning.

    Raises:
        CheckpointError: the adapter or weights do not fit the base the config describes.
    """
    base_model = load_model(cfg.model, cfg.quantization, device=device, seed=cfg.training.seed)
    if method == "lora":
        try:
            model = PeftModel.from_pretrained(base_model, str(path))
        except Exception as e:
            raise CheckpointError(f"cannot attach the adapter in '{path}' to its base ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); was config.yaml edited?") from None
        base = None
    else:
        model = copy.deepcopy(base_model)
        load_weights(path, model)
        base = base_model
    if cfg.quantization.mode == "none":
        model.to(device)
        if base is not None:
            base.to(device)
    return model, base


# ----------------------------------------------------------------------------------------------
# reports


# task metrics shown in the tables (all of them are in eval.json)
_TASK_ROWS = {"tag_f1": "tag F1 (macro)", "tag_precision": "tag precision", "tag_recall": "tag recall",
              "exact_match": "exact match", "rouge_l": "ROUGE-L F"}


def metric_rows(ppl: dict[str, dict[str, Any]],
                    task: dict[str, dict[str, Any]] | None = None) -> list[tuple[str, str, str, str]]:
    """(metric, base, fine-tuned, change) rows for the terminal and markdown tables: perplexity, then
    the task metrics of the generations (with references)."""
    b, t = ppl["base"], ppl["tuned"]
    change = (t["perplexity"] / b["perplexity"] - 1) * 100
    rows = [
        ("perplexity", f"{b['perplexity']:.3f}", f"{t['perplexity']:.3f}", f"{change:+.1f}%"),
        ("mean NLL (nats/token)", f"{b['nll']:.4f}", f"{t['nll']:.4f}", f"{t['nll'] - b['nll']:+.4f}"),
        ("target tokens", f"{b['tokens']:,d}", f"{t['tokens']:,d}", ""),
    ]
    if task:
        tb, tt = task["base"], task["tuned"]
        n = tt["examples"]
        rows += [(f"{label} ({n} generations)", f"{tb[key]:.3f}", f"{tt[key]:.3f}", f"{tt[key] - tb[key]:+.3f}")
                 for key, label in _TASK_ROWS.items() if key in tt]
    return rows


def _md_cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def to_markdown(result: EvalResult) -> str:
    """eval.md: the perplexity table and the generations, base and fine-tuned one under the other."""
    d = result.data
    lines = [
        f"# Evaluation of `{result.checkpoint}`",
        "",
        f"Data: `{d['path']}`, {d['split']}: {d['rows']} rows, {d['examples']} examples. Device: {result.device}.",
        "",
        "| metric | base | fine-tuned | change |",
        "|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in metric_rows(result.perplexity, result.task)],
        "",
    ]
    g = result.generation
    if result.generations:
        lines += [f"## Generations ({_settings(g)})", ""]
        for gen in result.generations:
            lines += [f"### {gen['id']}", "", "| | |", "|---|---|", f"| prompt | {_md_cell(gen['prompt'])} |"]
            if gen.get("reference"):
                lines.append(f"| reference | {_md_cell(gen['reference'])} |")
            lines += [f"| base | {_md_cell(gen['base'])} |", f"| fine-tuned | {_md_cell(gen['tuned'])} |", ""]
    if result.files.get("sheet"):
        lines += [f"Human evaluation sheet: `{result.files['sheet']}` (key: `{result.files['key']}`).", ""]
    return "\n".join(lines)


def _settings(g: dict[str, Any]) -> str:
    """The decoding settings of a result in one line (eval.md and the terminal)."""
    text = f"{g['decoding']}, max_new_tokens={g['max_new_tokens']}"
    if g["decoding"] == "sampling":
        text += f", temperature={g['temperature']}, top_p={g['top_p']}"
    for key, off in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
        if g.get(key, off) != off:
            text += f", {key}={g[key]}"
    if g.get("stop"):
        text += f", stop={g['stop']}"
    return text + f", seed={g['seed']}"


def render_result(result: EvalResult, console: Any) -> None:
    """Print the rich tables: perplexity side by side, then the generations."""
    d = result.data
    table = Table(title=f"{result.checkpoint}: base vs fine-tuned on {d['path']} ({d['split']}, "
                        f"{d['examples']} examples)", title_justify="left")
    for col in ("metric", "base", "fine-tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in metric_rows(result.perplexity, result.task):
        table.add_row(*row)
    console.print(table)
    if result.generations:
        g = result.generation
        gens = Table(title=f"generations ({_settings(g)})",
                     title_justify="left", show_header=False, show_lines=True)
        gens.add_column("what", style="bold")
        gens.add_column("text", overflow="fold")
        for gen in result.generations:
            text = [f"[bold]prompt[/bold]  {_escape(gen['prompt'])}"]
            if gen.get("reference"):
                text.append(f"[dim]reference[/dim]  {_escape(gen['reference'])}")
            text += [f"[red]base[/red]  {_escape(gen['base'])}", f"[green]fine-tuned[/green]  {_escape(gen['tuned'])}"]
            gens.add_row(str(gen["id"]), "\n".join(text))
        console.print(gens)
    for name in ("json", "markdown", "sheet", "key", "merged", "report"):
        if result.files.get(name):
            console.print(f"{name}: {result.files[name]}", highlight=False, markup=False)


def _escape(text: Any) -> str:
    return escape(str(text if text is not None else ""))


def render_scores(summary: dict[str, Any], console: Any) -> None:
    """Print the score summary as a rich table."""
    table = Table(title=f"human scores: {summary['sheet']} ({summary['rows']} rows)", title_justify="left")
    for col in ("model", "mean score (0-5)", "scored", "wins"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, s in summary["models"].items():
        label = "fine-tuned" if name == "tuned" else name
        table.add_row(label, f"{s['mean']:.2f}" if s["mean"] is not None else "-", str(s["count"]),
                      str(summary["wins"].get(name, 0)))
    table.add_row("tie", "", "", str(summary["wins"]["tie"]))
    console.print(table)
