"""Scoring any model: perplexity over every target token, batched and seeded generation, and both for
the base and the fine-tuned model side by side (`compare`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from ..config import GenerationArgs
from ..data import stop_token_ids
from ..errors import DataError
from ..lm import ensure_pad_token, model_kind
from ..losses import default_loss
from ..metrics import detect_kind, task_scores

MODELS = ("base", "tuned")  # names used in results, the key file and the score summary
OnBatch = Callable[[], None] | None



def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # dropout (LoRA dropout included) off
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def perplexity(model: nn.Module, loader: Any, *, max_batches: int = 0, on_batch: OnBatch = None) -> dict[str, Any]:
    """Perplexity of `model` on the batches of `loader`: ``exp(sum of token NLL / target tokens)``.

    Every target token counts once, whatever the batching: padding and masked prompt tokens
    (labels -100) are excluded. Logits are upcast to fp32 before the log-softmax and the sum is
    kept in fp64. Causal LMs predict ``labels[1:]`` from the ids before them; seq2seq models
    (T5) get their decoder inputs built from the labels, as in training (``losses.default_loss``).

    Args:
        model: a transformers (or peft) model; its mode is restored afterwards.
        loader: batches with ``input_ids``, ``attention_mask`` and ``labels`` (see minitune.data).
        max_batches: stop after this many batches (0: all).
        on_batch: called after each batch (progress bars).

    Returns:
        ``{"perplexity": float, "nll": mean NLL per token (nats), "tokens": target tokens}``.

    Raises:
        DataError: the loader holds no target token.
    """
    device = _device_of(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with _eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, n = default_loss(model, batch)  # fp32 cross-entropy, summed over target tokens
            total += loss_sum.double()
            count += n
            if on_batch is not None:
                on_batch()
    tokens = int(count.item())  # host-device sync, once
    if tokens == 0:
        raise DataError("no target tokens to evaluate (every label is -100): check data.response and data.mask_prompt")
    nll = float(total.item()) / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    gen: GenerationArgs | None = None,
    *,
    chat: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    on_batch: OnBatch = None,
) -> list[str]:
    """Continuations of `prompts`, batched; greedy unless ``gen.temperature`` > 0.

    Causal prompts are left-padded (so every continuation starts right after its prompt) and
    only the new tokens are decoded; seq2seq prompts go to the encoder and the decoder's output
    is decoded. Prompts are encoded as in training: with the tokenizer's special tokens, or, for
    `chat` prompts (rendered by the chat template, :func:`minitune.data.generation_prompt`), as
    written. A generation stops at EOS, at the end of an assistant turn (`chat`), or before the
    first of ``gen.stop``. The global torch RNG is seeded with `seed` first, so sampled outputs are
    reproducible and the base and fine-tuned models see the same random stream.

    Args:
        model: a transformers (or peft) model.
        tokenizer: its tokenizer (a pad token is set to EOS if it has none).
        prompts: the texts to continue.
        gen: decoding settings (None: the defaults of :class:`minitune.config.GenerationArgs`).
        chat: the prompts were rendered with the tokenizer's chat template.
        seed: seed of the sampling.
        batch_size: prompts per `generate` call.
        max_length: cut prompts to this many tokens (None: no cut).
        on_batch: called after each batch.

    Returns:
        One decoded string per prompt (special tokens removed, cut before a stop string, surrounding
        space stripped).
    """
    gen = gen or GenerationArgs()
    pad_id = ensure_pad_token(tokenizer)
    seq2seq = model_kind(model) == "seq2seq"
    device = _device_of(model)
    options: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "pad_token_id": pad_id,
                               "repetition_penalty": gen.repetition_penalty,
                               "no_repeat_ngram_size": gen.no_repeat_ngram_size}
    if gen.temperature > 0:
        options.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0)
    else:  # override sampling defaults a model's generation_config may carry (SmolLM2's does)
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    stop_ids = stop_token_ids(tokenizer, chat)
    if stop_ids:
        options["eos_token_id"] = stop_ids
    torch.manual_seed(seed)  # seeds every device's generator
    outputs: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if seq2seq else "left"
    try:
        with _eval_mode(model):
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start: start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=max_length is not None,
                                max_length=max_length, add_special_tokens=not chat)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                stop = [_StopStrings(tokenizer, gen.stop, 0 if seq2seq else enc["input_ids"].shape[1])] if gen.stop else []
                out = model.generate(**enc, **options, stopping_criteria=StoppingCriteriaList(stop))
                new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
                outputs += [cut_at(t, gen.stop).strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
                if on_batch is not None:
                    on_batch()
    finally:
        tokenizer.padding_side = old_side
    return outputs


class _StopStrings(StoppingCriteria):
    """Stop each sequence once its new text holds a stop string. (transformers' own `stop_strings`
    also match a string that starts in the prompt: a prompt ending in "\\n" stops at once on "\\n\\n".)"""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, list(stop), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def cut_at(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop string (generate() stops after one, and keeps it)."""
    cut = min((i for i in (text.find(x) for x in stop) if i >= 0), default=len(text))
    return text[:cut]


