"""`TrainState`: the counters of a run, which checkpoints save so that a resumed run continues exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Counters of a run; saved in checkpoints, so a resumed run continues exactly."""

    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # micro-batches processed
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tokens: int = 0  # real (non-padding) input tokens seen
    skipped_steps: int = 0  # steps skipped for a non-finite loss/gradient or an fp16 overflow
    scaler_skips: int = 0  # of those, fp16 GradScaler overflows (the scaler lowers its scale and goes on)
    bad_streak: int = 0  # consecutive non-finite steps
    stop_reason: str = ""  # '', 'max_steps', 'signal', 'callback', 'nonfinite'
    last: dict = field(default_factory=dict)  # the last logged metrics
    eval_losses: list = field(default_factory=list)  # (step, loss)
    # Sums since the last log, filled in only when saving: a run resumed between two logs logs the
    # same loss and token counts as the uninterrupted one.
    pending_loss_sum: float = 0.0
    pending_loss_items: float = 0.0
    pending_tokens: int = 0
    # Wall time (whole run, resumed sessions included): in training steps (the loop less its
    # evaluations and checkpoint saves; see `_Clock`), and in evaluations (the final one included).
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The counters as a JSON-able dict (what checkpoints store in trainer_state.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, counters: dict[str, Any]) -> TrainState:
        """A TrainState from `to_dict()` output; extra keys (e.g. a checkpoint's num_processes) are ignored."""
        return cls(**{k: v for k, v in counters.items() if k in cls.__dataclass_fields__})
