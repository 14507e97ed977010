"""What a CUDA training process holds beyond its tensors, predicted from the planner's simulation.

    terms = cuda_process_terms(trace, capability=(7, 5))   # trace: `planner.ledger.Ledger.trace`
    process_peak = sum(terms.values())

The planner's peak is what `torch.cuda.max_memory_allocated` reports: the bytes tensors hold. The
driver sees more (what `nvidia-smi` and `torch.cuda.mem_get_info` show for the process):

- `cuda_context`: the CUDA context and the kernel modules loaded into it. Its size depends on the
  GPU, the driver and which kernels run, and cannot be derived from a config. The figure used
  (`context_bytes`) is, on Hopper (compute capability 9.x), the one `bench/gpu_check.py` read with
  `torch.cuda.mem_get_info` right after creating the context: 527 MiB on an H200 and on an H100
  (torch 2.11+cu130, driver 580; bench/results/gpu-2026-12-04.md and gpu-2026-12-05.md);
  elsewhere, PyTorch's own measurement of a context created with lazy module loading, which torch
  turns on by default (pytorch/pytorch#86509: 287,047,680 bytes, against 666,632,192 with eager
  loading). Plus `MODULE_ALLOWANCE` for the kernels a training step loads (cuBLAS, the optimizer's,
  bitsandbytes'): 384 MiB, from what one small job's process showed beyond its context after
  training on an H100 (392 MiB); which kernels a job loads is not modelled. `bench/gpu_check.py
  --parts process` measures the context and the kernels of two jobs.
- `cublas_workspace`: cuBLAS's workspace, one per (handle, stream). torch allocates it through the
  caching allocator (so `max_memory_allocated` counts it): by default 32 MiB on compute capability
  9.x / 10.x / 12.x and 2 x 4096 KiB + 8 x 16 KiB elsewhere (`aten/src/ATen/cuda/CublasHandlePool.cpp`,
  `parseChosenWorkspaceSize`; cuBLASLt shares it: `TORCH_CUBLASLT_UNIFIED_WORKSPACE`). Handles are
  per thread, and autograd runs CUDA backward passes on its own device thread: two workspaces.
- `allocator_cache`: what the caching allocator holds in reserve at its peak (`max_memory_reserved`
  minus `max_memory_allocated`), found by replaying every allocation and release of the simulated
  steps through a model of `c10/cuda/CUDACachingAllocator.cpp` (`CachingAllocatorModel`).
- `tensors`: the tensors' own peak, each rounded up to the allocator's 512-byte blocks.

The four add up to the process's peak on the device. Not modelled: several CUDA streams (one is
assumed), `PYTORCH_CUDA_ALLOC_CONF` settings (`expandable_segments`, `max_split_size_mb`,
`roundup_power2_divisions`), memory of other processes, and NCCL buffers.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CONTEXT_BYTES", "HOPPER_CONTEXT_BYTES", "MODULE_ALLOWANCE", "AllocatorStats", "CachingAllocatorModel",
           "context_bytes", "cublas_workspace_bytes", "cuda_process_terms", "replay"]

KiB, MiB = 2**10, 2**20

# c10/cuda/CUDACachingAllocator.cpp (the same constants since torch 1.x; torch 2.x moved them to
# c10/core/AllocatorConfig.h unchanged)
MIN_BLOCK = 512  # kMinBlockSize: every size is rounded up to a multiple of 512 bytes
SMALL_SIZE = 1 * MiB  # kSmallSize: requests up to 1 MiB use the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small-pool segments are 2 MiB
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: requests between 1 and 10 MiB get a 20 MiB segment
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests get a segment rounded up to 2 MiB

CONTEXT_BYTES = 287_047_680  # pytorch/pytorch#86509: a context with CUDA_MODULE_LOADING=LAZY
HOPPER_CONTEXT_BYTES = 527 * MiB  # measured on an H100 and an H200 (torch 2.11+cu130, driver 580)
# kernels loaded while training: the tiny 8-bit job of bench/gpu_check.py's `process` part read 392 MiB
# beyond its context after training on an H100 (the allocator's cache emptied by then; 468 MiB on an H200
# with the code of 2026-12-04): a floor from one small job, not a model of which kernels load
MODULE_ALLOWANCE = 384 * MiB


def round_size(nbytes: int) -> int:
    """The block size the allocator serves a request of `nbytes` with (`round_size`)."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else MIN_BLOCK * -(-nbytes // MIN_BLOCK)


def segment_size(size: int) -> int:
    """The cudaMalloc the allocator makes when no cached block fits `size` (`get_allocation_size`)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


def context_bytes(capability: tuple[int, int]) -> int:
    """The CUDA context of a GPU of compute capability `capability`, before any kernel is loaded."""
    return HOPPER_CONTEXT_BYTES if capability[0] == 9 else CONTEXT_BYTES


def cublas_workspace_bytes(capability: tuple[int, int]) -> int:
    """torch's default cuBLAS workspace for a GPU of compute capability `capability`."""
    return 4096 * KiB * 8 if capability[0] in (9, 10, 12) else 4096 * KiB * 2 + 16 * KiB * 8


