"""minitune.planner: predictions pinned against the CPU allocator's exact account, the ledger's
arithmetic, device budgets, the `minitune plan` command and its advice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from minitune.config import load_config
from minitune.errors import ConfigError
from minitune.memory import MB
from minitune.planner import (
    MicroBatch,
    meta_model,
    parse_size,
    plan,
    simulate,
    smaller_split,
    target,
    worst_case_steps,
)
from minitune.planner.advice import candidates, with_overrides
from minitune.planner.ledger import Ledger
from minitune.run import off_component, train

from .conftest import REPO, measured_config, tiny_config

ARCHITECTURES = ["tiny-llama", "tiny-opt", "tiny-bloom", "tiny-gpt-neo", "tiny-t5"]


def _error(result) -> float:
    predicted, measured = result.memory["predicted"]["total"], result.memory["training_peak_mb"] * MB
    return (predicted - measured) / measured


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_prediction_matches_the_allocator_for_each_architecture(tmp_path, preset):
    # a real run on real data (padding, masked prompts): the summary's prediction for steps 1-2
    # against the CPU allocator's exact account of the same steps
    res = train(measured_config(preset, tmp_path / "run", training={"max_steps": 2}))
    assert res.memory["training_peak_kind"] == "held by the CPU allocator, steps 1-2"
    assert abs(_error(res)) <= 0.02, (preset, res.memory["predicted"], res.memory["training_peak_mb"])


@pytest.mark.parametrize("settings", [
    {"quantization": {"mode": "4bit"}, "training": {"gradient_checkpointing": True, "grad_accum": 2}},
    {"lora": {"enabled": False}, "optimizer": {"name": "adamw8bit"}, "training": {"loss": "full"}},
    {"data": {"packing": True, "mask_prompt": True, "max_length": 128}},
    pytest.param({"lora": {"enabled": False}}, marks=pytest.mark.slow),
    pytest.param({"training": {"mixed_precision": "bf16"}}, marks=pytest.mark.slow),
    pytest.param({"model": {"dtype": "bfloat16"}}, marks=pytest.mark.slow),
    pytest.param({"quantization": {"mode": "8bit"}, "optimizer": {"name": "adamw8bit"}}, marks=pytest.mark.slow),
    pytest.param({"lora": {"target_modules": ["all-linear"]}, "training": {"mixed_precision": "bf16"}},
                 marks=pytest.mark.slow),
], ids=["4bit-checkpointing-accum", "full-adam8-fullloss", "packing", "full", "bf16-autocast", "bf16-weights", "8bit-adam8",
        "all-linear-bf16"])
def test_prediction_matches_the_allocator_for_each_method(tmp_path, settings):
    cfg = measured_config("tiny-llama", tmp_path / "run", training={"max_steps": 2})
    for section, values in settings.items():
        cfg.setdefault(section, {}).update(values)
    res = train(cfg)
    assert abs(_error(res)) <= 0.02, (settings, res.memory["predicted"], res.memory["training_peak_mb"])


def test_the_ledger_counts_releases_and_shared_storage():
    ledger = Ledger(fake=False)
    with ledger:
        a = torch.empty(MB, dtype=torch.uint8) + 0  # 1 MiB
        view = a[: MB // 2]  # the same storage: nothing more
        b = torch.zeros(2 * MB, dtype=torch.uint8)
        del b  # released: the peak stays 3 MiB, the live count drops
        c = torch.ones(MB, dtype=torch.uint8)
    assert ledger.peak == 3 * MB and ledger.live == 2 * MB
    del a, view, c
    assert ledger.live == 0


def test_nonzero_is_answered_with_the_micro_batch_target_count():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ledger = Ledger()
    with FakeTensorMode(), ledger:
        x = torch.empty(100)
        ledger.targets = 7
        assert (x != 0).nonzero().shape == (7, 1)
        assert (x != 0).nonzero().shape == (100, 1)  # once per micro-batch, then every position


def test_micro_batch_of_a_collated_batch():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    # causal: targets are the labels shifted by one (positions 1.. of each row)
    assert MicroBatch.of(batch, "causal") == MicroBatch(2, 4, None, 4, padded=False)
    assert MicroBatch.of({**batch, "labels": labels[:, :3]}, "seq2seq") == MicroBatch(2, 4, 3, 3, padded=False)
    padded = {**batch, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert MicroBatch.of(padded, "causal").padded


def test_more_tokens_more_memory_and_the_expected_levers():
    cfg = load_config(tiny_config("tiny-llama", training={"batch_size": 4}))
    model = meta_model(cfg)[0]
    base = simulate(model, cfg, seq_len=64).total
    assert simulate(model, cfg, seq_len=128).total > base
    half = load_config(cfg, {"training": {"batch_size": 2, "grad_accum": 2}})
    assert simulate(model, half, seq_len=64).total < base
    chunk = load_config(cfg, {"training": {"loss_chunk_size": 64}})
    assert simulate(model, chunk, seq_len=64).total < base
    full = load_config(cfg, {"lora": {"enabled": False}})
    adam8 = load_config(full, {"optimizer": {"name": "adamw8bit"}})
    full_model = meta_model(full)[0]
    p_full, p_adam8 = simulate(full_model, full, seq_len=64), simulate(full_model, adam8, seq_len=64)
    assert p_adam8.breakdown["optimizer_state"] < p_full.breakdown["optimizer_state"] / 3
    params = list(full_model.parameters())
    n = sum(p.numel() for p in params)
    # two fp32 moments per element, and torch's step counter (a 4-byte tensor) per parameter
    assert p_full.breakdown["optimizer_state"] == 8 * n + 4 * len(params)


def test_worst_case_steps_shape():
    cfg = load_config(tiny_config("tiny-t5", training={"batch_size": 3, "grad_accum": 8}))
    steps = worst_case_steps(cfg, seq2seq=True)
    assert len(steps) == 2 and all(len(s) == 2 for s in steps)  # two micro-batches: gradients alive in the second
    assert steps[0][0] == MicroBatch(3, 48, 16, None)


def test_device_budgets():
    t4 = target("t4")
    assert (t4.name, t4.kind, t4.memory, t4.budget) == ("T4", "cuda", 16 * 10**9, 16 * 10**9)  # the context is a process term
    assert not t4.caps.bf16 and target("A100-80").caps.bf16
    m4 = target("M4-16")
    assert m4.kind == "mps" and m4.budget == int(16 * 2**30 * 2 / 3)  # Metal's recommended working set
    assert target("M4-24").budget == int(24 * 2**30 * 3 / 4)
    assert target("T4", budget=5 * 2**30).budget == 5 * 2**30
    with pytest.raises(ConfigError, match="unknown device 'T5'.*T4, V100"):
        target("T5")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="no MPS device"):
            target("mps")


@pytest.mark.parametrize(("text", "size"), [("12GiB", 12 * 2**30), ("16 GB", 16 * 10**9), ("800MiB", 800 * 2**20),
                                            ("2.5g", int(2.5e9)), ("1024", 1024)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "twelve", "12 GiBs", "-1GB", "0", "0.1", "1" * 400, "9" * 30 + "TiB"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError, match="not a memory size"):
        parse_size(text)


def test_precision_follows_the_device():
    cfg = load_config(tiny_config("tiny-llama", model={"dtype": "auto"}, training={"mixed_precision": "auto"}))
    assert plan(cfg, "T4", suggest=False).precision.mixed_precision == "fp16"
    assert plan(cfg, "H100", suggest=False).precision.mixed_precision == "bf16"


def test_suggestions_fit_and_are_ranked(tmp_path):
    cfg = load_config(tiny_config("tiny-llama", lora={"enabled": False}, training={"batch_size": 8},
                                  data={"max_length": 128}))
    first = plan(cfg, "cpu", suggest=False, baseline=0).process.total  # baseline injected: no RSS noise
    result = plan(cfg, "cpu", budget=int(first * 0.8), baseline=0)
    assert not result.fits
    fitting = [s for s in result.suggestions if s.fits]
    assert fitting, result.suggestions
    assert all(s.process_peak <= int(first * 0.8) for s in fitting)  # fitting is decided on the process
    keys = [(s.changes_result, s.speed) for s in fitting]
    assert keys == sorted(keys)  # changes that keep the result first, then the cheapest
    # applying each suggestion (every override of it) gives the predicted peak it promised
    for s in fitting:
        assert plan(with_overrides(cfg, s.overrides), "cpu", suggest=False).prediction.total == s.peak, s.what


def test_off_component_names_the_part_that_was_off():
    from minitune.planner import Prediction

    pred = Prediction(100 * MB, "forward", {"weights/float32": 50 * MB, "adapters": MB, "gradients": MB,
                                            "optimizer_state": 2 * MB, "activations": 46 * MB}, {}, {})
    tensors = {"frozen_weights/torch.float32": 50 * MB, "trainable_weights": MB, "gradients": MB,
               "optimizer_state": 2 * MB, "total_tensors": 54 * MB}
    assert off_component(pred, {**tensors, "optimizer_state": 30 * MB}, 130 * MB).startswith(
        "optimizer state: 2.0 MiB predicted, 30.0 MiB measured")
    assert off_component(pred, tensors, 80 * MB).startswith(
        "activations, logits and temporaries: 46.0 MiB predicted, about 26.0 MiB measured")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minitune", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_plan_command_answers_for_a_hub_model_offline():
    """The real-process check of `python -m minitune` (minitune/__main__.py): the command itself runs
    in a subprocess, as a shell runs it; the other tests of the command call `minitune.cli.main`
    (or train.py's `main_train`) in this process."""
    # configs/bloom.yaml names bigscience/bloomz-560m, not in any cache here: planned from its preset
    proc = _cli("plan", "--config", "bloom", "--device", "T4", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["device"] == "T4" and out["fits"] and out["precision"]["mixed_precision"] == "fp16"
    assert out["predicted"]["breakdown"]["weights/int8"] > 0  # the 8-bit base
    assert set(out["predicted"]["phases"]) == {"forward", "backward", "optimizer"}
    assert "planned from the preset bloom-560m" in out["notes"][0]


def test_plan_command_text_and_advice(capsys, monkeypatch):
    import minitune.process_memory as pm
    from minitune.cli import main

    monkeypatch.setattr(pm, "rss_bytes", lambda: 100 * MB)  # the baseline, fixed: no RSS noise in the verdict
    assert main(["plan", "--config", "tiny-llama", "--budget", "200MiB", "lora.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "changes that make it fit" in out
    assert "predicted process peak" in out and "predicted tensor peak" in out and "per phase" in out
    assert "  baseline                      100.0 MiB" in out


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "--config", "tiny-llama", "--device", "T5"], "unknown device 'T5'"),
    (["plan", "--config", "tiny-llama", "--budget", "lots"], "--budget 'lots' is not a memory size"),
    (["plan"], "give --config"),
    (["fit"], "unknown command 'fit'"),
])
def test_plan_command_bad_input(args, message, capsys):
    from minitune.cli import main

    try:
        rc = main(args)
    except SystemExit as e:  # argparse's usage errors exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_train_py_plan_flag(capsys):
    from minitune.cli import main_train

    assert main_train(["--config", "tiny-llama", "--plan", "--device", "A10G"]) == 0  # what train.py calls
    out = capsys.readouterr().out
    assert out.startswith("plan for A10G") and "fits:" in out
    with pytest.raises(SystemExit) as refused:
        main_train(["--config", "tiny-llama", "--device", "A10G"])
    assert refused.value.code == 2 and "go with --plan" in capsys.readouterr().err


