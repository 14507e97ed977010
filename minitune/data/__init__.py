"""Data: rows from a file, folder or hub id -> token ids -> padded batches.

    sources.py    rows: local files and folders, hub datasets, mojibake repair, the validation split
    templates.py  `{column}` templates rendered over a row
    chat.py       conversations rendered with the tokenizer's chat template; generation prompts
    tokenize.py   rows -> input ids and labels (masking, truncation, packing), cached
    batching.py   the collator, seeded and length-grouped samplers, data loaders
    bundle.py     build_data: both splits, tokenized, with their statistics

The flow is :func:`load_rows` (raw train / validation rows) -> :func:`tokenize` (templates rendered
over the columns, truncation, prompt masking or packing) -> :func:`make_dataloader` with a
:class:`Collator`. :func:`build_data` does the first two for both splits and reports statistics.

Conventions the loop relies on: labels are ``-100`` wherever a token is not a target (padding and,
with ``data.mask_prompt``, the prompt); real tokens in a batch are ``attention_mask.sum()`` and
target tokens are ``(labels != -100).sum()``. Batches hold exactly ``input_ids``,
``attention_mask`` and ``labels``.
"""

from __future__ import annotations

from .batching import (
    Collator,
    LengthGroupedSampler,
    SeededRandomSampler,
    estimate_padding,
    make_dataloader,
)
from .bundle import DataBundle, build_data, collator_for
from .chat import apply_chat, check_chat_template, conversation, generation_prompt, stop_token_ids, user_prompt
from .sources import load_rows, repair_text
from .templates import render
from .tokenize import pack, tokenize

__all__ = [
    "Collator",
    "DataBundle",
    "LengthGroupedSampler",
    "SeededRandomSampler",
    "apply_chat",
    "build_data",
    "check_chat_template",
    "collator_for",
    "conversation",
    "estimate_padding",
    "generation_prompt",
    "load_rows",
    "make_dataloader",
    "pack",
    "render",
    "repair_text",
    "stop_token_ids",
    "tokenize",
    "user_prompt",
]
