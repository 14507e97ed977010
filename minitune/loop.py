"""`fit`: minitune's one training loop, on `accelerate.Accelerator`.

It never sees YAML or argv: the model, data, optimizer and every helper come in as arguments, so
other codebases can call it with their own pieces. Device and precision are Accelerate's business
(`accelerator.prepare` wraps the forward in autocast, `accelerator.backward` scales fp16 losses).

Loss normalisation: each micro-batch's loss is a *sum* over target tokens (the items the loss
function counts), divided by the number of items in the whole accumulation window (across
processes). So gradient accumulation and data parallelism give the same gradient as one big batch,
whatever the padding.

The normaliser must be known before the first backward of a window: each micro-batch's graph is
freed by its own backward (keeping a window of graphs alive, to sum the losses and backpropagate
once, would multiply the activation memory by `grad_accum`). So a loss function says what it will
count with a `count(model, batch)` attribute, computed from the batch alone (for the built-in
losses, the target tokens: `losses.count_items`); the loop checks it against the count the call returns,
at the step's one host-device sync, and refuses a mismatch. A loss function without `count` is
backpropagated unnormalised and its gradients are divided by the returned counts after the window
(the same in exact arithmetic, not bit for bit).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .eval_loss import evaluate_during_run
from .interrupt import StopFlag
from .launch import steps_in_backward
from .losses import LossFn, default_loss
from .optim import clip_grad_norm, module_grad_norms
from .report import report_step, say
from .state import TrainState

__all__ = ["LoopArgs", "fit"]


def _windows(loader: Any, accelerator: Any, state: TrainState, grad_accum: int) -> Iterator[list[dict]]:
    """Yield lists of `grad_accum` micro-batches, epoch after epoch, from where `state` left off."""
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)  # seeded, per-epoch shuffle order
        epoch_loader = loader
        if state.batch_in_epoch:  # resuming mid-epoch: skip what was already consumed
            epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
        batches = iter(epoch_loader)
        # Starting a DataLoader draws its base seed from the global torch RNG. Fork it, so that the
        # dropout stream depends only on the batches trained on, not on how many loaders were
        # started: a resumed run starts one more (the skipping one) and must see the same masks.
        with torch.random.fork_rng(devices=[]):
            first = next(batches, None)
        if first is None and epoch_loader is loader:  # (a resumed epoch may have nothing left: it ended)
            raise ValueError("fit(): train_loader yielded no batches, so no step can ever be taken; give it "
                             "data (an empty dataset, or fewer examples than the batch size with drop_last=True?)")
        window: list[dict] = []
        for batch in itertools.chain([first] if first is not None else [], batches):
            window.append(batch)
            if len(window) == grad_accum:
                yield window
                window = []
        if window:  # a short last window still makes a step: no data is dropped
            yield window
        state.epoch += 1
        state.batch_in_epoch = 0


@dataclass
class LoopArgs:
    """The loop's settings (what a config's training section turns into; litgpt's TrainArgs)."""

    max_steps: int  # optimizer steps to reach (counted from 0, including resumed steps)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # clip the gradient norm to this (0: no clipping, the norm is still logged)
    log_every: int = 1  # log (and sync with the device) every N steps
    eval_every: int = 0  # evaluate every N steps (0: never inside the loop)
    eval_batches: int = 0  # limit each evaluation to N batches (0: all)
    save_every: int = 0  # call `save(state)` every N steps (0: never inside the loop)
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps
    module_grad_norms: bool = False  # add per-module lora_A / lora_B gradient norms to the logged metrics