def test_smaller_split_keeps_the_examples_per_step():
    """The one rule for 'a smaller micro-batch, the same examples per step': the largest divisor of
    batch_size below it (5 -> 1, not 5 // 2 = 2, which would train on 4 examples instead of 5)."""
    for b in range(1, 65):
        for g in (1, 2, 3):
            split = smaller_split(b, g)
            if b == 1:
                assert split is None
                continue
            micro, accum = split
            assert micro < b and b % micro == 0 and micro * accum == b * g
            assert not any(b % d == 0 for d in range(micro + 1, b))  # the largest such divisor
    assert smaller_split(8, 1) == (4, 2) and smaller_split(6, 1) == (3, 2) and smaller_split(5, 1) == (1, 5)


def test_plan_advice_splits_an_odd_batch_exactly():
    from minitune.device import capabilities

    cfg = load_config(tiny_config(training={"batch_size": 5, "grad_accum": 1}))
    split = [(what, over) for what, over, *_ in candidates(cfg, capabilities("cpu"), 100)
             if "training.batch_size" in over]
    assert split == [("micro-batch 1 x accumulation 5 (same examples per step)",
                      {"training.batch_size": 1, "training.grad_accum": 5})]


# ------------------------------------------------------------------------------------------------
# CUDA simulated as CUDA: bitsandbytes' kernels, the attention implementation, AdamW's kernels


