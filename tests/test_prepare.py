"""minitune.prepare: LoRA targets, trainable parameters, fp32 casting and gradient checkpointing
on tiny models built from presets."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

from minitune.config import LoraArgs, ModelArgs
from minitune.errors import ModelError
from minitune.model import build_from_config
from minitune.prepare import apply_lora, default_target_modules, prepare_for_training, prepare_model


@pytest.mark.parametrize("preset,targets", [("tiny-bloom", ["query_key_value"]), ("tiny-t5", ["q", "v"]),
                                           ("tiny-opt", ["q_proj", "v_proj"]), ("tiny-gpt-neo", ["q_proj", "v_proj"]),
                                           ("tiny-llama", ["q_proj", "v_proj"])])
def test_default_targets(preset, targets):
    model = build_from_config(ModelArgs(preset=preset))
    assert default_target_modules(model) == targets
    peft_model = apply_lora(model, LoraArgs(r=2))
    assert peft_model.get_nb_trainable_parameters()[0] > 0


def test_targets_that_match_nothing_list_the_linear_modules():
    model = build_from_config(ModelArgs(preset="tiny-llama"))
    with pytest.raises(ModelError, match=r"\['qkv'\] match no linear module.*k_proj.*q_proj"):
        apply_lora(model, LoraArgs(target_modules=["qkv"]))


def test_trainable_line_matches_peft():
    model = build_from_config(ModelArgs(preset="tiny-opt"))
    model, report = prepare_model(model, LoraArgs(r=4))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    assert report.trainable_line == buf.getvalue().strip()


def test_full_finetuning_trains_everything():
    model = build_from_config(ModelArgs(preset="tiny-llama"))
    model, report = prepare_model(model, None)
    assert report.trainable == report.total == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_fp32_norms_only_by_default_and_cost_reported():
    model = build_from_config(ModelArgs(preset="tiny-llama", dtype="bfloat16"))
    norm_numel = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    report = prepare_for_training(model, fp32_norms="norms")
    assert report.fp32_cast_params == norm_numel
    assert report.fp32_cast_bytes == 2 * norm_numel  # bf16 -> fp32 adds 2 bytes per parameter
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    # the forward still runs in bf16 around the fp32 norms
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.dtype == torch.bfloat16


def test_fp32_all_matches_peft_upcast_cost():
    model = build_from_config(ModelArgs(preset="tiny-llama", dtype="bfloat16"))
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = prepare_for_training(model, fp32_norms="all")
    assert report.fp32_cast_params == total
    assert report.fp32_cast_bytes == 2 * total


def test_gradient_checkpointing_reentrant_enables_input_grads():
    model = build_from_config(ModelArgs(preset="tiny-llama"))
    report = prepare_for_training(model, gradient_checkpointing=True, reentrant=True)
    assert report.gradient_checkpointing and report.input_grads
    model2 = build_from_config(ModelArgs(preset="tiny-llama"))
    assert not prepare_for_training(model2, gradient_checkpointing=True).input_grads


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt", "tiny-bloom", "tiny-gpt-neo", "tiny-t5"])
def test_fp32_norms_compute_in_fp32_and_return_the_weights_dtype(preset):
    # each cast norm of a bf16 model gives its fp32 reference's output (the same weights in fp32, on
    # the bf16 input upcast) rounded once to bf16: the norm's math in fp32, its output in bf16
    model = build_from_config(ModelArgs(preset=preset, dtype="bfloat16"))
    reference = dict(copy.deepcopy(model).float().named_modules())
    report = prepare_for_training(model, fp32_norms="norms")
    assert report.fp32_cast_modules
    g = torch.Generator().manual_seed(0)
    for name in report.fp32_cast_modules:
        module = dict(model.named_modules())[name]
        x = (3 * torch.randn(2, 5, module.weight.shape[-1], generator=g) + 1).to(torch.bfloat16)
        out = module(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, reference[name](x.float()).to(torch.bfloat16)), name