def fit(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Any,
    args: LoopArgs | None = None,
    *,
    scheduler: Any = None,
    eval_loader: Any = None,
    loss_fn: LossFn = default_loss,
    profiler: Any = None,
    logger: Any = None,
    save: Callable[[TrainState], Any] | None = None,
    on_step: Callable[[TrainState, dict], Any] | None = None,
    state: TrainState | None = None,
    **settings: Any,
) -> TrainState:
    """Train `model` for `args.max_steps` optimizer steps. The one loop of minitune.

    Args:
        accelerator: an `accelerate.Accelerator`; model, optimizer and loaders already prepared.
        model: the model to train (any nn.Module; see `default_loss` for what it must return).
        optimizer: its optimizer.
        train_loader: yields batches (dicts of tensors); re-iterated each epoch.
        args: the loop's settings (`LoopArgs`); or give its fields as keywords (`max_steps=100, ...`).
        scheduler: learning-rate scheduler stepped once per optimizer step (not on skipped steps).
        eval_loader: validation batches for `eval_loss.evaluate_loss`.
        loss_fn: (model, batch) -> (loss sum, item count); see `default_loss`. The gradient is
            normalised by the items of the whole accumulation window over all processes: counted
            before the backward passes by `loss_fn.count(model, batch)` where the loss function has
            one (the built-in ones do; a count that differs from what the call returns is an error),
            else by the counts the calls return, dividing the gradients once the window is done.
        profiler: a `minitune.memory.MemoryProfiler` (or None).
        logger: an object with `log(step, metrics)` (e.g. `minitune.report.RunLogger`), or None.
        save: checkpoint callback, also called when a signal stops the run.
        on_step: `on_step(state, metrics)` after every logged step; a truthy return stops the run.
        state: counters to resume from.
        **settings: `LoopArgs` fields, when `args` is not given.

    Returns:
        The final TrainState (`stop_reason` says why it ended).

    Raises:
        TypeError: both `args` and keyword settings, or neither.
        ValueError: `loss_fn.count` disagrees with the count `loss_fn` returns; `train_loader` yields
            no batch at all.
        Whatever the model, loss or optimizer raise (e.g. torch.OutOfMemoryError); non-finite losses
        and gradients do not raise: the step is skipped, and `max_bad_steps` in a row stop the run.
    """
    args = _loop_args(args, settings)
    state = state or TrainState()
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    tally = _Tally(accelerator, state)
    clock = _Clock(state)
    save_now = _Saver(save, state, tally, clock)
    with StopFlag() as stop:
        for window in _windows(train_loader, accelerator, state, args.grad_accum):
            if state.step >= args.max_steps:
                state.stop_reason = "max_steps"
                break
            phases = profiler if profiler is not None and profiler.want_phases(state.step + 1) else None
            loss, items = _forward_backward(accelerator, model, window, loss_fn, params, state, tally, phases)
            grad_norm = clip_grad_norm(accelerator, params, args.max_grad_norm)
            log_now = (state.step + 1) % args.log_every == 0 or state.step + 1 >= args.max_steps
            extra = module_grad_norms(model) if args.module_grad_norms and log_now else {}
            bad, agreed = _check_step(accelerator, loss, grad_norm, items, stop)  # the step's host sync
            if not skip_or_step(accelerator, optimizer, state, bad, args.max_bad_steps, logger):
                if state.stop_reason != "nonfinite" and stop.now(agreed):
                    state.stop_reason = "signal"
                    save_now()
                if state.stop_reason:
                    break
                continue
            tally.add(loss, items.total)
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if phases is not None:
                phases.phase("optimizer")
            state.bad_streak = 0
            state.step += 1
            tally.steps += 1

            metrics = _log_metrics(accelerator, state, tally, clock, grad_norm, optimizer, train_loader, profiler,
                                   extra) if log_now else {}
            if eval_loader is not None and args.eval_every and state.step % args.eval_every == 0:
                with clock.aside():
                    metrics["eval_loss"] = evaluate_during_run(accelerator, model, eval_loader, state,
                                                               max_batches=args.eval_batches, loss_fn=loss_fn)
                state.eval_losses.append((state.step, metrics["eval_loss"]))
            if metrics and report_step(state, metrics, logger, on_step):
                state.stop_reason = "callback"
            if stop.now(agreed):  # a signal may have come while logging
                state.stop_reason = "signal"
            if args.save_every and state.step % args.save_every == 0 or state.stop_reason == "signal":
                save_now()
            if not state.stop_reason and state.step >= args.max_steps:
                state.stop_reason = "max_steps"
            if state.stop_reason:
                break
    clock.lap()
    tally.stash(state)  # the sums not yet logged, for the final checkpoint
    return state


