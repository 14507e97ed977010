"""The ledger: a dispatch mode that sees every storage a simulated step creates, from allocation to
release, and counts it by role (weights, adapters, gradients, optimizer state, activations,
logits/loss, temporaries) and by phase; and the FLOPs of every operation torch has a formula for."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
ROLES = ("adapters", "trainable weights", "gradients", "optimizer_state", "activations", "logits/loss", "temporaries")


class Ledger(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive, by role, and the peaks (overall and per phase).

    Storages are keyed weakly: a storage leaves the count when torch frees it. `granule` rounds each
    allocation up (512 bytes: the CUDA caching allocator's smallest block). Two operations have
    data-dependent results and are answered without data: `nonzero` (the micro-batch's number of
    target positions, given in `targets`; every position when unknown) and reading a scalar (`.item()`: True for booleans, so masks are taken as all ones, 1 otherwise).

    `flops` sums the FLOPs of the operations it sees by torch's own formulas
    (`torch.utils.flop_counter.flop_registry`: matmuls, convolutions, the CUDA attention kernels),
    and the CPU attention kernel's by the same formula as CUDA's flash kernel. Unlike
    `FlopCounterMode`, it never decomposes an operation to count it: the simulated step runs (and
    allocates) exactly as it would uncounted.
    """

    def __init__(self, granule: int = 1, *, fake: bool = True, trace: bool = False) -> None:
        super().__init__()
        self.granule, self.fake = granule, fake
        # with `trace`: every allocation `(key, nbytes)` and release `(key, None)` in order, for the
        # CUDA caching allocator's replay (`cuda_memory.cuda_process_terms`)
        self.trace: list[tuple[int, int | None]] | None = [] if trace else None
        self._keys = itertools.count()
        self.targets: int | None = None  # positions with a target in the current micro-batch (None: all)
        self.all_real = True  # what a boolean read answers: "the attention mask is all ones" (no padding)
        self.role = "activations"
        self.phase = "setup"
        self.live = 0
        self.by_role: dict[str, int] = {}
        self.peak = 0
        self.peak_phase = "setup"
        self.peak_roles: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self.flops = 0
        self._info: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def count(self, t: torch.Tensor, role: str | None = None) -> None:
        """Add `t`'s storage under `role` (the current one by default) unless it is counted already."""
        st = t.untyped_storage()
        if st in self._info:
            return
        size = -(-st.nbytes() // self.granule) * self.granule
        entry = [size, role or self.role]
        trace, key = self.trace, next(self._keys)
        if trace is not None:
            trace.append((key, st.nbytes()))

        def release(_ref: Any, entry: list = entry) -> None:
            self.live -= entry[0]
            self.by_role[entry[1]] = self.by_role.get(entry[1], 0) - entry[0]
            if trace is not None:
                trace.append((key, None))

        self._info[st] = (entry, weakref.ref(st, release))
        self.live += size
        self.by_role[entry[1]] = self.by_role.get(entry[1], 0) + size
        self._mark()

    def relabel(self, t: torch.Tensor, role: str) -> None:
        """Move `t`'s storage to `role` (gradients once accumulated, optimizer state once created)."""
        st = t.untyped_storage()
        if st not in self._info:
            self.count(t, role)
            return
        entry = self._info[st][0]
        self.by_role[entry[1]] -= entry[0]
        entry[1] = role
        self.by_role[role] = self.by_role.get(role, 0) + entry[0]

    def _mark(self) -> None:
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.live)
        if self.live >= self.peak:  # ties: the later moment, when optimizer state has its own label
            self.peak, self.peak_phase, self.peak_roles = self.live, self.phase, dict(self.by_role)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.fake and func is torch.ops.aten.nonzero.default:
            x = args[0]  # the loss's selection of target positions: this micro-batch's count, once
            n = x.numel() if self.targets is None else min(x.numel(), self.targets)
            self.targets = None
            out = torch.empty((n, x.dim()), dtype=torch.long, device=x.device)
        elif self.fake and func is torch.ops.aten._local_scalar_dense.default:
            return self.all_real if args[0].dtype == torch.bool else 1
        else:
            out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.count, out)
        self.flops += _flops(func, args, kwargs or {}, out)
        return out


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """The FLOPs of one operation: torch's formula where it has one; CPU attention as flash attention."""
    packet = func._overloadpacket
    if packet in flop_registry:
        return flop_registry[packet](*args, **kwargs, out_val=out)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:  # (query, key, value, ...)
        return sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:  # (grad_out, query, key, value, ...)
        return sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape)
    return 0
