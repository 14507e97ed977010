"""The roofline: the simulated step's FLOPs against torch's own count of the real step."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.utils.flop_counter import FlopCounterMode

from minitune.config import LoraArgs, load_config
from minitune.losses import loss_fn_for
from minitune.planner import MicroBatch, simulate
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