def _loop_args(args: LoopArgs | None, settings: dict[str, Any]) -> LoopArgs:
    if args is not None and settings:
        raise TypeError(f"fit(): give the loop settings as `args` or as keywords, not both ({', '.join(settings)})")
    if args is None:
        if "max_steps" not in settings:
            raise TypeError("fit(): give `args=LoopArgs(max_steps=...)` or `max_steps=`")
        args = LoopArgs(**settings)  # an unknown keyword is a TypeError naming it
    return args


@dataclass
class _Items:
    """The items of one window on this process: what the loss function returned, and what its
    `count` gave before backward (None: the gradient was normalised afterwards by `total`)."""

    total: torch.Tensor
    counted: torch.Tensor | None


def _forward_backward(accelerator: Any, model: nn.Module, window: list[dict], loss_fn: LossFn,
                      params: list[torch.Tensor], state: TrainState, tally: _Tally,
                      phases: Any) -> tuple[torch.Tensor, _Items]:
    """Forward and backward of each micro-batch of `window`, gradients synced once (last micro-batch)
    and normalised by the window's items over all processes, so that accumulation and data
    parallelism give the gradient of one big batch whatever the padding.

    Each micro-batch's graph is freed by its own backward: nothing is held across the window. So the
    normaliser must be known before the first backward: `loss_fn.count` gives it without running the
    model (no host sync). A loss function without `count` is backpropagated unnormalised and its
    gradients divided by the returned counts afterwards (the same in exact arithmetic, not bit for bit).

    Returns:
        (sum of the micro-batch losses, `_Items`), device tensors of this process.
    """
    device = accelerator.device
    count = getattr(loss_fn, "count", None)
    scale = accelerator.num_processes  # DDP averages gradients over processes; the sum is wanted
    counted = None
    if count is not None:
        counted = sum(torch.as_tensor(count(model, b), device=device) for b in window)
        scale = scale / accelerator.reduce(counted, reduction="sum").clamp(min=1)
    loss = torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            # Autocast covers the loss too (Accelerate's idiom): the chunked loss applies the
            # output layer itself, outside the model's autocast-wrapped forward.
            with accelerator.autocast():
                micro_loss, micro_items = loss_fn(model, batch)
            if phases is not None and i == 0:
                phases.phase("forward")
            accelerator.backward(micro_loss * scale)
            if phases is not None and i == 0:
                phases.phase("backward")
        loss += micro_loss.detach().float()
        # the graph hangs on the loss until it is dropped, and with it whatever custom autograd
        # functions keep on their context (bitsandbytes' 8-bit layers keep each layer's input):
        # dropped now, not when the next micro-batch's forward has allocated its own
        del micro_loss
        total += micro_items
        tally.count_tokens(batch)
        state.micro_step += 1
        state.batch_in_epoch += 1
    if counted is None:
        n = accelerator.reduce(total.clone(), reduction="sum").clamp(min=1)
        for p in params:
            if p.grad is not None:
                p.grad.div_(n.to(p.grad.dtype))
    return loss, _Items(total, counted)


