"""minitune.losses: the chunked cross-entropy equals default_loss (value and gradients) and is wired to the config."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from minitune.config import LoraArgs, ModelArgs, load_config
from minitune.errors import ConfigError
from minitune.losses import auto_chunk_size, chunked_loss, count_items, default_loss, linear_cross_entropy, loss_fn_for
from minitune.model import build_from_config
from minitune.prepare import prepare_model
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(preset: str, lora: LoraArgs | None):
    model = build_from_config(ModelArgs(preset=preset), seed=0)
    for m in model.modules():  # no dropout: both losses must see the same forward
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "attention_dropout", "dropout_rate"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    model, _ = prepare_model(model, lora or LoraArgs(enabled=False))
    return model.train()


def _batch(preset: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a masked prompt
    if preset.endswith("t5"):
        labels = torch.randint(2, 1000, (3, 7), generator=g)
        labels[1, 4:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, n = fn(model, batch)
    (loss_sum / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss_sum.detach(), n, grads


def _assert_equal_losses(model, batch, chunk_size=5):
    ref, n_ref, g_ref = _loss_and_grads(default_loss, model, batch)
    out, n, g = _loss_and_grads(lambda m, b: chunked_loss(m, b, chunk_size=chunk_size), model, batch)
    assert int(n) == int(n_ref) == int(count_items(model, batch))
    torch.testing.assert_close(out / n, ref / n_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys() and g
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt", "tiny-bloom", "tiny-gpt-neo", "tiny-t5"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_chunked_equals_default_value_and_gradients(preset, lora):
    model = _model(preset, LoraArgs(r=4, alpha=8, dropout=0.0) if lora else None)
    _assert_equal_losses(model, _batch(preset))  # chunks of 5 of the ~30 targets: several chunks, a short last one


def test_trainable_head_with_bias_and_tied_embedding_gradients():
    """The fused path's own weight and bias gradients: a Linear head with a bias, trained fully."""
    torch.manual_seed(0)
    h = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=True).double()
    t = torch.randint(0, 50, (23,))
    t[::4] = -100
    loss = linear_cross_entropy(h, head, t, chunk_size=4)
    loss.backward()
    got = (h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    h.grad = head.weight.grad = head.bias.grad = None
    ref = torch.nn.functional.cross_entropy(head(h), t, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, (h.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 saved gradients


def test_wrapped_head_goes_through_checkpointed_chunks():
    """A head that is not a plain nn.Linear (peft's modules_to_save wrapper) takes the checkpoint path."""
    model = _model("tiny-llama", LoraArgs(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]))
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    _assert_equal_losses(model, _batch("tiny-llama"))


def test_no_grad_evaluation_and_empty_targets():
    model = _model("tiny-bloom", LoraArgs(r=4, alpha=8, dropout=0.0))
    batch = _batch("tiny-bloom")
    with torch.no_grad():
        ref, _ = default_loss(model, batch)
        out, _ = chunked_loss(model, batch, chunk_size=7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    loss_sum, n = chunked_loss(model, empty)
    assert float(loss_sum) == 0.0 and int(n) == 0
    loss_sum.backward()  # still part of the graph


def test_output_layer_runs_on_few_row_counts_with_the_same_loss_and_gradients(monkeypatch):
    """The number of target positions differs per batch; the output layer's matmuls see it rounded up
    to ROW_MULTIPLE (each new shape costs RSS in the CPU kernels' cache), and the added rows change
    neither the loss nor the gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    rows: set[int] = set()
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: rows.add(x.shape[0]) or linear(x, w, b))
    for n in range(1, 41):
        h = torch.randn(n, 8, requires_grad=True)
        t = torch.randint(0, 50, (n,))
        loss = linear_cross_entropy(h, head, t)
        loss.backward()
        h_ref = h.detach().clone().requires_grad_(True)
        w_ref = head.weight.detach().clone().requires_grad_(True)
        b_ref = head.bias.detach().clone().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(linear(h_ref, w_ref, b_ref), t, reduction="sum")
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.bias.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
        head.zero_grad(set_to_none=True)
    assert rows == {16, 32, 48}  # 40 target counts, 3 shapes


def test_bf16_autocast_close_to_default():
    """Under bf16 autocast the chunked loss matches the full one and fp32 closely enough to tell the
    right targets from targets off by one position. The output layer is scaled up (tied to the
    embedding: the model predicts its input token with confidence), so a target misalignment moves
    the loss by nats instead of by the ~0.6 it would on a near-uniform model around ln(vocab)."""
    model = _model("tiny-llama", LoraArgs(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    batch = _batch("tiny-llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, n = default_loss(model, batch)
        out, _ = chunked_loss(model, batch, chunk_size=8)
    assert out.dtype == torch.float32
    with torch.no_grad():
        fp32, _ = default_loss(model, batch)
        misaligned = {**batch, "labels": torch.roll(batch["labels"], 1, dims=1)}  # targets one position late
        wrong, n_wrong = default_loss(model, misaligned)
    per_token, fp32_per_token = (out / n).item(), (fp32 / n).item()
    torch.testing.assert_close(out / n, ref / n, rtol=1e-3, atol=0)
    assert abs(per_token - fp32_per_token) < 0.1, (per_token, fp32_per_token)  # bf16 rounding on ~20 nats
    assert abs((wrong / n_wrong).item() - fp32_per_token) > 10, "misaligned targets must be far outside the tolerance"


def test_logits_changed_in_place_after_the_head_fall_back_with_one_line():
    """A forward that changes the head's output in place (the same tensor object, so only the values
    tell) is caught by the probe's value check; 'full' is never checked, 'chunked' says so too."""
    model = _model("tiny-llama", None)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    assert loss_fn_for("auto", 0, model) is not default_loss
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out.tanh_().mul_(3))
    for name in ("auto", "chunked"):
        with pytest.warns(UserWarning) as seen:
            assert loss_fn_for(name, 0, model) is default_loss
        assert [str(w.message) for w in seen] == [
            f"training.loss={name}: on a probe batch the chunked loss of LlamaForCausalLM is "
            + str(seen[0].message).split(" is ", 1)[1]]
        assert "the full one" in str(seen[0].message) and str(seen[0].message).endswith("; using the full loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loss_fn_for("full", 0, model) is default_loss
    handle.remove()
    unchanged = {k: p.clone() for k, p in model.state_dict().items()}
    loss_fn_for("auto", 0, model)
    assert all(torch.equal(p, unchanged[k]) for k, p in model.state_dict().items())


def test_head_restored_after_the_forward():
    model = _model("tiny-opt", None)
    head = model.get_output_embeddings()
    chunked_loss(model, _batch("tiny-opt"))
    assert "forward" not in head.__dict__
    x = torch.randn(2, head.in_features)
    torch.testing.assert_close(head(x), x @ head.weight.T)


def test_config_choice_and_errors():
    assert loss_fn_for("full") is default_loss
    assert loss_fn_for("chunked", 64).keywords == {"chunk_size": 64}
    assert load_config(tiny_config()).training.loss == "auto"  # chunked where the model allows it
    assert loss_fn_for("auto").keywords == {"chunk_size": 0}
    with pytest.raises(ValueError, match="unknown loss 'chunky'"):
        loss_fn_for("chunky")
    cfg = load_config(tiny_config(training={"loss": "chunked", "loss_chunk_size": 256}))
    assert (cfg.training.loss, cfg.training.loss_chunk_size) == ("chunked", 256)
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config(training={"loss": "chunky", "loss_chunk_size": -1}))
    assert "training.loss='chunky' is not one of auto, full, chunked (did you mean 'chunked'?)" in str(e.value)
    assert "training.loss_chunk_size=-1 must be >= 0 (0: automatic)" in str(e.value)
    with pytest.raises(ValueError, match="chunk_size=-1"):
        linear_cross_entropy(torch.zeros(1, 2), torch.nn.Linear(2, 3), torch.zeros(1, dtype=torch.long), chunk_size=-1)
    assert auto_chunk_size(250_880) == 267 and auto_chunk_size(50_272) == 1334


def test_train_runs_the_loss_the_config_names(tiny, monkeypatch):
    """End to end through run.train: training.loss=full never runs the chunked cross-entropy, 'chunked'
    runs it at every step and evaluation, and both reach the same losses."""
    from minitune import losses
    from minitune.run import train

    calls = []
    chunked = losses.linear_cross_entropy
    monkeypatch.setattr(losses, "linear_cross_entropy", lambda *a, **k: calls.append(1) or chunked(*a, **k))
    runs = {}
    for loss in ("full", "chunked"):
        calls.clear()
        runs[loss] = train(tiny("tiny-llama", lora={"dropout": 0.0},
                                training={"max_steps": 3, "loss": loss, "overwrite": True})).metrics
        assert (len(calls) >= 4) if loss == "chunked" else not calls, (loss, len(calls))
    assert runs["chunked"]["loss"] == pytest.approx(runs["full"]["loss"], abs=1e-4)
    assert runs["chunked"]["eval_loss"] == pytest.approx(runs["full"]["eval_loss"], abs=1e-4)


def test_the_planner_simulates_the_loss_the_run_uses():
    """The memory simulation decides the loss on its fake copy with the same check: a model that
    cannot be chunked is simulated with the full loss, one that can with the chunked one."""
    from minitune.planner import simulate

    def peak(model, loss):
        return simulate(model, load_config(tiny_config(training={"loss": loss})), seq_len=32).total

    bart = _tiny_architecture("bart")
    with pytest.warns(UserWarning, match="training.loss=auto: BartForConditionalGeneration changes the logits"):
        assert peak(bart, "auto") == peak(bart, "full")
    llama = _model("tiny-llama", None)
    assert peak(llama, "auto") == peak(llama, "chunked") < peak(llama, "full")


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True),
                                             (torch.float32, True)])
