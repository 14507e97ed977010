"""`EvalResult` and how it is shown: the metric rows, eval.md, and the terminal tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape
from rich.table import Table


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
