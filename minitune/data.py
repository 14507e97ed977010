"""Data: rows from a file, folder or hub id -> token ids -> padded batches.

The flow is :func:`load_rows` (raw train / validation rows) -> :func:`tokenize` (templates rendered
over the columns, truncation, prompt masking or packing) -> :func:`make_dataloader` with a
:class:`Collator`. :func:`build_data` does the first two for both splits and reports statistics.

Conventions the loop relies on: labels are ``-100`` wherever a token is not a target (padding and,
with ``data.mask_prompt``, the prompt); real tokens in a batch are ``attention_mask.sum()`` and
target tokens are ``(labels != -100).sum()``. Batches hold exactly ``input_ids``,
``attention_mask`` and ``labels``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import statistics
import string
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import ftfy
import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import DataArgs, resolve_path
from .errors import DataError
from .lm import shift_targets

__all__ = [
    "Collator",
    "DataBundle",
    "LengthGroupedSampler",
    "SeededRandomSampler",
    "apply_chat",
    "build_data",
    "check_chat_template",
    "conversation",
    "ensure_pad_token",
    "estimate_padding",
    "generation_prompt",
    "load_rows",
    "make_dataloader",
    "render",
    "repair_text",
    "stop_token_ids",
    "tokenize",
    "user_prompt",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# file suffix -> (datasets builder, extra builder kwargs)
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}),  # a JSON list of objects or JSON lines: the json builder reads both
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
_SUFFIXES = ", ".join(BUILDERS)


# --------------------------------------------------------------------------------------------
# rows


def _read_local(path: Path, split: str) -> datasets.DatasetDict:
    """A local file (one split, named `split`) or folder (splits from file names) as a DatasetDict."""
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"data file '{path}' has an unsupported extension '{path.suffix}': use one of {_SUFFIXES}")
        if path.stat().st_size == 0:
            raise DataError(f"data file '{path}' is empty: give a file with at least one row")
        builder, kwargs = BUILDERS[path.suffix.lower()]
        source = {"data_files": {split: str(path)}}
    else:
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in BUILDERS
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise DataError(f"data folder '{path}' holds no data files: put {_SUFFIXES} files in it")
        kinds = {BUILDERS[p.suffix.lower()][0] for p in files}
        if len(kinds) > 1:
            raise DataError(f"data folder '{path}' mixes formats ({', '.join(sorted(kinds))}): keep one format per folder")
        builder, kwargs = BUILDERS[files[0].suffix.lower()]
        # datasets names splits after the files (train.jsonl, validation.jsonl, test-00000.parquet, ...)
        source = {"data_dir": str(path)}
    try:
        return datasets.load_dataset(builder, **source, **kwargs)
    except Exception as e:  # datasets raises many types (StopIteration for an empty JSON file, ArrowInvalid, ...)
        for f in [path] if path.is_file() else files:
            _check_text_file(f, builder)  # names the file and line when the text itself is the problem
        while e.__cause__ is not None:  # DatasetGenerationError wraps what went wrong
            e = e.__cause__
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if "corresponds to no data" in str(e):
            why = "it holds no rows"
        raise DataError(f"could not read '{path}' as {builder}: {why}; check the file's format") from e


def _check_text_file(path: Path, builder: str) -> None:
    """Raise a DataError naming the line of `path` that is not UTF-8 or not JSON (json builder); return
    quietly when the text looks well formed (the problem is elsewhere)."""
    if builder == "parquet":
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"data file '{path}', line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8") from None
    if builder != "json":
        return
    with contextlib.suppress(ValueError):
        json.loads(text)
        return  # one JSON document (a list of rows): well formed
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"data file '{path}', line {number}: not valid JSON ({e}); fix or remove that line "
                            "(JSON lines: one object per line)") from None
        if not isinstance(row, dict):
            raise DataError(f"data file '{path}', line {number}: a JSON {type(row).__name__}, not an object "
                            "(JSON lines: one {\"column\": value, ...} object per line)")


def _read_hub(name: str) -> datasets.DatasetDict:
    offline = datasets.config.HF_HUB_OFFLINE
    try:
        return datasets.load_dataset(name)
    except Exception as e:
        if offline or isinstance(e, ConnectionError):
            raise DataError(
                f"dataset '{name}' is not available offline: it is not a local file or folder, and the hub cannot "
                f"be reached; give a local file ({_SUFFIXES}) or a folder of them as data.path"
            ) from e
        raise DataError(f"could not load dataset '{name}' from the hub: {type(e).__name__}: {e}; "
                        "check the id, or give a local file as data.path") from e


# ftfy's encoding fixes only (and its repair of UTF-16 surrogate pairs, never valid text): its other fixes
# change text that is right ('“' -> '"', 'ﬁ' -> 'fi', full-width letters, HTML entities, line breaks,
# Unicode normalization), which a training set may mean to keep.
_FTFY = ftfy.TextFixerConfig(unescape_html=False, remove_terminal_escapes=False, fix_latin_ligatures=False,
                             fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
                             remove_control_chars=False, normalization=None, explain=False)


def repair_text(text: str) -> str:
    """`text` with its mojibake repaired ('Donâ€™t' -> 'Don’t', 'BrontÃ«' -> 'Brontë').

    Text that was encoded as UTF-8 and decoded as Windows-1252 or Latin-1 is decoded again by ftfy
    (``ftfy.fix_text`` with only its encoding fixes, see `_FTFY`); text that is right, curly quotes,
    accents and other scripts included, is left as it is. Mojibake that lost a byte (Windows-1252
    has no character for 0x81, 0x8D, 0x8F, 0x90 and 0x9D, so 'â€�' may have been '”' or a zero-width
    joiner) is left, or becomes '�' where the rest of the text decodes: ftfy does not guess.

    Args:
        text: any text.

    Returns:
        The repaired text (equal to `text` when nothing needed repair).
    """
    return ftfy.fix_text(text, _FTFY)


def _repair_value(value: Any, count: dict[str, int]) -> Any:
    """`value` with every string in it repaired, also inside lists and structs (a `messages` column's
    turns); counts the strings seen and changed."""
    if isinstance(value, str):
        fixed = repair_text(value)
        count["values"] += 1
        count["changed"] += fixed != value
        return fixed
    if isinstance(value, list):
        return [_repair_value(v, count) for v in value]
    if isinstance(value, dict):
        return {k: _repair_value(v, count) for k, v in value.items()}
    return value


def _repair_batch(batch: dict[str, list], count: dict[str, int]) -> dict[str, list]:
    return {column: [_repair_value(v, count) for v in values] for column, values in _columns(batch).items()}


def _repair_rows(rows: datasets.Dataset, count: dict[str, int]) -> datasets.Dataset:
    """`rows` with :func:`repair_text` applied to every string, also inside list and struct columns."""
    key = f"{rows._fingerprint} repair_text ftfy {ftfy.__version__}"
    # keep_in_memory and no cache: the function always runs, so the count is right
    return rows.map(_repair_batch, fn_kwargs={"count": count}, batched=True, features=rows.features,
                    keep_in_memory=True, load_from_cache_file=False,
                    new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16], desc="fix_text")


def _looks_local(path: str) -> bool:
    """Whether a missing `path` was meant as a file (and is not a hub id such as 'owner/name')."""
    return (Path(path).suffix.lower() in BUILDERS or path.startswith(("/", ".", "~"))
            or path.count("/") > 1 or "\\" in path)


def load_rows(args: DataArgs) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The raw (untokenized) train and validation rows named by `args`.

    A single local file is the split `args.split`; a folder's splits come from its file names
    (train.jsonl, validation.jsonl, ...); anything else is loaded from the hub. Without
    `args.validation_split`, `args.validation_fraction` of the train split is held out with a
    fixed seed, so that training and a later evaluation agree on which rows were held out.
    `args.max_samples` then caps the training rows. With `args.fix_text`, every string of the rows
    (also inside list and struct columns) goes through :func:`repair_text` and the number changed is
    logged.

    Args:
        args: the data section of the config.

    Returns:
        (train rows, validation rows or None).

    Raises:
        DataError: missing or unreadable file, hub dataset not available, unknown split, or no
            training rows.
        ConfigError: a 'pkg:' path names a package that is not installed.
    """
    if not args.path:
        raise DataError("data.path is not set: give a dataset (a local file, a folder or a hub id)")
    source = resolve_path(args.path, "data.path")
    path = Path(source).expanduser()
    if path.exists():
        splits = _read_local(path, args.split)
    elif _looks_local(source):
        raise DataError(f"data file '{source}' does not exist: check data.path "
                        f"(relative paths start from {Path.cwd()})")
    else:
        splits = _read_hub(args.path)

    found = ", ".join(splits) or "none"
    if args.split not in splits:
        raise DataError(f"split '{args.split}' is not in '{args.path}'; splits found: {found}; set data.split")
    train = splits[args.split]
    validation = None
    if args.validation_split:
        if args.validation_split not in splits:
            raise DataError(f"validation split '{args.validation_split}' is not in '{args.path}'; splits found: "
                            f"{found}; set data.validation_split, or leave it empty to hold out "
                            "data.validation_fraction")
        validation = splits[args.validation_split]
    elif args.validation_fraction > 0 and len(train) > 0:
        try:
            # seed=0, not the run's seed: a later `eval.py` must hold out the very same rows
            parts = train.train_test_split(test_size=args.validation_fraction, seed=0)
        except ValueError as e:
            raise DataError(f"cannot hold out data.validation_fraction={args.validation_fraction} of {len(train)} "
                            "rows (nothing would be left to train on): set data.validation_fraction=0") from e
        train, validation = parts["train"], parts["test"]
    if args.max_samples is not None and args.max_samples < len(train):
        train = train.select(range(args.max_samples))
    if len(train) == 0:
        hint = "set data.max_samples > 0 or leave it unset" if args.max_samples == 0 else "give a file with rows"
        raise DataError(f"no training rows in '{args.path}' (split '{args.split}'): {hint}")
    if validation is not None and len(validation) == 0:
        logger.warning("validation split of '%s' is empty: no validation", args.path)
        validation = None
    if args.fix_text:
        count = {"values": 0, "changed": 0}
        train = _repair_rows(train, count)
        validation = None if validation is None else _repair_rows(validation, count)
        # a warning when it changed the data (what the run trains on differs from the file), so that it shows
        logger.log(logging.WARNING if count["changed"] else logging.INFO,
                   "data.fix_text: repaired %d of %d text values in the train and validation rows",
                   count["changed"], count["values"])
    return train, validation


