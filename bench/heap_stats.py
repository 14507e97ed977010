"""glibc's heap during a run: bytes in use and free inside it, and mapped, at each phase and step.

    python bench/heap_stats.py --config smollm2-quotes training.max_steps=4 \
        training.eval_every=0 logging.report=false training.output_dir=/tmp/heap training.overwrite=true
    python bench/heap_stats.py --cell '{"model":"opt-125m","quant":"4bit"}'   # one memory-grid cell

A `train.py` run (the same arguments), or one cell of the memory grid (`bench/cell.py`, the spec as
there), that prints glibc's `mallinfo2()` (summed over every arena) whenever the memory profiler
closes a phase or a step: `heap` (bytes the heap spans), `in use`, `free` (freed chunks the heap
keeps, and how many), `top` (the free chunk at the heap's end, which glibc can hand back:
`keepcost`), `mapped` (blocks at or above the mmap threshold), the main heap's resident bytes
(`[heap]` in /proc/self/smaps: what of its span the process holds in RAM; of its free chunks, those
touched since the last `malloc_trim`), the RSS and its file-backed part (`RssFile`: library code
paged in). A cell ends with its peak RSS above the baseline
against the allocator's training peak (the memory grid's "RSS / allocator" column).
What `process_memory.HEAP_KEPT` models: with the 2 MiB threshold (minitune's, once train.py has
restarted with glibc's thread cache off; `--cell` restarts itself the same way) the heap's free bytes
at the end of a forward pass are RSS beyond the tensors. Linux with glibc 2.33 or later only; needs
`logging.memory=true` (the default).
"""

from __future__ import annotations

import ctypes
import json
import sys

import minitune.memory as memory
from minitune.cli import main_train
from minitune.process_memory import restart_with_malloc_env, tune_malloc
from minitune.rss import rss_bytes

MB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_resident_bytes() -> int:
    """Resident bytes of the main heap (the `[heap]` mapping of /proc/self/smaps); 0 if none."""
    resident, in_heap = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].endswith(":"):  # a mapping's header line: range, perms, ..., name
                in_heap = fields[-1] == "[heap]"
            elif in_heap and fields[0] == "Rss:":
                resident += int(fields[1]) * 1024
    return resident


def file_backed_bytes() -> int:
    """This process's file-backed resident bytes (`RssFile` in /proc/self/status): library code and
    data paged in, which the heap does not hold."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


def _printer(libc: ctypes.CDLL):
    def show(what: str) -> None:
        m = libc.mallinfo2()
        print(f"heap at {what}: RSS {rss_bytes() / MB:.0f} MiB, heap {m.arena / MB:.0f} MiB, in use "
              f"{m.uordblks / MB:.0f}, free {m.fordblks / MB:.0f} ({m.ordblks} chunks), top {m.keepcost / MB:.0f}, "
              f"mapped {m.hblkhd / MB:.0f} ({m.hblks} blocks), main heap resident {heap_resident_bytes() / MB:.0f}, "
              f"file-backed {file_backed_bytes() / MB:.0f}",
              flush=True)
    return show


def _run_cell(spec: str) -> int:
    import cell  # bench/cell.py, beside this file

    tune_malloc()  # as a run does, and as bench/cell.py's main does
    result = cell.run_cell(json.loads(spec))
    if result.get("status") != "ok":
        print(f"error: the cell did not run: {result.get('status')}: {result.get('error', '')}", file=sys.stderr)
        return 2
    above, peak = result["rss_peak_all_mb"], result["peak_train_mb"]
    print(f"peak RSS above the baseline {above:.1f} MiB, allocator's training peak {peak:.1f} MiB: "
          f"{above / peak:.2f}x; {result['step_s']:.2f} s a step")
    return 0


def main(argv: list[str]) -> int:
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
    if argv[:1] == ["--cell"]:
        if len(argv) != 2:
            print("error: --cell takes one cell spec, as JSON: --cell '{\"model\":\"opt-125m\",\"quant\":\"4bit\"}'",
                  file=sys.stderr)
            return 2
        restart_with_malloc_env()  # glibc's thread cache off, as train.py has it (replaces this process once)
        return _run_cell(argv[1])
    return main_train()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
