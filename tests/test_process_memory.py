"""The process peak (what the OS or driver sees) and the malloc settings that keep RSS from growing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minitune import process_memory as pm
from minitune.config import load_config
from minitune.memory import MB
from minitune.planner import format_plan, plan
from minitune.rss import KernelPeakRss, PeakWatcher, rss_bytes

from .conftest import measured_config, tiny_config


def test_cpu_process_peak_is_baseline_plus_tensors_plus_overhead():
    p = pm.process_peak("cpu", 300 * MB, baseline=500 * MB)
    assert set(p.terms) == {"baseline", "tensors", "allocator_overhead"}
    assert p.terms["baseline"] == 500 * MB and p.terms["tensors"] == 300 * MB
    assert p.terms["allocator_overhead"] == pm.OVERHEAD_FIXED + int(pm.OVERHEAD_FRACTION * 300 * MB)
    assert p.total == sum(p.terms.values()) and p.to_dict() == {"process_peak": p.total, "process_terms": p.terms}
    assert pm.process_peak("mps", 300 * MB, baseline=500 * MB).total == p.total  # unified memory: the same terms


def test_loading_counts_only_where_it_holds_more_than_training():
    overhead = pm.allocator_overhead(300 * MB)
    below = pm.process_peak("cpu", 300 * MB, baseline=500 * MB, loading=300 * MB)
    assert "loading_above_training" not in below.terms  # training's peak is the higher, or equal
    above = pm.process_peak("cpu", 300 * MB, baseline=500 * MB, loading=900 * MB)
    loaded = 900 * MB + pm.allocator_overhead(900 * MB)  # loading's tensors and the allocator's overhead on them
    assert above.terms["loading_above_training"] == loaded - 300 * MB - overhead
    assert above.total == 500 * MB + loaded
    assert pm.process_peak("cuda", 300 * MB, loading=900 * MB).total == 300 * MB + pm.CUDA_CONTEXT  # host memory


@pytest.mark.parametrize(("preset", "dtype", "quant"), [
    ("tiny-llama", "float32", "none"), ("tiny-opt", "bfloat16", "none"), ("tiny-t5", "float32", "none"),
    ("tiny-opt", "float32", "8bit"), ("tiny-llama", "float32", "4bit"),
])
def test_load_peak_of_a_random_init_model_is_the_allocators_peak_while_it_loads(preset, dtype, quant):
    import torch

    from minitune.cpu_allocator import AllocatorTrace
    from minitune.model import load_model
    from minitune.planner import load_peak

    if quant != "none":
        pytest.importorskip("bitsandbytes")
    cfg = load_config(tiny_config(preset, model={"dtype": dtype}, quantization={"mode": quant, "compute_dtype": dtype}))
    with AllocatorTrace() as trace:
        model = load_model(cfg.model, cfg.quantization, device=torch.device("cpu"))
    predicted = load_peak(cfg)
    held = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in
                                                      [*model.parameters(), *model.buffers()]}.values())
    if quant == "none":  # the build: one tensor per parameter, an output layer tied away never allocated;
        # the real init's own temporaries (a rotary table computed: 60 bytes for tiny-llama) are not counted
        assert predicted.bytes == held and 0 <= trace.peak() - held < 4096, predicted.how
    else:  # the quantized model, one block's weights before quantizing, one layer's quantizing (a measured
        # bytes-per-weight)
        assert predicted.bytes == pytest.approx(trace.peak(), rel=0.005), predicted.how


def test_load_peak_of_a_safetensors_folder_follows_its_stored_dtype(tmp_path):
    from minitune.model import load_model
    from minitune.planner import load_peak

    model = load_model(load_config(tiny_config("tiny-opt")).model)
    model.save_pretrained(tmp_path)  # float32
    weights = sum(p.numel() * 4 for p in model.parameters())
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))

    def peak(dtype, quant="none"):
        return load_peak(load_config(tiny_config(model={"preset": None, "name_or_path": str(tmp_path), "dtype": dtype},
                                                 quantization={"mode": quant, "compute_dtype": "float32"}))).bytes

    assert peak("float32") == weights  # views of the mapped file
    assert peak("bfloat16") == size + weights // 2  # the file's pages beside the converted weights
    assert peak("float32", "8bit") == size


def test_a_plan_counts_loading_where_it_holds_the_peak(monkeypatch, tmp_path):
    # a float32 checkpoint loaded in bfloat16 for LoRA, one example of 8 tokens: loading (the file's
    # pages beside the converted weights, 3x the bf16 weights) holds more than a training step on the
    # bf16 weights (with the 128 KiB threshold, whose heap keeps nothing more)
    from transformers import OPTConfig, OPTForCausalLM

    monkeypatch.setenv("MINITUNE_MALLOC", "lean")
    config = OPTConfig(hidden_size=512, ffn_dim=2048, num_hidden_layers=2, num_attention_heads=8,
                       vocab_size=512, max_position_embeddings=64, word_embed_proj_dim=512)
    OPTForCausalLM(config).save_pretrained(tmp_path)  # float32, 6.8M parameters
    cfg = load_config(tiny_config(model={"preset": None, "name_or_path": str(tmp_path), "dtype": "bfloat16"},
                                  training={"batch_size": 1}, data={"max_length": 8}))
    p = plan(cfg, "cpu", suggest=False, baseline=200 * MB)
    assert p.prediction.loading > 2 * p.prediction.total
    loaded = p.prediction.loading + pm.allocator_overhead(p.prediction.loading)
    assert p.process.total == 200 * MB + loaded and "loading_above_training" in p.process.terms
    assert p.to_dict()["predicted"]["loading"] == p.prediction.loading
    assert "predicted loading peak" in format_plan(p)


def test_the_default_baseline_is_this_process_now():
    now = rss_bytes()
    base = pm.process_peak("cpu", 0).terms["baseline"]
    assert abs(base - now) < 0.05 * now


def test_cuda_process_peak_carries_the_context_instead_of_a_cut_budget():
    p = pm.process_peak("cuda", 2 * 2**30)
    assert p.terms == {"tensors": 2 * 2**30, "cuda_context": pm.CUDA_CONTEXT}
    cfg = load_config(tiny_config("tiny-llama"))
    result = plan(cfg, "T4", suggest=False)
    assert result.target.budget == result.target.memory  # no flat 1 GiB cut from the budget
    # the plan's CUDA process is the simulation's own terms (context, cuBLAS workspaces, tensors in
    # blocks, the caching allocator's reserve): cuda_memory.cuda_process_terms, not the flat fallback
    assert result.process.terms == result.prediction.cuda
    assert set(result.process.terms) == {"cuda_context", "cublas_workspace", "tensors", "allocator_cache"}
    assert result.process.total > result.prediction.total


def test_fits_is_decided_on_the_process_peak():
    cfg = load_config(tiny_config("tiny-llama"))
    base = plan(cfg, "cpu", suggest=False, baseline=200 * MB)
    tensors, whole = base.prediction.total, base.process.total
    assert whole == 200 * MB + tensors + pm.allocator_overhead(tensors) + base.process.terms.get("malloc_heap", 0)
    between = plan(cfg, "cpu", budget=(tensors + whole) // 2, suggest=False, baseline=200 * MB)
    assert not between.fits  # the tensors alone would fit this budget; the process does not
    assert plan(cfg, "cpu", budget=whole, suggest=False, baseline=200 * MB).fits
    out = between.to_dict()
    assert out["process_peak"] == whole and out["process_terms"]["baseline"] == 200 * MB
    assert out["headroom_bytes"] == (tensors + whole) // 2 - whole
    text = format_plan(between)
    assert "predicted process peak" in text and "allocator_overhead" in text and "does not fit" in text


def test_a_run_records_and_shows_its_process_peak(tmp_path, capsys):
    from minitune.run import train

    result = train(measured_config("tiny-llama", tmp_path / "run", training={"max_steps": 2}))
    memory = json.loads((tmp_path / "run" / "memory.json").read_text())
    pred = memory["predicted"]
    assert pred["process_peak"] == sum(pred["process_terms"].values())
    assert pred["process_terms"]["tensors"] == pred["total"]
    assert pred["process_terms"]["baseline"] > 50 * MB  # Python + torch at least
    assert memory["process_peak_mb"] >= memory["baseline_mb"]
    assert result.memory["process_peak_kind"].startswith("peak RSS")
    out = capsys.readouterr().out
    assert "process memory" in out and "predicted (process_peak)" in out


_CHURN = r"""
import ctypes, os, sys
sys.path.insert(0, sys.argv[1])
from minitune.process_memory import tune_malloc
print(tune_malloc(), file=sys.stderr)
size = int(sys.argv[2]) << 10
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)  # glibc would raise its threshold here
before = rss()
blocks = []
for i in range(32):  # variable-size "tensors", each followed by a 64 KiB block still alive, as a step leaves them
    n = size + i * 4096
    b = libc.malloc(n); ctypes.memset(b, 1, n); blocks.append(b)
    keep = libc.malloc(65536); blocks.append(None); blocks.append(keep)
