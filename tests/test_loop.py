"""minitune.loop: `fit` driven with a tiny 2-layer nn.Module (no transformers), and its loss helpers."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from minitune.build import reset_accelerate_state
from minitune.eval_loss import evaluate_loss
from minitune.loop import LoopArgs, fit
from minitune.losses import count_items, default_loss
from minitune.state import TrainState

from .conftest import slow_evaluations


class TwoLayer(nn.Module):
    """x -> relu(W1 x) -> W2 -> summed squared error against y; the loss of a batch is a sum, its
    items the number of rows with a target (mask == 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.l2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        err = (self.l2(torch.relu(self.l1(x))).squeeze(-1) - y) ** 2
        return (err * mask).sum()


def squared_error(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return model(**batch), batch["mask"].sum()


squared_error.count = lambda model, batch: batch["mask"].sum()  # type: ignore[attr-defined]


def _batches(n: int, rows: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(rows, 4, generator=g)
        mask = torch.ones(rows)
        mask[: i % rows] = 0  # a different number of targets per batch, as padding makes them
        out.append({"x": x, "y": x.sum(1), "mask": mask})
    return out


def _setup(sgd: bool = False) -> tuple[Accelerator, TwoLayer, torch.optim.Optimizer]:
    """A fresh Accelerator, the model (seed 0) and AdamW (SGD where the gradient's scale must show)."""
    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = TwoLayer()
    optimizer = (torch.optim.SGD if sgd else torch.optim.AdamW)(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _run(batches: list[dict], args: LoopArgs, loss_fn=squared_error, sgd: bool = False,
         **kw) -> tuple[TrainState, list[dict], TwoLayer]:
    accelerator, model, optimizer = _setup(sgd)
    records: list[dict] = []
    state = fit(accelerator, model, optimizer, batches, args, loss_fn=loss_fn,
                on_step=lambda st, m: records.append(m), **kw)
    return state, records, model


# torch 2.13.0 CPU: AdamW (lr 0.05) on the 2-layer model, 8 batches of 8 rows (3 epochs), grad_accum 2,
# max_grad_norm 1 (recorded)
PINNED = [4.5686, 3.213, 3.5377, 2.0315, 2.7931, 2.0093, 2.382, 0.8938, 1.2777, 1.018, 1.0465, 0.3622]


def test_pinned_losses_of_a_two_layer_module():
    state, records, _ = _run(_batches(8, rows=8), LoopArgs(max_steps=12, grad_accum=2))
    assert [r["loss"] for r in records] == pytest.approx(PINNED, abs=1e-4)
    assert (state.step, state.micro_step, state.epoch, state.stop_reason) == (12, 24, 2, "max_steps")


def test_keywords_are_the_same_loop_as_loop_args():
    _, with_args, m1 = _run(_batches(8), LoopArgs(max_steps=4, grad_accum=2))
    accelerator, model, optimizer = _setup()
    records: list[dict] = []
    fit(accelerator, model, optimizer, _batches(8), max_steps=4, grad_accum=2, loss_fn=squared_error,
        on_step=lambda st, m: records.append(m))
    assert [r["loss"] for r in records] == [r["loss"] for r in with_args]
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), model.parameters(), strict=True))


def test_loop_args_and_keywords_together_or_neither_are_refused():
    accelerator, model, optimizer = _setup()
    with pytest.raises(TypeError, match="not both"):
        fit(accelerator, model, optimizer, _batches(2), LoopArgs(max_steps=1), max_steps=1)
    with pytest.raises(TypeError, match="max_steps"):
        fit(accelerator, model, optimizer, _batches(2))
    with pytest.raises(TypeError, match="grad_acum"):
        fit(accelerator, model, optimizer, _batches(2), max_steps=1, grad_acum=2)


def test_accumulation_gives_the_gradient_of_one_big_batch():
    """The normaliser is the window's target count, so 2 micro-batches of uneven counts step like
    one batch of both (no clipping, one SGD step: the weights must agree)."""
    small = _batches(2)
    big = [{k: torch.cat([small[0][k], small[1][k]]) for k in small[0]}]
    _, _, accumulated = _run(small, LoopArgs(max_steps=1, grad_accum=2, max_grad_norm=0), sgd=True)
    _, _, one = _run(big, LoopArgs(max_steps=1, grad_accum=1, max_grad_norm=0), sgd=True)
    for a, b in zip(accumulated.parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_micro_batch_graph_is_gone_before_the_next_forward():
    # a custom autograd function that keeps a tensor on its context (as bitsandbytes' 8-bit layers
    # keep their input): backward does not free it, only dropping the graph does. Each forward checks
    # that nothing of the previous micro-batches' graphs is alive (the loop held the last loss, and
    # with it this memory, until the next forward had run: 31 MiB on opt-125m 8-bit at 2 x 64).
    import weakref

    kept: list = []

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.kept = x.detach().clone()
            kept.append(weakref.ref(ctx.kept))
            return x * 1.0

        @staticmethod
        def backward(ctx, grad):
            return grad

    alive: list[int] = []

    def keeping_loss(model, batch):
        alive.append(sum(ref() is not None for ref in kept))
        loss, items = squared_error(model, batch)
        return Keep.apply(loss), items

    keeping_loss.count = squared_error.count
    _run(_batches(6), LoopArgs(max_steps=2, grad_accum=3, max_grad_norm=0), loss_fn=keeping_loss)
    assert alive == [0] * 6


def test_a_loss_without_count_is_normalised_by_what_it_returns():
    """Without `count` the gradients are divided after the window by the returned counts: the same
    training as with `count` (not bit for bit: the division happens in another place)."""

    def no_count(model, batch):
        return squared_error(model, batch)

    _, counted, m1 = _run(_batches(8), LoopArgs(max_steps=4, grad_accum=2, max_grad_norm=0), sgd=True)
    _, returned, m2 = _run(_batches(8), LoopArgs(max_steps=4, grad_accum=2, max_grad_norm=0), loss_fn=no_count,
                           sgd=True)
    assert [r["loss"] for r in returned] == pytest.approx([r["loss"] for r in counted], rel=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_count_that_disagrees_with_the_loss_is_an_error():
    def miscounting(model, batch):
        return squared_error(model, batch)

    miscounting.count = lambda model, batch: batch["mask"].numel()  # counts masked rows too
    with pytest.raises(ValueError, match="counted other items"):
        _run(_batches(4), LoopArgs(max_steps=2, grad_accum=2), loss_fn=miscounting)


def test_non_finite_steps_are_skipped_then_stop_the_run():
    def nan_from_third(model, batch, calls=[0]):  # noqa: B006  (a counter across calls)
        calls[0] += 1
        loss, n = squared_error(model, batch)
        return (loss * float("nan") if calls[0] >= 3 else loss), n

    nan_from_third.count = squared_error.count
    state, records, model = _run(_batches(10), LoopArgs(max_steps=5, max_bad_steps=2), loss_fn=nan_from_third)
    assert (state.step, state.skipped_steps, state.bad_streak, state.stop_reason) == (2, 2, 2, "nonfinite")
    assert len(records) == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_callback_stops_and_log_every_groups_steps():
    accelerator, model, optimizer = _setup()
    seen: list[int] = []

    def stop_at_4(st, metrics):
        seen.append(metrics["step"])
        return st.step >= 4

    state = fit(accelerator, model, optimizer, _batches(8), LoopArgs(max_steps=8, log_every=2), loss_fn=squared_error,
                on_step=stop_at_4)
    assert seen == [2, 4] and (state.step, state.stop_reason) == (4, "callback")


def test_save_every_hands_the_state_to_save():
    saved: list[tuple[int, int]] = []
    state, _, _ = _run(_batches(6), LoopArgs(max_steps=6, save_every=2),
                       save=lambda st: saved.append((st.step, st.micro_step)))
    assert saved == [(2, 2), (4, 4), (6, 6)] and state.step == 6


def test_step_times_and_tokens_per_s_leave_out_evaluations_and_saves(monkeypatch):
    """An evaluation and a save after every step (100 s and 1000 s, virtual) are not training time:
    the logged step time and tokens/s, and state.train_seconds, exclude them; state.eval_seconds
    holds the evaluations."""
    clock = slow_evaluations(monkeypatch, 100)

    def loss_fn(model, batch):  # the batches carry an attention mask, so the loop counts tokens
        return squared_error(model, {k: v for k, v in batch.items() if k != "attention_mask"})

    batches = [{**b, "attention_mask": torch.ones(4, 8, dtype=torch.long)} for b in _batches(3)]
    state, records, _ = _run(batches, LoopArgs(max_steps=3, eval_every=1, save_every=1), loss_fn=loss_fn,
                             eval_loader=batches[:1], save=lambda st: clock.sleep(1000))
    assert len(records) == 3 and all("eval_loss" in r for r in records)
    assert all(r["step_time_s"] < 50 for r in records)  # before: 1100 s for steps 2 and 3
    assert all(r["tokens_per_s"] == pytest.approx(32 / r["step_time_s"]) for r in records)  # 4 x 8 tokens a step
    assert state.train_seconds == pytest.approx(sum(r["step_time_s"] for r in records), abs=0.05)  # + the loop's exit
    assert 300 <= state.eval_seconds < 350


def test_evaluate_loss_is_the_mean_over_items_and_leaves_train_mode():
    accelerator, model, _ = _setup()
    batches = _batches(3)
    with torch.no_grad():
        loss = sum(float(squared_error(model, b)[0]) for b in batches)
    expected = loss / sum(float(b["mask"].sum()) for b in batches)
    assert evaluate_loss(accelerator, model, batches, loss_fn=squared_error) == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_default_loss_and_its_count_for_a_module_that_returns_its_loss():
    model = TwoLayer()
    batch = _batches(1)[0]
    loss, n = default_loss(model, batch)  # no labels, no config: the module's own loss, one item
    assert float(n) == 1 and count_items(model, batch) == 1 == default_loss.count(model, batch)
    torch.testing.assert_close(loss, model(**batch))


def test_an_empty_loader_stops_with_one_error():
    """An empty train_loader used to loop over empty epochs forever; resuming at the end of an epoch
    (nothing left to skip into) still goes on to the next one."""
    import threading

    outcome = {}

    def run():
        try:
            _run([], LoopArgs(max_steps=2))
        except ValueError as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=run, daemon=True)  # the old loop never returns: do not hang the suite
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "fit() with an empty loader did not stop"
    assert outcome["error"].startswith("fit(): train_loader yielded no batches")
    loader = torch.utils.data.DataLoader(_batches(2), batch_size=1, collate_fn=lambda b: b[0])
    state, _, _ = _run(loader, LoopArgs(max_steps=3), state=TrainState(step=2, micro_step=2, batch_in_epoch=2))
    assert (state.step, state.epoch) == (3, 1)


def test_a_nonfinite_step_under_deepspeed_stops_at_once():
    """DeepSpeed's engine steps inside `accelerator.backward`: a non-finite step cannot be skipped
    after the fact, so the run stops at the first one instead of claiming a skip and training on."""
    from types import SimpleNamespace

    from minitune.loop import skip_or_step

    class EngineOptimizer:  # accelerate's DeepSpeedOptimizerWrapper: step is a no-op, the engine reports skips
        step_was_skipped = False

        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            pass

    said = []
    logger = SimpleNamespace(message=said.append)
    for kind, stops in (("DistributedType.DEEPSPEED", True), ("DistributedType.MULTI_CPU", False)):
        accelerator = SimpleNamespace(distributed_type=kind, scaler=None)
        state = TrainState()
        assert not skip_or_step(accelerator, EngineOptimizer(), state, (False, True), 5, logger)
        assert (state.stop_reason == "nonfinite") == stops and state.skipped_steps == 1
    assert "cannot be skipped" in said[0] and "cannot be skipped" not in said[1]
    # the fp16 engine skipped the update itself (its loss scaler): that is a real skip, the run goes on
    fp16 = EngineOptimizer()
    fp16.step_was_skipped = True
    state = TrainState()
    skip_or_step(SimpleNamespace(distributed_type="DistributedType.DEEPSPEED", scaler=None), fp16, state,
                  (False, True), 5, logger)
    assert state.stop_reason == "" and state.skipped_steps == 1
