"""Every error minitune raises for bad input, in one place, under one base.

`MinituneError` means: the input (a config, a data file, a model path, a checkpoint, a run folder) or
a setting cannot be used, and the message names the problem and the fix in one line. The command
line prints it as one `error:` line with exit code 2; any other exception is an internal bug and
keeps its traceback. Each subclass also derives from the builtin error it used to be, so code that
catches `ValueError` or `RuntimeError` keeps working.
"""

from __future__ import annotations

import re

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiskFullError",
    "EvalError",
    "MinituneError",
    "ModelError",
    "PlanError",
    "ReportError",
    "RunError",
    "one_line",
]


def one_line(text: str) -> str:
    """`text` as one printable line: line breaks (and the blanks around them) become one space, other
    characters a terminal would not print as themselves (control characters, U+2028) are escaped."""
    text = re.sub(r"[ \t]*[\r\n]+[ \t]*", " ", text)
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class MinituneError(Exception):
    """Bad input or a refused setting; the message names the problem and the fix (CLI: exit code 2)."""


class ConfigError(MinituneError, ValueError):
    """A configuration is invalid; ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = [one_line(p) for p in problems]
        if len(self.problems) == 1:
            msg = f"invalid config: {self.problems[0]}"
        else:
            msg = f"invalid config ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(msg)


class DataError(MinituneError, ValueError):
    """The data cannot be used as configured; the one-line message names the problem and the fix."""


class ModelError(MinituneError, RuntimeError):
    """A model or tokenizer cannot be loaded or adapted; the message names the fix."""


class CheckpointError(MinituneError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the fix."""


class DiskFullError(CheckpointError):
    """A checkpoint could not be written: its folder's disk is full. The message names the folder, the
    space a checkpoint needs, the last good checkpoint and how to resume; the half-written copy is gone."""


class RunError(MinituneError, RuntimeError):
    """The run cannot start or continue; the message names the problem and the fix."""


class EvalError(RunError):
    """An evaluation cannot run as asked (sheet, key or output problems); the message names the fix."""


class PlanError(MinituneError, RuntimeError):
    """The planner could not simulate a config."""


class ReportError(MinituneError, ValueError):
    """A folder that is not a run folder, or a file in it that cannot be read."""