for i in range(0, len(blocks), 3):
    libc.free(blocks[i])
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or pm._glibc() is None, reason="glibc only")
@pytest.mark.parametrize(("env", "block_kib", "kept_mib"), [
    ({"GLIBC_TUNABLES": pm.TCACHE_OFF}, 3072, (56, 68)),  # minitune's (as train.py restarts): above 2 MiB, from
                                                          # the heap's top pad while it lasts (64 MiB), the rest mapped
    ({"GLIBC_TUNABLES": pm.TCACHE_OFF}, 6144, (56, 68)),  # twice as much: the same pad kept, the rest returned
    ({"GLIBC_TUNABLES": pm.TCACHE_OFF}, 1024, (16, 64)),  # below it: the heap keeps them for the next step (the speed)
    ({}, 1024, (0, 4)),  # not started with the thread cache off: the 128 KiB threshold, mapped, returned
    ({"MINITUNE_MALLOC": "lean", "GLIBC_TUNABLES": pm.TCACHE_OFF}, 1024, (0, 4)),  # lean: 128 KiB anyway
    ({"MINITUNE_MALLOC": "default"}, 3072, (40, 200)),  # glibc's threshold, raised by the first large free
])
def test_tuned_malloc_returns_freed_tensors_to_the_system(env, block_kib, kept_mib):
    """32 blocks of about `block_kib` freed between blocks still alive: what the RSS keeps of them
    under each MINITUNE_MALLOC setting."""
    import os

    from .conftest import REPO

    clean = {k: v for k, v in os.environ.items() if k not in ("MINITUNE_MALLOC", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", _CHURN, str(REPO), str(block_kib)], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    kept = int(proc.stdout.strip())
    assert kept_mib[0] <= kept <= kept_mib[1], (kept, proc.stderr)


_SMALL_FREES = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from minitune.process_memory import tune_malloc
print(tune_malloc(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                                                "keepcost").split()]
if not hasattr(libc, "mallinfo2"):
    sys.exit(77)  # glibc before 2.33
libc.mallinfo2.restype = Info
n = 1_800_000
small = (ctypes.c_void_p * n)()  # mapped (above the threshold); Python allocates nothing in the heap in the loops
for i in range(n):  # 192 MiB of small objects at the heap's end, as a step leaves them
    small[i] = libc.malloc(96)
for i in range(n - 1, -1, -1):
    libc.free(small[i])
keep = libc.malloc(2000)  # the next allocation of 1 KiB or more
print(libc.mallinfo2().keepcost >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or pm._glibc() is None, reason="glibc only")
@pytest.mark.parametrize(("setting", "top_mib"), [
    ("", ((pm.TOP_PAD >> 20) - 2, (pm.TOP_PAD >> 20) + 1)),  # minitune's: no fast bins, each free next to the top
                                                       # merges and the top is trimmed down to the pad
    ("default", (180, 200)),  # glibc's: the frees wait in fast bins, merged into the top by the next larger
                              # malloc, which does not trim it: RSS keeps 192 MiB that nothing holds
])
def test_small_frees_at_the_heaps_end_go_back_to_the_system(setting, top_mib):
    """The free top of the heap (glibc's keepcost) after 1,800,000 small blocks at its end are freed,
    with the thread cache off (as train.py restarts itself)."""
    import os

    from .conftest import REPO

    clean = {k: v for k, v in os.environ.items() if k not in ("MINITUNE_MALLOC", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", _SMALL_FREES, str(REPO)], capture_output=True, text=True, timeout=60,
                          env={**clean, "GLIBC_TUNABLES": pm.TCACHE_OFF, "MINITUNE_MALLOC": setting})
    if proc.returncode == 77:
        pytest.skip("glibc has no mallinfo2 (before 2.33)")
    assert proc.returncode == 0, proc.stderr
    top = int(proc.stdout.strip())
    assert top_mib[0] <= top <= top_mib[1], (top, proc.stderr)


def test_an_unknown_malloc_setting_is_refused_with_the_ones_there_are(monkeypatch):
    from minitune.errors import MinituneError

    monkeypatch.setenv("MINITUNE_MALLOC", "quick")
    with pytest.raises(MinituneError, match="MINITUNE_MALLOC='quick'.*'lean'.*'default'"):
        pm.malloc_setting()
    monkeypatch.setenv("MINITUNE_MALLOC", "fast")  # yesterday's opt-in: what unset gives now
    with pytest.raises(MinituneError, match="fast is gone.*unset MINITUNE_MALLOC"):
        pm.malloc_setting()
    monkeypatch.setenv("MINITUNE_MALLOC", " Lean ")
    assert pm.malloc_setting() == "lean" and pm.malloc_mode() == "lean"


@pytest.mark.skipif(pm._glibc() is None, reason="glibc's heap only")
def test_the_heap_term_grows_with_the_transient_tensors_in_heap_mode_and_lean_has_none(monkeypatch):
    cfg = load_config(tiny_config("tiny-llama"))
    monkeypatch.delenv("MINITUNE_MALLOC", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", pm.TCACHE_OFF)  # as train.py restarts itself
    assert pm.malloc_mode() == "heap"
    p = plan(cfg, "cpu", suggest=False, baseline=200 * MB)
    transient = sum(p.prediction.breakdown.get(k, 0) for k in ("activations", "logits/loss", "temporaries"))
    assert transient > 0
    fixed, share = pm.HEAP_KEPT["heap"]
    assert p.process.terms["malloc_heap"] == int(fixed + share * transient) == pm.heap_kept(transient)
    assert "MINITUNE_MALLOC=lean: none" in format_plan(p)
    monkeypatch.delenv("GLIBC_TUNABLES")  # a process that did not start with the thread cache off: lean
    assert pm.malloc_mode() == "lean"
    default = plan(cfg, "cpu", suggest=False, baseline=200 * MB)
    assert "malloc_heap" not in default.process.terms
    assert default.process.total == p.process.total - p.process.terms["malloc_heap"]
    assert "malloc_heap" not in pm.process_peak("mps", 10 * MB, baseline=0, transient=5 * MB).terms  # macOS malloc


@pytest.mark.skipif(pm._glibc() is None, reason="glibc only")
def test_malloc_env_turns_the_thread_cache_off_unless_told_otherwise():
    assert pm.malloc_env({})["GLIBC_TUNABLES"] == pm.TCACHE_OFF
    mine = "glibc.malloc.check=0"
    assert pm.malloc_env({"GLIBC_TUNABLES": mine})["GLIBC_TUNABLES"] == f"{mine}:{pm.TCACHE_OFF}"
    yours = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}  # your own tcache size is kept
    assert pm.malloc_env(yours) == yours
    for setting in ("lean", "default"):
        assert "GLIBC_TUNABLES" not in pm.malloc_env({"MINITUNE_MALLOC": setting})


_RESTART = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
print("started", os.getpid(), flush=True)
from minitune.process_memory import restart_with_malloc_env, tune_malloc
restart_with_malloc_env()
print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[2:], tune_malloc(), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or pm._glibc() is None, reason="glibc only")
def test_an_entry_point_restarts_itself_once_with_the_thread_cache_off():
    import os

    from .conftest import REPO

    clean = {k: v for k, v in os.environ.items() if k not in ("MINITUNE_MALLOC", "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", _RESTART, str(REPO), "a b", "c"], capture_output=True, text=True,
                          timeout=60, env=clean)
    assert proc.returncode == 0, proc.stderr
    first, again, running = proc.stdout.splitlines()  # started, restarted (the same process), ran on
    assert first == again and running.startswith("running " + first.split()[1] + " " + pm.TCACHE_OFF + " ['a b', 'c']")
    assert "2048 KiB" in running and "thread cache and fast bins off, top pad 64 MiB" in running
    lean = subprocess.run([sys.executable, "-c", _RESTART, str(REPO)], capture_output=True, text=True, timeout=60,
                          env={**clean, "MINITUNE_MALLOC": "lean"})
    assert lean.stdout.count("started") == 1 and "128 KiB" in lean.stdout and "None" in lean.stdout


def test_on_cuda_the_measured_process_is_the_reserve_peak_plus_what_the_driver_shows_beyond_it(monkeypatch):
    # compared with process_peak, which counts the context: the driver's view, not the reserve alone
    import types

    from minitune.run import measured_process_peak

    GiB = 2**30
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda device=None: (70 * GiB, 80 * GiB))  # 10 GiB used now
    monkeypatch.setattr("torch.cuda.memory_reserved", lambda device=None: 1 * GiB)  # after training: 1 GiB kept
    monkeypatch.setattr("torch.cuda.max_memory_reserved", lambda device=None: 12 * GiB)
    measured, what = measured_process_peak(types.SimpleNamespace(kind="cuda", device=0))
    assert measured == 12 * GiB + 9 * GiB and "context" in what  # 9 GiB outside the allocator


def test_peak_watcher_samples_any_value_keeps_its_peak_and_freezes_at_stop():
    import time

    value = [10]
    watch = PeakWatcher(lambda: value[0], interval_s=0.001, kernel=False)
    assert watch.source == "sampled" and watch.sampling and watch.peak_before is None
    value[0] = 50  # a peak, seen by the thread...
    deadline = time.monotonic() + 2.0
    while watch.read() < 50 and time.monotonic() < deadline:
        time.sleep(0.005)
    value[0] = 20  # ...and kept once gone
    time.sleep(0.01)
    assert watch.read() == 50
    watch.reset()
    assert watch.read() == 20
    value[0] = 70
    deadline = time.monotonic() + 2.0
    while watch.read() < 70 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert watch.stop() == 70 and not watch.sampling
    value[0] = 99  # after stop(): not watched
    time.sleep(0.01)
    assert watch.read() == 70
    watch.reset(5)
    assert watch.read() == 5
    value[0] = 5
    slow = PeakWatcher(lambda: value[0], interval_s=60, kernel=False)  # its thread never samples in this test
    value[0] = 40
    assert slow.stop() == 40  # the value when it stopped counts


def test_peak_watcher_reads_the_kernels_mark_and_samples_when_it_fails(monkeypatch):
    watch = PeakWatcher()
    if watch.source != "kernel peak":
        pytest.skip("no resettable kernel peak RSS here")
    assert not watch.sampling and watch.peak_before >= rss_bytes() - 4 * MB
    buf = bytearray(100 * MB)
    buf[::4096] = b"x" * len(buf[::4096])
    del buf  # a 100 MB peak, freed at once: in the kernel's mark without waiting
    assert watch.read() >= rss_bytes() + 90 * MB

    def refused(self):
        raise PermissionError("clear_refs: Permission denied")

    monkeypatch.setattr(KernelPeakRss, "reset", refused)
    with pytest.warns(UserWarning, match="RSS: the kernel's peak RSS failed .*Permission denied.*sampling it every"):
        watch.reset()
    assert watch.source == "sampled" and watch.sampling
    assert watch.read() < rss_bytes() + 20 * MB  # from now on, by the sampler
    watch.stop()
    assert not watch.sampling


def test_eval_py_sets_the_allocator_as_train_py_does(monkeypatch, capsys):
    from minitune import cli, evaluate
    from minitune.errors import CheckpointError

    calls = []
    monkeypatch.setattr(cli, "restart_with_malloc_env", lambda: calls.append("restart"))
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append("tune") or "")

    def no_checkpoint(*args, **kwargs):
        calls.append("evaluate")
        raise CheckpointError("no checkpoint at nowhere")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", no_checkpoint)
    monkeypatch.setattr(sys, "argv", ["eval.py", "-p", "nowhere", "--no-progress"])
    assert cli.main_eval() == 2  # the program itself: restarted first, the allocator set before any weights
    assert calls == ["restart", "tune", "evaluate"]
    assert "error: no checkpoint at nowhere" in capsys.readouterr().err