def test_half_precision_head_with_fp32_hidden_states(dtype, autocast):
    """Accelerate's mixed precision hands the loss fp32 hidden states (the model's outputs are
    converted) next to a bf16/fp16 output layer: the head's matmul runs in autocast's dtype where it
    is on, else the weight's, exactly as the same matmul written out by hand."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    targets[1, 5:] = -100
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = linear_cross_entropy(hidden, head, targets, chunk_size=4)
    loss.backward()
    matmul = torch.bfloat16 if autocast else dtype
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    logits = torch.nn.functional.linear(ref_hidden.to(matmul), head.weight.to(matmul)).float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100,
                                            reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=2e-2, atol=2e-2)


# Every causal and seq2seq architecture the sweep builds tiny from its config (2 layers, hidden 32,
# 96 tokens): model type -> (extra config keys, whether its forward returns the output layer's
# logits untouched). The expected decision is pinned, so that a check which always falls back fails too.
_TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, d_model=32, encoder_layers=2,
             decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
             decoder_ffn_dim=64, d_kv=8, d_ff=64, num_layers=2, num_heads=4, rotary_dim=4, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
ARCHITECTURES = {
    "bart": ({}, False), "mbart": ({}, False), "marian": ({}, False), "pegasus": ({}, False),  # final_logits_bias
    "plbart": ({}, False), "t5": ({}, True), "mt5": ({}, True),
    "gpt2": ({}, True), "gptj": ({}, True), "mistral": ({}, True), "mixtral": ({}, True), "qwen2": ({}, True),
    "qwen3": ({}, True), "phi": ({}, True), "gemma": ({}, True), "falcon": ({}, True), "llama": ({}, True),
    "opt": ({}, True), "bloom": ({}, True), "gpt_neox": ({}, True), "starcoder2": ({}, True), "olmo": ({}, True),
    "gpt_neo": ({"attention_types": [[["global", "local"], 1]]}, True),
    "gemma2": ({}, False),  # soft-caps its logits
    # scale their logits after the head: the chunked loss would be right (a scale commutes with the
    # head), but the check asks for the head's output itself, which the planner can check on fake tensors
    "cohere": ({}, False), "granite": ({}, False),
}


def _tiny_architecture(model_type: str) -> torch.nn.Module:
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    cls = CONFIG_MAPPING[model_type]
    known = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "attribute_map", {}))
    config = cls(**{k: v for k, v in _TINY.items() if k in known}, **ARCHITECTURES[model_type][0])
    config.decoder_start_token_id = 2
    seq2seq = model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    torch.manual_seed(0)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config)
    with torch.no_grad():
        # confident logits, so that soft-capping or scaling after the head moves the loss by much
        model.get_output_embeddings().weight.mul_(30)
        for name, buf in model.named_buffers():
            if "logits_bias" in name:  # zero at init, where it would change nothing
                buf.copy_(torch.linspace(-3, 3, buf.numel()).reshape(buf.shape))
    return model


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_auto_loss_is_chunked_only_where_it_equals_the_full_loss(model_type):
    """training.loss=auto over the architectures transformers builds: chunked, and then equal to the full
    loss in value and gradients to 1e-5; or the full loss, with one line saying why."""
    model = _tiny_architecture(model_type)
    for m in model.modules():  # no dropout: both losses must see the same forward
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "attention_dropout", "dropout_rate", "activation_dropout", "layerdrop"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 11), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    if model.config.is_encoder_decoder:
        labels = torch.randint(3, vocab, (2, 6), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn = loss_fn_for("auto", 4, model)
    lines = [str(w.message) for w in seen if "training.loss" in str(w.message)]
    assert all(m.training for m in model.modules()) and torch.equal(torch.get_rng_state(), rng)  # left as it was
    chunkable = ARCHITECTURES[model_type][1]
    assert (fn is not default_loss) == chunkable, lines
    if chunkable:
        assert not lines
        _assert_equal_losses(model, batch, chunk_size=4)
        torch.testing.assert_close(fn(model, batch)[0], chunked_loss(model, batch, chunk_size=4)[0])
    else:
        assert len(lines) == 1 and lines[0].startswith("training.loss=auto: ") and "using the full loss" in lines[0]
    if model_type in ("bart", "mbart", "marian", "pegasus", "plbart", "gemma2"):
        with pytest.raises(RuntimeError) if model.config.is_encoder_decoder else contextlib.nullcontext():
            # what the chunked loss would do: crash on the bias after the head, or give another number
            out, n = chunked_loss(model, batch)
            ref, _ = default_loss(model, batch)
            assert abs(float(out / n) - float(ref / n)) > 1e-3
