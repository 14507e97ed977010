"""The blind human-evaluation sheet: write it (outputs shuffled, a separate key), never replace a
scored one, and summarise the scores people fill in."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, EvalError
from .scoring import MODELS

SCORE_RANGE = (0.0, 5.0)


SHEET_COLUMNS = ["id", "prompt", "output_a", "output_b", "score_a", "score_b"]


KEY_COLUMNS = ["id", "a", "b", "prompt_index"]


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