def test_int8_matmul_on_cuda_allocates_what_bitsandbytes_allocates_and_keeps_its_input():
    from minitune.planner.standins import DequantizedMatmul, Int8Matmul

    m, k, n = 4, 8, 16  # rows (tokens), in_features, out_features; fp32 input
    packed = torch.empty(n, k, dtype=torch.int8)  # the weight: made before the ledger counts
    for grad in (True, False):
        leaf = torch.randn(m, k, requires_grad=grad)
        ledger = Ledger(fake=False)
        with ledger:
            x = leaf * 1.0  # a layer's input: made by the layer before (autograd keeps leaves anyway)
            y = Int8Matmul.apply(x, packed, None, n, 6.0)
        # MatMul8bitLt's forward at its highest: x, the int8 row-quantized x (m*k) and its fp32 row
        # scales (4m), the int32 product (4mn) and its fp16 dequantization (2mn)
        assert ledger.peak == 4 * m * k + m * k + 4 * m + 4 * m * n + 2 * m * n
        del x
        # ctx.tensors = (CAt, subA, A): the input stays alive for backward when autograd records the op
        assert ledger.live == 4 * m * n + (4 * m * k if grad else 0)
        del y
    # the CPU path (MatMul8bitFp) dequantizes the weight instead: a different account
    ledger = Ledger(fake=False)
    with ledger:
        x = torch.randn(m, k, requires_grad=True)
        y = DequantizedMatmul.apply(x, packed, None, n, True)
    assert ledger.peak == 4 * m * k + 4 * n * k + 4 * m * n and y.shape == (m, n)