def _check_step(accelerator: Any, loss: torch.Tensor, grad_norm: torch.Tensor, items: _Items,
                stop: StopFlag) -> tuple[tuple[bool, bool], list[bool]]:
    """((loss not finite, gradient not finite), [signal seen by any process] with several processes
    ([] with one: `StopFlag.now` then reads the flag when asked)), the same on every process.

    Host-device sync, once per optimizer step: is the loss finite, is the gradient, did the loss
    function return the count the gradient was normalised by, and (with several processes, summed so
    that all take the same branch) did a signal come?

    Raises:
        ValueError: `loss_fn.count` counted other items than `loss_fn` returned.
    """
    miscount = (items.total != items.counted) if items.counted is not None else torch.zeros((), dtype=torch.bool)
    status = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm), miscount.to(loss.device)]).float()
    if accelerator.num_processes > 1:
        flag = torch.ones(1, device=accelerator.device) * (stop.raised is not None)
        status = accelerator.reduce(torch.cat([status, flag]), reduction="sum")
    loss_bad, grad_bad, miscounted, *agreed = (bool(v > 0) for v in status.tolist())
    if miscounted:
        raise ValueError("loss_fn.count(model, batch) counted other items than loss_fn(model, batch) returned: "
                         "the gradient would be normalised by the wrong number; make them count the same items")
    return (loss_bad, grad_bad), agreed


def skip_or_step(accelerator: Any, optimizer: torch.optim.Optimizer, state: TrainState, bad: tuple[bool, bool],
                  max_bad_steps: int, logger: Any) -> bool:
    """Step the optimizer unless the loss or gradient is not finite; True if the step counts.

    A step that does not count takes no scheduler step and no step number, and its loss is not
    logged; `max_bad_steps` genuine ones in a row set `state.stop_reason = 'nonfinite'`.
    """
    loss_bad, grad_bad = bad
    scaler = getattr(accelerator, "scaler", None)  # fp16 only
    overflow = False
    if scaler is not None or not (loss_bad or grad_bad) or steps_in_backward(accelerator):
        # fp16: always step, so the GradScaler sees the gradients it unscaled; it skips the update
        # itself when they are not finite, and lowers its scale. DeepSpeed: a no-op (the engine
        # stepped inside `accelerator.backward`) that reports the fp16 engine's own overflow skip.
        optimizer.step()
        overflow = bool(getattr(optimizer, "step_was_skipped", False))
    if not (loss_bad or grad_bad or overflow):
        return True
    if (loss_bad or grad_bad) and not overflow and steps_in_backward(accelerator):
        # the update is in the weights already: skipping nothing and going on would train on NaNs
        state.skipped_steps += 1
        state.bad_streak += 1
        state.stop_reason = "nonfinite"
        say(logger, accelerator, f"step {state.step + 1}: non-finite {'loss' if loss_bad else 'gradient'} under "
             "DeepSpeed, whose engine already applied the update inside backward (it cannot be skipped): stopping")
        return False
    optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += 1
    if loss_bad or scaler is None or scaler.get_scale() < 1:  # genuine: a scale < 1 still overflowing
        state.bad_streak += 1
        say(logger, accelerator, f"step {state.step + 1}: non-finite {'loss' if loss_bad else 'gradient'}, "
             f"step skipped ({state.bad_streak} in a row, stopping at {max_bad_steps})")
    else:
        state.scaler_skips += 1
    if state.bad_streak >= max_bad_steps:
        state.stop_reason = "nonfinite"
    return False


class _Tally:
    """What the loop sums between two logs, kept on the device so that a step never waits for it.
    A resumed run starts from the sums its checkpoint held (`TrainState.pending_*`), on the main
    process only: the next log sums them over processes again."""

    def __init__(self, accelerator: Any, state: TrainState) -> None:
        self.accelerator = accelerator
        device, main = accelerator.device, accelerator.process_index == 0
        self.loss = torch.tensor(state.pending_loss_sum if main else 0.0, device=device)
        self.items = torch.tensor(state.pending_loss_items if main else 0.0, device=device)
        self.tokens = torch.tensor(state.pending_tokens if main else 0, dtype=torch.long, device=device)
        self.steps, self.tokens_at_start, self.seconds_at_start = 0, state.tokens, state.train_seconds

    def count_tokens(self, batch: dict) -> None:
        if "attention_mask" in batch:
            self.tokens += batch["attention_mask"].sum()

    def add(self, loss: torch.Tensor, items: torch.Tensor) -> None:
        self.loss += loss
        self.items += items

    def reset(self, state: TrainState) -> None:
        self.loss.zero_(), self.items.zero_(), self.tokens.zero_()
        self.steps, self.tokens_at_start, self.seconds_at_start = 0, state.tokens, state.train_seconds

    def stash(self, state: TrainState) -> None:
        """Copy the sums not yet logged into `state` (a host-device sync; only when saving), summed
        over processes."""
        pending = self.accelerator.reduce(torch.stack([self.loss, self.items]), reduction="sum").tolist()
        state.pending_loss_sum, state.pending_loss_items = pending
        state.pending_tokens = int(self.accelerator.reduce(self.tokens, reduction="sum").item())


