"""The simulation: the model built on the meta device as `build.setup_model` builds it, copied onto
fake tensors, and the configured steps run on them under the ledger (`simulate`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import convert_outputs_to_fp32
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.quantizers import AutoHfQuantizer

from ..config import Config
from ..cuda_memory import cuda_process_terms
from ..errors import ModelError
from ..lm import model_kind, shift_targets
from ..losses import loss_fn_for
from ..model import DTYPES, build_from_config, model_config, quantization_config
from ..prepare import prepare_model
from ..presets import hub_preset
from ..process_memory import ProcessPeak, process_peak
from .ledger import ROLES, Ledger
from .roofline import memory_bytes
from .standins import Bnb8bitState, QuantizedLinear, is_bnb_layer, kernels_as_on, stand_in_optimizer


def _fake_copy(model: nn.Module, mode: Any, device_type: str = "cpu") -> nn.Module:
    """A copy of `model` whose parameters and buffers are fake tensors of the same shapes and dtypes
    (tied weights stay tied), with bitsandbytes layers replaced by `QuantizedLinear`. `model` itself
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
        if is_bnb_layer(m) and hasattr(m, "weight"):
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
        bits = is_bnb_layer(module)
        if bits:
            original = model.get_submodule(name)
            clone.set_submodule(name, QuantizedLinear(original, bits, make, device_type))
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
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    forward = model.forward

    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = convert_outputs_to_fp32(autocast_forward)


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
        ids, labels, mask = batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
        targets = int((shift_targets(labels, kind) != -100).sum()) if labels is not None else None
        return cls(int(ids.shape[0]), int(ids.shape[1]),
                   int(labels.shape[1]) if kind == "seq2seq" and labels is not None else None, targets,
                   # packed rows (position ids): transformers builds the per-example mask, as for padding
                   padded="position_ids" in batch or (mask is not None and not bool(mask.all())))

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
    # what loading the model holds at its peak (`loading.load_peak`); 0: not predicted
    loading: int = 0
    # FLOP of one optimizer step: its matmuls and attention products, forward, backward and
    # recomputation, as the simulation runs them (`Ledger.flops`; mean over the steps simulated)
    flops: float = 0.0
    # bytes one optimizer step moves in memory-bound work: dequantization, the optimizer update
    # (`roofline.memory_bytes`)
    moved: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def process(self, kind: str, baseline: int | None = None) -> ProcessPeak:
        """The whole process's predicted peak around these tensors (`process_memory.process_peak`)
        on a device of `kind`; `baseline`: RSS before loading (default: this process's now)."""
        transient = sum(v for k, v in self.breakdown.items() if k in ("activations", "logits/loss", "temporaries"))
        return process_peak(kind, self.total, baseline=baseline, cuda_terms=self.cuda, loading=self.loading,
                            transient=transient)


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
    t = cfg.training
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = _fake_copy(model, mode, device_type).train()  # as the loop trains: dropout on
    inner = fake.get_base_model() if hasattr(fake, "get_base_model") else fake
    steps = steps or worst_case_steps(cfg, seq_len, target_len, model_kind(inner.config) == "seq2seq")
    ledger = Ledger(granule=512 if device_type == "cuda" else 1, trace=device_type == "cuda")
    with mode:
        loss_fn = loss_fn or loss_fn_for(t.loss, t.loss_chunk_size, fake)  # before the ledger counts anything
        optimizer = stand_in_optimizer(fake, cfg, device_type)
        _accelerate_forward(fake, t.mixed_precision, "cpu")
        _count_parameters(fake, ledger)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        hooks = [fake.register_forward_hook(lambda *a: setattr(ledger, "role", "logits/loss"))]
        if head is not None:
            hooks.append(head.register_forward_pre_hook(lambda *a: setattr(ledger, "role", "logits/loss")))
        with ledger, _masks_read_as_real(), kernels_as_on(device_type):
            for step in steps:
                _simulate_step(fake, step, loss_fn, optimizer, ledger, cfg, device_type,
                               vocab=int(getattr(inner.config, "vocab_size", 0) or 2))
        for h in hooks:
            h.remove()
    breakdown = {k: v for k, v in ledger.peak_roles.items() if v or not k.startswith("weights/")}
    cuda = cuda_process_terms(ledger.trace, capability=cuda_capability or (8, 0)) if ledger.trace is not None else {}
    return Prediction(ledger.peak, ledger.peak_phase, _ordered(breakdown),
                      {k: v for k, v in ledger.phase_peaks.items() if k != "setup"}, _shape(steps, cfg, optimizer), cuda,
                      flops=ledger.flops / len(steps),
                      moved=memory_bytes(model, sum(map(len, steps)) / len(steps), checkpointing=t.gradient_checkpointing,
                                         optimizer=cfg.optimizer.name, fused=bool(cfg.optimizer.fused)))