def test_cuda_plans_use_bitsandbytes_cuda_kernels_and_report_process_terms(monkeypatch):
    from minitune.planner.standins import Int8Matmul

    calls = []
    apply = Int8Matmul.apply
    monkeypatch.setattr(Int8Matmul, "apply", lambda *a: calls.append(a[0].device) or apply(*a))
    cfg = load_config(tiny_config("tiny-llama", quantization={"mode": "8bit"}, model={"dtype": "float16"},
                                  data={"max_length": 32}))
    model = meta_model(cfg)[0]
    cpu = simulate(model, cfg, device_type="cpu")
    assert not calls  # CPU: MatMul8bitFp's stand-in
    cuda = simulate(model, cfg, device_type="cuda", cuda_capability=(7, 5))
    assert len(calls) >= 2 * 7  # every 8-bit linear of both layers (simulated on CPU fake tensors)
    assert cpu.cuda == {}
    terms = cuda.cuda
    assert set(terms) == {"cuda_context", "cublas_workspace", "tensors", "allocator_cache"}
    # the replayed allocator serves the same tensors, each in 512-byte blocks, unsplit blocks whole
    assert cuda.total <= terms["tensors"] <= 1.05 * cuda.total
    assert terms["cublas_workspace"] == 2 * 8_519_680 and terms["allocator_cache"] > 0


