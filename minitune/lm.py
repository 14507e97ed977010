"""Facts about a language model and its batches, each decided here and nowhere else.

    IGNORE                        the label of a position without a target (-100)
    model_kind(config)            'causal' or 'seq2seq'
    shift_targets(labels, kind)   the tokens the model predicts: causal LMs predict labels[1:]
    unwrap(model)                 the module inside DDP / torch.compile wrappers
    ensure_pad_token(tokenizer)   the pad token (EOS where a tokenizer has none)

Only torch is imported: the loop, the losses and the memory estimate use these without transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import DataError

__all__ = ["IGNORE", "PACKING_MODEL_TYPES", "count_targets", "ensure_pad_token", "model_kind", "shift_targets", "unwrap"]

IGNORE = -100  # label of a position without a target (padding, masked prompt)

# Model types whose attention keeps packed examples apart (`data.packing`): given restarting position
# ids and no attention mask, their transformers code builds a block-diagonal causal mask, so each
# example's loss is what it is alone (tests/test_data.py checks each type to 1e-5). OPT's and BLOOM's
# code builds its mask without the positions (examples would see each other): not in it.
PACKING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neo"})


def model_kind(config: Any) -> str:
    """'seq2seq' for an encoder-decoder config, else 'causal'.

    Args:
        config: a transformers config, a model (its `.config` is read), a dict (config.json), or None.

    Returns:
        'seq2seq' or 'causal'.
    """
    if isinstance(config, nn.Module):
        config = getattr(unwrap(config), "config", None)
    if isinstance(config, Mapping):
        return "seq2seq" if config.get("is_encoder_decoder") else "causal"
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def shift_targets(labels: Any, kind: str, *, keep_length: bool = False) -> Any:
    """The targets a model of `kind` predicts from `labels` (-100 = no target): a batch x seq tensor,
    or one example's labels (a 1-d tensor or a list).

    A causal LM predicts token t+1 at position t, so its targets are `labels[:, 1:]`; a seq2seq
    decoder predicts the labels themselves (its inputs are the labels shifted right).

    Args:
        labels: the collator's labels, or one example's.
        kind: 'causal' or 'seq2seq' (`model_kind`).
        keep_length: pad the causal targets with -100 back to the labels' length, so that they line
            up with logits of every position (the last position then has no target).

    Returns:
        The target ids (a view or slice of `labels` unless padded).
    """
    if kind == "seq2seq":
        return labels
    targets = labels[..., 1:] if torch.is_tensor(labels) else labels[1:]
    return nn.functional.pad(targets, (0, 1), value=IGNORE) if keep_length else targets


def count_targets(labels: torch.Tensor, kind: str) -> torch.Tensor:
    """How many positions have a target (a 0-dim tensor on the labels' device; no host sync)."""
    return (shift_targets(labels, kind) != IGNORE).sum()


def unwrap(model: nn.Module, *, keep_compiled: bool = False) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (a PeftModel is kept: it forwards attributes to
    its base itself; a DeepSpeed engine too: it forwards attributes, and its module must not run alone).

    Args:
        model: a model as `accelerator.prepare` returned it, or any module.
        keep_compiled: stop at a torch.compile wrapper (run the compiled forward, without DDP's).

    Returns:
        The innermost such module (`model` itself when it is not wrapped).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif not keep_compiled and getattr(model, "_orig_mod", None) is not None:
            model = model._orig_mod
        else:
            return model


def ensure_pad_token(tokenizer: Any) -> int:
    """Give a tokenizer without a pad token (GPT-2) its EOS as pad token; return the pad id.

    Padding never reaches the loss (its labels are -100) nor attention (mask 0), so EOS is a safe pad.

    Raises:
        DataError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has no pad token and no EOS token: add one with "
                            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id
