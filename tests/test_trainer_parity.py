"""minitune's loop against transformers.Trainer on the same job: the same loss at every step.

Both sides get the same tiny fp32 model (a preset, seed 0, no dropout), the very same pre-collated
batches in the same order (the Trainer subclass returns them from `get_train_dataloader`), torch
AdamW over the same decay groups, the same linear schedule with warmup, clipping and gradient
accumulation. What transformers 5.23's Trainer does with accumulation (trainer.py):

- `get_batch_samples` fetches a whole accumulation window first; `_get_num_items_in_batch` counts
  its target tokens (`labels[..., 1:] != -100` for causal LMs, whose loss shifts the labels;
  `labels != -100` for encoder-decoders) whenever the model's forward takes `**kwargs`;
- `compute_loss` passes that count to the model as `num_items_in_batch`, and a causal LM's
  `ForCausalLMLoss` returns sum(token losses) / count; `training_step` then does not divide by the
  number of micro-batches. That is minitune's normalisation (loop.py): the same gradient.
- T5's forward takes `**kwargs` too, so Trainer counts the tokens and skips the division, but T5
  ignores `num_items_in_batch` and returns the *mean* over its micro-batch: with accumulation the
  Trainer's T5 loss is the sum of the micro-batch means (twice the per-token loss for two
  micro-batches, and each micro-batch weighted alike whatever its token count). minitune divides
  the window's token-loss sum by its token count. With grad_accum=1 the two agree; with 2 they do
  not, and `test_t5_with_accumulation_trainer_sums_micro_batch_means` pins down how.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GPT2, QUOTES, T5_TOK

STEPS = 10
LR = 5e-3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine waiting threads make them slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _no_dropout(model: torch.nn.Module) -> None:
    """Dropout modules and the float rates that attention layers pass to functional dropout (T5)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "dropout_rate"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


def _model(preset: str, lora: bool):
    from minitune.config import LoraArgs, ModelArgs
    from minitune.model import build_from_config
    from minitune.prepare import prepare_model

    model = build_from_config(ModelArgs(preset=preset), seed=0)
    _no_dropout(model)
    model, _ = prepare_model(model, LoraArgs(enabled=lora, r=4, alpha=8, dropout=0.0))
    return model


def _batches(preset: str, n: int) -> list[dict]:
    """`n` pre-collated batches of 4 quotes; the prompt is masked out of the labels (causal), so
    the micro-batches of a window hold different numbers of target tokens."""
    from minitune.config import DataArgs, ModelArgs
    from minitune.data import build_data, make_dataloader
    from minitune.model import load_tokenizer

    seq2seq = preset.endswith("t5")
    tok = load_tokenizer(ModelArgs(preset=preset, tokenizer=T5_TOK if seq2seq else GPT2))
    args = DataArgs(path=QUOTES, prompt="{quote} ->: ", response="{tags}", mask_prompt=not seq2seq, max_length=64,
                    max_target_length=12, max_samples=6 * n, validation_fraction=0.0)
    data = build_data(args, tok, seq2seq=seq2seq)
    loader = make_dataloader(data.train, data.collator, batch_size=4, shuffle=True, seed=0)
    batches = [b for _, b in zip(range(n), loader, strict=False)]
    assert len(batches) == n
    return batches


def _optimizer_args():
    from minitune.config import OptimizerArgs

    return OptimizerArgs(lr=LR, weight_decay=0.1, scheduler="linear", warmup_steps=2)


def _run_minitune(model, batches: list[dict], grad_accum: int, loss: str = "full") -> dict:
    from accelerate import Accelerator

    from minitune.build import reset_accelerate_state
    from minitune.loop import fit
    from minitune.losses import loss_fn_for
    from minitune.optim import build_optimizer, build_scheduler

    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, _optimizer_args(), accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, _optimizer_args(), STEPS)
    seen: dict = {"loss": [], "grad_norm": [], "lr": []}
    seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step(state, metrics):
        seen["loss"].append(metrics["loss"])
        seen["grad_norm"].append(metrics["grad_norm"])
        seen["lr"].append(metrics["learning_rate"])

    fit(accelerator, model, optimizer, batches, max_steps=STEPS, scheduler=scheduler, grad_accum=grad_accum,
        max_grad_norm=1.0, log_every=1, on_step=on_step, loss_fn=loss_fn_for(loss))
    seen["groups"] = _decay_groups(model, optimizer)
    seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return seen