def _saved_for_backward(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_cuda_attention_keeps_no_attention_matrix_and_dropout_keeps_a_bool_mask():
    from minitune.planner.standins import kernels_as_on

    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, h, n, n, requires_grad=True)  # T5's relative positions, trainable
    sdpa = lambda p: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # noqa: E731
    # CPU with dropout: the math path keeps batch x heads x n x n tensors (scores, softmax, mask)
    _, saved = _saved_for_backward(lambda: sdpa(0.1))
    assert sum(t.numel() == b * h * n * n for t in saved) >= 2
    with kernels_as_on("cuda"):
        out, saved = _saved_for_backward(lambda: sdpa(0.1))
        dropped, kept = _saved_for_backward(lambda: torch.nn.functional.dropout(q, 0.1, True))
    # as CUDA's fused kernels: inputs, output, an fp32 log-sum-exp per query; the bias, never the matrix
    assert not [t for t in saved if t.numel() == b * h * n * n and t is not bias]
    assert any(t.dtype == torch.float32 and t.shape == (b, h, n) for t in saved)
    assert [t.dtype for t in kept] == [torch.bool] and dropped.shape == q.shape
    out.sum().backward()
    assert bias.grad.shape == bias.shape and q.grad.shape == q.shape
    # the values are attention's (dropout aside): the stand-in runs CPU's flash kernel
    with kernels_as_on("cuda"):
        fused = sdpa(0.0)
    torch.testing.assert_close(fused, sdpa(0.0), atol=1e-5, rtol=1e-4)
    # grouped-query attention (transformers passes enable_gqa): fewer key/value heads, the same values
    kv = [t[:, :1].detach() for t in (k, v)]
    gqa = lambda: torch.nn.functional.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)  # noqa: E731
    with kernels_as_on("cuda"):
        fused = gqa()
    torch.testing.assert_close(fused, gqa(), atol=1e-5, rtol=1e-4)
    # and everything is as it was afterwards
    assert torch.nn.functional.dropout.__module__ == "torch.nn.functional"
    _, kept = _saved_for_backward(lambda: torch.nn.functional.dropout(q, 0.1, True))
    assert [t.dtype for t in kept] == [torch.float32]


def test_cuda_plans_cast_to_fp32_where_cudas_autocast_does():
    from minitune.planner.standins import kernels_as_on

    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    ops = {"layer_norm": lambda: torch.nn.functional.layer_norm(x, (8,)), "softmax": lambda: x.softmax(-1),
           "pow": lambda: torch.pow(x, 3.0), "sum": lambda: x.sum(-1), "matmul": lambda: x @ x.T}

    def dtypes() -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return {name: f().dtype for name, f in ops.items()}

    cpu = dtypes()
    with kernels_as_on("cuda"):
        cuda = dtypes()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.pow(x, 3.0).sum().backward()  # differentiable through the cast
    assert set(cpu.values()) == {torch.bfloat16}
    assert cuda == {**{k: torch.float32 for k in ops}, "matmul": torch.bfloat16}
    assert x.grad.dtype == torch.bfloat16 and dtypes() == cpu  # unregistered afterwards
    # a bf16-autocast plan of GPT-Neo (GELU's pow, layer norms) keeps more on CUDA than on CPU
    cfg = load_config(tiny_config("tiny-gpt-neo", training={"mixed_precision": "bf16"}, data={"max_length": 64}))
    model = meta_model(cfg)[0]
    cpu_plan, cuda_plan = (simulate(model, cfg, device_type=d) for d in ("cpu", "cuda"))
    assert cuda_plan.breakdown["activations"] > 1.1 * cpu_plan.breakdown["activations"]


