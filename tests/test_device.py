"""device.py: what CUDA, MPS and CPU support, and the checks made before anything loads.

There is no GPU or Mac here: the CUDA and MPS paths run with torch's and bitsandbytes' answers
patched (torch.cuda.is_available / get_device_capability, torch.backends.mps.is_available, the
macOS version, the installed bitsandbytes version and backends).
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from minitune import device as dev
from minitune import launch
from minitune.config import load_config
from minitune.errors import ConfigError

from .conftest import REPO, tiny_config

MPS_OPS_0_50 = frozenset({"quantize_4bit", "dequantize_4bit", "gemv_4bit", "gemm_4bit", "quantize_blockwise"})


def _cfg(**sections):
    return load_config(tiny_config("tiny-llama", "runs/unused", **sections))


def _problems(device, **sections) -> list[str]:
    return dev.check(_cfg(**sections), device)[0]


def _notes(device, **sections) -> list[str]:
    return dev.check(_cfg(**sections), device)[1]


@pytest.fixture
def mac(monkeypatch):
    """An Apple-silicon Mac on macOS 14 with a bitsandbytes that has an MPS backend for its
    quantized layers but no MPS kernel for 8-bit optimizers (as 0.50 ships)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(dev, "_macos_at_least", lambda major: major <= 14)
    monkeypatch.setattr(dev, "_bnb_version", lambda: "0.50.2")
    backends = {"mps": MPS_OPS_0_50}
    monkeypatch.setattr(dev, "bnb_backend", lambda kind: backends.get(kind))
    return backends


@pytest.fixture
def cuda(monkeypatch):
    """A machine with 2 GPUs of compute capability `cuda.capability` (default 8.0, Ampere)."""
    gpus = types.SimpleNamespace(capability=(8, 0), count=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus.count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus.capability)
    monkeypatch.setattr(dev, "_bnb_version", lambda: "0.50.2")
    return gpus


# --- CPU, with what is installed here ------------------------------------------------------------

def test_cpu_capabilities_with_installed_bitsandbytes():
    caps = dev.capabilities("cpu")
    assert caps.bf16 and not caps.fp16_autocast and not caps.paged_optimizers
    # the installed bitsandbytes (0.50) ships a CPU backend, with the 8-bit optimizer kernel
    ops = dev.bnb_backend("cpu")
    assert ops is not None and "quantize_blockwise" in ops
    assert caps.bnb_layers and caps.bnb_optimizers == ("optimizer_update_8bit_blockwise" in ops)


def test_installed_bitsandbytes_backends_are_read_without_importing_it():
    code = ("import sys; from minitune import device; ops = device.bnb_backend('mps'); "
            "print(sorted(ops) if ops else None, 'bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")  # importing bitsandbytes takes seconds; reading its files does not
    assert "quantize_4bit" in out  # the installed 0.50 quantizes 4-bit on MPS
    assert dev.bnb_backend("no-such-device") is None


def test_cpu_refuses_fp16_autocast_and_allows_bf16():
    assert any("fp16 would be silently ignored on cpu" in p for p in _problems("cpu", training={
        "mixed_precision": "fp16"}))
    assert _problems("cpu", training={"mixed_precision": "bf16"}, model={"dtype": "bfloat16"}) == []


def test_paged_optimizer_falls_back_unpaged_off_cuda_with_one_note():
    problems, notes = dev.check(_cfg(optimizer={"name": "paged_adamw8bit"}), "cpu")
    assert problems == [] and len(notes) == 1 and "runs unpaged (adamw8bit)" in notes[0]
    assert dev.optimizer_name_for("paged_adamw8bit", "cpu") == "adamw8bit"
    assert dev.optimizer_name_for("paged_adamw32bit", "cpu") == "adamw32bit"
    assert dev.optimizer_name_for("adamw8bit", "cpu") == "adamw8bit"


def test_no_bitsandbytes_is_a_problem_naming_the_fix(monkeypatch):
    monkeypatch.setattr(dev, "_bnb_version", lambda: None)
    problems = _problems("cpu", quantization={"mode": "4bit"}, optimizer={"name": "adamw8bit"})
    assert len(problems) == 2 and all("pip install bitsandbytes" in p for p in problems)
    assert "quantization.mode=none" in problems[0] and "optimizer.name=adamw" in problems[1]


def test_resolve_device_auto_and_overrides_here():
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="training.device=cuda but no CUDA device"):
        dev.resolve_device("cuda")
    with pytest.raises(ValueError, match="training.device=mps but MPS is not available"):
        dev.resolve_device("mps")


def test_unavailable_device_fails_before_anything_is_created(tmp_path):
    from minitune.run import train

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="training.device=mps but MPS is not available"):
        train(tiny_config("tiny-llama", out, training={"device": "mps"}))
    assert not out.exists()


