"""Only the memory profiler, inside a plain PyTorch loop that knows nothing else of minitune.

`minitune.memory` imports only torch and the standard library. Each `step()` returns a flat dict
(units in the key names; peaks are since the previous call); `table()` is the end-of-run summary.

    python examples/04_memory_profiler_only.py [OUTPUT_DIR]
"""

import sys
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from minitune.memory import MemoryProfiler, tensor_breakdown

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-profiler")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

with MemoryProfiler(device, phases_every=2) as profiler:
    profiler.phase("model loaded")
    for step in range(1, 7):
        x = torch.randn(256, 512, device=device)
        loss = model(x).pow(2).mean()
        if profiler.want_phases(step):
            profiler.phase("forward")
        loss.backward()
        if profiler.want_phases(step):
            profiler.phase("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = profiler.step(step)  # {'mem/rss_mb': ..., 'mem/peak_rss_mb': ...} on CPU
        print(step, {k: round(v, 1) for k, v in record.items()})

# weights, gradients (counted even though zero_grad freed them) and AdamW state, computed from the tensors
profiler.breakdown = tensor_breakdown(model, optimizer, profiler.peak_bytes(above_baseline=True), assume_grads=True)
Console(width=100).print(profiler.table())
profiler.save(out / "memory.json")
