import json
from unittest import mock

import torch
from torch import nn

from minitune.memory import MB, MemoryProfiler, estimate_peak, format_bytes, tensor_breakdown


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    model[0].to(torch.bfloat16).requires_grad_(False)
    model.register_buffer("mask", torch.zeros(10, dtype=torch.int8))
    return model


def test_breakdown_arithmetic_is_exact():
    model = _tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    model[2](model[1](model[0](x).float())).sum().backward()
    opt.step()
    b = tensor_breakdown(model, opt, peak_bytes=10 * MB)
    frozen_bf16 = (16 * 32 + 32) * 2  # Linear(16, 32) weight + bias in bf16
    trainable = (32 + 32 + 32 * 4 + 4) * 4  # LayerNorm weight+bias, Linear(32, 4) weight+bias, fp32
    # AdamW keeps exp_avg and exp_avg_sq (fp32, parameter-shaped) and a scalar fp32 'step' per parameter
    adam = 2 * trainable + 4 * 4
    assert b["frozen_weights/torch.bfloat16"] == frozen_bf16
    assert b["frozen_weights/torch.int8"] == 10
    assert b["trainable_weights"] == trainable
    assert b["gradients"] == trainable
    assert b["optimizer_state"] == b["optimizer_state/32bit"] == adam
    assert b["optimizer_state/8bit"] == 0
    total = frozen_bf16 + 10 + trainable * 2 + adam
    assert b["total_tensors"] == total
    assert b["activations_and_temporaries"] == 10 * MB - total


def test_breakdown_counts_tied_weights_once_and_never_negative():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    b = tensor_breakdown(model, peak_bytes=1)
    assert b["trainable_weights"] == 100 * 8 * 4
    assert b["activations_and_temporaries"] == 0


def test_assume_grads_counts_freed_gradients():
    model = _tiny()
    assert tensor_breakdown(model)["gradients"] == 0
    assert tensor_breakdown(model, assume_grads=True)["gradients"] == tensor_breakdown(model)["trainable_weights"]


def test_cpu_peak_is_per_step_and_resets():
    with MemoryProfiler("cpu", sample_interval_s=0.002) as prof:
        first = prof.step(1)
        assert first["mem/rss_mb"] > 0 and first["mem/peak_rss_mb"] >= first["mem/rss_mb"]
        import mmap
        import time

        # fresh anonymous pages, touched: resident whatever the allocator holds already (inside a long
        # test session, malloc may serve 200 MB from memory that is resident and free)
        region = mmap.mmap(-1, 200 * MB)
        big = torch.frombuffer(region, dtype=torch.uint8).fill_(1)

        from minitune.memory import _rss_bytes

        assert _rss_bytes() >= (first["mem/rss_mb"] + 150) * MB  # the allocation is in the RSS
        # the sampler thread sees it within a few periods; a busy machine may delay it (up to 2 s)
        deadline = time.monotonic() + 2.0
        while prof._max_sampled < (first["mem/rss_mb"] + 150) * MB and time.monotonic() < deadline:
            time.sleep(0.01)
        del big
        region.close()
        second = prof.step(2)
        assert second["mem/peak_rss_mb"] >= first["mem/rss_mb"] + 150
        assert second["mem/rss_mb"] < second["mem/peak_rss_mb"] - 150
        time.sleep(0.02)
        third = prof.step(3)
        assert third["mem/peak_rss_mb"] < second["mem/peak_rss_mb"] - 150
        assert prof.peak_bytes() >= second["mem/peak_rss_mb"] * MB
        assert prof.baseline_bytes > 0
        assert prof.peak_bytes(above_baseline=True) == prof.peak_bytes() - prof.baseline_bytes


