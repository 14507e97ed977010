"""Will it fit? The peak memory of a training step, predicted from the config alone.

    minitune plan --config bloom --device T4            # or: python train.py --config bloom --plan --device T4
    minitune plan --config bloom --budget 12GiB --json

How the prediction is made: the model is built on the meta device the way `build.setup_model`
builds it (the transformers class from its config, bitsandbytes layers placed by transformers' own
quantizer, frozen base, fp32 norms, gradient checkpointing, LoRA by peft), its tensors are replaced
by fake tensors (shapes and dtypes, no data: torch's `FakeTensorMode`), and two optimizer steps of
the configured loss and optimizer run on them, at the precision the device would use. A dispatch
mode (`_Ledger`) sees every tensor every operation creates and counts its storage from allocation
to release, by role: weights by dtype, adapters (trainable weights), gradients, optimizer state,
activations (made in the forward pass), logits/loss (made by the output layer and loss), and
temporaries (made in backward and in the optimizer step). No weights are read and nothing is
downloaded: a hub id that is not in the local cache is planned from the preset with its shapes.

Two things run inside kernels where a dispatch mode cannot see them, and are stood in for, as
they run on the planned device: bitsandbytes layers (4-bit: the weight dequantized to the input
dtype in forward and again in backward; 8-bit: on CUDA the LLM.int8() kernels' int8, int32 and fp16
buffers, on CPU a dequantized weight; both keep the layer's input for backward), and bitsandbytes
optimizers (their state tensors, allocated as `bitsandbytes.optim` allocates them).

The result is the peak of what tensors hold: what `torch.cuda.max_memory_allocated` reports on
CUDA, and what the CPU allocator holds on CPU (see bench/README.md, "How memory is measured").
It does not include the CUDA context, the allocator's cached but unused blocks, or the process
itself: `plan` adds those as the process peak (`minitune.process_memory.process_peak`), and decides
whether a config fits on that. On CUDA, `Prediction.cuda` has the process terms
(`cuda_memory.cuda_process_terms`: the allocations replayed through the caching allocator).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from .config import Config
from .device import Capabilities, capabilities, resolve_precision
from .errors import ConfigError, PlanError
from .lm import model_kind
from .losses import auto_chunk_size, loss_fn_for
from .memory import format_bytes
from .process_memory import ProcessPeak, process_peak

__all__ = ["DEVICES", "MicroBatch", "Plan", "Prediction", "Target", "format_plan", "plan", "predict", "simulate",
           "smaller_split", "target", "worst_case_steps"]

GiB = 2**30
MiB = 2**20

ROLES = ("adapters", "trainable weights", "gradients", "optimizer_state", "activations", "logits/loss", "temporaries")


# ------------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class Target:
    """A device to plan for: its memory, the budget a run may use, and what it can do."""

    name: str
    kind: str  # 'cuda', 'mps' or 'cpu'
    memory: int  # bytes the device has
    budget: int  # bytes a run's process may use (see `DEVICES`)
    caps: Capabilities
    note: str = ""  # where the budget comes from
    capability: tuple[int, int] | None = None  # CUDA compute capability (cuBLAS's workspace size)


# CUDA: the card's memory as sold, all of it the budget; the CUDA context, cuBLAS workspaces and the
# caching allocator's unused blocks (none of which max_memory_allocated counts) are a term of the
# process peak (`process_memory.process_peak`), not a cut from the budget.
# Apple: unified memory; Metal lets one process use `recommendedMaxWorkingSetSize` of it, which
# macOS sets to about 2/3 of the RAM on 16 GB machines and 3/4 above (read live with --device mps).
_CUDA = {  # name: (GB, bf16)
    "T4": (16, False), "V100": (16, False), "A10G": (24, True), "L4": (24, True), "A100-40": (40, True),
    "A100-80": (80, True), "H100": (80, True), "RTX4090": (24, True),
}
_CAPABILITY = {"T4": (7, 5), "V100": (7, 0), "A10G": (8, 6), "L4": (8, 9), "A100-40": (8, 0), "A100-80": (8, 0),
               "H100": (9, 0), "RTX4090": (8, 9)}
_APPLE = {"M4-16": 16, "M4-24": 24}
DEVICES = (*_CUDA, *_APPLE, "cpu", "mps")


def _cuda_caps(name: str, bf16: bool) -> Capabilities:
    return Capabilities(torch.device("cuda"), bf16=bf16, fp16_autocast=True, bnb_layers=True, bnb_optimizers=True,
                        paged_optimizers=True, fused_adamw=True, fast_bf16=bf16,
                        label=f"a {name}")


def _apple_caps(name: str) -> Capabilities:
    mps = capabilities("mps")
    return dataclasses.replace(mps, bf16=True, fp16_autocast=True, fast_bf16=True, label=f"an Apple {name} (MPS)")


def _cpu_memory() -> tuple[int, int]:
    """(total, available) RAM of this machine, from /proc/meminfo (else psutil)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        import psutil  # off Linux

        vm = psutil.virtual_memory()
        return vm.total, vm.available