@contextlib.contextmanager
def _base_of(model: nn.Module, base: nn.Module | None) -> Iterator[nn.Module]:
    """The base model: `base` if given, else `model` with its adapter disabled (no second copy)."""
    if base is not None:
        yield base
        return
    if not hasattr(model, "disable_adapter"):
        raise TypeError("compare(): give `base`, or a peft model whose adapter can be disabled")
    with model.disable_adapter():
        yield model


def compare(
    model: nn.Module,
    loader: Any,
    tokenizer: Any,
    prompts: Sequence[str] = (),
    *,
    base: nn.Module | None = None,
    references: Sequence[str] | None = None,
    shown: Sequence[str] | None = None,
    gen: GenerationArgs | None = None,
    chat: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    max_batches: int = 0,
    progress: Callable[[str, int], OnBatch] | None = None,
) -> dict[str, Any]:
    """Perplexity and generations of the base and the fine-tuned model, side by side.

    Args:
        model: the fine-tuned model. A peft model serves as its own base (adapter disabled
            inside ``disable_adapter()``) unless `base` is given.
        loader: evaluation batches (see :func:`perplexity`).
        tokenizer: for the generations.
        prompts: prompts to generate from (may be empty).
        base: the base model, for full fine-tuning (None: `model` with its adapter disabled).
        references: the expected output of each prompt (shown beside the generations).
        shown: each prompt as a person reads it (default: the prompt; a chat prompt's user turn).
        gen, chat, seed, batch_size: see :func:`generate`.
        max_batches: limit the perplexity to this many batches (0: all).
        progress: ``progress(label, total)`` returns the callback for one task's batches.

    Returns:
        ``{"perplexity": {"base": {...}, "tuned": {...}}, "generations": [{"id", "prompt",
        "reference", "base", "tuned"}, ...], "task": {"base": {...}, "tuned": {...}}}``; perplexity
        entries as :func:`perplexity` returns; "task" (with references) as
        :func:`minitune.metrics.task_scores` returns, the kind of task detected once for both.

    Raises:
        TypeError: no `base` and `model` is not a peft model.
    """
    n_batches = min(len(loader), max_batches) if max_batches else len(loader)
    n_gen = math.ceil(len(prompts) / batch_size)
    options = dict(gen=gen, chat=chat, seed=seed, batch_size=batch_size)

    def task(label: str, total: int) -> OnBatch:
        return progress(label, total) if progress is not None else None

    result: dict[str, Any] = {"perplexity": {}, "generations": []}
    outputs: dict[str, list[str]] = {}
    with _base_of(model, base) as base_model:
        result["perplexity"]["base"] = perplexity(base_model, loader, max_batches=max_batches,
                                                  on_batch=task("perplexity (base)", n_batches))
        if prompts:
            outputs["base"] = generate(base_model, tokenizer, prompts, on_batch=task("generate (base)", n_gen),
                                       **options)
    result["perplexity"]["tuned"] = perplexity(model, loader, max_batches=max_batches,
                                               on_batch=task("perplexity (fine-tuned)", n_batches))
    if prompts:
        outputs["tuned"] = generate(model, tokenizer, prompts, on_batch=task("generate (fine-tuned)", n_gen),
                                    **options)
    for i, prompt in enumerate(prompts):
        result["generations"].append({
            "id": i, "prompt": shown[i] if shown else prompt, "reference": references[i] if references else None,
            "base": outputs["base"][i], "tuned": outputs["tuned"][i],
        })
    if prompts and references and any(r.strip() for r in references):
        kind = detect_kind(references)  # one kind for both sides
        result["task"] = {name: task_scores(outputs[name], references, kind) for name in MODELS}
    return result