class _Block:
    __slots__ = ("addr", "free", "next", "prev", "size", "small")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr, self.size, self.small = addr, size, small
        self.free = True
        self.prev: _Block | None = None
        self.next: _Block | None = None


@dataclass
class AllocatorStats:
    """What torch.cuda's statistics would read after the replay (bytes)."""

    allocated: int  # memory_allocated: blocks handed out, rounded
    reserved: int  # memory_reserved: segments obtained from cudaMalloc
    peak_allocated: int  # max_memory_allocated
    peak_reserved: int  # max_memory_reserved
    segments: int  # cudaMalloc calls made (none are returned: no memory pressure is modelled)


class CachingAllocatorModel:
    """PyTorch's CUDA caching allocator, one stream, default settings, as a replay of sizes.

    The policy modelled (`DeviceCachingAllocator::malloc` / `free`): a request is rounded to 512
    bytes and served from the small pool (<= 1 MiB) or the large pool; the smallest cached free
    block that fits is taken (ties: the lowest address); if none fits, a new segment is obtained
    (`segment_size`). A block larger than the request is split when the rest is >= 512 bytes (small
    pool) or > 1 MiB (large pool); otherwise the whole block is handed out (internal waste). A freed
    block merges with free neighbours of its segment and stays cached: reserved memory never
    shrinks here. The fragmentation this predicts is exactly what that policy produces on the
    simulated order of allocations; real address order, other streams and memory pressure (when
    torch frees unsplit cached segments and retries a failed cudaMalloc) are not modelled.
    """

    def __init__(self) -> None:
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # small?: (size, addr, block)
        self._live: dict[int, _Block] = {}
        self._next_addr = 0
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = self.segments = 0

    def _add_free(self, block: _Block) -> None:
        block.free = True
        bisect.insort(self._free[block.small], (block.size, block.addr, block))

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, (block.size, block.addr))
        assert pool[i][2] is block, "allocator model: free list out of order"
        del pool[i]

    def malloc(self, key: int, nbytes: int) -> None:
        """Serve a request of `nbytes` for the tensor storage `key`."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:  # cudaMalloc a new segment
            seg = segment_size(size)
            block = _Block(self._next_addr, seg, small)
            self._next_addr += seg + MIN_BLOCK  # segments never touch: no merging across them
            self.reserved += seg
            self.segments += 1
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        rest = block.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):  # should_split
            tail = _Block(block.addr + size, rest, small)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._add_free(tail)
        block.free = False
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        """Release the storage `key` (unknown keys are ignored: storages made before the trace)."""
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        for other in (block.prev, block.next):  # try_merge_blocks
            if other is not None and other.free:
                self._remove_free(other)
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next is not None:
                        block.next.prev = other
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
        self._add_free(block)

    def stats(self) -> AllocatorStats:
        return AllocatorStats(self.allocated, self.reserved, self.peak_allocated, self.peak_reserved, self.segments)


def replay(trace: Iterable[tuple[int, int | None]], model: CachingAllocatorModel | None = None) -> AllocatorStats:
    """Replay `(key, nbytes)` events (an allocation of `nbytes`; `nbytes` None: the release of `key`)."""
    model = model or CachingAllocatorModel()
    for key, nbytes in trace:
        if nbytes is None:
            model.free(key)
        elif nbytes > 0:  # torch serves empty tensors without a block
            model.malloc(key, nbytes)
    return model.stats()


def cuda_process_terms(trace: Iterable[tuple[int, int | None]], *, capability: tuple[int, int] = (8, 0),
                       workspaces: int = 2, context: int | None = None) -> dict[str, int]:
    """The parts of a CUDA training process's peak device memory (bytes); they add up to it.

    Args:
        trace: the simulated run's allocations and releases in order, `(key, nbytes)` for an
            allocation and `(key, None)` for a release (`planner.ledger.Ledger(trace=True).trace`).
        capability: the GPU's compute capability (sets cuBLAS's workspace size).
        workspaces: cuBLAS workspaces alive (2: the main thread's and autograd's device thread's).
        context: the CUDA context's bytes (default: `context_bytes(capability)` + `MODULE_ALLOWANCE`;
            see the module docstring).

    Returns:
        {"cuda_context", "cublas_workspace", "tensors", "allocator_cache"}: the context; the
        workspaces; the tensors' peak in 512-byte blocks; reserved but unallocated bytes at the
        reserved peak (`max_memory_reserved - max_memory_allocated`).
    """
    ws = cublas_workspace_bytes(capability)
    events = itertools.chain(((-1 - i, ws) for i in range(workspaces)), trace)  # allocated at the first matmul
    stats = replay(events)
    workspace = workspaces * round_size(ws)
    context = context_bytes(capability) + MODULE_ALLOWANCE if context is None else context
    return {"cuda_context": context, "cublas_workspace": workspace, "tensors": stats.peak_allocated - workspace,
            "allocator_cache": stats.peak_reserved - stats.peak_allocated}
