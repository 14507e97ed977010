"""Multi-process training: a real two-process DDP run on CPU (gloo) through `accelerate launch`,
compared with a single-process run over the same global batches; and the shipped accelerate
configs, parsed and validated as `accelerate launch` would.

Which single-process run is exactly comparable: Accelerate shards a loader by handing process p
the batches p, p + N, p + 2N, ... of the one seeded order (BatchSamplerShard), so 2 processes x
batch 2 take in each step the same two micro-batches, padded the same way, that 1 process x batch 2
x grad_accum 2 takes (1 x batch 4 would pad differently, and a length-grouped order depends on the
batch size). The loop normalises by the target tokens of the whole window over all processes, so
the gradients agree to fp32 rounding.

This file is also the launched worker: `python tests/test_distributed.py RECORD_DIR CONFIG [CONFIG ...]`
trains each config in turn and writes, per run and process, the examples each of its batches held.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU2 = REPO / "configs/accelerate/cpu-2proc.yaml"


def _recorder(seen: list):
    """A `Collator.__call__` that also appends the token ids of each batch's examples to `seen`."""
    from minitune.data import Collator

    collate = Collator.__call__

    def recording(self, features):
        seen.append([list(map(int, f["input_ids"])) for f in features])
        return collate(self, features)

    return recording


if __name__ == "__main__":  # the launched worker: train each config in turn, in the same process group
    import gc

    from accelerate import PartialState
    from torch.nn.parallel import DistributedDataParallel

    from minitune import data
    from minitune.run import train

    record_dir, *configs = sys.argv[1:]
    # train() ends by destroying the process group; keep it for the next run (one launch is cheaper),
    # and count the DDP models still alive at that moment (one keeps the group past its destruction)
    alive_at_destroy: list[int] = []

    def keep_group(self, group=None):
        alive_at_destroy.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))

    destroy, PartialState.destroy_process_group = PartialState.destroy_process_group, keep_group
    collate = data.Collator.__call__
    for i, config in enumerate(configs):
        batches: list = []
        data.Collator.__call__ = collate
        data.Collator.__call__ = _recorder(batches)
        result = train(config)
        Path(record_dir, f"run{i}-rank{os.environ['RANK']}.json").write_text(json.dumps({
            "world_size": int(os.environ["WORLD_SIZE"]), "num_processes": PartialState().num_processes,
            "batches": batches, "step": result.state.step, "eval_loss": result.metrics.get("eval_loss"),
            "ddp_models_alive_at_destroy": alive_at_destroy[-1]}))
    destroy(PartialState())
    sys.exit(0)


import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from .conftest import tiny_config  # noqa: E402

# 24 training rows; the held-out 0.25% of the quotes file is 7 rows, so the last evaluation batch
# is uneven over 2 processes (Accelerate would repeat an example there).
DATA = {"max_samples": 24, "validation_fraction": 0.0025}
TRAINING = {"max_steps": 0, "epochs": 2, "batch_size": 2, "save_every": 3, "keep_last": 0}
OPTIMIZER = {"lr": 1e-2, "scheduler": "linear", "warmup_steps": 2}


def _config(out: Path, **training) -> dict:
    # fp32 weights, no autocast, said explicitly: the differences the README quotes are fp32 rounding
    return tiny_config("tiny-llama", out, data=DATA, optimizer=OPTIMIZER, model={"dtype": "float32"},
                       training={**TRAINING, "mixed_precision": "no", **training}, lora={"target_modules": ["all-linear"]})


def _config_4bit(out: Path, base: Path, **training) -> dict:
    """4-bit LoRA on `base`, a saved tiny model (each process quantizes it while loading)."""
    cfg = _config(out, max_steps=4, save_every=0, **training)
    cfg["model"] = {"name_or_path": str(base), "tokenizer": cfg["model"]["tokenizer"], "dtype": "float32"}
    cfg["quantization"] = {"mode": "4bit"}
    return cfg


