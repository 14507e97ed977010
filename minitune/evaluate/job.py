"""`evaluate_checkpoint`: what `eval.py -p CHECKPOINT` runs. The checkpoint's config.yaml gives the
base model, tokenizer, data and templates; results go to `<run>/eval/<checkpoint>/`."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from ..checkpoint import MARKER, load_weights, weights_in
from ..config import Config, QuantizationArgs, load_config
from ..data import collator_for, generation_prompt, load_rows, make_dataloader, tokenize, user_prompt
from ..device import setup_device
from ..errors import CheckpointError, DataError, EvalError
from ..lm import ensure_pad_token, model_kind
from ..model import load_model, load_tokenizer, resolve_kind
from ..run_report import try_write_report
from .merge import merge_adapter
from .results import EvalResult, to_markdown
from .scoring import OnBatch, compare
from .sheet import key_path_for, sheet_path_in, write_sheet


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
    if weights_in(path)[0] is None:
        if (path / "final").is_dir() or any(path.glob("checkpoint-*")):
            raise CheckpointError(f"'{path}' is a run folder, not a checkpoint: give {path / 'final'} "
                                  "or one of its checkpoint-NNNNNN folders")
        raise CheckpointError(f"checkpoint '{path}' holds no weights (adapter_model.safetensors or "
                              f"model.safetensors): {hint}")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {MARKER} marker: its save was "
                              "interrupted); use another checkpoint")
    return load_config(path / "config.yaml", list(overrides))


def checkpoint_model_kind(path: Path, cfg: Config) -> str:
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
        ensure_pad_token(tok)
        return tok
    return load_tokenizer(cfg.model)


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
    seq2seq = checkpoint_model_kind(path, cfg) == "seq2seq"
    rows, examples, tokenizer = _held_out(path, cfg, seq2seq, max_samples)
    bs = batch_size or cfg.training.batch_size
    loader = make_dataloader(examples, collator_for(cfg.data, tokenizer, seq2seq=seq2seq), batch_size=bs,
                             shuffle=False, seed=seed)
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
    out.mkdir(parents=True, exist_ok=True)
    files = _write_sheet(out, comparison["generations"], seed) if sheet and comparison["generations"] else {}
    if merge_to is not None:
        if cfg.quantization.mode != "none":  # merge into an unquantized copy of the base: a quantized merge is lossy
            del model, base
            model = PeftModel.from_pretrained(load_model(cfg.model, QuantizationArgs(), seed=cfg.training.seed),
                                              str(path))
        files["merged"] = str(merge_adapter(model, merge_to, tokenizer=tokenizer))

    generation = {"prompts": "file " + str(prompts_file) if prompts_file else f"{len(prompts)} held-out rows",
                  **dataclasses.asdict(cfg.generation), "seed": seed, "chat_template": cfg.data.chat_template,
                  "decoding": "sampling" if cfg.generation.temperature > 0 else "greedy"}
    result = EvalResult(str(path), method or "", _data_info(cfg, rows, examples), comparison["perplexity"],
                        comparison["generations"], generation, str(device), time.perf_counter() - t0, files,
                        comparison.get("task", {}))
    json_path, md_path = out / "eval.json", out / "eval.md"
    result.files.update(json=str(json_path), markdown=str(md_path))
    json_path.write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    md_path.write_text(to_markdown(result))
    report = _report_after_eval(path, out, cfg)
    if report is not None:  # after eval.json, which the report is drawn from
        result.files["report"] = str(report)
    return result


def _write_sheet(out: Path, generations: list[dict[str, Any]], seed: int) -> dict[str, str]:
    """The blind sheet of these generations in `out` (named by its contents: a scored one is never
    replaced) and its key."""
    sheet = sheet_path_in(out, generations, seed=seed)
    if not sheet.exists() and not key_path_for(sheet).exists():  # both there: this very sheet, kept as it is
        write_sheet(generations, sheet, seed=seed)
    return {"sheet": str(sheet), "key": str(key_path_for(sheet))}


def _data_info(cfg: Config, rows: Any, examples: Any) -> dict[str, Any]:
    """Which data the evaluation ran on, as eval.json and eval.md report it."""
    d = cfg.data
    return {"path": d.path,
            "split": (f"split '{d.validation_split}'" if d.validation_split
                      else f"{d.validation_fraction:g} of split '{d.split}' held out (seed 0)"),
            "rows": len(rows), "examples": len(examples), "prompt": d.prompt, "response": d.response}


def _report_after_eval(path: Path, out: Path, cfg: Config) -> Path | None:
    """Add the scores to the run's report (logging.report): the run folder's when eval.json went to
    the final checkpoint's default eval folder (`eval_dir_for`), else a report of the scores alone
    beside eval.json. A failure to draw is one warning line."""
    if not cfg.logging.report:
        return None
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
    method = weights_in(path)[0]
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
