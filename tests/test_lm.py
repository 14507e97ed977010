"""minitune.lm: the model kind, the target shift and unwrapping, each decided once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minitune.config import ModelArgs
from minitune.lm import count_targets, model_kind, shift_targets, unwrap
from minitune.model import build_from_config, resolve_kind

LABELS = torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])


def test_model_kind_from_configs_models_and_dicts():
    t5 = build_from_config(ModelArgs(preset="tiny-t5"))
    llama = build_from_config(ModelArgs(preset="tiny-llama"))
    assert model_kind(t5) == model_kind(t5.config) == model_kind({"is_encoder_decoder": True}) == "seq2seq"
    assert model_kind(llama) == model_kind(llama.config) == model_kind({}) == model_kind(None) == "causal"
    assert model_kind(nn.Linear(2, 2)) == "causal"  # no config: a module that is not an encoder-decoder


def test_resolve_kind_takes_model_kind_unless_auto():
    assert resolve_kind(ModelArgs(preset="tiny-t5")) == "seq2seq"
    assert resolve_kind(ModelArgs(preset="tiny-llama")) == "causal"
    assert resolve_kind(ModelArgs(preset="tiny-t5", kind="causal")) == "causal"


def test_causal_targets_are_labels_shifted_by_one():
    assert shift_targets(LABELS, "causal").tolist() == [[5, 6, -100], [-100, 8, 9]]
    assert shift_targets(LABELS, "causal", keep_length=True).tolist() == [[5, 6, -100, -100], [-100, 8, 9, -100]]
    assert shift_targets(LABELS, "seq2seq") is LABELS
    assert shift_targets([-100, 1, 2], "causal") == [1, 2]  # one example's labels, as minitune.data has them
    assert int(count_targets(LABELS, "causal")) == 4 and int(count_targets(LABELS, "seq2seq")) == 5


def test_unwrap_strips_compile_but_keeps_peft_and_plain_modules():
    model = nn.Linear(2, 2)
    assert unwrap(model) is model
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
    assert unwrap(compiled, keep_compiled=True) is compiled


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_default_loss_counts_what_shift_targets_says(kind):
    from minitune.losses import count_items, default_loss

    model = build_from_config(ModelArgs(preset="tiny-t5" if kind == "seq2seq" else "tiny-llama"))
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[4, -100, 5, 6]])}
    _, n = default_loss(model, batch)
    assert int(n) == int(count_items(model, batch)) == int(count_targets(batch["labels"], kind))
    assert int(n) == (3 if kind == "seq2seq" else 2)
