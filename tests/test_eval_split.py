"""`evaluate_loss` over 2 CPU processes (gloo) with odd batch limits: under FSDP / ZeRO-3 the forward
holds collectives, so every process must run the same number of forwards whatever `max_batches` is,
and the mean must still cover exactly the first `max_batches` batches of the one order.

A forward with an all-reduce inside stands in for a sharded model (an unwrapped module is treated as
one); a DDP-wrapped model runs the bare module, with no collective, and stops per process.

This file is also the launched worker: `python tests/test_eval_split.py RECORD_DIR`.
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
ROWS = 7  # 7 one-example batches over 2 processes: an uneven split
LIMITS = (1, 2, 3, 5, 7, 9, 0)


if __name__ == "__main__":  # the launched worker
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from torch.utils.data import DataLoader, TensorDataset

    from minitune.eval_loss import evaluate_loss

    # a mismatched collective fails after 30 s instead of hanging
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=30))])
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(float(ROWS))), batch_size=1))
    forwards = [0]

    def gathering_loss(net, batch):  # a sharded forward: waits for every process
        forwards[0] += 1
        dist.all_reduce(torch.ones(1))
        return batch[0].sum(), batch[0].numel()

    def plain_loss(net, batch):
        forwards[0] += 1
        return batch[0].sum(), batch[0].numel()

    record = {}
    for kind, model, loss_fn in (("sharded", torch.nn.Linear(1, 1), gathering_loss),
                                 ("ddp", accelerator.prepare(torch.nn.Linear(1, 1)), plain_loss)):
        for limit in LIMITS:
            forwards[0] = 0
            loss = evaluate_loss(accelerator, model, loader, max_batches=limit, loss_fn=loss_fn)
            record[f"{kind}-{limit}"] = {"loss": loss, "forwards": forwards[0]}
    Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    # the DDP model holds the process group: let go of it first (as minitune.run does), or the group
    # outlives end_training and the interpreter's teardown can abort the process
    del model
    accelerator.free_memory()
    accelerator.end_training()
    sys.exit(0)


import pytest  # noqa: E402


def test_every_process_runs_the_same_forwards_with_odd_limits(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU2), __file__, str(tmp_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the 2-process evaluation hung:\n{out[-2000:]}{err[-4000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for limit in LIMITS:
        used = min(limit or ROWS, ROWS)
        sharded = [r[f"sharded-{limit}"] for r in ranks]
        assert sharded[0]["forwards"] == sharded[1]["forwards"], (limit, sharded)
        ddp = [r[f"ddp-{limit}"] for r in ranks]
        # DDP: each process its own batches only (rank r: batches r, r + 2, ... below the limit)
        assert [d["forwards"] for d in ddp] == [len(range(r, used, 2)) for r in range(2)], (limit, ddp)
        want = sum(range(used)) / used  # batch i holds the value i: the mean of the first `used` batches
        assert ddp[0]["loss"] == ddp[1]["loss"] == pytest.approx(want)
        if 0 < limit <= ROWS:  # (past the rows, Accelerate's repeated example evens out the sharded split)
            assert sharded[0]["loss"] == sharded[1]["loss"] == pytest.approx(want), (limit, sharded)