def test_cuda_path_with_mocks():
    with mock.patch("torch.cuda.max_memory_allocated", return_value=300 * MB), \
            mock.patch("torch.cuda.memory_allocated", return_value=100 * MB), \
            mock.patch("torch.cuda.memory_reserved", return_value=400 * MB), \
            mock.patch("torch.cuda.reset_peak_memory_stats") as reset:
        prof = MemoryProfiler("cuda:0").start()
        rec = prof.step(1)
        prof.phase("load")
        prof.stop()
    assert rec == {"mem/allocated_mb": 100, "mem/reserved_mb": 400, "mem/peak_allocated_mb": 300}
    assert reset.call_count == 2  # at start and after the step's read
    assert prof.phases["load"]["mem/current_mb"] == 100


def test_mps_path_never_says_peak():
    with mock.patch("torch.mps.current_allocated_memory", return_value=50 * MB, create=True), \
            mock.patch("torch.mps.driver_allocated_memory", return_value=80 * MB, create=True), \
            mock.patch("torch.mps.recommended_max_memory", return_value=1000 * MB, create=True):
        with MemoryProfiler("mps", sample_interval_s=0.001) as prof:
            rec = prof.step(1)
    assert rec == {"mem/current_mb": 50, "mem/driver_mb": 80, "mem/max_sampled_mb": 50, "mem/headroom_mb": 920}
    assert not any("peak" in k for k in rec)
    assert "peak" not in prof.summary()["peak_label"]


def test_phases_summary_save_and_table(tmp_path):
    from rich.console import Console

    prof = MemoryProfiler("cpu", phases_every=2)
    assert prof.want_phases(2) and not prof.want_phases(3)
    with prof:
        prof.phase("load")
        prof.phase("lora")
        prof.step(1)
    prof.breakdown = tensor_breakdown(_tiny())
    prof.save(tmp_path / "memory.json")
    data = json.loads((tmp_path / "memory.json").read_text())
    assert set(data["phases"]) == {"load", "lora"} and data["steps"] == 1
    console = Console(record=True, width=120)
    console.print(prof.table())
    text = console.export_text()
    assert "after load" in text and "after lora" in text and "trainable_weights" in text


def test_estimate_peak_on_meta_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    adam = estimate_peak(model, optimizer="adamw", batch_size=4, seq_len=128)
    adam8 = estimate_peak(model, optimizer="adamw8bit", batch_size=4, seq_len=128)
    ckpt = estimate_peak(model, optimizer="adamw", batch_size=4, seq_len=128, gradient_checkpointing=True)
    n = sum(p.numel() for p in model.parameters())
    assert adam["trainable_weights"] == n * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert adam["weights"] == n * 4 + buffers
    assert adam["optimizer_state"] == 8 * n and adam8["optimizer_state"] < adam["optimizer_state"] / 3
    assert ckpt["activations"] < adam["activations"]
    assert adam["activations"] >= 2 * 4 * 128 * 1000 * 4  # at least the fp32 logits and their gradient
    assert adam["total"] == sum(adam[k] for k in ("weights", "gradients", "optimizer_state", "activations"))


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * MB) == "3.0 MiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_estimate_counts_16_bit_activations_for_16_bit_weights():
    from minitune.config import ModelArgs
    from minitune.memory import estimate_peak
    from minitune.model import build_from_config

    shape = {"batch_size": 2, "seq_len": 32}
    fp32 = estimate_peak(build_from_config(ModelArgs(preset="tiny-llama", dtype="float32")), **shape)
    bf16 = estimate_peak(build_from_config(ModelArgs(preset="tiny-llama", dtype="bfloat16")), **shape)
    autocast = estimate_peak(build_from_config(ModelArgs(preset="tiny-llama", dtype="float32")),
                             mixed_precision="bf16", **shape)
    logits = 2 * 2 * 32 * 50257 * 4  # fp32 logits and their gradient, the same in every case
    assert abs(bf16["weights"] * 2 - fp32["weights"]) < 100  # fp32 buffers (rotary frequencies) aside
    assert bf16["activations"] - logits == (fp32["activations"] - logits) // 2 == autocast["activations"] - logits