def target(name: str, budget: int | None = None) -> Target:
    """The Target called `name` (one of `DEVICES`), its budget overridden by `budget` bytes if given.

    Raises:
        ConfigError: an unknown device name (the message lists the known ones), or --device mps on
            a machine without MPS.
    """
    key = {k.lower(): k for k in DEVICES}.get(name.lower())
    if key in _CUDA:
        gb, bf16 = _CUDA[key]
        memory = gb * 10**9
        t = Target(key, "cuda", memory, memory, _cuda_caps(key, bf16), f"{gb} GB as sold", _CAPABILITY[key])
    elif key in _APPLE:
        memory = _APPLE[key] * GiB
        share = 2 / 3 if _APPLE[key] <= 16 else 3 / 4
        t = Target(key, "mps", memory, int(memory * share), _apple_caps(key),
                   f"unified memory: Metal's recommended working set, about {share:.0%} of {_APPLE[key]} GB")
    elif key == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(["--device mps: this machine has no MPS device; name an Apple model instead "
                               f"({', '.join(_APPLE)}) or give --budget"])
        total = int(torch.mps.recommended_max_memory())
        t = Target("mps", "mps", total, total, capabilities("mps"),
                   "this Mac: torch.mps.recommended_max_memory()")
    elif key == "cpu":
        total, available = _cpu_memory()
        t = Target("cpu", "cpu", total, available, capabilities("cpu"), "this machine: RAM available now")
    else:
        raise ConfigError([f"unknown device '{name}': choose one of {', '.join(DEVICES)}, or give --budget (e.g. 12GiB)"])
    if budget is not None:
        t = dataclasses.replace(t, budget=budget, note=f"--budget {format_bytes(budget)}")
    return t


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'12GiB', '16 GB', '800MiB', '2.5g' -> bytes (GB = 10**9, GiB = 2**30).

    Raises:
        ConfigError: not a size, or not positive.
    """
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    size = float(m.group(1)) * _UNITS[unit] if m and unit in _UNITS else 0.0
    if not 1 <= size < 2**62:  # no unit we know, zero, or more bytes than any machine (and than an int64)
        shown = text if len(str(text)) <= 40 else f"{str(text)[:30]}... ({len(str(text))} characters)"
        raise ConfigError([f"--budget '{shown}' is not a memory size: write it like 12GiB, 16GB or 800MiB"])
    return int(size)


# ------------------------------------------------------------------------------------------------
# the ledger: every storage from allocation to release


class _Ledger(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive, by role, and the peaks (overall and per phase).

    Storages are keyed weakly: a storage leaves the count when torch frees it. `granule` rounds each
    allocation up (512 bytes: the CUDA caching allocator's smallest block). Two operations have
    data-dependent results and are answered without data: `nonzero` (the micro-batch's number of
    target positions, given in `targets`; every position when unknown) and reading a scalar (`.item()`: True for booleans, so masks are taken as all ones, 1 otherwise).
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
        return out


# ------------------------------------------------------------------------------------------------
# stand-ins for what runs inside kernels


class _DequantizedMatmul(torch.autograd.Function):
    """y = x @ W.T + b for a quantized W: W is dequantized to x's dtype for the forward matmul and
    again for the backward one, and freed after each; `keep_input` keeps x for backward (bitsandbytes'
    8-bit CPU path saves it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                keep_input: bool) -> torch.Tensor:
        w = torch.empty((out_features, x.shape[-1]), dtype=x.dtype, device=x.device)
        y = nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
        ctx.kept = x if keep_input else None
        ctx.shape = (out_features, x.shape[-1], x.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        out_features, in_features, dtype = ctx.shape
        w = torch.empty((out_features, in_features), dtype=dtype, device=grad.device)
        return grad.to(dtype) @ w, None, None, None, None


class _Int8Matmul(torch.autograd.Function):
    """bitsandbytes' LLM.int8() matmul on CUDA (`autograd/_functions.py::MatMul8bitLt`, kernels in
    `backends/cuda/ops.py`), its allocations in order. Forward: the input cast to fp16, its outlier
    mask (threshold > 0), the int8 row-quantized input and its fp32 row scales, the int32 product,
    the fp16 dequantized product, cast back to the input dtype. Saved for backward
    (`ctx.tensors = (CAt, subA, A)`): the input itself whenever autograd records the op, no
    transposed copy (`CAt`: only when the weight takes a gradient; a frozen base does not), and the
    input's outlier columns (`subA`: data-dependent, taken as none). Backward: the weight
    dequantized to the input dtype (`state.CB.to(dtype_A, copy=True)`) and the input gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                threshold: float) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1])
        rows, cols = a.shape
        a16 = a.to(torch.float16)  # int8_vectorwise_quant takes fp16 only
        outliers = (a16.abs() >= threshold) if threshold > 0 else None
        ca = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
        sca = torch.empty((rows,), dtype=torch.float32, device=x.device)
        del a16, outliers
        product = torch.empty((rows, out_features), dtype=torch.int32, device=x.device)  # int8_linear_matmul
        out = torch.empty((rows, out_features), dtype=torch.float16, device=x.device)  # int8_mm_dequant
        del product, ca, sca
        if bias is not None:
            out.add_(bias.to(torch.float16))
        y = out.to(x.dtype)
        del out
        ctx.kept = x if any(ctx.needs_input_grad[:2]) else None
        ctx.shape = (out_features, cols, x.dtype, x.shape)
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        out_features, in_features, dtype, shape = ctx.shape
        g = grad.reshape(-1, out_features).contiguous()
        cb = torch.empty((out_features, in_features), dtype=dtype, device=grad.device)
        cb.mul_(torch.empty((out_features, 1), dtype=torch.float32, device=grad.device))  # * SCB / 127
        return (g.to(dtype) @ cb).view(shape), None, None, None, None


class _QuantizedLinear(nn.Module):
    """A bitsandbytes Linear4bit / Linear8bitLt as memory sees it: the packed weight and its
    quantization state, and the matmul bitsandbytes runs on `device_type` (4-bit: dequantize, in
    the compute dtype; 8-bit on CUDA: `_Int8Matmul`; 8-bit on CPU: dequantize and keep the input)."""

    def __init__(self, layer: nn.Module, bits: int, make: Any, device_type: str = "cpu") -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, bits
        self.device_type = device_type
        self.threshold = float(getattr(getattr(layer, "state", None), "threshold", 0.0) or 0.0)
        n = self.in_features * self.out_features
        if bits == 4:
            self.compute_dtype = getattr(layer, "compute_dtype", None)
            nested = getattr(getattr(layer.weight, "quant_state", None), "nested", None)
            if nested is None:
                nested = bool(getattr(layer.weight, "compress_statistics", True))
            blocks = -(-n // getattr(layer.weight, "blocksize", 64) or 64)
            self.weight = nn.Parameter(make(((n + 1) // 2, 1), torch.uint8), requires_grad=False)
            # absmax per block: uint8 with a second-level fp32 absmax per 256 blocks (double quant), else fp32
            state = blocks + 4 * -(-blocks // 256) + 4 * 256 if nested else 4 * blocks
        else:
            self.compute_dtype = None
            self.weight = nn.Parameter(make((self.out_features, self.in_features), torch.int8), requires_grad=False)
            state = 4 * self.out_features  # SCB: one fp32 scale per row
        self.register_buffer("quant_state", make((state,), torch.uint8), persistent=False)
        bias = getattr(layer, "bias", None)
        self.bias = None if bias is None else nn.Parameter(make(tuple(bias.shape), bias.dtype),
                                                            requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        if self.bits == 8 and self.device_type not in ("cpu", "xpu"):  # bnb.matmul: MatMul8bitLt off CPU/XPU
            y = _Int8Matmul.apply(x, self.weight, self.bias, self.out_features, self.threshold)
        else:  # 4-bit; 8-bit on CPU/XPU: MatMul8bitFp, which keeps its input (`ctx.A = A`)
            y = _DequantizedMatmul.apply(x, self.weight, self.bias, self.out_features, self.bits == 8)
        return y.to(inp_dtype)


def _is_bnb_layer(module: nn.Module) -> int:
    if not type(module).__module__.startswith("bitsandbytes"):
        return 0
    return {"Linear4bit": 4, "LinearNF4": 4, "LinearFP4": 4, "Linear8bitLt": 8}.get(type(module).__name__, 0)


class _Bnb8bitState(torch.optim.Optimizer):
    """bitsandbytes' 8-bit optimizers as memory sees them: per parameter of >= 4096 elements, one or
    two uint8 states of its size with an fp32 absmax per 256 elements; smaller parameters get fp32
    states. Paged state on CUDA lives outside PyTorch's allocator (parameters of >= 1e5 elements)."""

    def __init__(self, params: Any, moments: int, eight_bit: bool, paged: bool, device_type: str) -> None:
        super().__init__(params, {})
        self.moments, self.eight_bit, self.paged, self.device_type = moments, eight_bit, paged, device_type
        self.paged_bytes = 0  # state in CUDA unified memory: outside PyTorch's allocator, not in the peak

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                small = p.numel() < 4096 or not self.eight_bit
                if not state:
                    state["step"] = 0
                    if self.paged and self.device_type == "cuda" and p.numel() >= 1e5:
                        self.paged_bytes += self.moments * p.numel() * (1 if self.eight_bit else 4)
                        continue
                    for i in range(1, self.moments + 1):
                        state[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32 if small else torch.uint8)
                        if not small:
                            state[f"absmax{i}"] = torch.zeros((-(-p.numel() // 256),), dtype=torch.float32,
                                                              device=p.device)
                if self.device_type == "cpu" and not small:
                    self._cpu_update(p)

    def _cpu_update(self, p: torch.Tensor) -> None:
        """The temporaries of bitsandbytes' CPU 8-bit update (`backends/cpu/ops.py`): the states
        dequantized to fp32, the fp32 gradient and the denominator, then the states re-quantized."""
        s1 = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        s2 = torch.empty(p.shape, dtype=torch.float32, device=p.device) if self.moments == 2 else None
        grad = p.grad.float() * 1.0
        p32 = p.data.float()
        if s2 is not None:
            denom = (s2.sqrt() / 1.0).add_(1e-8)
            p32.addcdiv_(s1, denom, value=-1e-3)
        else:
            denom = torch.sign(s1.mul(0.9) + grad.mul(0.1))
            p32.add_(denom, alpha=-1e-3)
        p.data.copy_(p32)
        for s in (s1, s2):
            if s is not None:
                torch.empty(s.shape, dtype=torch.uint8, device=p.device)
                torch.empty((-(-s.numel() // 256),), dtype=torch.float32, device=p.device)


def _optimizer(model: nn.Module, cfg: Config, device_type: str) -> torch.optim.Optimizer:
    """The configured optimizer over the fake parameters, as it would run on `device_type`."""
    from .optim import parameter_groups  # the real grouping (decay / no decay)

    groups = parameter_groups(model, cfg.optimizer.weight_decay)
    name = cfg.optimizer.name
    if name.startswith("paged_") and device_type != "cuda":
        name = name.removeprefix("paged_")
    if name == "adamw":
        # As `optim.build_optimizer` makes it: fused where asked and the device has the kernel (in
        # place, no temporaries); else torch's default, for-each kernels on CUDA (temporaries the
        # size of all the parameters of a dtype: `sqrt` of the second moments, in `_multi_tensor_adamw`)
        # and a loop over parameters on CPU (the same temporaries, one parameter at a time).
        from .device import _fused_adamw_devices

        fused = bool(cfg.optimizer.fused and device_type in _fused_adamw_devices())
        return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, fused=fused or None,
                                 foreach=(device_type == "cuda" and not fused) or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optimizer.lr, foreach=device_type == "cuda")
    return _Bnb8bitState(groups, moments=1 if "lion" in name else 2, eight_bit="8bit" in name,
                         paged=name.startswith("paged_"), device_type=device_type)


# ------------------------------------------------------------------------------------------------
# the model, on fake tensors


def _fake_copy(model: nn.Module, mode: Any, device_type: str = "cpu") -> nn.Module:
    """A copy of `model` whose parameters and buffers are fake tensors of the same shapes and dtypes
    (tied weights stay tied), with bitsandbytes layers replaced by `_QuantizedLinear`. `model` itself
    is not touched; real weights are never copied."""

    def make(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        with mode:
            return torch.empty(shape, dtype=dtype, device="cpu")

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the module it compiled
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        fake = make(tuple(t.shape), t.dtype)
        memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else fake
    for m in model.modules():  # bitsandbytes keeps quantization state outside parameters: leave it behind
        if _is_bnb_layer(m) and hasattr(m, "weight"):
            for attr in ("quant_state", "CB", "SCB"):
                value = getattr(m.weight, attr, None)
                if value is not None:
                    memo[id(value)] = None
            if hasattr(m, "state"):
                memo[id(m.state)] = None
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():  # a forward that Accelerate wrapped is bound to the original: the class's own
        for attr in ("forward", "_original_forward"):
            module.__dict__.pop(attr, None)
    for name, module in list(clone.named_modules()):
        bits = _is_bnb_layer(module)
        if bits:
            original = model.get_submodule(name)
            clone.set_submodule(name, _QuantizedLinear(original, bits, make, device_type))
    return clone


@contextlib.contextmanager
def _masks_read_as_real() -> Any:
    """transformers takes a fake tensor for a sign of graph tracing and then always builds the 4-D
    attention mask, which for a real batch without padding it skips (`masking_utils`). While the
    simulation runs, its tracing check ignores fake tensors, so that the mask's values are asked
    for, and the ledger answers as the micro-batch would (`all_real`). Without that function (other
    transformers versions) nothing is changed: the mask is then always counted, a little more."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "is_tracing", None)
    if original is None:
        yield
        return
    masking_utils.is_tracing = lambda tensor=None: original(None)  # dynamo, jit and stream capture only
    try:
        yield
    finally:
        masking_utils.is_tracing = original


def _accelerate_forward(model: nn.Module, mixed_precision: str, device_type: str) -> None:
    """Wrap the forward as `accelerator.prepare` does: autocast, and outputs converted to fp32."""
    if mixed_precision not in ("bf16", "fp16"):
        return
    from accelerate.utils import convert_outputs_to_fp32

    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    forward = model.forward

    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = convert_outputs_to_fp32(autocast_forward)


# ------------------------------------------------------------------------------------------------
# the simulation


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one micro-batch, as the collator makes it."""

    batch_size: int
    seq_len: int  # input tokens (padded)
    target_len: int | None = None  # seq2seq: target tokens (padded)
    targets: int | None = None  # positions that carry a target (None: every one)
    # some examples are padded: transformers then builds a 4-D attention mask, which it skips when
    # every position is real (the default counts the mask: the most a batch can need)
    padded: bool = True

    @classmethod
    def of(cls, batch: dict, kind: str) -> MicroBatch:
        """The shape of a real collated batch (`kind`: 'causal' or 'seq2seq')."""
        from .lm import shift_targets

        ids, labels, mask = batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
        targets = int((shift_targets(labels, kind) != -100).sum()) if labels is not None else None
        return cls(int(ids.shape[0]), int(ids.shape[1]),
                   int(labels.shape[1]) if kind == "seq2seq" and labels is not None else None, targets,
                   padded=mask is not None and not bool(mask.all()))

    @property
    def tokens(self) -> int:
        return self.batch_size * (self.seq_len + (self.target_len or 0))


def worst_case_steps(cfg: Config, seq_len: int | None = None, target_len: int | None = None,
                     seq2seq: bool = False) -> list[list[MicroBatch]]:
    """Two optimizer steps of micro-batches padded to `seq_len` (default data.max_length), every
    position a target: the most a batch of this config can need. With accumulation, two
    micro-batches per step: the second runs with the first one's gradients alive."""
    mb = MicroBatch(cfg.training.batch_size, seq_len or cfg.data.max_length,
                    (target_len or cfg.data.max_target_length) if seq2seq else None)
    return [[mb] * max(1, min(cfg.training.grad_accum, 2)) for _ in range(2)]


@dataclass
class Prediction:
    """Predicted peak of a training run's tensors (bytes)."""

    total: int
    peak_phase: str  # 'forward', 'backward' or 'optimizer'
    breakdown: dict[str, int]  # at the peak: weights/<dtype>, adapters, gradients, optimizer_state, activations, ...
    phases: dict[str, int]  # the highest value reached in each phase
    shape: dict[str, Any]  # what was simulated: the largest micro-batch, accumulation, precision, optimizer
    # CUDA only: the process's device memory beyond the tensors (`cuda_memory.cuda_process_terms`)
    cuda: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def simulate(model: nn.Module, cfg: Config, *, steps: list[list[MicroBatch]] | None = None,
             seq_len: int | None = None, target_len: int | None = None, device_type: str = "cpu",
             cuda_capability: tuple[int, int] | None = None, loss_fn: Any = None) -> Prediction:
    """Run optimizer steps of `cfg`'s training on a fake copy of `model` and return the peak.

    Args:
        model: the prepared model (quantized, LoRA-wrapped or not): real weights or the meta device.
        cfg: a resolved config (no 'auto' precision): accumulation, mixed precision, loss,
            optimizer, gradient clipping, and the batch size when `steps` is not given.
        steps: the micro-batches of each optimizer step (default: `worst_case_steps`).
        seq_len: for the default steps: tokens per example (default: data.max_length).
        target_len: for the default steps: seq2seq target tokens (default: data.max_target_length).
        device_type: the device the run uses ('cuda' rounds allocations to 512 bytes and uses
            torch's for-each optimizer kernels and bitsandbytes' CUDA kernels).
        cuda_capability: on CUDA, the GPU's compute capability (default 8.0), for the cuBLAS
            workspace in `Prediction.cuda`.
        loss_fn: the loss the run uses (`build.setup` decides it on the real model); default: the
            one the config names, checked on the fake copy (`losses.loss_fn_for`).

    Returns:
        The Prediction.

    Raises:
        Whatever the model's own code raises on fake tensors (a custom architecture that reads tensor
        values); `build.predict_run` turns that into a warning and a run without a prediction.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = cfg.training
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = _fake_copy(model, mode, device_type).train()  # as the loop trains: dropout on
    inner = fake.get_base_model() if hasattr(fake, "get_base_model") else fake
    config = inner.config
    seq2seq = model_kind(config) == "seq2seq"
    steps = steps or worst_case_steps(cfg, seq_len, target_len, seq2seq)
    ledger = _Ledger(granule=512 if device_type == "cuda" else 1, trace=device_type == "cuda")
    params = [p for p in fake.parameters() if p.requires_grad]
    with mode:
        loss_fn = loss_fn or loss_fn_for(t.loss, t.loss_chunk_size, fake)  # before the ledger counts anything
        optimizer = _optimizer(fake, cfg, device_type)
        _accelerate_forward(fake, t.mixed_precision, "cpu")
        seen: set[int] = set()
        quant = {id(m.quant_state) for m in fake.modules() if isinstance(m, _QuantizedLinear)}
        trainable = "adapters" if hasattr(fake, "peft_config") else "trainable weights"
        for p in itertools.chain(fake.parameters(), fake.buffers()):
            if id(p) not in seen:
                seen.add(id(p))
                role = ("weights/quantization state" if id(p) in quant else trainable if p.requires_grad
                        else "weights/" + str(p.dtype).removeprefix("torch."))
                ledger.count(p, role)
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: ledger.relabel(p.grad, "gradients"))
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        hooks = [fake.register_forward_hook(lambda *a: setattr(ledger, "role", "logits/loss"))]
        if head is not None:
            hooks.append(head.register_forward_pre_hook(lambda *a: setattr(ledger, "role", "logits/loss")))
        vocab = int(getattr(config, "vocab_size", 0) or 2)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16)
                    if t.mixed_precision in ("bf16", "fp16") else contextlib.nullcontext())
        with ledger, _masks_read_as_real():
            for step in steps:
                for mb in step:
                    ids = torch.randint(0, vocab, (mb.batch_size, mb.seq_len))
                    labels = torch.randint(0, vocab, (mb.batch_size, mb.target_len or mb.seq_len))
                    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
                    ledger.phase, ledger.role, ledger.targets = "forward", "activations", mb.targets
                    ledger.all_real = not mb.padded
                    with autocast:
                        loss, _ = loss_fn(fake, batch)
                    ledger.phase, ledger.role = "backward", "temporaries"
                    loss.backward()
                    del loss, batch, ids, labels
                ledger.phase = "optimizer"
                # the loop always computes the norm (to log it); it clips only when max_grad_norm > 0
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf,
                                               foreach=device_type == "cuda" or None)
                optimizer.step()
                for state in optimizer.state.values():
                    for v in state.values():
                        if torch.is_tensor(v):
                            ledger.relabel(v, "optimizer_state")
                optimizer.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
    breakdown = {k: v for k, v in ledger.peak_roles.items() if v or not k.startswith("weights/")}
    largest = max((mb for step in steps for mb in step), key=lambda mb: (mb.tokens, mb.targets or 0))
    shape = {"batch_size": largest.batch_size, "seq_len": largest.seq_len, "target_len": largest.target_len,
             "targets": largest.targets if largest.targets is not None else "every position",
             "grad_accum": t.grad_accum, "mixed_precision": t.mixed_precision,
             "optimizer": cfg.optimizer.name if isinstance(optimizer, _Bnb8bitState) else type(optimizer).__name__,
             "paged_state_bytes": getattr(optimizer, "paged_bytes", 0)}
    cuda = {}
    if ledger.trace is not None:
        from .cuda_memory import cuda_process_terms

        cuda = cuda_process_terms(ledger.trace, capability=cuda_capability or (8, 0))
    return Prediction(ledger.peak, ledger.peak_phase, _ordered(breakdown),
                      {k: v for k, v in ledger.phase_peaks.items() if k != "setup"}, shape, cuda)


def _ordered(breakdown: dict[str, int]) -> dict[str, int]:
    weights = sorted(k for k in breakdown if k.startswith("weights/"))
    return {k: breakdown[k] for k in [*weights, *(r for r in ROLES if r in breakdown)]}


# ------------------------------------------------------------------------------------------------
# the plan: a config on a device


def meta_model(cfg: Config) -> tuple[nn.Module, Any, str]:
    """The model `setup_model` would build for the resolved `cfg`, on the meta device (no weights).

    Returns:
        (model, PreparationReport, note): the note says when a hub id that is not cached was planned
        from the preset with its shapes.

    Raises:
        ModelError: the model's config cannot be read and no preset has its shapes; bad LoRA targets.
    """
    from .errors import ModelError
    from .model import DTYPES, build_from_config, model_config, prepare_model, quantization_config
    from .presets import hub_preset

    args, note = cfg.model, ""
    try:
        model_config(args)
    except ModelError:
        preset = hub_preset(args.name_or_path) if not (args.preset or args.config_file) else None
        if preset is None:
            raise
        args = dataclasses.replace(args, preset=preset, gguf_file="")
        note = f"{cfg.model.name_or_path} is not in the local cache: planned from the preset {preset} (its shapes)"
    if (args.attn_implementation or "").startswith("flash_attention") or "/" in (args.attn_implementation or ""):
        # flash-attn kernels (packages, or 'org/repo' hub kernels) are CUDA-only: planned with
        # torch's sdpa, whose flash kernel keeps the same for backward (inputs, output and the
        # fp32 log-sum-exp per query, no attention matrix)
        args = dataclasses.replace(args, attn_implementation="sdpa")
        note = "; ".join(filter(None, [note, f"model.attn_implementation={cfg.model.attn_implementation} is "
                                       "planned with sdpa's memory (the same tensors kept for backward)"]))
    with torch.device("meta"):
        base = build_from_config(args, seed=cfg.training.seed)
        if cfg.quantization.mode != "none":
            from transformers.quantizers import AutoHfQuantizer

            quantizer = AutoHfQuantizer.from_config(quantization_config(cfg.quantization), pre_quantized=False)
            quantizer.preprocess_model(model=base, dtype=DTYPES[args.dtype], device_map={"": "cpu"})
    t = cfg.training
    model, report = prepare_model(base, cfg.lora, fp32_norms=t.fp32_norms, gradient_checkpointing=t.gradient_checkpointing,
                                  reentrant=t.checkpointing_reentrant)
    return model, report, note


def predict(cfg: Config, device_type: str = "cpu", *, seq_len: int | None = None) -> Prediction:
    """The predicted peak of the resolved `cfg` on a device of type `device_type` (builds the meta
    model, then `simulate`)."""
    model, _, _ = meta_model(cfg)
    return simulate(model, cfg, seq_len=seq_len, device_type=device_type)


# Changes that lower the peak, each with the step time it is expected to cost (x the current step),
# and whether it changes what is trained. Costs are estimates: gradient checkpointing recomputes the
# forward pass (~4/3; 1.4x measured in bench/results/cpu-2026-11-25.md); bitsandbytes layers
# dequantize each weight on every forward and backward.
_CHANGES = (
    ("fused", 1.0, False), ("split", 1.05, False), ("chunk", 1.02, False), ("optimizer8", 1.02, False), ("checkpointing", 1.35, False),
    ("4bit", 1.3, True), ("8bit", 1.6, True), ("lora", 0.8, True), ("seq", 0.5, True),
)


def smaller_split(batch_size: int, grad_accum: int) -> tuple[int, int] | None:
    """The micro-batch split that needs less memory and trains on the same examples per step: the
    largest divisor of `batch_size` below it, and the accumulation that makes up the rest (8 x 1 ->
    4 x 2, 6 x 1 -> 3 x 2, 5 x 2 -> 1 x 10). None when batch_size is 1 (no smaller micro-batch).
    The one source of this advice: `minitune plan`, the out-of-memory line and auto_batch_size."""
    smaller = next((d for d in range(batch_size // 2, 0, -1) if batch_size % d == 0), 0)
    return (smaller, grad_accum * batch_size // smaller) if smaller else None


def _candidates(cfg: Config, caps: Capabilities, vocab: int) -> list[tuple[str, dict[str, Any], float, bool]]:
    """(what, overrides, speed cost, changes the result) for each change that applies to `cfg`."""
    t, out = cfg.training, []
    for key, cost, changes in _CHANGES:
        if key == "fused" and cfg.optimizer.name == "adamw" and not cfg.optimizer.fused and caps.fused_adamw:
            # torch documents fused as its fastest implementation: no cost expected
            over, what = {"optimizer.fused": True}, "fused AdamW (no for-each temporaries)"
        elif key == "split" and (split := smaller_split(t.batch_size, t.grad_accum)):
            over = {"training.batch_size": split[0], "training.grad_accum": split[1]}
            what = f"micro-batch {split[0]} x accumulation {split[1]} (same examples per step)"
        elif key == "chunk" and t.loss in ("auto", "chunked"):
            current = min(t.loss_chunk_size or auto_chunk_size(vocab), t.batch_size * cfg.data.max_length)
            if current <= 64:
                continue
            over = {"training.loss_chunk_size": max(64, current // 4)}
            what = f"loss chunks of {max(64, current // 4)} positions"
        elif key == "optimizer8" and "8bit" not in cfg.optimizer.name and caps.bnb_optimizers:
            over, what = {"optimizer.name": "adamw8bit"}, "8-bit AdamW (bitsandbytes)"
        elif key == "checkpointing" and not t.gradient_checkpointing:
            over, what = {"training.gradient_checkpointing": True}, "gradient checkpointing"
        elif key in ("4bit", "8bit") and cfg.lora.enabled and caps.bnb_layers and cfg.quantization.mode not in (key, "4bit"):
            over = {"quantization.mode": key}
            what = "4-bit NF4 base (QLoRA)" if key == "4bit" else "8-bit base (LLM.int8)"
        elif key == "lora" and not cfg.lora.enabled:
            over, what = {"lora.enabled": True}, "LoRA instead of full fine-tuning"
        elif key == "seq" and cfg.data.max_length > 64:
            over, what = {"data.max_length": cfg.data.max_length // 2}, f"sequences of {cfg.data.max_length // 2} tokens (longer ones truncated)"
        else:
            continue
        out.append((what, over, cost, changes))
    return out


@dataclass
class Suggestion:
    what: str
    overrides: dict[str, Any]
    peak: int
    fits: bool
    speed: float  # expected step time x the current one
    changes_result: bool
    process_peak: int = 0  # the whole process with this change (what `fits` is decided on)


@dataclass
class Plan:
    target: Target
    precision: Any  # device.Precision
    prediction: Prediction
    fits: bool
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    process: ProcessPeak | None = None  # the whole process at the peak: what `fits` is decided on

    def to_dict(self) -> dict[str, Any]:
        tg = self.target
        process = self.process or process_peak(tg.kind, self.prediction.total, cuda_terms=self.prediction.cuda)
        return {
            "device": tg.name, "device_kind": tg.kind, "memory_bytes": tg.memory, "budget_bytes": tg.budget,
            "budget_note": tg.note, "precision": dataclasses.asdict(self.precision),
            "predicted": self.prediction.to_dict(), **process.to_dict(), "fits": self.fits,
            "headroom_bytes": tg.budget - process.total,
            "suggestions": [dataclasses.asdict(s) for s in self.suggestions], "notes": self.notes,
        }


def _with(cfg: Config, overrides: dict[str, Any]) -> Config:
    from .config import load_config

    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return load_config(cfg, nested)


def plan(cfg: Config, device: str | Target = "cpu", *, budget: int | None = None, suggest: bool = True,
         baseline: int | None = None) -> Plan:
    """Predict `cfg`'s peak on `device` and, if it does not fit the budget, what would.

    Args:
        cfg: a validated config ('auto' precision fields are resolved for the device).
        device: a name from `DEVICES` or a Target.
        budget: bytes the run may use (default: the device's budget).
        suggest: look for changes when it does not fit.
        baseline: CPU/MPS: the RSS a run has before its model loads (default: this process's now).

    Returns:
        The Plan: the tensor peak (prediction), the process peak (process) and whether that fits
        the budget, and the changes that make it fit, cheapest first.

    Raises:
        ConfigError: an unknown device name.
        PlanError: the config cannot be simulated (shapes torch refuses, a model whose code reads
            tensor values).
        ModelError: the model's config cannot be read (and no preset has its shapes), or LoRA
            targets that match nothing.
    """
    tg = device if isinstance(device, Target) else target(device, budget)
    if budget is not None and isinstance(device, Target):
        tg = dataclasses.replace(tg, budget=budget)
    resolved, precision = resolve_precision(cfg, tg.caps.device, caps=tg.caps)
    model, _, note = meta_model(resolved)
    try:
        prediction = simulate(model, resolved, device_type=tg.kind, cuda_capability=tg.capability)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:  # the model's own code on fake tensors (torch's
        # data-dependent / unsupported-operator errors are RuntimeErrors), or shapes torch refuses; a bug
        # of the planner's own (TypeError, AttributeError, KeyError, ...) keeps its traceback
        raise PlanError(f"could not simulate this config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else 'no message'}); check the model and "
                        "batch settings, e.g. training.batch_size and data.max_length") from None
    if baseline is None:  # CPU/MPS: this process now, measured once for the plan and its suggestions
        baseline = process_peak(tg.kind, 0).terms.get("baseline")

    def whole(pred: Prediction) -> ProcessPeak:
        return process_peak(tg.kind, pred.total, baseline=baseline, cuda_terms=pred.cuda)

    process = whole(prediction)
    result = Plan(tg, precision, prediction, process.total <= tg.budget, notes=[note] if note else [], process=process)
    if result.fits or not suggest:
        return result
    tried: list[Suggestion] = []
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
    for what, over, cost, changes in _candidates(resolved, tg.caps, vocab):
        changed = _with(resolved, over)
        needs_model = any(k.split(".")[0] in ("quantization", "lora") or k == "training.gradient_checkpointing"
                          for k in over)
        try:
            m = meta_model(changed)[0] if needs_model else model
            changed_prediction = simulate(m, changed, device_type=tg.kind, cuda_capability=tg.capability)
        except Exception as e:  # a change this model cannot take (e.g. no checkpointing support): not offered
            result.notes.append(f"not offered: {what} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            continue
        peak = changed_prediction.total
        if "optimizer.fused" in over and peak >= prediction.total:  # advice only where it saves memory
            continue
        total = whole(changed_prediction).total
        tried.append(Suggestion(what, over, peak, total <= tg.budget, cost, changes, total))
    fitting = sorted((s for s in tried if s.fits), key=lambda s: (s.changes_result, s.speed))
    lowering = [s for s in tried if s.peak < prediction.total]
    if not any(not s.changes_result for s in fitting):  # first: changes that keep what is trained, together
        combo = _combination(resolved, tg, [s for s in lowering if not s.changes_result], whole)
        fitting = ([combo] if combo is not None else []) + fitting
    if not fitting:
        combo = _combination(resolved, tg, lowering, whole)
        if combo is not None:
            fitting = [combo]
        else:
            result.notes.append("no combination of the changes below fits: choose a smaller model or a larger device")
    result.suggestions = fitting + sorted((s for s in tried if not s.fits), key=lambda s: s.peak)
    return result


def _combination(cfg: Config, tg: Target, useful: list[Suggestion], whole: Any) -> Suggestion | None:
    """No single change fits: add the changes that lower the peak, cheapest first, until it fits;
    then drop, most expensive first, every one it still fits without. `whole(prediction)` is the
    ProcessPeak of a prediction (what fitting is decided on)."""

    def fits(pred: Prediction | None) -> bool:
        return pred is not None and whole(pred).total <= tg.budget

    def peak_of(chosen: list[Suggestion]) -> Prediction | None:
        changed = _with(cfg, {k: v for s in chosen for k, v in s.overrides.items()})
        try:
            return simulate(meta_model(changed)[0], changed, device_type=tg.kind, cuda_capability=tg.capability)
        except Exception:  # changes that cannot be combined on this model: never the answer
            return None

    chosen: list[Suggestion] = []
    peak = None
    for s in sorted(useful, key=lambda s: (s.changes_result, s.speed)):
        chosen.append(s)
        peak = peak_of(chosen)
        if fits(peak):
            break
    else:
        return None
    for s in sorted(chosen[:-1], key=lambda s: (not s.changes_result, -s.speed)):
        rest = [c for c in chosen if c is not s]
        without = peak_of(rest)
        if fits(without):
            chosen, peak = rest, without
    speed = math.prod(s.speed for s in chosen)
    return Suggestion(" + ".join(s.what for s in chosen), {k: v for s in chosen for k, v in s.overrides.items()},
                      peak.total, True, round(speed, 2), any(s.changes_result for s in chosen), whole(peak).total)


def format_plan(p: Plan) -> str:
    """The plan as the terminal shows it."""
    pred, tg = p.prediction, p.target
    lines = [f"plan for {tg.name} ({format_bytes(tg.memory)}; budget {format_bytes(tg.budget)}: {tg.note})"]
    lines.append(f"precision: {p.precision.describe()}")
    s = pred.shape
    lines.append(f"shape: micro-batch {s['batch_size']} x {s['seq_len']} tokens"
                 + (f" -> {s['target_len']} target tokens" if s.get("target_len") else "")
                 + f", accumulation {s['grad_accum']}, every position a target (the most a batch can need); "
                 f"optimizer {s['optimizer']}")
    lines.append("")
    process = p.process or process_peak(tg.kind, pred.total, cuda_terms=pred.cuda)
    lines.append(f"predicted process peak{format_bytes(process.total):>19}   "
                 f"({'RSS' if tg.kind != 'cuda' else 'device memory'}: what fits is decided on)")
    for name, value in process.terms.items():
        lines.append(f"  {name:<28}{format_bytes(value):>11}" + ("   (RSS before the model loads)"
                                                                 if name == "baseline" else ""))
    lines.append(f"predicted tensor peak{format_bytes(pred.total):>20}   (the allocator's, in the {pred.peak_phase} pass)")
    for role, value in pred.breakdown.items():
        lines.append(f"  {role:<28}{format_bytes(value):>11}")
    lines.append("per phase (highest):")
    for phase, value in pred.phases.items():
        lines.append(f"  {phase:<28}{format_bytes(value):>11}")
    lines.append("")
    room = tg.budget - process.total
    if p.fits:
        lines.append(f"fits: {format_bytes(room)} of headroom ({100 * room / tg.budget:.0f}% of the budget)")
    else:
        lines.append(f"does not fit: {format_bytes(-room)} over the budget")
        fitting = [x for x in p.suggestions if x.fits]
        if fitting:
            lines.append("changes that make it fit, cheapest first (expected step time x now):")
            for x in fitting:
                lines.append(f"  {x.what:<58} process {format_bytes(x.process_peak or x.peak):>10}  x{x.speed:.2f}"
                             + ("  (changes what is trained)" if x.changes_result else ""))
                lines.append(f"      {' '.join(f'{k}={v}' for k, v in x.overrides.items())}")
        rest = [x for x in p.suggestions if not x.fits]
        if rest:
            lines.append("not enough alone:")
            for x in rest:
                lines.append(f"  {x.what:<58} process {format_bytes(x.process_peak or x.peak):>10}")
    if s.get("paged_state_bytes"):
        lines.append(f"note: the paged optimizer's state ({format_bytes(s['paged_state_bytes'])}) is not in the peak: it "
                     "lives in CUDA unified memory, which the driver moves to CPU RAM when the GPU runs short")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