def test_paged_fallback_warns_once_and_trains(tmp_path, capsys):
    from minitune.run import train

    result = train(tiny_config("tiny-llama", tmp_path / "run", optimizer={"name": "paged_adamw8bit"},
                               training={"max_steps": 1}, data={"validation_fraction": 0}))
    assert result.state.step == 1
    assert capsys.readouterr().out.count("paged optimizers need CUDA") == 1


# --- Apple MPS (mocked) ---------------------------------------------------------------------------

def test_mps_is_picked_by_auto(mac):
    assert dev.resolve_device("auto") == torch.device("mps")
    assert dev.resolve_device("mps") == torch.device("mps")
    assert dev.resolve_device("cpu") == torch.device("cpu")  # the override


@pytest.mark.parametrize("dtype,mp", [("float32", "no"), ("float16", "no"), ("float32", "fp16"),
                                      ("bfloat16", "no"), ("float32", "bf16")])
def test_mps_lora_in_fp32_fp16_bf16_with_checkpointing_is_accepted(mac, dtype, mp):
    assert _problems("mps", model={"dtype": dtype}, training={
        "mixed_precision": mp, "gradient_checkpointing": True}) == []


def test_mps_before_macos_14_has_no_bf16(mac, monkeypatch):
    monkeypatch.setattr(dev, "_macos_at_least", lambda major: major <= 13)
    caps = dev.capabilities("mps")
    assert not caps.bf16 and caps.fp16_autocast
    problems = _problems("mps", model={"dtype": "bfloat16"}, training={"mixed_precision": "bf16"})
    assert len(problems) == 2 and all("not supported on mps" in p for p in problems)


def test_mps_old_torch_has_no_autocast(mac, monkeypatch):
    monkeypatch.setattr(dev, "_torch_at_least", lambda major, minor: False)
    caps = dev.capabilities("mps")
    assert not caps.bf16 and not caps.fp16_autocast


def test_mps_quantized_layers_only_where_bitsandbytes_has_an_mps_backend(mac):
    caps = dev.capabilities("mps")
    assert caps.bnb_layers and not caps.bnb_optimizers and not caps.paged_optimizers
    assert _problems("mps", quantization={"mode": "4bit"}) == []
    # 8-bit optimizers: no MPS kernel in this version -> refused with the reason
    (problem,) = _problems("mps", optimizer={"name": "adamw8bit"})
    assert "bitsandbytes 0.50.2 has no 8-bit optimizer kernel for MPS" in problem
    # paged falls back to unpaged, which still needs the missing kernel: one problem, no note
    problems, notes = dev.check(_cfg(optimizer={"name": "paged_adamw8bit"}), "mps")
    assert len(problems) == 1 and notes == []
    # an older bitsandbytes without an MPS backend: quantization refused too
    mac.pop("mps")
    (problem,) = _problems("mps", quantization={"mode": "8bit"})
    assert "bitsandbytes 0.50.2 has no MPS backend" in problem and "quantization.mode=none" in problem


def test_mps_8bit_optimizers_once_bitsandbytes_ships_the_kernel(mac):
    mac["mps"] = MPS_OPS_0_50 | {"optimizer_update_8bit_blockwise"}
    assert dev.capabilities("mps").bnb_optimizers
    assert _problems("mps", optimizer={"name": "adamw8bit"}) == []


# --- CUDA (mocked) --------------------------------------------------------------------------------

def test_cuda_bf16_follows_compute_capability(cuda):
    assert dev.capabilities("cuda:0").bf16
    cuda.capability = (7, 5)  # Turing: fp16 only
    caps = dev.capabilities("cuda:0")
    assert not caps.bf16 and caps.fp16_autocast and caps.bnb_layers and caps.paged_optimizers
    (problem,) = _problems("cuda:0", training={"mixed_precision": "bf16"})
    assert "compute capability 7.5" in problem and "use fp16 or no" in problem
    assert _problems("cuda:0", training={"mixed_precision": "fp16"}) == []


def test_cuda_paged_optimizers_run_paged(cuda):
    problems, notes = dev.check(_cfg(optimizer={"name": "paged_adamw8bit"}, quantization={"mode": "4bit"}), "cuda:0")
    assert problems == [] and notes == []
    assert dev.optimizer_name_for("paged_adamw8bit", "cuda:0") == "paged_adamw8bit"


