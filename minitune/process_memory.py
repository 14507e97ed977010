"""What the operating system sees of a run: the process, not only its tensors.

Two things live here, the one place for each:

1. `tune_malloc()`: the C allocator's settings, applied once when a run starts. PyTorch's CPU
   allocator takes every tensor from glibc's malloc. By default glibc raises its mmap threshold
   each time a large block is freed (up to 32 MiB), so after the first steps the tensors of
   variable-size batches come from the heap, and freed heap memory that is not at its top is kept,
   not returned: RSS grows step after step by what malloc caches, not by what training holds.
   `mallopt` (through ctypes) fixes the threshold from inside the process. Tensors at or above it
   get their own mapping, zero-filled by the kernel page by page when first written (page faults,
   every step) and returned when freed; smaller ones reuse heap memory.
   minitune's setting (`malloc_mode`): a 2 MiB threshold with glibc's per-thread cache (tcache)
   off, "heap". The tcache holds small freed chunks that the heap cannot merge with their free
   neighbours, and hands them to small allocations that stay alive: the holes they pin made the heap
   grow step after step (an 8-bit gpt-neo-125m: 483 MiB of heap after 6 steps with it off, 702 with
   it on, growing; bench/results/default-job-speed-cpu-2026-12-05.md). Its fast bins are off too
   (`mallopt(M_MXFAST, 0)`): small chunks freed into them merge with the heap's free top only when a
   later malloc of 1 KiB or more consolidates them, a path that never trims the top, so RSS kept up
   to 220 MiB of free top after one step in five (the default job); without them each free next to
   the top merges and trims at once, down to a 64 MiB pad (`TOP_PAD`) that the next step grows into
   without page faults (`python bench/heap_stats.py`: the top 64 MiB after every step, the RSS flat
   to 1 MiB; with no pad, 9% slower steps). The tcache is a start-up
   tunable (GLIBC_TUNABLES), so the command-line entry points restart themselves with it once
   (`restart_with_malloc_env`); a process that did not start with it (minitune embedded in yours)
   gets "lean", a fixed 128 KiB threshold: RSS follows the tensors, at the page faults' cost (the
   default job: 1.5x the training time; bench/results/default-job-speed-cpu-2026-12-05.md).
   MINITUNE_MALLOC=lean asks for that anywhere; MINITUNE_MALLOC=default leaves glibc as it is
   (beyond what `process_peak` predicts).
   `release_free_memory()` (`malloc_trim`) hands back what loading freed (file buffers, fp32 copies).

2. `process_peak(kind, tensors, baseline, loading)`: the peak the operating system (or driver) will
   see, as named byte terms and their sum:
       CPU, MPS  baseline            RSS before the model loads: Python, torch, the tokenizer, the data
                 tensors             the allocator's training peak (the planner's prediction)
                 allocator_overhead  what the process holds beyond its tensors at the peak (malloc
                                     headers and page rounding, the math libraries' buffers)
                 loading_above_training  where loading the model holds more than training will
                                     (`planner.loading.load_peak`: a quantized build, a GGUF file,
                                     a file converted; with the allocator's overhead on it, as on
                                     training's tensors): the difference, so the sum is the higher peak
       CPU also  malloc_heap         what glibc's heap keeps beyond the tensors at the peak: a fixed
                                     part and a share of the step's transient tensors (`heap_kept`)
       CUDA      tensors + cuda_context (a flat 1 GiB for the context, cuBLAS workspaces and the
                 caching allocator's unused blocks: not modelled term by term yet)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass, field

from .errors import MinituneError
from .rss import rss_bytes

__all__ = ["ProcessPeak", "format_bytes", "heap_kept", "malloc_env", "malloc_mode", "malloc_setting", "process_peak",
           "release_free_memory", "restart_with_malloc_env", "tune_malloc"]

KiB, MiB, GiB = 2**10, 2**20, 2**30

# glibc's mallopt parameters (malloc.h)
_M_MXFAST = 1
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# malloc_mode() -> glibc's mmap threshold, fixed: tensors at or above it get their own mapping,
# returned when freed; smaller ones come from the heap, whose reuse spares their page faults (the
# default job, 30 steps, the threshold fixed through glibc's own variable: 128 tokens/s at 256 KiB,
# 133 at 512 KiB, 182 at 1 MiB, 228 at 2 MiB; bench/results/malloc-cpu-2026-12-05.md).
#   heap    2 MiB, with the tcache off (TCACHE_OFF at start-up), the fast bins off and a 64 MiB top
#           pad: the heap keeps freed memory for the next step (`heap_kept`), in holes that no
#           longer grow, and a free top of at most TOP_PAD between steps
#   lean    128 KiB (glibc's starting value): RSS follows the tensors, each step paying page faults
MMAP_THRESHOLDS = {"lean": 128 * KiB, "heap": 2 * MiB}
TCACHE_OFF = "glibc.malloc.tcache_count=0"  # a GLIBC_TUNABLES item: read by glibc at process start only
TRIM_THRESHOLD = 128 * KiB  # free heap top above this goes back to the system (glibc's default)...
TOP_PAD = 64 * MiB  # ...down to this much, in 'heap': what the next step grows the heap into without page faults
# (blocks above the mmap threshold are cut from it too while it lasts): at most this much RSS beyond the heap's use

# CPU/MPS: beyond its tensors a process holds, at its peak, malloc's headers and page rounding and
# the math libraries' (oneDNN, BLAS) buffers and kernel caches: a fixed part and a small share of
# the tensors. Fitted on CPU runs with `tune_malloc` on, loading and steps 1-2 (2026-12-04: tiny-llama
# and tiny-opt, 3 steps: 22 and 0 MiB beyond baseline + tensors; opt-125m bf16 LoRA: 24 MiB; the
# default job's step 1: below baseline + tensors). Not in it: the kernels' per-shape cache, which
# grows with each new batch width after that (about 3 MiB a width on opt-125m, bench/shape_cache.py).
OVERHEAD_FIXED = 24 * MiB
OVERHEAD_FRACTION = 0.02
# CPU: glibc's heap at the peak holds, beyond the live tensors, freed chunks it keeps for reuse:
# holes left between chunks still alive (`python bench/heap_stats.py --config smollm2-quotes
# training.max_steps=4` prints the heap's bytes in use and free per phase). Modelled per
# `malloc_mode` as a fixed part and a share of the step's transient tensors (activations, logits,
# temporaries). 'heap' fitted (largest error of the process peak) on what the RSS held beyond
# baseline + tensors + overhead with the thread cache off, in the 18 CPU grid cells (`python
# bench/memory_grid.py --parts grid --name cpu-2026-12-05-blockwise`: 17-108 MiB, for 22 to 2,940 MiB
# of transient tensors), the 5 configs outside it (`python bench/plan_check.py --parts outside`:
# 35-122 MiB) and the default job's steps 1-2 (`make train`: 68 MiB for 812): every one within 3%.
# (Fitted before on the same runs while the allocator trace kept an event per operator and a
# quantized preset loaded through its whole fp32 build: 130 MiB + 0.1.) With the 128 KiB threshold
# the overhead above needs nothing more.
HEAP_KEPT = {"lean": (0, 0.0), "heap": (48 * MiB, 0.075)}
CUDA_CONTEXT = GiB  # the CUDA context, cuBLAS workspaces and the caching allocator's unused blocks

_tuned: str | None = None


MB = 2**20


def format_bytes(n: float) -> str:
    """Human-readable size: '812.4 MiB', '3.21 GiB'."""
    n = float(n)
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= MB:
        return f"{n / MB:.1f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError off glibc: musl has no mallopt knobs we want)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc() -> str:
    """Fix glibc's mmap and trim thresholds for this process, as `malloc_mode` says (once; later
    calls return the same).

    Returns:
        What was done, for the run's start-up lines: the settings, or why nothing changed (not glibc,
        or MINITUNE_MALLOC=default).
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    libc = _glibc()
    mode = malloc_mode()
    if mode == "glibc":
        _tuned = ("glibc defaults kept (MINITUNE_MALLOC=default): RSS stays at the heap's high-water mark, "
                  "which the predicted process peak does not include")
    elif libc is None:
        _tuned = "unchanged (not glibc)"
    elif (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLDS[mode])
          and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
          and (mode != "heap" or (libc.mallopt(_M_MXFAST, 0) and libc.mallopt(_M_TOP_PAD, TOP_PAD)))):
        _tuned = f"glibc mmap threshold fixed at {MMAP_THRESHOLDS[mode] // KiB} KiB, trim threshold {TRIM_THRESHOLD // KiB} KiB"
        if mode == "heap":
            _tuned += f", thread cache and fast bins off, top pad {TOP_PAD // MiB} MiB"
        elif malloc_setting():
            _tuned += f" (MINITUNE_MALLOC={malloc_setting()})"
        else:
            _tuned += (f" (this process did not start with GLIBC_TUNABLES={TCACHE_OFF}, so not the faster 2 MiB: "
                       "train.py, minitune-train and minitune set it themselves)")
    else:
        _tuned = "unchanged (mallopt refused)"
    return _tuned


