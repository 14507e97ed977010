"""`build_data`: both splits loaded and tokenized, with the statistics a run reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets

from ..config import DataArgs
from ..errors import DataError
from .batching import Collator, estimate_padding
from .sources import load_rows
from .tokenize import tokenize


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
    return DataBundle(train, validation, raw_validation, collator_for(args, tokenizer, seq2seq=seq2seq), stats)


def collator_for(args: DataArgs, tokenizer: Any, *, seq2seq: bool) -> Collator:
    """The collator a config's data section asks for: widths padded to data.pad_to_multiple_of, never
    past data.max_length (training and evaluation batch alike)."""
    return Collator(tokenizer, seq2seq=seq2seq, pad_to_multiple_of=args.pad_to_multiple_of or None,
                    max_width=args.max_length, max_label_width=args.max_target_length if seq2seq else None)