def test_cuda_device_of_each_launched_process(cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dev.resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # 4 processes on 2 GPUs: Accelerate wraps around
    assert dev.resolve_device("cuda") == torch.device("cuda", 1)


def _accelerator(device, *, num_processes=2, local_process_index=0):
    return types.SimpleNamespace(device=torch.device(device), num_processes=num_processes,
                                 local_process_index=local_process_index)


def test_check_processes_each_process_on_its_own_gpu(cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.check_processes(_accelerator("cuda:1", local_process_index=1), quantized=True) == []
    (problem,) = launch.check_processes(_accelerator("cuda:0", local_process_index=1), quantized=True)
    assert "process 1 runs on cuda:0 instead of cuda:1" in problem
    # more processes than GPUs: fine for a full-precision model, not for quantized copies
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch.check_processes(_accelerator("cuda:1", num_processes=4, local_process_index=3)) == []
    (problem,) = launch.check_processes(_accelerator("cuda:1", num_processes=4, local_process_index=3), quantized=True)
    assert "4 processes share 2 GPU(s)" in problem


def test_check_processes_catches_a_launch_where_each_process_trains_alone(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    (problem,) = launch.check_processes(_accelerator("cpu", num_processes=1))
    assert "launched as one of 2 processes" in problem and "cpu-2proc.yaml" in problem
    assert launch.check_processes(_accelerator("cpu", num_processes=2)) == []
    monkeypatch.delenv("WORLD_SIZE")
    assert launch.check_processes(_accelerator("cpu", num_processes=1)) == []


def test_check_processes_refuses_fsdp_or_deepspeed_that_accelerate_did_not_apply(monkeypatch):
    cpu_ddp = _accelerator("cpu")
    cpu_ddp.distributed_type = "DistributedType.MULTI_CPU"
    assert launch.check_processes(cpu_ddp) == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an FSDP config launched on CPU runs as DDP
    (problem,) = launch.check_processes(cpu_ddp)
    assert "asks for FSDP but Accelerate set up MULTI_CPU" in problem and "cpu-2proc.yaml" in problem


def test_deepspeed_needs_grad_accum_1():
    ds = _accelerator("cpu")
    ds.distributed_type = "DistributedType.DEEPSPEED"
    assert launch.check_processes(ds, grad_accum=1) == []
    (problem,) = launch.check_processes(ds, grad_accum=4)
    assert "training.grad_accum=4 under DeepSpeed" in problem and "set training.grad_accum=1" in problem


# --- precision: what `auto` chooses per device, and what is refused ------------------------------

def _auto_cfg(**sections):
    """tiny_config pins fp32 for the other tests; these start from the defaults (auto)."""
    model = {"dtype": "auto", **sections.pop("model", {})}
    training = {"mixed_precision": "auto", **sections.pop("training", {})}
    return _cfg(model=model, training=training, **sections)


def _resolved(device, **sections):
    cfg, chosen = dev.resolve_precision(_auto_cfg(**sections), device)
    return (cfg.model.dtype, cfg.training.mixed_precision, cfg.quantization.compute_dtype), chosen


@pytest.mark.parametrize("capability, lora, expected", [
    ((8, 0), True, ("bfloat16", "bf16", "bfloat16")),  # A100 / H100 / RTX 30xx+: bf16 everywhere
    ((8, 0), False, ("float32", "bf16", "bfloat16")),  # full fine-tuning: fp32 master weights, bf16 autocast
    ((7, 5), True, ("float16", "fp16", "float16")),  # T4: no bf16, fp16 with a GradScaler
    ((7, 0), False, ("float32", "fp16", "float16")),  # V100 full fine-tuning
])
def test_auto_precision_on_cuda_follows_compute_capability(cuda, capability, lora, expected):
    cuda.capability = capability
    got, chosen = _resolved("cuda:0", lora={"enabled": lora})
    assert got == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in chosen.reason
    assert not dev.check(dev.resolve_precision(_auto_cfg(lora={"enabled": lora}), "cuda:0")[0], "cuda:0")[0]


def test_auto_precision_on_mps_follows_macos_and_torch(mac, monkeypatch):
    assert _resolved("mps")[0] == ("bfloat16", "bf16", "bfloat16")
    monkeypatch.setattr(dev, "_macos_at_least", lambda major: major <= 13)  # macOS 13: no bf16
    assert _resolved("mps")[0] == ("float16", "fp16", "float16")
    monkeypatch.setattr(dev, "_torch_at_least", lambda major, minor: False)  # no MPS autocast at all
    assert _resolved("mps")[0] == ("float32", "no", "float32")


def test_auto_precision_on_cpu_follows_its_bf16_instructions(monkeypatch):
    monkeypatch.setattr(dev, "_cpu_has_fast_bf16", lambda: True)
    got, chosen = _resolved("cpu")
    assert got == ("bfloat16", "no", "bfloat16") and "AVX512-BF16/AMX" in chosen.reason
    assert _resolved("cpu", lora={"enabled": False})[0] == ("float32", "no", "float32")
    monkeypatch.setattr(dev, "_cpu_has_fast_bf16", lambda: False)  # bf16 would be emulated: slower than fp32
    assert _resolved("cpu")[0] == ("float32", "no", "float32")


def test_this_cpu_reports_its_bf16_instructions():
    flags = Path("/proc/cpuinfo").read_text().split() if sys.platform == "linux" else []
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert dev.capabilities("cpu").fast_bf16 == expected


def test_explicit_settings_win_and_auto_fields_match_their_format(cuda):
    # the user's own fields are kept; an 'auto' next to them takes the same 16-bit format
    assert _resolved("cuda:0", model={"dtype": "float16"})[0] == ("float16", "fp16", "float16")
    assert _resolved("cuda:0", training={"mixed_precision": "fp16"})[0] == ("float16", "fp16", "float16")
    got, chosen = _resolved("cuda:0", model={"dtype": "float32"}, training={"mixed_precision": "no"})
    assert got == ("float32", "no", "float32") and "as configured" in chosen.reason
    assert _resolved("cuda:0", quantization={"mode": "4bit", "compute_dtype": "float32"})[0][2] == "float32"


@pytest.mark.parametrize("sections", [
    {"model": {"dtype": "float16"}, "training": {"mixed_precision": "bf16"}},
    {"model": {"dtype": "bfloat16"}, "training": {"mixed_precision": "fp16"}},
    {"model": {"dtype": "bfloat16"}, "quantization": {"mode": "4bit", "compute_dtype": "float16"}},
])
def test_two_16_bit_formats_in_one_run_are_refused(sections):
    with pytest.raises(ConfigError, match="mixes bfloat16 and float16"):
        _cfg(**sections)


def test_fp16_full_finetuning_is_refused_everywhere(cuda):
    for device in ("cpu", "cuda:0"):
        problems = _problems(device, model={"dtype": "float16"}, lora={"enabled": False},
                             training={"mixed_precision": "no"})
        assert any("model.dtype=float32 with training.mixed_precision=fp16" in p for p in problems), problems


def test_run_reports_its_precision_choice(tmp_path, capsys):
    import json

    from minitune.run import train

    auto = {"model": {"dtype": "auto"}, "training": {"max_steps": 1, "mixed_precision": "auto"}}
    result = train(tiny_config("tiny-llama", tmp_path / "run", **auto))
    expected = dev.resolve_precision(_auto_cfg(), "cpu")[1]
    assert result.precision == expected
    out = capsys.readouterr().out
    assert f"precision: {expected.describe()}" in out  # the startup line
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["precision"]["reason"] == expected.reason  # log.jsonl says it too
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"  dtype: {expected.dtype}\n" in saved and "dtype: auto" not in saved  # what ran, for eval and resume
    assert "mixed_precision: auto" not in saved


@pytest.mark.parametrize("name", ["bloom", "gpt-neo-qlora", "opt-125m-qlora", "flan-t5-small", "smollm2-quotes"])
def test_shipped_configs_leave_precision_to_auto_and_run_on_a_t4(cuda, name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert (cfg.model.dtype, cfg.training.mixed_precision, cfg.quantization.compute_dtype) == ("auto",) * 3
    cuda.capability = (7, 5)  # a T4: no bf16
    resolved, chosen = dev.resolve_precision(cfg, "cuda:0")
    assert "bfloat16" not in (resolved.model.dtype, resolved.quantization.compute_dtype)
    assert resolved.training.mixed_precision == "fp16" and not dev.check(resolved, "cuda:0")[0]


def test_a_quantized_model_under_fsdp_is_refused():
    fsdp = _accelerator("cpu")
    fsdp.distributed_type = "DistributedType.FSDP"
    assert launch.check_processes(fsdp, quantized=False) == []
    (problem,) = launch.check_processes(fsdp, quantized=True)
    assert "quantized model" in problem and "under FSDP" in problem and "quantization.mode=none" in problem


def test_a_launched_cpu_process_on_one_thread_of_several_cores_is_told(monkeypatch):
    """`accelerate launch` without --num_cpu_threads_per_process gives a CPU process OMP_NUM_THREADS=1:
    the run says so and how to use every core; a setting that uses them, or no launcher, says nothing."""
    from minitune import device as dev

    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(dev.torch, "get_num_threads", lambda: 1)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    note = dev.cpu_threads_note()
    assert note is not None and "--num_cpu_threads_per_process 4" in note
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share the cores: 2 each
    assert "--num_cpu_threads_per_process 2" in dev.cpu_threads_note()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one core each: nothing to gain
    assert dev.cpu_threads_note() is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # not started by accelerate launch: the user's setting
    assert dev.cpu_threads_note() is None