def test_cuda_plans_of_t5_count_no_attention_matrices():
    # tiny-t5 trains with dropout 0.1: on CPU, sdpa's math path keeps the matrices; CUDA's kernels do not
    cfg = load_config(tiny_config("tiny-t5", data={"max_length": 128, "max_target_length": 128}))
    model = meta_model(cfg)[0]
    cpu, cuda = (simulate(model, cfg, device_type=d) for d in ("cpu", "cuda"))
    b, n, layers = cfg.training.batch_size, 128, model.config.num_layers
    heads = model.config.num_heads
    matrix = b * heads * n * n * 4  # one fp32 attention matrix of one layer
    # encoder, decoder and cross attention: at least one matrix each (the softmax) and a float mask
    assert cpu.breakdown["activations"] - cuda.breakdown["activations"] >= 3 * layers * 2 * matrix * 0.9


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_configured_attention_is_built_and_planned(attn):
    cfg = load_config(tiny_config("tiny-llama", model={"attn_implementation": attn}, data={"max_length": 128}))
    model = meta_model(cfg)[0]
    assert model.get_base_model().config._attn_implementation == attn
    sdpa = load_config(cfg, {"model": {"attn_implementation": "sdpa"}})
    eager, fused = simulate(model, cfg).phases["forward"], simulate(meta_model(sdpa)[0], sdpa).phases["forward"]
    if attn == "eager":  # eager keeps attention probabilities (batch x heads x 128 x 128 fp32 a layer); sdpa
        assert eager - fused >= 4 * 4 * 128 * 128 * 4  # keeps a float mask (batch x 128 x 128): > one matrix more
    for kernel in ("flash_attention_2", "kernels-community/flash-attn"):
        flash = load_config(cfg, {"model": {"attn_implementation": kernel}})
        model, _, note = meta_model(flash)  # flash-attn kernels are CUDA-only: planned as sdpa, and said so
        assert model.get_base_model().config._attn_implementation == "sdpa" and "planned with sdpa" in note


def test_adamw_kernels_temporaries_and_the_fused_advice():
    cfg = load_config(tiny_config("tiny-llama", lora={"enabled": False}, data={"max_length": 8},
                                  training={"batch_size": 1}))
    model = meta_model(cfg)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    fused_cfg = load_config(cfg, {"optimizer": {"fused": True}})
    peak = {(dev, fused): simulate(model, c, device_type=dev).phases["optimizer"]
            for dev in ("cuda", "cpu") for fused, c in ((False, cfg), (True, fused_cfg))}
    # for-each (CUDA's default): sqrt of every second moment at once, the size of all parameters
    every = sum(-(-4 * p.numel() // 512) * 512 for p in params)
    assert peak["cuda", False] - peak["cuda", True] == pytest.approx(every, rel=0.01)
    # the loop (CPU's default): sqrt and the denominator of one parameter at a time, the largest
    largest = max(4 * p.numel() for p in params)
    assert peak["cpu", False] - peak["cpu", True] == pytest.approx(2 * largest, rel=0.01)
    # offered where it lowers the peak (the optimizer step is this T5's highest point) ...
    t5 = load_config(tiny_config("tiny-t5", lora={"enabled": False}, data={"max_length": 8, "max_target_length": 4},
                                 training={"batch_size": 1}))
    first_plan = plan(t5, "T4", suggest=False)
    first = first_plan.prediction
    assert first.peak_phase == "optimizer"
    # (a tiny model's saving is inside one 2 MiB segment of the caching allocator: the process peak,
    # what fits is decided on, does not move, so the advice is checked on the tensor peak)
    advice = plan(t5, "T4", budget=first_plan.process.total - 1).suggestions
    fused = [s for s in advice if s.overrides == {"optimizer.fused": True}]
    assert fused and fused[0].peak < first.total
    # ... and not where it does not (the peak is the logits' backward)
    assert not any("optimizer.fused" in s.overrides
                   for s in plan(cfg, "T4", budget=plan(cfg, "T4", suggest=False).process.total - 1).suggestions)
