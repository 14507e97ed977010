"""Stand-ins for what runs inside kernels, where a dispatch mode cannot see it: bitsandbytes layers
(what their forward and backward allocate on the planned device), optimizers (their state, as
torch and bitsandbytes allocate it), and CUDA's fused attention and dropout kernels (the
simulation runs on CPU fake tensors, where torch takes other paths)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..device import fused_adamw_devices
from ..optim import parameter_groups


class DequantizedMatmul(torch.autograd.Function):
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


class Int8Matmul(torch.autograd.Function):
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


class QuantizedLinear(nn.Module):
    """A bitsandbytes Linear4bit / Linear8bitLt as memory sees it: the packed weight and its
    quantization state, and the matmul bitsandbytes runs on `device_type` (4-bit: dequantize, in
    the compute dtype; 8-bit on CUDA: `Int8Matmul`; 8-bit on CPU: dequantize and keep the input)."""

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
            y = Int8Matmul.apply(x, self.weight, self.bias, self.out_features, self.threshold)
        else:  # 4-bit; 8-bit on CPU/XPU: MatMul8bitFp, which keeps its input (`ctx.A = A`)
            y = DequantizedMatmul.apply(x, self.weight, self.bias, self.out_features, self.bits == 8)
        return y.to(inp_dtype)


def is_bnb_layer(module: nn.Module) -> int:
    if not type(module).__module__.startswith("bitsandbytes"):
        return 0
    return {"Linear4bit": 4, "LinearNF4": 4, "LinearFP4": 4, "Linear8bitLt": 8}.get(type(module).__name__, 0)


class Bnb8bitState(torch.optim.Optimizer):
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


def stand_in_optimizer(model: nn.Module, cfg: Config, device_type: str) -> torch.optim.Optimizer:
    """The configured optimizer over the fake parameters, as it would run on `device_type`."""
    groups = parameter_groups(model, cfg.optimizer.weight_decay)
    name = cfg.optimizer.name
    if name.startswith("paged_") and device_type != "cuda":
        name = name.removeprefix("paged_")
    if name == "adamw":
        # As `optim.build_optimizer` makes it: fused where asked and the device has the kernel (in
        # place, no temporaries); else torch's default, for-each kernels on CUDA (temporaries the
        # size of all the parameters of a dtype: `sqrt` of the second moments, in `_multi_tensor_adamw`)
        # and a loop over parameters on CPU (the same temporaries, one parameter at a time).
        fused = bool(cfg.optimizer.fused and device_type in fused_adamw_devices())
        return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, fused=fused or None,
                                 foreach=(device_type == "cuda" and not fused) or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optimizer.lr, foreach=device_type == "cuda")
    return Bnb8bitState(groups, moments=1 if "lion" in name else 2, eight_bit="8bit" in name,
                         paged=name.startswith("paged_"), device_type=device_type)


class FusedAttention(torch.autograd.Function):
    """`F.scaled_dot_product_attention` as CUDA runs it in training: a fused kernel (flash, or
    memory-efficient where a mask or bias is given) that keeps the inputs, the output and an fp32
    log-sum-exp per query for backward, never the attention matrix, and draws dropout inside the
    kernel (an RNG seed, no mask). On CPU, torch takes the math path whenever dropout is on (T5's
    attention in training), keeping the matrix, its softmax and a dropout mask, batch x heads x
    queries x keys each. Here: CPU's flash kernel, which keeps what CUDA's keeps (and counts the same
    FLOPs). A bias that takes a gradient (T5's relative positions in full fine-tuning) gets one of its
    own shape; a bool mask is first turned into a bias, as the memory-efficient kernel does."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                is_causal: bool, scale: float | None) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                                              attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        q, k, v, out, lse, bias = ctx.saved_tensors
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=bias, scale=ctx.scale)
        gbias = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        return gq, gk, gv, gbias, None, None


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False) -> torch.Tensor:
    """A stand-in for `F.scaled_dot_product_attention` on CUDA (`FusedAttention`), autocast's casts included."""
    tensors = [query, key, value, attn_mask]
    if torch.is_autocast_enabled("cpu"):  # sdpa is on autocast's lower-precision list (CUDA's and CPU's)
        low = torch.get_autocast_dtype("cpu")
        tensors = [t.to(low) if t is not None and t.is_floating_point() else t for t in tensors]
    query, key, value, attn_mask = tensors
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key, value = (t.repeat_interleave(query.shape[-3] // t.shape[-3], dim=-3) for t in (key, value))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return FusedAttention.apply(query, key, value, attn_mask, is_causal, scale)


def fused_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`F.dropout` as CUDA runs it: the fused `native_dropout`, which keeps a bool mask for backward
    (1 byte an element). On CPU it is `bernoulli_`, `div_` and `mul`, keeping a mask of the input's
    dtype (4 bytes an element in fp32): aten/src/ATen/native/Dropout.cpp, `is_fused_kernel_acceptable`."""
    if not training or not 0 < p < 1 or input.numel() == 0:
        return _DROPOUT(input, p, training, inplace)
    return torch.native_dropout(input, p, training)[0]


_DROPOUT = nn.functional.dropout


# CUDA's autocast runs these in fp32 where CPU's leaves them in bf16 / fp16 (ATen/autocast_mode.h:
# AT_FORALL_FP32, and AT_FORALL_FP32_SET_OPT_DTYPE: an unset `dtype` becomes fp32); the ones CPU's
# autocast also runs in fp32 (its losses, `prod`) are left to it
CUDA_AUTOCAST_FP32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
                      "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
                      "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "cosine_similarity", "logsumexp")
CUDA_AUTOCAST_FP32_DTYPE = ("softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm", "sum",
                            "sum.dim_IntList")
_LOW = (torch.bfloat16, torch.float16)


def _aten(name: str) -> Any:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _autocast_fp32(op: Any, set_dtype: bool) -> Any:
    """An AutocastCPU kernel for `op` that does what CUDA's autocast does: bf16 / fp16 inputs cast
    to fp32 (`set_dtype`: the op's unset `dtype` argument set to fp32 instead)."""
    schema = [a.name for a in op._schema.arguments]
    at = schema.index("dtype") if set_dtype else -1
    kwarg_only = set_dtype and op._schema.arguments[at].kwarg_only
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def up(a: Any) -> Any:
        return a.float() if isinstance(a, torch.Tensor) and a.dtype in _LOW else a

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(below):
            if not set_dtype:
                return op(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
            if args[0].dtype in _LOW and kwarg_only and kwargs.get("dtype") is None:
                kwargs["dtype"] = torch.float32
            elif args[0].dtype in _LOW and not kwarg_only and (len(args) <= at or args[at] is None):
                args = (*args[:at], *[None] * (at - len(args)), torch.float32, *args[at + 1:])
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def _cuda_autocast_policy() -> Iterator[None]:
    """While it lasts, CPU autocast casts as CUDA's does (`CUDA_AUTOCAST_FP32`): the simulation runs
    autocast on CPU tensors, and a layer norm, a softmax or GELU's `pow` of a bf16 activation is
    bf16 there but fp32 on CUDA, twice the bytes kept for backward."""
    library = torch.library.Library("aten", "IMPL")
    try:
        for names, set_dtype in ((CUDA_AUTOCAST_FP32, False), (CUDA_AUTOCAST_FP32_DTYPE, True)):
            for name in names:
                library.impl(name, _autocast_fp32(_aten(name), set_dtype), "AutocastCPU")
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def kernels_as_on(device_type: str) -> Iterator[None]:
    """While it lasts, attention, dropout and autocast allocate as on `device_type` (CUDA:
    `fused_attention`, `fused_dropout`, `_cuda_autocast_policy`; elsewhere torch's own, as the
    simulation's CPU tensors run them)."""
    if device_type != "cuda":
        yield
        return
    functional = nn.functional
    saved = functional.scaled_dot_product_attention, functional.dropout
    functional.scaled_dot_product_attention, functional.dropout = fused_attention, fused_dropout
    try:
        with _cuda_autocast_policy():
            yield
    finally:
        functional.scaled_dot_product_attention, functional.dropout = saved
