"""The launch: how many processes, under which engine (DDP, FSDP, DeepSpeed), and whether that is
what the config and `accelerate launch` asked for. Decided here; the loop and checkpoints ask."""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["check_processes", "engine", "shards_weights", "steps_in_backward"]


def check_processes(accelerator: Any, quantized: bool = False, grad_accum: int = 1) -> list[str]:
    """Problems with how `accelerate launch` set up this process, found before the model loads.

    Catches a multi-process launch in which each process trains alone (every process would write
    the same run); an FSDP or DeepSpeed config that Accelerate did not apply (FSDP needs GPUs: on
    CPU it would quietly run as DDP); DeepSpeed with minitune's own gradient accumulation (the
    engine steps at every backward through Accelerate); and, on CUDA, a process whose device is not
    its own GPU (with `quantized`, bitsandbytes would quantize every process's copy onto that GPU);
    and a quantized model under FSDP.

    Args:
        accelerator: the run's Accelerator (or anything with its `num_processes`,
            `local_process_index`, `device` and `distributed_type`).
        quantized: the model will be loaded with bitsandbytes layers, placed on `accelerator.device`.
        grad_accum: training.grad_accum.

    Returns:
        One line per problem, naming the fix.
    """
    problems: list[str] = []
    kind = engine(accelerator)
    for wanted, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(env, "false").lower() == "true" and kind != wanted:
            problems.append(f"the accelerate config asks for {wanted} but Accelerate set up {kind} on "
                            f"{accelerator.device} ({wanted} needs GPUs); on CPU launch with "
                            "configs/accelerate/cpu-2proc.yaml")
    if kind == "FSDP" and quantized:
        problems.append("a quantized model (quantization.mode 8bit/4bit) under FSDP: minitune places bitsandbytes "
                        "layers whole on each process's GPU and does not set up FSDP for them; set "
                        "quantization.mode=none, or launch with DDP (configs/accelerate/multi-gpu-ddp.yaml)")
    if kind == "DEEPSPEED" and grad_accum > 1:
        problems.append(f"training.grad_accum={grad_accum} under DeepSpeed, whose engine steps at every backward "
                        "in minitune's loop: set training.grad_accum=1 (raise training.batch_size or the number "
                        "of processes instead)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        problems.append(f"launched as one of {launched} processes, but Accelerate set this one up alone on "
                        f"{accelerator.device} (each process would train and write the same run); on CPU launch "
                        "with configs/accelerate/cpu-2proc.yaml (`--multi_gpu`, not `--cpu`) and "
                        "training.device=cpu or auto")
    device = torch.device(accelerator.device)
    if device.type == "cuda" and accelerator.num_processes > 1:
        count = torch.cuda.device_count()
        expected = accelerator.local_process_index % max(1, count)
        if device.index is not None and device.index != expected:
            problems.append(f"process {accelerator.local_process_index} runs on {device} instead of cuda:{expected}; "
                            "launch with `accelerate launch` and do not set training.device to a fixed GPU")
        elif quantized and int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) > count:
            problems.append(f"{os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes)} processes share {count} "
                            "GPU(s) on this machine: with a quantized model each process needs its own GPU; set "
                            "--num_processes to at most the number of GPUs")
    return problems


def engine(accelerator: Any) -> str:
    """The distributed engine a launch runs under, as one name: 'NO', 'MULTI_CPU', 'MULTI_GPU', 'FSDP',
    'DEEPSPEED', ... (Accelerate's `DistributedType`; 'NO' for anything without one)."""
    return str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]


def shards_weights(accelerator: Any) -> bool:
    """FSDP and DeepSpeed shard the weights: every process joins in gathering them (a collective)."""
    return engine(accelerator) in ("FSDP", "DEEPSPEED")


def steps_in_backward(accelerator: Any) -> bool:
    """DeepSpeed: Accelerate's `backward` runs the engine's backward and step (the optimizer's `step`
    is a no-op), so the loop sees a step's loss and gradient only after its update."""
    return engine(accelerator) == "DEEPSPEED"
