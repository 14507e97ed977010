"""How much RSS the CPU matmul kernels keep per batch width (a benchmark, not a unit test).

    python bench/shape_cache.py                     # opt-125m-sized bf16 layers, 30 widths, 3 passes
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python bench/shape_cache.py

Forward and backward of a bf16 768->3072 linear, a 768->50272 output layer and a float32 LoRA-like
768->16 matrix (opt-125m's shapes) for 30 input widths, three passes over the same widths, with
minitune's malloc settings (`tune_malloc`). RSS grows on the first pass (a cache keyed by shape:
oneDNN's primitives and kernels) and stays flat on the later ones, where every width repeats.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from minitune.process_memory import tune_malloc  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    print(tune_malloc())
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 3072).to(torch.bfloat16).requires_grad_(False)
    head = torch.nn.Linear(768, 50272, bias=False).to(torch.bfloat16).requires_grad_(False)
    lora = torch.nn.Parameter(torch.zeros(16, 768))
    widths = list(range(40, 280, 8))
    start = rss_mb()
    for n in range(3):
        for m in widths:
            x = torch.randn(m, 768, dtype=torch.bfloat16, requires_grad=True)
            (lin(x).float().sum() + head(x).float().sum() + (x.float() @ lora.T).sum()).backward()
        grown = rss_mb() - start
        print(f"pass {n + 1} over {len(widths)} widths: RSS +{grown:.0f} MiB since the start"
              + (f" ({grown / len(widths):.2f} MiB per width)" if n == 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