def _count_parameters(fake: nn.Module, ledger: Ledger) -> None:
    """Put every parameter and buffer in the ledger under its role; gradients are relabelled as they land."""
    seen: set[int] = set()
    quant = {id(m.quant_state) for m in fake.modules() if isinstance(m, QuantizedLinear)}
    trainable = "adapters" if hasattr(fake, "peft_config") else "trainable weights"
    for p in itertools.chain(fake.parameters(), fake.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            role = ("weights/quantization state" if id(p) in quant else trainable if p.requires_grad
                    else "weights/" + str(p.dtype).removeprefix("torch."))
            ledger.count(p, role)
    for p in fake.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: ledger.relabel(p.grad, "gradients"))


def _simulate_step(fake: nn.Module, step: list[MicroBatch], loss_fn: Any, optimizer: torch.optim.Optimizer,
                   ledger: Ledger, cfg: Config, device_type: str, *, vocab: int) -> None:
    """One optimizer step as the loop takes it: forward and backward of each micro-batch, the gradient
    norm (always computed, to log it; clipping only when max_grad_norm > 0), the update."""
    t = cfg.training
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16)
                if t.mixed_precision in ("bf16", "fp16") else contextlib.nullcontext())
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
    params = [p for p in fake.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf,
                                   foreach=device_type == "cuda" or None)
    optimizer.step()
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                ledger.relabel(v, "optimizer_state")
    optimizer.zero_grad(set_to_none=True)


def _shape(steps: list[list[MicroBatch]], cfg: Config, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What the prediction was made for: the largest micro-batch, the accumulation, precision, optimizer."""
    largest = max((mb for step in steps for mb in step), key=lambda mb: (mb.tokens, mb.targets or 0))
    return {"batch_size": largest.batch_size, "seq_len": largest.seq_len, "target_len": largest.target_len,
            "targets": largest.targets if largest.targets is not None else "every position",
            "grad_accum": cfg.training.grad_accum, "mixed_precision": cfg.training.mixed_precision,
            "optimizer": cfg.optimizer.name if isinstance(optimizer, Bnb8bitState) else type(optimizer).__name__,
            "paged_state_bytes": getattr(optimizer, "paged_bytes", 0)}


def _ordered(breakdown: dict[str, int]) -> dict[str, int]:
    weights = sorted(k for k in breakdown if k.startswith("weights/"))
    return {k: breakdown[k] for k in [*weights, *(r for r in ROLES if r in breakdown)]}


def planned_args(cfg: Config) -> tuple[Any, str]:
    """The model section a plan builds from, and a note when it differs from `cfg.model`: a hub id not
    in the local cache is planned from the preset with its shapes, flash-attn as sdpa.

    Raises:
        ModelError: the model's config cannot be read and no preset has its shapes.
    """
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
    return args, note


def meta_model(cfg: Config) -> tuple[nn.Module, Any, str]:
    """The model `setup_model` would build for the resolved `cfg`, on the meta device (no weights).

    Returns:
        (model, PreparationReport, note): the note says when a hub id that is not cached was planned
        from the preset with its shapes.

    Raises:
        ModelError: the model's config cannot be read and no preset has its shapes; bad LoRA targets.
    """
    args, note = planned_args(cfg)
    with torch.device("meta"):
        base = build_from_config(args, seed=cfg.training.seed)
        if cfg.quantization.mode != "none":
            quantizer = AutoHfQuantizer.from_config(quantization_config(cfg.quantization), pre_quantized=False)
            quantizer.preprocess_model(model=base, dtype=DTYPES[args.dtype], device_map={"": "cpu"})
    t = cfg.training
    model, report = prepare_model(base, cfg.lora, fp32_norms=t.fp32_norms, gradient_checkpointing=t.gradient_checkpointing,
                                  reentrant=t.checkpointing_reentrant)
    return model, report, note