# --------------------------------------------------------------------------------------------
# templates


def _template_columns(template: str, name: str) -> list[str]:
    """The columns a template refers to ('{quote} ->: ' -> ['quote'])."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"{name} '{template}' is not a valid template ({e}): name columns as {{column}} "
                        "and write literal braces as {{{{ and }}}}") from e
    roots = [f.split(".")[0].split("[")[0] for f in fields]
    if any(not r or r.isdigit() for r in roots):
        raise DataError(f"{name} '{template}' has a positional field {{}}: name a column, e.g. {{text}}")
    return roots


def _missing_column(name: str, column: str, columns: Sequence[str]) -> DataError:
    return DataError(f"{name} uses column '{column}' but the data has columns: {', '.join(columns)}; "
                     "set data.prompt / data.response to a template over them")


def _text_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "" if value is None else value


def render(template: str, row: dict[str, Any], *, name: str = "template") -> str:
    """Fill `template` with the row's columns (``str.format_map``).

    List values are joined with ", " (``['love', 'life']`` -> ``love, life``); None becomes "".

    Args:
        template: e.g. ``"{quote} ->: "``; format specs work (``{score:.2f}``).
        row: one row, column -> value.
        name: what the template is called in errors (``data.prompt``).

    Returns:
        The rendered text.

    Raises:
        DataError: the template names a column the row lacks, or is not a valid template.
    """
    values = {k: _text_value(v) for k, v in row.items()}
    try:
        return template.format_map(values)
    except KeyError as e:
        raise _missing_column(name, e.args[0], list(row)) from None
    except (ValueError, IndexError, AttributeError, TypeError) as e:
        raise DataError(f"{name} '{template}' cannot be rendered ({e}): name columns as {{column}}") from None


# --------------------------------------------------------------------------------------------
# chat templates

MESSAGES = "messages"  # the column of conversational rows (TRL's name): [{"role": ..., "content": ...}, ...]
ROLES = ("system", "user", "assistant", "tool")


def check_chat_template(tokenizer: Any) -> None:
    """Raise a DataError when `tokenizer` has no chat template (data.chat_template=true needs one)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"data.chat_template=true, but the tokenizer '{name}' has no chat template: use a tokenizer "
                        "that has one (an -Instruct / -chat model's), or set data.chat_template=false and write the "
                        "format with data.prompt / data.response")