def _run_trainer(model, batches: list[dict], grad_accum: int, tmp_path) -> dict:
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from minitune.build import reset_accelerate_state

    reset_accelerate_state()
    micro: list[torch.Tensor] = []
    seen: dict = {"loss": [], "grad_norm": [], "lr": [], "num_items": []}

    class SameBatches(Trainer):
        def get_train_dataloader(self):
            return DataLoader(batches, batch_size=None, shuffle=False)  # no sampler, no shuffling

        def training_step(self, model, inputs, num_items_in_batch=None):
            seen["num_items"].append(num_items_in_batch)
            loss = super().training_step(model, inputs, num_items_in_batch)
            micro.append(loss)
            return loss

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["loss"].append(torch.stack(micro).sum().item())  # what Trainer's logs add up
            micro.clear()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                seen["grad_norm"].append(logs["grad_norm"])
                seen["lr"].append(logs["learning_rate"])

    o = _optimizer_args()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, gradient_accumulation_steps=grad_accum,
        max_steps=STEPS, learning_rate=o.lr, lr_scheduler_type=o.scheduler, warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        optim="adamw_torch", max_grad_norm=1.0, use_cpu=True, seed=0, save_strategy="no", report_to="none",
        disable_tqdm=True, logging_steps=1, remove_unused_columns=False,
    )
    trainer = SameBatches(model=model, args=args, train_dataset=batches, callbacks=[Record()])
    trainer.train()
    seen["groups"] = _decay_groups(trainer.model, trainer.optimizer)
    seen["params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return seen


def _decay_groups(model, optimizer) -> dict[float, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[float, set[str]] = {}
    for g in optimizer.param_groups:
        groups.setdefault(g["weight_decay"], set()).update(names[id(p)] for p in g["params"])
    return {decay: params for decay, params in groups.items() if params}  # Trainer keeps empty groups


def _assert_same_run(ours: dict, theirs: dict, loss_tol: float = 1e-6, weight_atol: float = 1e-6) -> None:
    assert len(ours["loss"]) == len(theirs["loss"]) == STEPS
    assert ours["groups"] == theirs["groups"]  # the same parameters decayed, the same not
    for step, (a, b) in enumerate(zip(ours["loss"], theirs["loss"], strict=True), 1):
        assert abs(a - b) <= loss_tol, f"step {step}: minitune loss {a!r}, Trainer loss {b!r}"
    torch.testing.assert_close(torch.tensor(ours["grad_norm"]), torch.tensor(theirs["grad_norm"]).float(),
                               rtol=1e-5, atol=1e-6)
    # Trainer logs the rate the step used; minitune the one after the scheduler's step (the next step's)
    assert ours["lr"][:-1] == pytest.approx(theirs["lr"][1:], rel=1e-12)
    assert ours["params"].keys() == theirs["params"].keys()
    for name, p in ours["params"].items():
        torch.testing.assert_close(p, theirs["params"][name], rtol=1e-5, atol=weight_atol, msg=name)
    # it trained: the comparison is not of two idle runs (the model of `_model` starts where both did)
    moved = max((p - ours["start"][n]).abs().max().item() for n, p in ours["params"].items())
    assert moved > 1e-3


@pytest.mark.parametrize(("preset", "lora", "loss"), [("tiny-llama", False, "full"), ("tiny-bloom", True, "full"),
                                                    ("tiny-llama", False, "auto"), ("tiny-bloom", True, "auto")],
                         ids=["llama-full-finetune", "bloom-lora", "llama-full-finetune-chunked", "bloom-lora-chunked"])
def test_causal_lm_same_loss_every_step_with_accumulation(preset, lora, loss, tmp_path):
    """`fit` with the model's full logits (`default_loss`) and with training.loss=auto, the default
    config's chunked loss."""
    grad_accum = 2
    batches = _batches(preset, STEPS * grad_accum)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(set(counts)) > 1  # windows mix micro-batches of different token counts: the normaliser matters
    ours = _run_minitune(_model(preset, lora), batches, grad_accum, loss)
    theirs = _run_trainer(_model(preset, lora), batches, grad_accum, tmp_path)
    # Trainer counted the window's target tokens the way minitune does (labels[:, 1:] != -100)
    windows = [sum(counts[i:i + grad_accum]) for i in range(0, len(counts), grad_accum)]
    assert [int(n) for n in theirs["num_items"][::grad_accum]] == windows
    # The chunked loss adds the same token losses in another order: 2 fp32 ulps apart at a loss of ~10,
    # and after 10 Adam steps the embedding rows of tokens that are never targets (gradients near 0,
    # which Adam normalises) differ by up to 3.3e-6 (llama full fine-tuning; its weights moved 0.025).
    chunked = loss != "full"
    _assert_same_run(ours, theirs, loss_tol=4e-6 if chunked else 1e-6, weight_atol=1e-5 if chunked else 1e-6)
    if not lora:
        assert ours["groups"][0.0] and ours["groups"][0.1]  # norms undecayed, matrices decayed, on both sides


def test_t5_without_accumulation_same_loss_every_step(tmp_path):
    batches = _batches("tiny-t5", STEPS)
    ours = _run_minitune(_model("tiny-t5", True), batches, 1)
    theirs = _run_trainer(_model("tiny-t5", True), batches, 1, tmp_path)
    _assert_same_run(ours, theirs)


def test_t5_with_accumulation_trainer_sums_micro_batch_means(tmp_path):
    """Where they differ (see the module docstring): Trainer's first step loss is the sum of the
    two micro-batch means, minitune's the window's token-weighted mean."""
    from minitune.losses import default_loss

    batches = _batches("tiny-t5", 2 * STEPS)
    first = batches[:2]
    assert int((first[0]["labels"] != -100).sum()) != int((first[1]["labels"] != -100).sum())
    reference = _model("tiny-t5", True)
    with torch.no_grad():
        sums, counts = zip(*(default_loss(reference, b) for b in first), strict=True)
    token_mean = (sum(sums) / sum(counts)).item()
    sum_of_means = sum((s / n).item() for s, n in zip(sums, counts, strict=True))

    ours = _run_minitune(_model("tiny-t5", True), batches, 2)
    theirs = _run_trainer(_model("tiny-t5", True), batches, 2, tmp_path)
    assert ours["loss"][0] == pytest.approx(token_mean, abs=1e-5)
    assert theirs["loss"][0] == pytest.approx(sum_of_means, abs=1e-5)
    assert theirs["loss"][0] == pytest.approx(2 * ours["loss"][0], rel=0.05)  # about twice: two micro-batches
