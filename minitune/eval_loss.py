"""The validation loss during a run: the mean per-token loss over a loader, summed across processes,
the same batches counted whatever the number of processes, and its wall time kept apart from training."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .lm import unwrap
from .losses import LossFn, default_loss
from .state import TrainState

__all__ = ["evaluate_during_run", "evaluate_loss"]


@torch.no_grad()
def evaluate_loss(accelerator: Any, model: nn.Module, loader: Any, *, max_batches: int = 0,
                  loss_fn: LossFn = default_loss) -> float:
    """Mean per-token loss over `loader`, summed across processes. Leaves the model in train mode.

    `max_batches` counts batches over all processes (a prepared loader gives process p the batches
    p, p + N, p + 2N, ...), so the result does not depend on the number of processes. Under DDP each
    process runs the bare module (no collectives are needed without gradients) on its own batches
    only, without the examples Accelerate repeats to even out the last batch. Under FSDP or
    DeepSpeed ZeRO-3 the forward itself gathers weights from every process, so every process runs
    the same number of forwards: one past `max_batches` runs and is not counted.
    """
    model.eval()
    net = unwrap(model, keep_compiled=True)  # DDP's forward would wait for the other processes
    sharded = net is model  # FSDP / DeepSpeed (or one process): the forward may hold collectives
    procs, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    # fork_rng: starting the loader draws from the global RNG; evaluating must not move the training's
    # dropout stream (else eval_every, or resuming from `final`, would change the trained weights)
    with _own_batches_only(loader) if net is not model else contextlib.nullcontext(), \
            torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(loader):
            counted = not max_batches or i * procs + rank < max_batches
            # the same stop on every process (i is the same everywhere), so sharded forwards stay paired
            if max_batches and (i * procs >= max_batches or not (counted or sharded)):
                break
            with accelerator.autocast():
                loss_sum, n = loss_fn(net, batch)
            if counted:
                total += loss_sum.float()
                count += n
    total, count = accelerator.reduce(torch.stack([total, count]), reduction="sum")
    model.train()
    return (total / count.clamp(min=1)).item()  # host-device sync, once per evaluation


def evaluate_during_run(accelerator: Any, model: nn.Module, loader: Any, state: TrainState, *,
                        max_batches: int = 0, loss_fn: LossFn = default_loss) -> float:
    """`evaluate_loss`, its wall time added to `state.eval_seconds` (evaluation is never training time)."""
    started = time.perf_counter()
    try:
        return evaluate_loss(accelerator, model, loader, max_batches=max_batches, loss_fn=loss_fn)
    finally:
        state.eval_seconds += time.perf_counter() - started


@contextlib.contextmanager
def _own_batches_only(loader: Any) -> Iterator[None]:
    """Accelerate pads every process's share to the same number of full batches by repeating the
    first examples (training needs it: every process must take every step); an evaluation must not
    count them twice."""
    sampler = getattr(loader, "batch_sampler", None)
    if not hasattr(sampler, "even_batches"):
        yield
        return
    old, sampler.even_batches = sampler.even_batches, False
    try:
        yield
    finally:
        sampler.even_batches = old