def _checked_messages(value: Any) -> list[dict[str, str]]:
    """A `messages` cell as a list of {"role", "content"} turns with text content."""
    if not isinstance(value, list) or not value:
        raise DataError(f"column '{MESSAGES}' must hold a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        f"turns, got {str(value)[:80]!r}")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"column '{MESSAGES}': each turn needs a role ({', '.join(ROLES)}) and a text content, "
                            f"got {str(turn)[:80]!r}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def conversation(row: dict[str, Any], args: DataArgs) -> list[dict[str, str]]:
    """The row as chat turns: its `messages` column if it has one, else data.system_prompt (if set) as
    the system turn, data.prompt as the user turn and data.response (if set) as the assistant turn.

    Raises:
        DataError: a malformed `messages` cell, or a template over a missing column.
    """
    if MESSAGES in row:
        return _checked_messages(row[MESSAGES])
    turns = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    turns.append({"role": "user", "content": render(args.prompt, row, name="data.prompt")})
    if args.response:
        turns.append({"role": "assistant", "content": render(args.response, row, name="data.response")})
    return turns


def apply_chat(tokenizer: Any, turns: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    """The text of `turns` as the tokenizer's chat template writes it (special tokens included:
    encode it with ``add_special_tokens=False``).

    Raises:
        DataError: the template refuses the turns (e.g. roles that do not alternate).
    """
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError, or the template's own raise_exception(...)
        roles = " -> ".join(t["role"] for t in turns) or "no turns"
        raise DataError(f"the tokenizer's chat template cannot render a conversation ({roles}): "
                        f"{type(e).__name__}: {e}; check the order of the roles in the data") from None


def _chat_example(tokenizer: Any, turns: list[dict[str, str]], assistant_only: bool) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation; with `assistant_only`, labels are -100 outside the
    assistant turns. An assistant turn's tokens are those between the conversation rendered up to
    the turn with the generation prompt and rendered through the turn (its end-of-turn token
    included), each matched against the whole conversation's ids as a common prefix."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    full = ids(apply_chat(tokenizer, turns))
    if not assistant_only:
        return full, list(full)
    labels = [IGNORE_INDEX] * len(full)
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            start = _common_prefix(ids(apply_chat(tokenizer, turns[:i], generation_prompt=True)), full)
            end = _common_prefix(ids(apply_chat(tokenizer, turns[: i + 1])), full)
            labels[start:end] = full[start:end]
    return full, labels


def generation_prompt(row: dict[str, Any], args: DataArgs, tokenizer: Any) -> tuple[str, str, str]:
    """What a model is asked to continue for one row, rendered as training renders it.

    Returns:
        (text to encode, the prompt as a person reads it, the reference response or ""). With
        data.chat_template: the turns before the last assistant turn, with the template's
        generation prompt (encode it with ``add_special_tokens=False``); shown is the last user turn.
    """
    if not args.chat_template:
        prompt = render(args.prompt, row, name="data.prompt")
        return prompt, prompt, render(args.response, row, name="data.response") if args.response else ""
    turns = conversation(row, args)
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
    context = turns[:last]
    shown = next((t["content"] for t in reversed(context) if t["role"] == "user"), "")
    reference = turns[last]["content"] if last < len(turns) else ""
    return apply_chat(tokenizer, context, generation_prompt=True), shown, reference


def user_prompt(text: str, args: DataArgs, tokenizer: Any) -> str:
    """A free-text prompt (eval.py --prompts) as training renders a user turn: with data.chat_template,
    data.system_prompt (if set) and `text` as the user turn, with the generation prompt; else `text`."""
    if not args.chat_template:
        return text
    turns = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    return apply_chat(tokenizer, [*turns, {"role": "user", "content": text}], generation_prompt=True)


def stop_token_ids(tokenizer: Any, chat: bool) -> list[int]:
    """Token ids that end a generation: EOS, and for `chat` prompts the special token that ends an
    assistant turn (found by rendering one; SmolLM2's <|im_end|> is its EOS, Llama 3's <|eot_id|> is not)."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat:
        marker = "\u2063minitune\u2063"
        text = apply_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        after = text.split(marker, 1)[-1].lstrip()
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        first = tokenizer(after, add_special_tokens=False, verbose=False)["input_ids"][:1]
        if first and first[0] in special and first[0] not in stop:
            stop.append(first[0])
    return stop


# --------------------------------------------------------------------------------------------
# tokenization


def _columns(batch: dict[str, list]) -> dict[str, list]:
    """A batch of rows (datasets' lazy batch) as Python lists, one per column.

    Raises:
        DataError: pyarrow cannot turn a value into Python (a nested object with duplicate keys).
    """
    try:
        return {c: batch[c] for c in batch}  # datasets converts a column when it is read
    except ValueError as e:
        raise DataError(f"the data holds values that cannot be read as Python objects ({e}); check the file's "
                        "nested values (e.g. objects whose keys differ only by invisible characters)") from None


def _rows_of(batch: dict[str, list]) -> list[dict[str, Any]]:
    columns = _columns(batch)
    n = len(next(iter(columns.values()))) if columns else 0
    return [{c: values[i] for c, values in columns.items()} for i in range(n)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer: Any, texts: list[str], max_len: int) -> tuple[list[list[int]], list[int]]:
    """Token ids with the tokenizer's special tokens, cut to `max_len` the tokenizer's way (T5
    keeps its closing </s>); and for each text its length before the cut (0 when not cut)."""
    ids = tokenizer(texts, verbose=False)["input_ids"]
    before = [len(x) if len(x) > max_len else 0 for x in ids]
    long = [i for i, n in enumerate(before) if n]
    if long:  # only the long ones are encoded twice
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_len, verbose=False)["input_ids"]
        for i, c in zip(long, cut, strict=True):
            ids[i] = c
    return ids, before


def _fingerprint(rows: datasets.Dataset, args: DataArgs, tokenizer: Any, seq2seq: bool, stage: str) -> str:
    # Passing our own fingerprint spares datasets from pickling and hashing the tokenizer.
    key = repr((rows._fingerprint, sorted(asdict(args).items()), getattr(tokenizer, "name_or_path", ""),
                type(tokenizer).__name__, len(tokenizer), seq2seq, stage))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _features() -> datasets.Features:
    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "length": datasets.Value("int32")})


def _count_targets(labels: list[int], seq2seq: bool) -> int:
    return sum(t != IGNORE_INDEX for t in shift_targets(labels, "seq2seq" if seq2seq else "causal"))


def tokenize(
    rows: datasets.Dataset,
    args: DataArgs,
    tokenizer: Any,
    *,
    seq2seq: bool,
    stats: dict[str, int] | None = None,
) -> datasets.Dataset:
    """Render the templates over `rows` and turn them into ``input_ids`` / ``labels`` / ``length``.

    Causal: the text is prompt + response (+ EOS with ``data.add_eos``), cut to ``data.max_length``
    (a cut example loses its EOS: it did not end there; plain text, without a response template, is
    cut even when every document is longer: the warning counts the tokens cut and suggests packing); labels copy the ids, with the prompt's
    tokens set to -100 under ``data.mask_prompt``. The prompt's tokens are the longest common
    prefix of the prompt's and the full text's ids, so a token that a BPE tokenizer merges across
    the boundary (GPT-2 merges the space of "->: " into " love") stays a target. Examples whose
    response was cut away entirely are dropped.
    Seq2seq: ``input_ids`` encode the prompt (cut to ``max_length``), ``labels`` the response (cut
    to ``max_target_length``, ending with EOS as the tokenizer adds it, or as appended with
    ``data.add_eos`` when it does not).
    Packing (causal): every example, each ending with EOS, is concatenated and cut into blocks of
    exactly ``max_length`` tokens; the remainder is a last, shorter block; labels = ids.

    Empty examples (blank text) are dropped. ``length`` holds ``len(input_ids)`` (the source
    length for seq2seq), for grouping by length. The result is the same on every call.

    Args:
        rows: raw rows from :func:`load_rows`.
        args: the data section of the config.
        tokenizer: a Hugging Face tokenizer.
        seq2seq: encoder-decoder model (T5) rather than a causal LM.
        stats: if given, filled with ``rows_in``, ``rows``, ``empty``, ``no_target``,
            ``truncated``, ``tokens`` and ``target_tokens`` (the targets the loss sees).

    Returns:
        The tokenized dataset, with columns ``input_ids``, ``labels``, ``length``.

    Raises:
        DataError: a template names a missing column, every example is empty, every example with a
            response (or every seq2seq example) is longer than ``data.max_length`` /
            ``data.max_target_length``, or no example keeps a target token.
    """
    columns = rows.column_names
    chat_rows = args.chat_template and MESSAGES in columns  # the templates are not used
    for name, template in (("data.prompt", args.prompt), ("data.response", args.response)):
        for column in [] if chat_rows else _template_columns(template, name):
            if column not in columns:
                raise _missing_column(name, column, columns)
    if seq2seq and args.packing:
        raise DataError("data.packing is for causal LMs: set data.packing=false for a seq2seq model")
    if seq2seq and args.chat_template:
        raise DataError("data.chat_template is for causal LMs: set data.chat_template=false for a seq2seq model "
                        "and write the format with data.prompt / data.response")
    if args.chat_template:
        check_chat_template(tokenizer)
    if args.packing and tokenizer.eos_token_id is None:
        raise DataError("data.packing needs an EOS token between examples, and the tokenizer has none")
    count = {"rows_in": len(rows), "rows": 0, "empty": 0, "no_target": 0, "truncated": 0,
             "tokens": 0, "target_tokens": 0}
    cut_lengths: dict[str, list[int]] = {"source": [], "target": []}  # before the cut, for the error
    # keep_in_memory and no cache: the function always runs (so the counts are right) and no stale
    # cache file can outlive a change of tokenizer.
    out = rows.map(
        _seq2seq_batch if seq2seq else _causal_batch,
        fn_kwargs={"args": args, "tokenizer": tokenizer, "count": count, "cut_lengths": cut_lengths},
        batched=True,
        remove_columns=columns,
        features=_features(),
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=_fingerprint(rows, args, tokenizer, seq2seq, "tokenize"),
        desc="tokenize",
    )
    _check_counts(count, cut_lengths, args, len(out), seq2seq)
    if args.packing:
        out = _pack(out, args.max_length)
    count["rows"] = len(out)
    count["tokens"] = sum(out["length"])
    count["target_tokens"] = sum(_count_targets(labels, seq2seq) for labels in out["labels"])
    if stats is not None:
        stats.update(count)
    return out


def _causal_batch(batch: dict[str, list], args: DataArgs, tokenizer: Any, count: dict[str, int],
                  cut_lengths: dict[str, list[int]]) -> dict[str, list]:
    """Causal examples for one batch of rows (see :func:`tokenize`); updates the counts."""
    if args.chat_template:
        return _chat_batch(batch, args, tokenizer, count, cut_lengths)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    prompts, fulls = [], []
    for row in _rows_of(batch):
        prompt = render(args.prompt, row, name="data.prompt")
        full = prompt + render(args.response, row, name="data.response")
        if not full.strip():
            count["empty"] += 1
            continue
        prompts.append(prompt)
        fulls.append(full)
    if not fulls:
        return out
    eos = tokenizer.eos_token_id
    limit = None if args.packing else args.max_length  # packing cuts the stream, not the examples
    full_ids = tokenizer(fulls, verbose=False)["input_ids"]
    prompt_ids = tokenizer(prompts, verbose=False)["input_ids"] if args.mask_prompt else None
    for i, ids in enumerate(full_ids):
        ids = list(ids)
        if (args.add_eos or args.packing) and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if limit is not None and len(ids) > limit:
            count["truncated"] += 1
            cut_lengths["source"].append(len(ids))
            ids = ids[:limit]
        labels = list(ids)
        if prompt_ids is not None:
            n = _common_prefix(prompt_ids[i], ids)
            labels[:n] = [IGNORE_INDEX] * n
            if all(t == IGNORE_INDEX for t in shift_targets(labels, "causal")):
                count["no_target"] += 1  # the response was cut away: nothing to learn
                continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
    return out


def _chat_batch(batch: dict[str, list], args: DataArgs, tokenizer: Any, count: dict[str, int],
                cut_lengths: dict[str, list[int]]) -> dict[str, list]:
    """Causal examples rendered with the chat template (see :func:`tokenize`); updates the counts."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for row in _rows_of(batch):
        turns = conversation(row, args)
        if not any(t["content"].strip() for t in turns):
            count["empty"] += 1
            continue
        ids, labels = _chat_example(tokenizer, turns, args.assistant_only_loss)
        if not args.packing and len(ids) > args.max_length:
            count["truncated"] += 1
            cut_lengths["source"].append(len(ids))
            ids, labels = ids[: args.max_length], labels[: args.max_length]
        if all(t == IGNORE_INDEX for t in shift_targets(labels, "causal")):
            count["no_target"] += 1  # no assistant turn, or it was cut away: nothing to learn
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
    return out


def _seq2seq_batch(batch: dict[str, list], args: DataArgs, tokenizer: Any, count: dict[str, int],
                   cut_lengths: dict[str, list[int]]) -> dict[str, list]:
    """Seq2seq examples for one batch of rows (see :func:`tokenize`); updates the counts."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    sources, targets = [], []
    for row in _rows_of(batch):
        source = render(args.prompt, row, name="data.prompt")
        target = render(args.response, row, name="data.response")
        if not source.strip() or not target.strip():
            count["empty"] += 1
            continue
        sources.append(source)
        targets.append(target)
    if not sources:
        return out
    eos = tokenizer.eos_token_id
    source_ids, source_cut = _encode(tokenizer, sources, args.max_length)
    target_ids, target_cut = _encode(tokenizer, targets, args.max_target_length)
    for ids, labels, cut_s, cut_t in zip(source_ids, target_ids, source_cut, target_cut, strict=True):
        labels = list(labels)
        if args.add_eos and eos is not None and (not labels or labels[-1] != eos):
            labels = labels[: args.max_target_length - 1] + [eos]  # a tokenizer that adds no EOS
        count["truncated"] += bool(cut_s or cut_t)
        if cut_s:
            cut_lengths["source"].append(cut_s)
        if cut_t:
            cut_lengths["target"].append(cut_t)
        out["input_ids"].append(list(ids))
        out["labels"].append(labels)
        out["length"].append(len(ids))
    return out


def _check_counts(count: dict[str, int], cut_lengths: dict[str, list[int]], args: DataArgs, kept_rows: int,
                  seq2seq: bool) -> None:
    """Raise when nothing usable is left; warn about truncated and dropped examples."""
    kept = count["rows_in"] - count["empty"]
    if kept == 0:
        raise DataError(f"every one of the {count['rows_in']} examples is empty: check that data.prompt "
                        f"('{args.prompt}') and data.response ('{args.response}') name columns with text")
    # plain text (a causal LM, no response template): long documents are cut to data.max_length, never refused
    plain_text = not seq2seq and not args.response
    for part, knob in (("source", "max_length"), ("target", "max_target_length")):
        cut = cut_lengths[part]
        if len(cut) == kept and not plain_text:
            median = int(statistics.median(cut))
            raise DataError(f"every example is longer than data.{knob}={getattr(args, knob)} tokens (shortest "
                            f"{min(cut)}, median {median}): raise data.{knob} (e.g. to {median})")
    if kept_rows == 0:
        if args.chat_template:
            raise DataError(f"no example keeps an assistant token within data.max_length={args.max_length} (the "
                            "loss is on assistant turns only): raise data.max_length, give rows an assistant turn, "
                            "or set data.assistant_only_loss=false")
        raise DataError(f"no example keeps a response token within data.max_length={args.max_length} "
                        "(data.mask_prompt hides the prompt): raise data.max_length or shorten the prompt")
    if count["truncated"]:
        limits = f"data.max_length={args.max_length}"
        if seq2seq:
            limits += f" or data.max_target_length={args.max_target_length}"
        lost = (sum(cut_lengths["source"]) - len(cut_lengths["source"]) * args.max_length
                + sum(cut_lengths["target"]) - len(cut_lengths["target"]) * args.max_target_length)
        hint = "; to train on whole documents, set data.packing=true" if plain_text else ""
        logger.warning("%d of %d examples were longer than %s tokens and were truncated (%d tokens cut)%s",
                       count["truncated"], kept, limits, lost, hint)
    if count["empty"] or count["no_target"]:
        logger.warning("dropped %d empty examples and %d whose response was cut away by data.max_length",
                       count["empty"], count["no_target"])


def _pack(ds: datasets.Dataset, block: int) -> datasets.Dataset:
    """Concatenate every example's ids and cut the stream into blocks of `block` tokens.

    Every token is kept: the remainder is a last, shorter block (the collator pads it).
    """
    stream = np.fromiter((t for ids in ds["input_ids"] for t in ids), dtype=np.int32)
    blocks = [stream[i: i + block].tolist() for i in range(0, len(stream), block)]
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "labels": blocks, "length": [len(b) for b in blocks]}, features=_features()
    )


# --------------------------------------------------------------------------------------------
# batches


def ensure_pad_token(tokenizer: Any) -> int:
    """Give a tokenizer without a pad token (GPT-2) its EOS as pad token; return the pad id.

    Padding never reaches the loss (its labels are -100) nor attention (mask 0), so EOS is a safe pad.

    Raises:
        DataError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has no pad token and no EOS token: add one with "
                            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class Collator:
    """Pad tokenized examples (right padding) into a batch of LongTensors.

    Returns ``input_ids`` (padded with the pad id), ``attention_mask`` and ``labels`` (padded with
    -100). For seq2seq the labels have their own width; the model builds ``decoder_input_ids``
    from them.

    Args:
        tokenizer: gives the pad id (see :func:`ensure_pad_token`, which this calls).
        seq2seq: labels are targets of their own length rather than aligned with ``input_ids``.
        pad_to_multiple_of: round the widths up (e.g. 8 for tensor cores).
    """

    def __init__(self, tokenizer: Any, *, seq2seq: bool, pad_to_multiple_of: int | None = None):
        self.pad_token_id = ensure_pad_token(tokenizer)
        self.seq2seq = seq2seq
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate(features)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch of `features` (what calling the collator returns; the memory planner calls this
        directly to look at a run's first batches without taking them from the run's loader)."""
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long) for f in features]
        width = _round_up(max((len(x) for x in ids), default=0), self.pad_to_multiple_of)
        label_width = _round_up(max((len(x) for x in labels), default=0), self.pad_to_multiple_of)
        if not self.seq2seq:
            label_width = width
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        label_batch = torch.full((len(ids), label_width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
            input_ids[i, : len(x)] = x
            attention_mask[i, : len(x)] = 1
            label_batch[i, : len(y)] = y
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_batch}


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # mixed so that (seed, epoch + 1) and (seed + 1, epoch) give different orders
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class SeededRandomSampler:
    """A shuffled order that is a function of (seed, epoch) only, so a resumed run sees the same order.

    Call :meth:`set_epoch` before each epoch (Accelerate's loader does); without it, each pass
    over the sampler moves on to the next epoch by itself.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` for the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


def _grouped_order(lengths: torch.Tensor, batch_size: int, g: torch.Generator, mega: int = 50) -> list[int]:
    """Indices such that each consecutive `batch_size` run holds examples of similar length."""
    perm = torch.randperm(len(lengths), generator=g)
    chunks: list[torch.Tensor] = []
    for start in range(0, len(perm), mega * batch_size):
        idx = perm[start: start + mega * batch_size]
        idx = idx[torch.argsort(lengths[idx], descending=True, stable=True)]
        chunks += list(idx.split(batch_size))
    # only the last mega-batch can leave a short chunk: keep it last so batches stay aligned
    full = [c for c in chunks if len(c) == batch_size]
    short = [c for c in chunks if len(c) < batch_size]
    full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    if full:  # longest batch first, as transformers does: an out-of-memory shows at once
        first = max(range(len(full)), key=lambda i: int(lengths[full[i][0]]))
        full[0], full[first] = full[first], full[0]
    return torch.cat(full + short).tolist() if full or short else []


class LengthGroupedSampler(SeededRandomSampler):
    """Shuffle, then sort by length within mega-batches of ``50 * batch_size`` and shuffle the batches.

    Like transformers' LengthGroupedSampler: batches hold examples of similar length (less
    padding) while the order stays random and seeded; each epoch has its own order.

    Args:
        lengths: the length of each example.
        batch_size: the DataLoader's batch size (batches are cut at its multiples).
        seed: the run's seed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        super().__init__(len(lengths), seed)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        g = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        return iter(_grouped_order(self.lengths, self.batch_size, g))


class _Loader(DataLoader):
    """A DataLoader with ``set_epoch`` (forwarded to its sampler), as Accelerate's loaders have."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _lengths(dataset: Any) -> list[int]:
    if "length" in getattr(dataset, "column_names", ()):
        return list(dataset["length"])
    return [len(x["input_ids"]) for x in dataset]


def make_dataloader(
    dataset: Any,
    collator: Collator,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    group_by_length: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over a tokenized dataset with a reproducible order.

    Args:
        dataset: tokenized examples (``input_ids``, ``labels``, optionally ``length``).
        collator: pads examples into batches.
        batch_size: examples per batch.
        shuffle: a seeded random order (else the dataset's order).
        seed: seeds the order; the order of epoch e depends only on (seed, e).
        group_by_length: with `shuffle`, batch examples of similar length (see
            :class:`LengthGroupedSampler`); ignored without `shuffle`.
        num_workers: DataLoader worker processes.
        drop_last: drop a last, short batch (nothing is dropped otherwise).

    Returns:
        A DataLoader with ``set_epoch(epoch)``.
    """
    sampler = None
    if shuffle:
        if group_by_length:
            sampler = LengthGroupedSampler(_lengths(dataset), batch_size, seed)
        else:
            sampler = SeededRandomSampler(len(dataset), seed)
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                   num_workers=num_workers, drop_last=drop_last)


def estimate_padding(lengths: Sequence[int], batch_size: int, *, group_by_length: bool = False, seed: int = 0) -> float:
    """The fraction of padding in one epoch of batches drawn as :func:`make_dataloader` draws them."""
    if not lengths:
        return 0.0
    t = torch.as_tensor(list(lengths), dtype=torch.long)
    g = _epoch_generator(seed, 0)
    order = _grouped_order(t, batch_size, g) if group_by_length else torch.randperm(len(t), generator=g).tolist()
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = t[order[start: start + batch_size]]
        real += int(batch.sum())
        padded += int(batch.max()) * len(batch)
    return 1 - real / padded if padded else 0.0


# --------------------------------------------------------------------------------------------
# all together


@dataclass
class DataBundle:
    """Everything the loop and the evaluation need from the data."""

    train: datasets.Dataset
    """Tokenized training examples."""
    validation: datasets.Dataset | None
    """Tokenized validation examples, or None."""
    raw_validation: datasets.Dataset | None
    """The validation rows before tokenization (for generations); empty rows are still there."""
    collator: Collator
    stats: dict[str, Any] = field(default_factory=dict)
    """rows, tokens, target_tokens, truncated, dropped, mean_length, longest, padding_fraction
    (estimated for the given batch size), validation_rows, validation_tokens."""


def build_data(args: DataArgs, tokenizer: Any, *, seq2seq: bool, batch_size: int = 8) -> DataBundle:
    """Load and tokenize the train and validation splits.

    Args:
        args: the data section of the config.
        tokenizer: a Hugging Face tokenizer (given a pad token if it has none).
        seq2seq: encoder-decoder model (T5) rather than a causal LM.
        batch_size: only for the padding estimate in the stats.

    Returns:
        A :class:`DataBundle`.

    Raises:
        DataError: see :func:`load_rows` and :func:`tokenize` (validation problems say so).
    """
    raw_train, raw_validation = load_rows(args)
    train_stats: dict[str, int] = {}
    train = tokenize(raw_train, args, tokenizer, seq2seq=seq2seq, stats=train_stats)
    validation, val_stats = None, {"rows": 0, "tokens": 0}
    if raw_validation is not None:
        try:
            validation = tokenize(raw_validation, args, tokenizer, seq2seq=seq2seq, stats=val_stats)
        except DataError as e:
            raise DataError(f"validation split: {e}") from e
    lengths = list(train["length"])
    stats = {
        "rows": train_stats["rows"],
        "tokens": train_stats["tokens"],
        "target_tokens": train_stats["target_tokens"],
        "truncated": train_stats["truncated"],
        "dropped": train_stats["empty"] + train_stats["no_target"],
        "mean_length": train_stats["tokens"] / max(1, len(lengths)),
        "longest": max(lengths, default=0),
        "padding_fraction": estimate_padding(lengths, batch_size, group_by_length=args.group_by_length),
        "validation_rows": val_stats["rows"],
        "validation_tokens": val_stats["tokens"],
    }
    return DataBundle(train, validation, raw_validation, Collator(tokenizer, seq2seq=seq2seq), stats)
