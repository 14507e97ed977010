"""Will it fit? The peak memory of a training step, predicted from the config alone.

    minitune plan --config bloom --device T4            # or: python train.py --config bloom --plan --device T4
    minitune plan --config bloom --budget 12GiB --json

    devices.py     targets: named GPUs and Macs, this machine, sizes   ledger.py     storages counted by role
    standins.py    bitsandbytes layers and optimizers as they allocate  simulation.py the model on fake tensors, simulate
    advice.py      the changes that lower a peak, simulated             planning.py   plan, Plan, format_plan
    loading.py     what loading the model holds at its peak (load_peak), per way of loading
    roofline.py    the step at the device's peaks: FLOPs and memory-bound bytes over probed or data-sheet rates

How the prediction is made: the model is built on the meta device the way `build.setup_model`
builds it (the transformers class from its config, bitsandbytes layers placed by transformers' own
quantizer, frozen base, fp32 norms, gradient checkpointing, LoRA by peft), its tensors are replaced
by fake tensors (shapes and dtypes, no data: torch's `FakeTensorMode`), and two optimizer steps of
the configured loss and optimizer run on them, at the precision the device would use. A dispatch
mode (`Ledger`) sees every tensor every operation creates and counts its storage from allocation
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

from .advice import smaller_split
from .devices import DEVICES, Target, parse_size, target
from .loading import LoadPeak, load_peak
from .planning import Plan, format_plan, plan, predict
from .simulation import MicroBatch, Prediction, meta_model, simulate, worst_case_steps

__all__ = ["DEVICES", "LoadPeak", "MicroBatch", "Plan", "Prediction", "Target", "format_plan", "load_peak", "meta_model",
           "parse_size", "plan", "predict", "simulate", "smaller_split", "target", "worst_case_steps"]