def _launch(tmp_path: Path, *configs: dict, timeout: int = 300) -> list[list[dict]]:
    """Train each config in turn with 2 CPU processes (one launch); per config, each rank's record."""
    records = tmp_path / "records"
    records.mkdir()
    paths = []
    for i, cfg in enumerate(configs):
        paths.append(tmp_path / f"config{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    # a session of its own, so that a timeout can end the launcher and both workers together
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU2), __file__, str(records),
         *map(str, paths)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the 2-process run took over {timeout} s:\n{out[-2000:]}{err[-4000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return [[json.loads((records / f"run{i}-rank{r}.json").read_text()) for r in range(2)]
            for i in range(len(configs))]


def _adapter(run: Path, folder: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run / folder / "adapter_model.safetensors")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_one_process_and_resumes(tmp_path, monkeypatch):
    from minitune.config import ModelArgs
    from minitune.model import build_from_config
    from minitune.run import train

    # the references: 1 process x batch 2 x grad_accum 2, in this process
    single_batches: list = []
    monkeypatch.setattr("minitune.data.Collator.__call__", _recorder(single_batches))
    single = train(_config(tmp_path / "single", grad_accum=2))
    monkeypatch.undo()
    base = tmp_path / "tiny-llama"
    build_from_config(ModelArgs(preset="tiny-llama"), seed=0).save_pretrained(base)
    single_4bit = train(_config_4bit(tmp_path / "single-4bit", base, grad_accum=2))

    # one launch of 2 processes: the DDP run; a run resumed from its step-3 checkpoint (the middle
    # of the first epoch) into another folder; a 4-bit LoRA run
    ddp, resumed, ddp_4bit = tmp_path / "ddp", tmp_path / "resumed", tmp_path / "ddp-4bit"
    ranks, ranks_resumed, ranks_4bit = _launch(
        tmp_path, _config(ddp), _config(resumed, resume=str(ddp / "checkpoint-000003")), _config_4bit(ddp_4bit, base))

    # both processes ran, in one process group of 2
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["num_processes"] for r in ranks] == [2, 2]
    # each run let go of its DDP model before ending the group (else the group outlives its
    # destruction, and the interpreter's teardown can abort a finished process)
    assert [r["ddp_models_alive_at_destroy"] for run in (ranks, ranks_resumed, ranks_4bit) for r in run] == [0] * 6
    # each process got its own shard: every other batch of the one seeded order (both epochs and
    # the evaluation), so together they saw exactly what the single process saw, nothing twice
    assert ranks[0]["batches"] == single_batches[0::2]
    assert ranks[1]["batches"] == single_batches[1::2]
    assert ranks[0]["batches"][0] != ranks[1]["batches"][0]

    # the same schedule: 24 rows / (2 x 2 per step) = 6 steps per epoch, 2 epochs
    assert single.state.step == 12 and [r["step"] for r in ranks] == [12, 12]
    one, two = _log(tmp_path / "single"), _log(ddp)
    assert [r["step"] for r in two] == list(range(1, 13))  # logged once, by the main process
    assert [r["learning_rate"] for r in two] == pytest.approx([r["learning_rate"] for r in one], rel=1e-6)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    # evaluated over all 7 held-out rows once each, although they do not split evenly
    assert ranks[0]["eval_loss"] == ranks[1]["eval_loss"] == pytest.approx(single.metrics["eval_loss"], rel=1e-5)

    # the same adapter, to fp32 rounding (the largest differences are printed: pytest -s)
    ref = _adapter(tmp_path / "single")
    _assert_same(_adapter(ddp), ref, rtol=0, atol=1e-5, what="2 processes vs 1")
    assert any((v - _adapter(tmp_path / "single", "checkpoint-000003")[k]).abs().max() > 1e-3
               for k, v in ref.items())  # and training did move the adapter

    # each checkpoint written once, whole: rank 0 wrote the weights, every rank its training state
    folders = sorted(p.name for p in ddp.iterdir() if p.is_dir())
    assert folders == ["checkpoint-000003", "checkpoint-000006", "checkpoint-000009", "checkpoint-000012", "final"]
    for folder in folders:
        files = {p.name for p in (ddp / folder).iterdir()}
        assert {"COMPLETE", "adapter_model.safetensors", "training_state_0.pt", "training_state_1.pt"} <= files
    assert not list(ddp.glob(".*"))  # no temporary folders or write probes left

    # resumed with 2 processes: on from where step 3 left off, to the same adapter
    assert [r["step"] for r in ranks_resumed] == [12, 12]
    assert ranks_resumed[0]["batches"] == single_batches[6::2]
    assert ranks_resumed[1]["batches"] == single_batches[7::2]
    assert [r["step"] for r in _log(resumed)] == list(range(4, 13))
    _assert_same(_adapter(resumed), _adapter(ddp), rtol=0, atol=0, what="2 processes resumed vs uninterrupted")

    # 4-bit LoRA under DDP: each process quantizes its own copy; it trains like one process does
    assert [r["step"] for r in ranks_4bit] == [4, 4]
    assert [r["loss"] for r in _log(ddp_4bit)] == pytest.approx([r["loss"] for r in _log(tmp_path / "single-4bit")],
                                                                rel=1e-4)
    _assert_same(_adapter(ddp_4bit), _adapter(tmp_path / "single-4bit"), rtol=0, atol=1e-5,
                 what="4-bit LoRA, 2 processes vs 1")
    assert single_4bit.state.step == 4


def _assert_same(got: dict, ref: dict, *, rtol: float, atol: float, what: str) -> None:
    """Every tensor within `atol` (+ `rtol`); prints the largest difference, which the README quotes."""
    assert got.keys() == ref.keys() and len(ref) > 0
    largest = max((got[k] - ref[k]).abs().max().item() for k in ref)
    scale = max(v.abs().max().item() for v in ref.values())
    print(f"\n{what}: largest difference {largest:.2g} on weights up to {scale:.2g}"
          + (" (bit for bit)" if all(torch.equal(got[k], ref[k]) for k in ref) else ""))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# --- the shipped accelerate configs ----------------------------------------------------------------

ACCELERATE_CONFIGS = {  # file -> (launch mode, processes)
    "single-gpu": ("NO", 1),
    "multi-gpu-ddp": ("MULTI_GPU", 2),
    "cpu-2proc": ("MULTI_GPU", 2),  # turned into MULTI_CPU (gloo) by Accelerator(cpu=True)
    "multi-node": ("MULTI_GPU", 16),
    "fsdp-full": ("FSDP", 2),
    "fsdp-lora": ("FSDP", 2),
    "deepspeed-zero2": ("DEEPSPEED", 2),
    "deepspeed-zero3": ("DEEPSPEED", 2),
}


@pytest.mark.parametrize("name", list(ACCELERATE_CONFIGS))
def test_accelerate_config_is_accepted_by_accelerate_launch(name, monkeypatch):
    """Each file goes through what `accelerate launch --config_file` does before starting processes:
    parse (unknown keys fail), merge into the launch arguments, build the processes' environment,
    and build the FSDP / DeepSpeed plugin from it (deepspeed itself is not installed)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = REPO / "configs/accelerate" / f"{name}.yaml"
    mode, processes = ACCELERATE_CONFIGS[name]
    text = path.read_text()
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml" in text  # the header shows its use
    cfg = load_config_from_file(str(path))
    assert str(cfg.distributed_type).endswith(mode) and cfg.num_processes == processes
    # minitune passes training.mixed_precision to the Accelerator, which overrides the file's
    assert cfg.mixed_precision == "no"
    assert f"configs/accelerate/{name}.yaml" in (REPO / "docs" / "precision-and-devices.md").read_text()  # documented

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(path), "train.py", "--config", "configs/tiny-llama.yaml"]))
    assert args.num_processes == processes
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (mode == "MULTI_GPU", mode == "FSDP",
                                                                     mode == "DEEPSPEED")
    if mode == "NO":
        return
    if mode == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():  # what the launched processes would see
        monkeypatch.setenv(key, value)
    if mode == "MULTI_GPU":
        assert int(args.nproc_per_node) * cfg.num_machines == processes
        if cfg.num_machines > 1:
            rendezvous = getattr(args, "master_addr", None) or getattr(args, "rdzv_endpoint", "")
            assert args.nnodes == str(cfg.num_machines) and cfg.main_process_ip in rendezvous
    elif mode == "FSDP":
        plugin = FullyShardedDataParallelPlugin()
        # FSDP2 shards frozen and trainable parameters alike (LoRA), one unit per decoder layer, and
        # checkpoints gather the full state dict (checkpoint.py saves it from rank 0)
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert plugin.cpu_offload is not None and not plugin.activation_checkpointing
    else:
        plugin = DeepSpeedPlugin()
        stage = int(name[-1])
        assert plugin.zero_stage == stage and plugin.deepspeed_config["gradient_accumulation_steps"] == 1
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


def test_every_shipped_accelerate_config_is_checked():
    assert sorted(p.stem for p in (REPO / "configs/accelerate").glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)
