"""Bring your own model, data and optimizer: `minitune.fit` with minitune's logging, memory
profiling, checkpointing and gradient accumulation.

The model here is a plain PyTorch module whose forward returns its loss; any Hugging Face model
works too (batches with `labels` get minitune's token-weighted loss). Resuming continues from the
last checkpoint with the same optimizer, scheduler, RNG and data position.

    python examples/02_own_model_data_optimizer.py [OUTPUT_DIR [STEPS]]    # STEPS more steps (20)
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

import minitune


class Regressor(nn.Module):
    """A plain module: forward(x, y) returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)


def rows(n: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = x[:, :4].sum(-1)  # a target the network can learn
    return [{"x": x[i], "y": y[i]} for i in range(n)]


out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-own-loop")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
accelerator = Accelerator(cpu=True)
model = Regressor()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
loader = DataLoader(rows(), batch_size=16, shuffle=True)  # batches are dicts of tensors
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

state = minitune.TrainState()
latest = minitune.find_latest(out)
if latest is not None:  # a second run of this script continues exactly where the first stopped
    state = minitune.load_checkpoint(latest, accelerator=accelerator, model=model, optimizer=optimizer,
                                     scheduler=scheduler)
    print(f"resuming from {latest.name} at step {state.step}")


def save(st: minitune.TrainState) -> Path:
    return minitune.save_checkpoint(out / f"checkpoint-{st.step:06d}", accelerator=accelerator, model=model,
                                    optimizer=optimizer, scheduler=scheduler, state=st, keep_last=2)


max_steps = state.step + (int(sys.argv[2]) if len(sys.argv) > 2 else 20)
profiler = minitune.MemoryProfiler(accelerator.device, phases_every=5).start()
logger = minitune.RunLogger(accelerator, out, total_steps=max_steps, progress="none", append=latest is not None)
state = minitune.fit(accelerator, model, optimizer, loader, max_steps=max_steps, scheduler=scheduler,
                     grad_accum=2, log_every=5, save_every=10, save=save, profiler=profiler, logger=logger,
                     state=state)
logger.close()
profiler.stop()
print(f"stopped at step {state.step} ({state.stop_reason}); logged losses:",
      " ".join(f"{r['loss']:.3f}" for r in logger.records))
print(f"peak memory {profiler.peak_bytes() / 2**20:.0f} MiB ({profiler.summary()['peak_label']}); "
      f"checkpoints: {sorted(p.name for p in out.glob('checkpoint-*'))}")
