"""Loss functions for `minitune.loop.fit`: `(model, batch) -> (sum of token losses, target tokens)`.

`default_loss` lets the model build the whole `batch x seq x vocab` logits tensor and
takes the cross-entropy over it: for bloom's 250,880-token vocabulary that is 1 GB per 1,000
tokens in fp32, and autograd keeps it plus the log-softmax and their gradients alive at once.

`chunked_loss` never builds it. The model runs with its output layer bypassed, so its forward
returns the hidden states; the output layer is then applied to `chunk_size` target positions at a
time, and each chunk's cross-entropy *and its gradient* are computed right there (the
"fused linear cross-entropy" of Liger-Kernel / Apple's cut-cross-entropy, in plain PyTorch), so
only one chunk of logits is ever alive and nothing is recomputed in backward. Positions whose
label is -100 (padding, masked prompts) get no logits at all. Output layers that are not a plain
`nn.Linear` (a LoRA-wrapped or quantized head) go through `torch.utils.checkpoint` chunk by chunk
instead: same memory bound, one extra forward of the head in backward.

Chunking is only right for a model whose forward returns its output layer's output untouched:
BART, Marian or Pegasus add a bias after it, gemma2 soft-caps, cohere scales. Which models do is
not kept in a list (it would drift from transformers): `loss_fn_for` asks the model itself, once,
on a probe batch (`chunking_problem`), and gives the others `default_loss` with one line saying why.

Both return the same value and gradients as `default_loss` (tests/test_losses.py checks it to 1e-5
on tiny llama / opt / bloom / gpt-neo / t5 models, and checks the choice over the architectures
transformers builds).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint

from .config import LOSSES
from .lm import count_targets, model_kind, shift_targets, unwrap

__all__ = ["LossFn", "auto_chunk_size", "chunked_loss", "chunking_problem", "count_items", "decoder_inputs",
           "default_loss", "linear_cross_entropy", "loss_fn_for", "model_inputs"]

AUTO_CHUNK_BYTES = 256 * 2**20  # chunk_size=0: this much fp32 logits per chunk
# The output layer's matmuls run on a multiple of this many rows (zero rows added, their loss and
# gradient dropped): the number of target positions differs from batch to batch, and the CPU
# kernels (oneDNN) keep a cache entry per shape, so unrounded counts grew RSS step after step
# (about 1 MiB a step on opt-125m, docs/memory.md). At most ROW_MULTIPLE - 1 rows more per chunk.
ROW_MULTIPLE = 16

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


def model_inputs(batch: dict) -> dict:
    """What the model is called with: the batch without its labels, and a packed batch (it has
    `position_ids`, `data.packing`) without its attention mask: transformers builds the per-example,
    block-diagonal causal mask from restarting positions only when no mask is given."""
    packed = "position_ids" in batch
    return {k: v for k, v in batch.items() if k != "labels" and not (packed and k == "attention_mask")}


def default_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token losses, number of target tokens) for a batch with `labels`.

    Works for causal LMs (labels shifted by one) and seq2seq models (decoder inputs built from the
    labels). A model whose forward returns a scalar loss (any `nn.Module`) counts as one item.
    `default_loss.count(model, batch)` counts the same items without running the model (`fit`
    normalises the gradient by it before the backward pass).
    """
    labels = batch.get("labels")
    config = _config_of(model)
    if labels is None or config is None:
        out = model(**batch)
        loss = out if torch.is_tensor(out) else out["loss"]
        return loss, torch.ones((), device=loss.device)
    kind = model_kind(config)
    inputs = model_inputs(batch)
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = decoder_inputs(model, labels)
    # Shift the labels, not the logits: `logits[:, :-1]` cannot be flattened without a copy of the
    # whole batch x seq x vocab tensor (and its gradient); the last position simply gets no target.
    targets = shift_targets(labels, kind, keep_length=True)
    logits = model(**inputs, use_cache=False).logits  # a cache would also stop per-example masks (packing)
    loss_sum = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss_sum, (targets != -100).sum()


