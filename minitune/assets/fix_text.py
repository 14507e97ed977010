"""Repair the mojibake of a JSON lines data file in place, the way data/english_quotes.jsonl was repaired.

    python data/fix_text.py [FILE]      (FILE: data/english_quotes.jsonl; needs minitune installed, `make setup`)

Every string of every row, also inside lists, goes through `minitune.data.repair_text` (ftfy's
encoding fixes, what `data.fix_text=true` does at load time), with two additions for mojibake ftfy
cannot repair alone, each checked by hand on the quotes file (see `LOST_BYTES` and `TOO_SHORT`).
Rows keep their order and the file its format (one compact JSON object per line, non-ASCII
characters as they are), so that a diff shows only the repaired strings. Prints what changed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from minitune.data import repair_text

DEFAULT = Path(__file__).resolve().parent / "english_quotes.jsonl"

# Mojibake whose last byte was lost: Windows-1252 has no character for 0x81 and 0x9D, so the reader
# that made the mojibake wrote U+FFFD for them, and ftfy cannot know which character it was. Putting
# the byte back (as ftfy reads it, U+0081 / U+009D) before repair_text lets ftfy decode the rest.
LOST_BYTES = {
    "\u00e2\u20ac\ufffd": "\u00e2\u20ac\u009d",  # '”' (E2 80 9D): 58 times in the quotes, each closing a quotation
    "\u00d9\ufffd": "\u00d9\u0081",  # 'ف' (D9 81): 6 times in two Arabic quotes and their author (توفيق, فحسب, ...)
}
# Mojibake that ftfy leaves because it is too short to tell from real text; replaced after repair_text.
TOO_SHORT = {
    "\u00d9\u02c6": "\u0648",  # 'و' (D9 88, 'and') as a word of its own: 4 times in one Arabic quote
}


def _line(row: dict[str, Any]) -> str:
    """A row as the quotes file writes it: compact separators, non-ASCII characters unescaped, except the
    line and paragraph separators U+2028 / U+2029 (one repaired quote holds one), escaped so that tools
    that split lines on them (str.splitlines) still see one row per line."""
    text = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def _replace(text: str, table: dict[str, str], used: Counter) -> str:
    for bad, good in table.items():
        used[bad] += text.count(bad)
        text = text.replace(bad, good)
    return text


def fix(text: str, used: Counter) -> str:
    """`text` repaired: lost bytes put back, repair_text, then what ftfy leaves; counts each table entry used."""
    return _replace(repair_text(_replace(text, LOST_BYTES, used)), TOO_SHORT, used)


def fix_value(value: Any, changed: Counter, used: Counter) -> Any:
    """`value` with every string in it (also inside lists) repaired; counts strings seen and changed."""
    if isinstance(value, str):
        fixed = fix(value, used)
        changed["strings"] += 1
        changed["changed"] += fixed != value
        return fixed
    if isinstance(value, list):
        return [fix_value(v, changed, used) for v in value]
    return value


def main(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.removesuffix("\n").split("\n")]
    if "".join(_line(row) for row in rows) != text:
        sys.exit(f"{path} is not one compact JSON object per line (as json.dumps(row, ensure_ascii=False, "
                 "separators=(',', ':')) writes it): rewriting it would change more than its strings")
    changed: Counter = Counter()
    used: Counter = Counter()
    fixed = [fix_value(row, changed, used) for row in rows]
    rows_changed = sum(a != b for a, b in zip(rows, fixed, strict=True))
    path.write_text("".join(_line(row) for row in fixed), encoding="utf-8")
    print(f"{path}: {rows_changed} of {len(rows)} rows and {changed['changed']} of {changed['strings']} strings "
          "changed")
    for bad, n in used.items():
        print(f"  {ascii(bad)}: {n} times")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
