"""The roofline: the simulated step's FLOPs against torch's own count of the real step, the memory-
bound bytes, the device peaks (probed live, data sheets) and the step time at those peaks."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.utils.flop_counter import FlopCounterMode

from minitune.config import LoraArgs, load_config
from minitune.losses import loss_fn_for
from minitune.planner import MicroBatch, simulate, target
from minitune.planner.advice import with_overrides
from minitune.planner.roofline import DATASHEETS, Peak, datasheet_name, memory_bytes, peak_for, probe, step_seconds
from minitune.prepare import prepare_model

from .conftest import tiny_config

# small vocabularies: the blocks' matmuls, not the output layer, make most of the count
FAMILIES = {
    "llama": lambda: tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2),
    "opt": lambda: tf.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=64),
    "bloom": lambda: tf.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4),
    "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                       attention_types=[[["global", "local"], 1]], window_size=256),
    "t5": lambda: tf.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                              num_heads=4, decoder_start_token_id=0),
}


def _model(family: str, lora: bool, checkpointing: bool) -> torch.nn.Module:
    hf = FAMILIES[family]()
    hf._attn_implementation = "eager"  # torch's counter decomposes CPU sdpa into eager's products
    torch.manual_seed(0)
    auto = tf.AutoModelForSeq2SeqLM if family == "t5" else tf.AutoModelForCausalLM
    model, _ = prepare_model(auto.from_config(hf), LoraArgs(enabled=lora, r=8, alpha=16, dropout=0.0),
                             fp32_norms="none", gradient_checkpointing=checkpointing)
    return model.train()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("lora,checkpointing", [(True, False), (False, False), (True, True)])
def test_simulated_flops_are_torchs_count_of_the_real_step(tmp_path, family, lora, checkpointing):
    model = _model(family, lora, checkpointing)
    cfg = load_config(tiny_config("tiny-t5" if family == "t5" else "tiny-llama", tmp_path,
                                  lora={"enabled": lora}, training={"gradient_checkpointing": checkpointing}))
    b, s, t = 2, 24, 10
    seq2seq = family == "t5"
    predicted = simulate(model, cfg, steps=[[MicroBatch(b, s, t if seq2seq else None, padded=False)]]).flops
    ids = torch.randint(0, 256, (b, s))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 256, (b, t)) if seq2seq else ids}
    loss_fn = loss_fn_for(cfg.training.loss, cfg.training.loss_chunk_size, model)
    with FlopCounterMode(display=False) as counter:
        loss, _ = loss_fn(model, batch)
        loss.backward()
    assert predicted == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert predicted > 0


def test_cpu_attention_is_counted_as_flash_attention_forward_and_backward():
    """CPU sdpa runs a flash kernel: forward 2 products of s x s x d per head, backward 5 (the scores
    recomputed, then the gradients of values, scores, queries and keys)."""
    hf = FAMILIES["llama"]()
    hf._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(hf)
    eager = _model("llama", False, False)
    cfg = load_config(tiny_config("tiny-llama", lora={"enabled": False}))
    steps = [[MicroBatch(2, 24, padded=False)]]
    b, s, heads, d = 2, 24, 4, 16
    product = 2 * b * heads * s * s * d
    per_layer = {"sdpa": 2 * product + 5 * product, "eager": 2 * product + 4 * product}
    difference = simulate(model, cfg, steps=steps).flops - simulate(eager, cfg, steps=steps).flops
    assert difference == 2 * (per_layer["sdpa"] - per_layer["eager"])  # 2 layers


def test_checkpointing_adds_the_recomputed_forward():
    cfg = load_config(tiny_config("tiny-llama"))
    steps = [[MicroBatch(2, 24, padded=False)]]
    plain = simulate(_model("llama", True, False), cfg, steps=steps).flops
    recomputed = simulate(_model("llama", True, True), cfg, steps=steps).flops
    assert plain * 1.2 < recomputed < plain * 1.5  # LoRA: 3 passes over frozen weights become about 4


def test_memory_bytes_count_dequantization_and_the_update():
    model = _model("llama", True, False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory_bytes(model, 1, checkpointing=False, optimizer="adamw") == 92 * trainable
    assert memory_bytes(model, 1, checkpointing=False, optimizer="adamw", fused=True) == 40 * trainable
    assert memory_bytes(model, 3, checkpointing=True, optimizer="adamw8bit") == 28 * trainable


def test_step_seconds_adds_compute_and_memory_time():
    peak = Peak(flops=1e12, bandwidth=1e10, source="test")
    assert step_seconds(2e12, 5e9, peak) == pytest.approx(2.5)


def test_the_cpu_probe_measures_a_plausible_peak():
    peak = probe("cpu", torch.float32)
    assert 1e9 < peak.flops < 1e14 and 1e8 < peak.bandwidth < 1e13
    assert "probed on this CPU" in peak.source and peak is probe("cpu", torch.float32)  # once per process


def test_named_gpus_use_their_data_sheet_and_apple_has_none():
    t4 = peak_for(target("T4"), half=True)
    assert t4.flops == DATASHEETS["T4"][0] and "data sheet of the T4" in t4.source
    assert peak_for(target("H100"), half=False).flops == DATASHEETS["H100"][1]
    assert peak_for(target("M4-16"), half=True) is None
    names = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA H200": "H200", "Tesla T4": "T4", "NVIDIA L4": "L4",
             "NVIDIA A100-SXM4-80GB": "A100-80", "NVIDIA A100-PCIE-40GB": "A100-40",
             "NVIDIA GeForce RTX 4090": "RTX4090", "NVIDIA L40S": None, "NVIDIA A10G": None}
    assert {n: datasheet_name(n) for n in names} == names


def test_plan_prints_the_step_at_the_peak_and_prices_each_change_by_it(tmp_path):
    from minitune.planner import format_plan, plan

    cfg = load_config(tiny_config("tiny-llama", lora={"enabled": False}, training={"batch_size": 8},
                                  data={"max_length": 128}))
    first = plan(cfg, "cpu", suggest=False, baseline=0)
    assert first.step_seconds == pytest.approx(step_seconds(first.prediction.flops, first.prediction.moved, first.peak))
    assert "step time at the peak" in format_plan(first)
    tight = plan(cfg, "cpu", budget=int(first.process.total * 0.8), baseline=0)
    by_change = {next(iter(s.overrides)): s for s in tight.suggestions}
    for key, s in by_change.items():  # each price: the changed step at the same peaks x this one
        changed = plan(with_overrides(cfg, s.overrides), first.target, suggest=False, baseline=0)
        expected = step_seconds(changed.prediction.flops, changed.prediction.moved, tight.peak) / tight.step_seconds
        assert s.speed == pytest.approx(expected, abs=0.006), key
    assert by_change["training.gradient_checkpointing"].speed > 1.0  # the blocks' forward again (the output layer is most of this model)
    assert by_change["training.batch_size"].speed == pytest.approx(1.0, abs=0.01)  # the same FLOPs, split
    assert by_change["data.max_length"].speed < 0.6  # half the positions
    assert plan(cfg, "M4-16", suggest=False).to_dict()["step"]["seconds_at_peak"] is None


def test_a_quantized_base_is_dequantized_for_each_pass_of_each_micro_batch(tmp_path):
    from minitune.device import resolve_precision
    from minitune.planner import meta_model

    cfg, _ = resolve_precision(load_config(tiny_config("tiny-llama", tmp_path, quantization={"mode": "4bit"})),
                               torch.device("cpu"))
    model, _, _ = meta_model(cfg)
    packed = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert packed  # the attention and MLP projections
    elements = sum(m.in_features * m.out_features for m in packed)
    update = memory_bytes(model, 1, checkpointing=False, optimizer="adamw") - 2 * elements * 4.5
    assert update == 92 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    # forward, backward and the recomputed forward, each micro-batch: read 4 bits, write and read 16
    assert memory_bytes(model, 2, checkpointing=True, optimizer="adamw") == 2 * 3 * elements * 4.5 + update
