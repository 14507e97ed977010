"""A run's report, drawn from its folder alone: `report.png` and a self-contained `report.html`.

The numbers come only from the files a run leaves (`log.jsonl`, `memory.json`, `config.yaml`, and
`eval.json` once eval.py has run), so `minitune report RUN` rebuilds the same report at any time,
and `minitune report RUN RUN ...` overlays several runs, labelled by the config keys that differ.

    run_data.py   what a run folder holds, the figures and table rows   run_plots.py  the figure (matplotlib)
    run_report.py report.png and report.html, written atomically
"""

from __future__ import annotations

import base64
import html
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ReportError
from .files import write_atomic
from .run_data import TABLE_COLUMNS, RunData, first_line, fmt_value, load_run, run_labels, table_rows
from .run_plots import draw

__all__ = ["try_write_report", "write_report"]


# -- labels and final figures --------------------------------------------------------------------


# -- the picture ---------------------------------------------------------------------------------


# -- files -----------------------------------------------------------------------------------------

def write_report(runs: str | Path | Sequence[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Draw `report.png` and `report.html` for one run folder, or several overlaid.

    Args:
        runs: a run folder, or several.
        out: where the two files go (default: the run's folder; several runs: their common parent).

    Returns:
        (report.png, report.html).

    Raises:
        ReportError: a folder that is not a run folder, or a file in it that cannot be read.
    """
    folders = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    if not folders:
        raise ReportError("give at least one run folder")
    data = [load_run(f) for f in folders]
    if out is None:
        out = folders[0] if len(folders) == 1 else Path(os.path.commonpath([f.resolve() for f in folders]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(data)
    fig = draw(data, labels)
    buffer = io.BytesIO()
    # no "Software" stamp: the same folder gives the same bytes (a rebuild is identical)
    fig.savefig(buffer, format="png", metadata={"Software": None})
    png = buffer.getvalue()
    png_path, html_path = out / "report.png", out / "report.html"
    write_atomic(png_path, png)
    write_atomic(html_path, _html(data, labels, png).encode("utf-8"))
    return png_path, html_path


def try_write_report(folder: str | Path, say: Any = None) -> Path | None:
    """`write_report(folder)` for the end of a run or an evaluation: a failure prints one warning
    line and returns None; it never raises (a report is never worth a failed run)."""
    try:
        return write_report(folder)[0]
    except Exception as e:  # noqa: BLE001 - any failure to plot is only a warning
        line = f"warning: no report drawn in {folder} ({type(e).__name__}: {first_line(e)})"
        (say or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
        return None


def _html(runs: Sequence[RunData], labels: Sequence[str], png: bytes) -> str:
    esc = html.escape
    title = str(runs[0].folder) if len(runs) == 1 else ", ".join(str(r.folder) for r in runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>minitune report: {esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1250px}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}td.gen{white-space:pre-wrap;max-width:28em}img{max-width:100%}</style>",
        f"</head><body><h1>minitune report</h1><p>{esc(title)}</p>",
        f"<img alt='report' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>",
        "<h2>Final figures</h2>", _html_table(TABLE_COLUMNS, table_rows(runs, labels)),
    ]
    for run, label in zip(runs, labels, strict=True):
        ev = run.eval
        if not ev:
            continue
        head = f" ({esc(label)})" if len(runs) > 1 else ""
        rows = []
        for who in ("base", "tuned"):
            ppl = ((ev.get("perplexity") or {}).get(who) or {}).get("perplexity")
            task = {k: v for k, v in ((ev.get("task") or {}).get(who) or {}).items() if isinstance(v, float)}
            if ppl is not None or task:
                rows.append([who, fmt_value(ppl, ".3f") if isinstance(ppl, (int, float)) else "-",
                             ", ".join(f"{k} {v:.3f}" for k, v in task.items()) or "-"])
        parts += [f"<h2>Evaluation{head}</h2>", f"<p>{esc(str(ev.get('checkpoint', '')))}</p>",
                  _html_table(("model", "perplexity", "task metrics"), rows)]
        gens = ev.get("generations") or []
        if gens:
            parts.append(f"<h3>Generations{head}</h3><table><tr><th>prompt</th><th>reference</th><th>base</th>"
                         "<th>fine-tuned</th></tr>")
            for g in gens:
                cells = (g.get("shown") or g.get("prompt"), g.get("reference"), g.get("base"), g.get("tuned"))
                parts.append("<tr>" + "".join(f"<td class='gen'>{esc('' if c is None else str(c))}</td>"
                                              for c in cells) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