def malloc_setting() -> str:
    """MINITUNE_MALLOC from the environment: '' (unset: minitune's settings), 'lean' or 'default'.

    Raises:
        MinituneError: any other value (named, with the ones there are).
    """
    value = os.environ.get("MINITUNE_MALLOC", "").strip().lower()
    if value == "fast":
        raise MinituneError("MINITUNE_MALLOC=fast is gone: its 2 MiB threshold is minitune's own setting now, with "
                            "glibc's thread cache off so that the heap stops growing; unset MINITUNE_MALLOC")
    if value not in ("", "lean", "default"):
        raise MinituneError(f"MINITUNE_MALLOC={value!r} is not a malloc setting: unset it (minitune's: 2 MiB mmap "
                            "threshold, thread cache off), or set it to 'lean' (128 KiB: the least RSS, slower "
                            "steps) or 'default' (glibc's own)")
    return value


def _tcache_off(env: dict | os._Environ) -> bool:
    return any(item.strip() == TCACHE_OFF for item in env.get("GLIBC_TUNABLES", "").split(":"))


def malloc_mode() -> str:
    """How this process's allocator is set for a run: 'heap' (2 MiB mmap threshold, thread cache
    off: MINITUNE_MALLOC unset and the process started with GLIBC_TUNABLES holding TCACHE_OFF),
    'lean' (128 KiB: MINITUNE_MALLOC=lean, or unset in a process started without it) or 'glibc'
    (MINITUNE_MALLOC=default: glibc's own).

    Raises:
        MinituneError: a MINITUNE_MALLOC value there is none of.
    """
    setting = malloc_setting()
    if setting == "default":
        return "glibc"
    return "heap" if not setting and _tcache_off(os.environ) else "lean"


