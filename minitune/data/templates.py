"""Templates: `{column}` placeholders rendered over a row (`data.prompt`, `data.response`)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from ..errors import DataError


def template_columns(template: str, name: str) -> list[str]:
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


def missing_column(name: str, column: str, columns: Sequence[str]) -> DataError:
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
        raise missing_column(name, e.args[0], list(row)) from None
    except (ValueError, IndexError, AttributeError, TypeError) as e:
        raise DataError(f"{name} '{template}' cannot be rendered ({e}): name columns as {{column}}") from None
