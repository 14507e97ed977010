"""glibc's heap during a run: bytes in use and free inside it, and mapped, at each phase and step.

    python bench/heap_stats.py --config smollm2-quotes training.max_steps=4 \
        training.eval_every=0 logging.report=false training.output_dir=/tmp/heap training.overwrite=true

A `train.py` run (the same arguments) that prints glibc's `mallinfo2()` (summed over every arena)
whenever the memory profiler closes a phase or a step: `heap` (bytes the heap spans), `in use`,
`free` (freed chunks the heap keeps, and how many), `top` (the free chunk at the heap's end, which
glibc can hand back: `keepcost`), `mapped` (blocks at or above the mmap threshold), and the RSS.
What `process_memory.HEAP_KEPT` models: with the 2 MiB threshold (minitune's, once train.py has
restarted with glibc's thread cache off) the heap's free bytes at the end of a forward pass are RSS
beyond the tensors. Linux with glibc 2.33 or later only; needs
`logging.memory=true` (the default).
"""

from __future__ import annotations

import ctypes
import sys

import minitune.memory as memory
from minitune.cli import main_train
from minitune.process_memory import rss_bytes

MB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _printer(libc: ctypes.CDLL):
    def show(what: str) -> None:
        m = libc.mallinfo2()
        print(f"heap at {what}: RSS {rss_bytes() / MB:.0f} MiB, heap {m.arena / MB:.0f} MiB, in use "
              f"{m.uordblks / MB:.0f}, free {m.fordblks / MB:.0f} ({m.ordblks} chunks), top {m.keepcost / MB:.0f}, "
              f"mapped {m.hblkhd / MB:.0f} ({m.hblks} blocks)", flush=True)
    return show


def main() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    show = _printer(libc)
    step, phase = memory.MemoryProfiler.step, memory.MemoryProfiler.phase

    def on_step(self, n=None, *a, **k):
        show(f"step {n}")
        return step(self, n, *a, **k)

    def on_phase(self, name, *a, **k):
        show(f"phase {name}")
        return phase(self, name, *a, **k)

    memory.MemoryProfiler.step, memory.MemoryProfiler.phase = on_step, on_phase
    return main_train()


if __name__ == "__main__":
    sys.exit(main())
