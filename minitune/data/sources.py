"""Rows: a local file or folder, or a hub dataset, read into train / validation rows, mojibake repaired."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import ftfy

from ..config import DataArgs, looks_like_path, resolve_path
from ..errors import DataError

logger = logging.getLogger("minitune.data")


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
    if builder == "json":
        # before pyarrow's JSON reader sees them: it segfaults on a file whose first row is `null`
        # (pyarrow 26, apache/arrow#47409), and reads other non-object rows as rows of nulls
        for f in [path] if path.is_file() else files:
            _check_text_file(f, builder)
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
    try:
        document = json.loads(text)
    except ValueError:
        pass
    else:  # one JSON document: a list of rows, or one row
        for number, row in enumerate(document if isinstance(document, list) else [document]):
            if not isinstance(row, dict):
                where = f"item {number} of its list" if isinstance(document, list) else "the whole file"
                raise DataError(f"data file '{path}': {where} is a JSON {_json_kind(row)}, not an object; give a "
                                "list of {\"column\": value, ...} objects, or one object per line")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"data file '{path}', line {number}: not valid JSON ({e}); fix or remove that line "
                            "(JSON lines: one object per line)") from None
        if not isinstance(row, dict):
            raise DataError(f"data file '{path}', line {number}: a JSON {_json_kind(row)}, not an object "
                            "(JSON lines: one {\"column\": value, ...} object per line)")


def _json_kind(value: Any) -> str:
    """JSON's name for the type of a parsed value ('null', 'array', ...)."""
    kinds = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return kinds.get(type(value), "object")


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
    return {column: [_repair_value(v, count) for v in values] for column, values in columns_of(batch).items()}


def _has_text(feature: Any) -> bool:
    """Whether a column's feature holds strings, also inside lists and structs."""
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    if isinstance(feature, dict):
        return any(_has_text(f) for f in feature.values())
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return inner is not None and _has_text(inner)


def _nul_named(feature: Any) -> bool:
    """Whether a struct inside a column's feature has a field name with a NUL character (Arrow
    reads such a name, but cannot take it back from Python: the column cannot be rewritten)."""
    if isinstance(feature, dict):
        return any("\x00" in k or _nul_named(f) for k, f in feature.items())
    inner = getattr(feature, "feature", None)
    return inner is not None and _nul_named(inner)


def _repair_rows(rows: datasets.Dataset, count: dict[str, int]) -> datasets.Dataset:
    """`rows` with :func:`repair_text` applied to every string, also inside list and struct columns.
    Only the columns that hold text go through the repair (and back into Arrow): the others stay as
    read, whatever their types (a struct of nulls under an odd field name cannot make the round trip),
    and so do text columns with a NUL in a field name, with a warning."""
    text = [c for c, f in rows.features.items() if _has_text(f)]
    kept = [c for c in text if _nul_named(rows.features[c])]
    if kept:
        logger.warning("data.fix_text: column(s) %s left as read: a field name in them has a NUL character", kept)
        text = [c for c in text if c not in kept]
    if not text:
        return rows
    key = f"{rows._fingerprint} repair_text ftfy {ftfy.__version__}"
    part = rows.select_columns(text)
    # keep_in_memory and no cache: the function always runs, so the count is right
    fixed = part.map(_repair_batch, fn_kwargs={"count": count}, batched=True, features=part.features,
                     keep_in_memory=True, load_from_cache_file=False,
                     new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16], desc="fix_text")
    if len(text) == len(rows.column_names):
        return fixed
    rest = rows.remove_columns(text)
    return datasets.concatenate_datasets([rest, fixed], axis=1).select_columns(rows.column_names)


def _looks_local(path: str) -> bool:
    """Whether a missing `path` was meant as a file (and is not a hub id such as 'owner/name')."""
    return Path(path).suffix.lower() in BUILDERS or looks_like_path(path)


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


def columns_of(batch: dict[str, list]) -> dict[str, list]:
    """A batch of rows (datasets' lazy batch) as Python lists, one per column.

    Raises:
        DataError: pyarrow cannot turn a value into Python (a nested object with duplicate keys).
    """
    try:
        return {c: batch[c] for c in batch}  # datasets converts a column when it is read
    except ValueError as e:
        raise DataError(f"the data holds values that cannot be read as Python objects ({e}); check the file's "
                        "nested values (e.g. objects whose keys differ only by invisible characters)") from None


def rows_of(batch: dict[str, list]) -> list[dict[str, Any]]:
    columns = columns_of(batch)
    n = len(next(iter(columns.values()))) if columns else 0
    return [{c: values[i] for c, values in columns.items()} for i in range(n)]
