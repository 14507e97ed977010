"""Command-line entry points: parse argv, build a Config, run, and turn known errors into one line.

Exit codes: 0 success, 2 bad input (config, data, model, checkpoint, output folder), 1 other errors.

The modules that import torch, transformers and peft (run, evaluate and the error types of the
others) are imported inside the functions that use them, on purpose: `--help` answers without
loading them, and third-party logging is quieted before they load (bitsandbytes logs a note when
peft imports it).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import SEED_MAX, choices_of, describe, describe_configs, generation_args, load_config
from .errors import ConfigError, MinituneError, one_line
from .process_memory import restart_with_malloc_env, tune_malloc
from .run_data import TABLE_COLUMNS, load_run, run_labels, table_rows
from .run_report import write_report

__all__ = ["main", "main_eval", "main_plan", "main_report", "main_train"]


def _quiet_third_party() -> None:
    """Silence known-harmless noise of the pinned stack (CLI only; the library sets nothing globally):
    bitsandbytes' note that an optional CPU kernel package is missing, and transformers'
    deprecation warnings for the gradient-checkpointing calls that peft and minitune make."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported like any other bad input: one `error:` line, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def run_cli(fn: Callable[[], Any]) -> int:
    """Call `fn`; bad input becomes `error: <message>` on stderr and exit code 2."""
    _quiet_third_party()
    try:
        fn()
    except MinituneError as e:  # bad input (minitune.errors); anything else is a bug and keeps its traceback
        # a ConfigError lists its problems one per line (each made one line already); others are one line
        print(f"error: {e if isinstance(e, ConfigError) else one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a path given as input that the operating system refuses
        if e.errno not in _PATH_ERRORS or e.filename is None:
            raise
        print(f"error: {_path_problem(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


_PATH_ERRORS = {errno.ENAMETOOLONG: "is too long for this file system: give a shorter path",
                errno.EACCES: "is not accessible (permission denied): choose a path you can read and write"}


def _path_problem(e: OSError) -> str:
    name = str(e.filename)
    shown = one_line(name if len(name) <= 80 else f"{name[:60]}...{name[-12:]}")
    return f"the path '{shown}' ({len(name):,d} characters) {_PATH_ERRORS[e.errno]}"


def main_train(argv: Sequence[str] | None = None) -> int:
    """`train.py --config NAME|FILE [section.key=value ...]`, or `train.py --list-configs`."""
    if argv is None:  # the program itself, not a caller's function: its allocator can still be set
        restart_with_malloc_env()
    parser = _Parser(
        prog="train.py",
        description="Fine-tune a language model with minitune (launch with `accelerate launch train.py ...`).",
        epilog="Overrides: section.key=value, e.g. training.max_steps=20 lora.r=16. "
               "List every key with --help-config.",
    )
    parser.add_argument("--config", "-c", metavar="NAME|FILE",
                        help="a shipped config by name (e.g. smollm2-quotes; see --list-configs) or a YAML file")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    parser.add_argument("--plan", action="store_true",
                        help="do not train: predict the peak memory and whether it fits (see `minitune plan --help`)")
    _plan_arguments(parser, with_config=False)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.plan:
        return _run_plan(parser, args)
    if args.device or args.budget or args.json:
        parser.error("--device, --budget and --json go with --plan")
    if args.list_configs:
        print(describe_configs())
        return 0
    if args.help_config:
        print(describe())
        return 0
    if not args.config and not args.overrides:
        parser.error("give --config NAME or FILE (e.g. smollm2-quotes; see --list-configs) and/or section.key=value "
                     "overrides")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .run import train  # here: torch and the training stack load when a run starts, not for --help

    return run_cli(lambda: train(args.config, args.overrides))


def _plan_arguments(parser: argparse.ArgumentParser, *, with_config: bool = True) -> None:
    if with_config:
        parser.add_argument("--config", "-c", metavar="NAME|FILE",
                            help="a shipped config by name (see minitune-train --list-configs) or a YAML file")
    parser.add_argument("--device", "-d", metavar="NAME",
                        help="plan for this device: T4, V100, A10G, L4, A100-40, A100-80, H100, RTX4090, M4-16, "
                             "M4-24, mps (this Mac) or cpu (this machine; the default)")
    parser.add_argument("--budget", "-b", metavar="SIZE", help="memory the run may use, e.g. 12GiB (instead of the "
                                                                   "device's own budget)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main_plan(argv: Sequence[str] | None = None) -> int:
    """`minitune plan --config NAME|FILE [--device T4 | --budget 12GiB] [--json] [section.key=value ...]`."""
    parser = _Parser(
        prog="minitune plan",
        description="Will it fit? Predict a run's peak memory, by phase and by tensor role, without loading "
                    "weights, and list the cheapest changes that make it fit.",
        epilog="Overrides: section.key=value, as for train.py. Predictions are the bytes tensors hold "
               "(torch.cuda.max_memory_allocated on CUDA); see docs/memory.md, 'Will it fit?'.",
    )
    _plan_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    return _run_plan(parser, args)


def _run_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.config and not args.overrides:
        parser.error("give --config NAME or FILE (see minitune-train --list-configs) and/or section.key=value overrides")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a plan never downloads: uncached hub models use their preset

    def plan_it() -> None:
        from .planner import format_plan, parse_size, plan  # here: the planner loads torch and transformers

        budget = parse_size(args.budget) if args.budget else None
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, args.device or "cpu", budget=budget)
        print(json.dumps(result.to_dict(), indent=1) if args.json else format_plan(result))

    return run_cli(plan_it)


def main_report(argv: Sequence[str] | None = None) -> int:
    """`minitune report RUN [RUN ...] [--out DIR]`: report.png and report.html from run folders."""
    parser = _Parser(
        prog="minitune report",
        description="Draw report.png and report.html from run folders (log.jsonl, memory.json, eval.json): loss, "
                    "learning rate, grad norm, tokens/s and memory per step, eval scores. Several runs are "
                    "overlaid, labelled by the config keys that differ, with a table of their final figures.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (a run's training.output_dir)")
    parser.add_argument("--out", "-o", metavar="DIR",
                        help="where the report goes (default: the run's folder; several runs: their common parent)")
    args = parser.parse_args(argv)

    def report() -> None:
        png, html = write_report(args.runs, out=args.out)
        runs = [load_run(r) for r in args.runs]
        table = Table(title="final figures", title_justify="left")
        for column in TABLE_COLUMNS:
            table.add_column(column)
        for row in table_rows(runs, run_labels(runs)):
            table.add_row(*row)
        Console().print(table)
        print(f"report: {png} and {html}")

    return run_cli(report)


def main(argv: Sequence[str] | None = None) -> int:
    """`minitune plan ...` or `minitune report ...` (training and evaluation are minitune-train and minitune-eval)."""
    if argv is None:  # `minitune plan` predicts the process a train.py run will be: the same allocator
        restart_with_malloc_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: minitune plan --config NAME|FILE [--device T4 | --budget 12GiB] [--json] [key=value ...]\n"
              "       minitune report RUN [RUN ...] [--out DIR]\n"
              "       (train with minitune-train or train.py, evaluate with minitune-eval or eval.py)")
        return 0 if argv else 2
    commands = {"plan": main_plan, "report": main_report}
    if argv[0] not in commands:
        print(f"error: unknown command '{one_line(argv[0])}': the commands are `minitune plan` and `minitune report` "
              "(see minitune --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


# eval.py's decoding flags: each is the override generation.<key>=<value> of the checkpoint's config
_DECODING = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size", "stop")


def _eval_parser() -> _Parser:
    parser = _Parser(
        prog="eval.py",
        description="Compare a fine-tuned checkpoint with its base model on the held-out data: perplexity, "
                    "generations and a blind human-evaluation sheet. Or summarize a filled-in sheet (--scores).",
        epilog="Overrides of the checkpoint's config: section.key=value, e.g. data.max_length=128 training.device=cpu.",
    )
    parser.add_argument("-p", "--path", help="checkpoint folder, e.g. runs/smollm2-quotes/final")
    parser.add_argument("--data", help="evaluate on another dataset (same templates; same hold-out rules)")
    parser.add_argument("--split", help="evaluate on every row of this split (e.g. validation, or train for a whole file)")
    parser.add_argument("--max-samples", type=_positive_int, help="use the first N held-out rows")
    parser.add_argument("--batch-size", type=_positive_int, help="examples per batch (default: training.batch_size)")
    parser.add_argument("--num-prompts", type=int, default=8, help="held-out rows to generate from (default 8; 0: none)")
    parser.add_argument("--prompts", help="generate from this file instead: one prompt per line")
    decoding = parser.add_argument_group(
        "decoding", "default: the checkpoint config's generation section (see --help-config of train.py); "
                    "each flag is the override generation.<key>=<value>")
    decoding.add_argument("--max-new-tokens", type=int, help="new tokens per generation (default 48)")
    decoding.add_argument("--temperature", type=float, help="0 (default): greedy; > 0: sampling")
    decoding.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --temperature)")
    decoding.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeated tokens (default 1: off)")
    decoding.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size (default 3)")
    decoding.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt choice, sampling and sheet order")
    parser.add_argument("--out", help="folder for eval.json, eval.md and the sheet (default: <run>/eval/<checkpoint>/)")
    parser.add_argument("--no-sheet", action="store_true", help="do not write the human-evaluation sheet")
    parser.add_argument("--merge-to", metavar="DIR", help="also write the merged model (base + LoRA) to DIR")
    parser.add_argument("--device", choices=choices_of("training", "device"), help="override training.device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--scores", metavar="SHEET", help="summarize a filled-in sheet (with its key) and exit")
    parser.add_argument("--key", help="the sheet's key file (default: <sheet>_key.csv beside it)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the checkpoint's config")
    return parser


def main_eval(argv: Sequence[str] | None = None) -> int:
    """`eval.py -p CHECKPOINT [options] [section.key=value ...]`, or `eval.py --scores SHEET.csv`."""
    if argv is None:  # the program itself: its allocator is set as train.py's is
        restart_with_malloc_env()
    parser = _eval_parser()
    args = parser.parse_args(argv)
    if args.scores is None and not args.path:
        parser.error("give -p CHECKPOINT (e.g. runs/smollm2-quotes/final), or --scores SHEET.csv")
    if args.num_prompts < 0:
        parser.error("--num-prompts must be >= 0")
    decoding_flags = {key: getattr(args, key) for key in _DECODING if getattr(args, key) is not None}
    try:
        generation_args(decoding_flags)  # the config's own checks, before any work
    except ConfigError as e:
        parser.error("; ".join(e.problems))
    if not 0 <= args.seed <= SEED_MAX:
        parser.error(f"--seed {args.seed} must be in [0, 2**32 - 1]")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console = Console()

    def scores() -> None:
        from .evaluate import render_scores, summarize_scores  # here: evaluation loads torch and transformers

        render_scores(summarize_scores(args.scores, args.key), console)

    def evaluate() -> None:
        from .evaluate import evaluate_checkpoint, render_result  # here: as above

        tune_malloc()  # minitune's malloc setting, as a run's: one setting for every minitune program
        overrides = list(args.overrides) + ([f"training.device={args.device}"] if args.device else [])
        overrides += [f"generation.{key}={json.dumps(value)}" for key, value in decoding_flags.items()]
        with _progress(not args.no_progress) as progress:
            result = evaluate_checkpoint(
                args.path, overrides, data_path=args.data, split=args.split, max_samples=args.max_samples,
                batch_size=args.batch_size, num_prompts=args.num_prompts, prompts_file=args.prompts,
                seed=args.seed,
                out_dir=args.out, sheet=not args.no_sheet, merge_to=args.merge_to, progress=progress,
            )
        render_result(result, console)

    return run_cli(scores if args.scores is not None else evaluate)


class _progress:
    """A rich progress bar (on stderr) with one task per evaluation phase; yields `add(label, total)`."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self) -> Callable[[str, int], Callable[[], None]] | None:
        if not self.enabled:
            return None
        def add(label: str, total: int) -> Callable[[], None]:
            if self.bar is None:  # started with the first task: an early error leaves the terminal clean
                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)
                self.bar.start()
            task = self.bar.add_task(label, total=total)
            return lambda: self.bar.advance(task)

        return add

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