def count_items(model: nn.Module, batch: dict) -> torch.Tensor | int:
    """The items `default_loss` counts for `batch`: target tokens (1 for a model that returns its own loss)."""
    labels = batch.get("labels")
    config = _config_of(model)
    if labels is None or config is None:
        return 1
    return count_targets(labels, model_kind(config))


default_loss.count = count_items  # type: ignore[attr-defined]


def _config_of(model: nn.Module) -> Any:
    return getattr(unwrap(model), "config", None)


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """A seq2seq model's decoder inputs: the labels shifted right (peft forwards the method to its base)."""
    return unwrap(model).prepare_decoder_input_ids_from_labels(labels=labels)


def auto_chunk_size(vocab_size: int) -> int:
    """Target positions whose fp32 logits fill AUTO_CHUNK_BYTES (bloom's 250,880 tokens: 267)."""
    return max(16, AUTO_CHUNK_BYTES // (4 * max(1, vocab_size)))


def loss_fn_for(name: str, chunk_size: int = 0, model: nn.Module | None = None) -> LossFn:
    """The loss function a config names: 'full' (`default_loss`), 'chunked' (`chunked_loss`), or
    'auto' (the default: the same as 'chunked').

    Whether chunking gives a model's own loss is decided from the model itself, here and only here:
    given `model`, 'auto' and 'chunked' are checked once with `chunking_problem` (one tiny batch, no
    gradients), and a model that fails gets `default_loss` with one warning line saying why. Without
    `model` nothing is checked.

    Raises:
        ValueError: an unknown name.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
    if name == "full":
        return default_loss
    if model is not None:
        problem = chunking_problem(model)
        if problem:
            _fallback(f"training.loss={name}: {problem}; using the full loss")
            return default_loss
    fn = functools.partial(chunked_loss, chunk_size=chunk_size)
    fn.count = count_items  # what `fit` normalises the gradient by: the same target tokens
    return fn


def chunking_problem(model: nn.Module) -> str:
    """Why `chunked_loss` would not give `model`'s own loss ('' when it does), from the model itself.

    Checked: the model has an output layer and no prompt-learning adapter; on a probe batch of
    1 x 8 tokens, in eval mode and without gradients, the logits its forward returns are the
    output layer's output itself (not a bias added after it, soft-capping, scaling, ...: what a
    bypassed output layer would skip); and, where the weights hold values (not the planner's fake
    or meta tensors), the chunked loss equals the full one. Costs two forwards of the probe batch.
    """
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    name = type(inner).__name__
    if config is None:
        return f"{name} has no transformers config"
    peft_config = getattr(inner, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "prompt-learning adapters change the sequence"
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        return f"{name} has no output embeddings"
    batch = _probe_batch(inner, config)
    seen: dict[str, Any] = {}
    hooks = [head.register_forward_hook(lambda m, a, out: seen.__setitem__("head", out)),
             model.register_forward_hook(lambda m, a, out: seen.__setitem__("model", out))]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # no dropout: both losses must see the same forward
    try:
        with torch.no_grad():
            try:
                full, n = default_loss(model, batch)
            finally:
                for h in hooks:
                    h.remove()
            out = seen.get("model")
            logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", None)
            if logits is None or logits is not seen.get("head"):
                return (f"{name} changes the logits after its output layer (a bias, soft-capping or scaling "
                        "that chunking would skip)")
            if not _holds_values(logits):
                return ""  # the planner's fake tensors: the structure is all there is to check
            try:
                chunked, _ = _chunked(model, batch, chunk_size=0)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # the bypassed forward does not run: the model needs its logits
                return f"the chunked loss fails on {name} ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            full, chunked = (full / n.clamp(min=1)).item(), (chunked / n.clamp(min=1)).item()
            if abs(chunked - full) > 1e-3 * max(1.0, abs(full)):
                return f"on a probe batch the chunked loss of {name} is {chunked:.6g}, the full one {full:.6g}"
    finally:
        for m, training in modes:
            m.training = training
    return ""


def _probe_batch(inner: nn.Module, config: Any) -> dict:
    """1 x 8 fixed tokens (no random numbers drawn), labels on every position (seq2seq: 4 target
    tokens), on the device of the input embeddings."""
    emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    device = weight.device if weight is not None else next(inner.parameters()).device
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    ids = ((torch.arange(8, device=device) * 7 + 3) % vocab).unsqueeze(0)
    labels = ids[:, :4].flip(1) if model_kind(config) == "seq2seq" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _holds_values(t: torch.Tensor) -> bool:
    return not (t.is_meta or is_fake(t))


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


class _HeadBypassed:
    """Within the block, `head(x)` returns `x`: the model's forward hands back its hidden states as
    `logits`. The forward still runs through every wrapper (DDP, peft, compile, autocast)."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.saved = head.__dict__.get("forward")  # an instance-level forward (accelerate hooks) is kept

    def __enter__(self) -> nn.Module:
        self.head.forward = _identity
        return self.head

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            self.head.forward = self.saved
        else:
            del self.head.forward