class _Clock:
    """Training time, decided here only: the loop's wall time less its evaluations and checkpoint
    saves (`aside`), summed in `state.train_seconds`. The logged `step_time_s` and `tokens_per_s`,
    and the run's summary, divide by it."""

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.mark = time.perf_counter()

    def lap(self) -> None:
        """Add the time since the last mark to `state.train_seconds`."""
        now = time.perf_counter()
        self.state.train_seconds += now - self.mark
        self.mark = now

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Time that is not training (an evaluation, a save): not added to `state.train_seconds`."""
        self.lap()
        try:
            yield
        finally:
            self.mark = time.perf_counter()


class _Saver:
    """`save(state)` with the pending sums stashed, at most once per micro-step (a signal right
    after a save does not save twice); saving is not training time."""

    def __init__(self, save: Callable[[TrainState], Any] | None, state: TrainState, tally: _Tally,
                 clock: _Clock) -> None:
        self.save, self.state, self.tally, self.clock = save, state, tally, clock
        self.saved_at = -1

    def __call__(self) -> None:
        if self.save is None or self.saved_at == self.state.micro_step:
            return
        with self.clock.aside():  # first: the checkpoint holds the training time up to here
            self.tally.stash(self.state)
            self.save(self.state)
        self.saved_at = self.state.micro_step


def _log_metrics(accelerator: Any, state: TrainState, tally: _Tally, clock: _Clock, grad_norm: torch.Tensor,
                 optimizer: torch.optim.Optimizer, train_loader: Any, profiler: Any, extra: dict) -> dict[str, Any]:
    """The metrics of a logged step; resets the sums. Host-device sync: the only regular one besides
    the finiteness check. Times are training time since the last log (no evaluation, no saving)."""
    totals = accelerator.reduce(torch.stack([tally.loss, tally.items]), reduction="sum")
    state.tokens += int(accelerator.reduce(tally.tokens, reduction="sum").item())
    clock.lap()  # after the sync: the device has finished the steps being timed
    elapsed = state.train_seconds - tally.seconds_at_start
    scaler = getattr(accelerator, "scaler", None)
    metrics = {
        "step": state.step,
        "epoch": state.epoch + state.batch_in_epoch / max(1, _len(train_loader)),
        "loss": (totals[0] / totals[1].clamp(min=1)).item(),
        "grad_norm": grad_norm.item(),
        "learning_rate": optimizer.param_groups[0]["lr"],
        "step_time_s": elapsed / max(tally.steps, 1),
        "skipped_steps": state.skipped_steps,
        **({"scaler_skips": state.scaler_skips} if scaler is not None else {}),
        # tokens: attention-mask ones; batches without an attention mask (your own data) have none
        **({"tokens_per_s": (state.tokens - tally.tokens_at_start) / max(elapsed, 1e-9), "tokens": state.tokens}
           if state.tokens else {}),
        **extra,
    }
    if profiler is not None:
        metrics.update(profiler.step(state.step))
    tally.reset(state)
    return metrics


def _len(loader: Any) -> int:
    try:
        return len(loader)
    except TypeError:
        return 0


