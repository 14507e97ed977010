"""Command-line entry points: parse argv, build a Config, run, and turn known errors into one line.

Exit codes: 0 success, 2 bad input (config, data, model, checkpoint, output folder), 1 other errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main_train", "user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: reported in one line with exit code 2."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .model import ModelError
    from .run import RunError

    return (ConfigError, RunError, DataError, ModelError, CheckpointError)


def run_cli(fn: Callable[[], Any]) -> int:
    """Call `fn`; bad input becomes `error: <message>` on stderr and exit code 2."""
    try:
        fn()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main_train(argv: Sequence[str] | None = None) -> int:
    """`train.py --config FILE [section.key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a language model with minitune (launch with `accelerate launch train.py ...`).",
        epilog="Overrides: section.key=value, e.g. training.max_steps=20 lora.r=16. "
               "List every key with --help-config.",
    )
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    from .config import describe

    if args.help_config:
        print(describe())
        return 0
    if not args.config and not args.overrides:
        parser.error("give --config FILE (e.g. configs/smollm2-quotes.yaml) and/or section.key=value overrides")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .run import train

    return run_cli(lambda: train(args.config, args.overrides))