def malloc_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with what a process started with it needs for minitune's malloc setting: GLIBC_TUNABLES
    with the thread cache off, unless MINITUNE_MALLOC is set, glibc is not in use, or GLIBC_TUNABLES
    already says how big the thread cache is (yours is kept)."""
    if (env.get("MINITUNE_MALLOC", "").strip() or _glibc() is None
            or "glibc.malloc.tcache_count" in env.get("GLIBC_TUNABLES", "")):
        return dict(env)
    tunables = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TCACHE_OFF]))
    return {**env, "GLIBC_TUNABLES": tunables}


def restart_with_malloc_env() -> None:
    """Replace this process by itself (same command line, same PID) started with `malloc_env`, if
    that changes the environment; else return. For command-line entry points, before anything
    heavy is imported: glibc reads GLIBC_TUNABLES only at start-up. If the restart fails, the run
    goes on with the 128 KiB threshold ('lean')."""
    env = malloc_env(dict(os.environ))
    argv = getattr(sys, "orig_argv", None)
    if env == dict(os.environ) or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.execve(sys.executable, [argv[0], *argv[1:]], env)


def release_free_memory() -> None:
    """Return malloc's free memory to the system (glibc `malloc_trim`); nothing elsewhere. Cheap
    (a walk over the free lists): called after loading, which frees large temporaries."""
    libc = _glibc()
    if libc is not None and malloc_mode() != "glibc":
        libc.malloc_trim(0)


@dataclass
class ProcessPeak:
    """The predicted peak of the whole process, as named byte terms (`total` is their sum)."""

    kind: str  # 'cpu', 'mps' or 'cuda'
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def describe(self) -> str:
        """'1.21 GiB = baseline 640.0 MiB + tensors 389.2 MiB + allocator_overhead 102.9 MiB'."""
        return (f"{format_bytes(self.total)} = "
                + " + ".join(f"{name} {format_bytes(v)}" for name, v in self.terms.items()))

    def to_dict(self) -> dict[str, object]:
        return {"process_peak": self.total, "process_terms": dict(self.terms)}


def allocator_overhead(tensors: int) -> int:
    """CPU/MPS: what the process holds beyond `tensors` bytes of tensors at its peak (see
    OVERHEAD_FIXED, OVERHEAD_FRACTION)."""
    return int(OVERHEAD_FIXED + OVERHEAD_FRACTION * tensors)


def heap_kept(transient: int) -> int:
    """CPU: what glibc's heap keeps beyond the tensors at the peak of a step whose transient tensors
    are `transient` bytes, under this process's `malloc_mode` (HEAP_KEPT; glibc's own settings:
    as 'heap', which is below what they keep). 0 off glibc or without a step."""
    if not transient or _glibc() is None:
        return 0
    fixed, share = HEAP_KEPT.get(malloc_mode(), HEAP_KEPT["heap"])
    return int(fixed + share * transient)


def process_peak(kind: str, tensors: int, *, baseline: int | None = None,
                 cuda_terms: dict[str, int] | None = None, loading: int = 0, transient: int = 0) -> ProcessPeak:
    """The peak the operating system (CPU, MPS: RSS, unified memory) or the driver (CUDA) will see.

    Args:
        kind: 'cpu', 'mps' or 'cuda' (any other is treated as 'cpu').
        tensors: the allocator's predicted peak (`planner.Prediction.total`).
        baseline: CPU/MPS: RSS before the model loads (default: this process's RSS now, which is
            what a run measures when it has imported its libraries, tokenizer and data).
        cuda_terms: CUDA: the simulation's process terms (`planner.Prediction.cuda`, from
            `cuda_memory.cuda_process_terms`: context, cuBLAS workspaces, tensors in blocks, the caching
            allocator's reserve); without them the tensors plus a flat CUDA_CONTEXT.
        loading: CPU/MPS: what loading the model holds at its peak, above the baseline
            (`planner.loading.load_peak`; 0: not known). On CUDA the model loads in host memory.
        transient: CPU: the step's own tensors at the peak (activations, logits, temporaries:
            what is freed and allocated again every step), from which `heap_kept` predicts what
            glibc's heap keeps beyond the tensors.

    Returns:
        The ProcessPeak with its terms.
    """
    if kind == "cuda" and cuda_terms:
        return ProcessPeak(kind, {k: int(v) for k, v in cuda_terms.items()})
    if kind == "cuda":
        return ProcessPeak(kind, {"tensors": int(tensors), "cuda_context": CUDA_CONTEXT})
    base = rss_bytes() if baseline is None else int(baseline)
    terms = {"baseline": base, "tensors": int(tensors), "allocator_overhead": allocator_overhead(tensors)}
    heap = heap_kept(transient) if kind == "cpu" else 0
    if heap:
        terms["malloc_heap"] = heap
    training = sum(terms.values()) - base
    # loading's tensors with the allocator's overhead, as training's: quantizing layer by layer goes
    # through glibc's heap (bench/results/cpu-2026-12-05-blockwise.md: loading's peak is below the
    # training's in every cell since a quantized preset is made block by block)
    loaded = int(loading) + allocator_overhead(loading) if loading else 0
    if loaded > training:
        terms["loading_above_training"] = loaded - training
    return ProcessPeak(kind, terms)