def _fallback(line: str) -> None:
    """The one line a run (or a plan) shows when it uses the full loss instead of the chunked one."""
    warnings.warn(line, stacklevel=3)


def chunked_loss(model: nn.Module, batch: dict, *, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`default_loss` without materialising the full logits (see the module docstring).

    It trusts the model to return its output layer's output untouched: `loss_fn_for(name,
    chunk_size, model)` checks that once (`chunking_problem`) and gives `default_loss` to a model
    that does not (BART's bias after the head, gemma2's soft-capping, ...).

    Args:
        model: a transformers causal or seq2seq LM, optionally peft-, DDP- or compile-wrapped.
        batch: `input_ids`, `attention_mask`, `labels` (-100 = no target), as the collator makes them.
        chunk_size: target positions per chunk (memory: chunk_size x vocab x 4 bytes, about 2x at
            peak); 0: `auto_chunk_size(vocab)`, 256 MiB of fp32 logits.

    Returns:
        (sum of per-token losses, number of target tokens), like `default_loss`; a batch without
        labels, or a model without a config, gets `default_loss` itself.
    """
    if batch.get("labels") is None or getattr(unwrap(model), "config", None) is None:
        return default_loss(model, batch)
    return _chunked(model, batch, chunk_size=chunk_size)


def _chunked(model: nn.Module, batch: dict, *, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    inner = unwrap(model)
    config = inner.config
    head = inner.get_output_embeddings()

    inputs = model_inputs(batch)
    kind = model_kind(config)
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = decoder_inputs(inner, labels)
    with _HeadBypassed(head):
        out = model(**inputs, use_cache=False)
    hidden = out["logits"] if isinstance(out, dict) else out[0]
    targets = shift_targets(labels, kind)
    hidden = hidden[:, : targets.size(1)]  # a causal LM's last position has no target
    loss_sum = linear_cross_entropy(hidden, head, targets, chunk_size=chunk_size)
    return loss_sum, (targets != -100).sum()


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, *,
                         chunk_size: int = 0) -> torch.Tensor:
    """Sum over positions of cross_entropy(head(hidden), targets), ignoring targets of -100, in fp32,
    with at most `chunk_size` positions' logits alive at a time.

    Args:
        hidden: (..., hidden_size) states that `head` maps to logits.
        head: the output layer; a plain `nn.Linear` takes the fused path (no recomputation).
        targets: (...) token ids, -100 where there is no target.
        chunk_size: positions per chunk (0: `auto_chunk_size`).

    Returns:
        A scalar fp32 tensor (differentiable).
    """
    if chunk_size < 0:
        raise ValueError(f"chunk_size={chunk_size} must be >= 0 (0: automatic)")
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1).to(h.device)
    # Only target positions get logits: padding and masked prompts cost nothing. Selecting them is
    # a host-device sync (the count decides a shape), once per micro-batch.
    keep = (t != -100).nonzero().squeeze(1)
    h, t = h.index_select(0, keep), t.index_select(0, keep)
    if chunk_size == 0:
        weight = getattr(head, "weight", None)
        chunk_size = auto_chunk_size(weight.shape[0] if weight is not None else head(h[:1]).shape[-1])
    if type(head) is nn.Linear:
        need_grad = torch.is_grad_enabled()
        return _LinearCrossEntropy.apply(h, head.weight, head.bias, t, chunk_size, need_grad,
                                         _matmul_dtype(h, head.weight))
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(0), chunk_size):
        hc, tc = h[start: start + chunk_size], t[start: start + chunk_size]
        if torch.is_grad_enabled():
            # this chunk's logits are freed after the forward and recomputed in backward
            total = total + checkpoint(_head_cross_entropy, head, hc, tc, use_reentrant=False)
        else:
            total = total + _head_cross_entropy(head, hc, tc)
    return total


def _matmul_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the output layer's matmul runs in: autocast's where it is on (as inside the model's
    forward), else the weight's. Under Accelerate's mixed precision the model hands back fp32 hidden
    states (its outputs are converted to fp32), so they are cast, never mixed with a bf16/fp16 weight."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return weight.dtype


def _pad_rows(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`h` and `t` with zero rows (target 0) added up to a multiple of ROW_MULTIPLE rows."""
    pad = -h.size(0) % ROW_MULTIPLE
    if not pad:
        return h, t
    return nn.functional.pad(h, (0, 0, 0, pad)), nn.functional.pad(t, (0, pad))


def _head_cross_entropy(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(h).float(), t, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(h @ W.T + b, t)) whose gradients are computed chunk by chunk in forward.

    Per chunk: logits -> fp32 -> loss; softmax - one_hot is the gradient of the logits, turned at
    once into the gradients of h (and W, b when they train). Backward only scales them by the
    incoming gradient (the loop's 1 / tokens-in-window, and the fp16 loss scale), which is why the
    saved gradients are kept in fp32.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor,
                chunk_size: int, need_grad: bool, dtype: torch.dtype) -> torch.Tensor:
        grad_h = grad_w = grad_b = None
        want_h = need_grad and ctx.needs_input_grad[0]
        want_w = need_grad and ctx.needs_input_grad[1]
        want_b = need_grad and bias is not None and ctx.needs_input_grad[2]
        if want_h:
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        if want_w:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if want_b:
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        # one explicit matmul dtype (see _matmul_dtype); autocast off so that nothing recasts it
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        for start in range(0, h.size(0), chunk_size):
            hc, tc = h[start: start + chunk_size].to(dtype), t[start: start + chunk_size]
            n = hc.size(0)
            hc, tc = _pad_rows(hc, tc)  # n rounded up to ROW_MULTIPLE: few distinct matmul shapes
            with torch.autocast(h.device.type, enabled=False):
                logits = nn.functional.linear(hc, w, b)
            lf = logits.float()
            # log-sum-exp in place (torch.logsumexp would allocate a second chunk-sized temporary):
            # lf becomes exp(logits - max), then softmax, the gradient of the logits (it may be
            # `logits` itself, which is no longer needed)
            target = lf.gather(1, tc.unsqueeze(1)).squeeze(1)
            top = lf.amax(dim=-1, keepdim=True)
            total = lf.sub_(top).exp_().sum(dim=-1, keepdim=True)
            loss += (total.log() + top - target.unsqueeze(1))[:n].sum()
            if not (want_h or want_w or want_b):
                continue
            # d loss / d logits = softmax(logits) - one_hot(t); nothing on the added rows
            g = lf.div_(total)
            g[torch.arange(n, device=g.device), tc[:n]] -= 1
            g[n:] = 0
            gc = g.to(dtype)  # the matmuls run in the dtype the forward matmul ran in
            del logits, lf
            if want_h:
                grad_h[start: start + n] = (gc @ w)[:n]
            if want_w:
                grad_w += (gc.t() @ hc).float()
            if want_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        return (
            (grad_h * scale).to(h_dtype) if grad_h is not None else None,
            (grad_w * scale).to(w_dtype) if grad_w is not None else None,
            (grad_b * scale).to(b_dtype) if grad_b is not None else None,
            None, None, None, None,
        )
