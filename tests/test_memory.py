import gc
import json
import sys
from unittest import mock

import pytest
import torch
from torch import nn

from minitune.cpu_allocator import AllocatorTrace
from minitune.memory import MB, MemoryProfiler, format_bytes, tensor_breakdown
from minitune.process_memory import release_free_memory
from minitune.rss import rss_bytes


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    model[0].to(torch.bfloat16).requires_grad_(False)
    model.register_buffer("mask", torch.zeros(10, dtype=torch.int8))
    return model


def test_breakdown_arithmetic_is_exact():
    model = _tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    model[2](model[1](model[0](x).float())).sum().backward()
    opt.step()
    b = tensor_breakdown(model, opt, peak_bytes=10 * MB)
    frozen_bf16 = (16 * 32 + 32) * 2  # Linear(16, 32) weight + bias in bf16
    trainable = (32 + 32 + 32 * 4 + 4) * 4  # LayerNorm weight+bias, Linear(32, 4) weight+bias, fp32
    # AdamW keeps exp_avg and exp_avg_sq (fp32, parameter-shaped) and a scalar fp32 'step' per parameter
    adam = 2 * trainable + 4 * 4
    assert b["frozen_weights/torch.bfloat16"] == frozen_bf16
    assert b["frozen_weights/torch.int8"] == 10
    assert b["trainable_weights"] == trainable
    assert b["gradients"] == trainable
    assert b["optimizer_state"] == b["optimizer_state/32bit"] == adam
    assert b["optimizer_state/8bit"] == 0
    total = frozen_bf16 + 10 + trainable * 2 + adam
    assert b["total_tensors"] == total
    assert b["activations_and_temporaries"] == 10 * MB - total


def test_breakdown_counts_tied_weights_once_and_never_negative():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    b = tensor_breakdown(model, peak_bytes=1)
    assert b["trainable_weights"] == 100 * 8 * 4
    assert b["activations_and_temporaries"] == 0


def test_assume_grads_counts_freed_gradients():
    model = _tiny()
    assert tensor_breakdown(model)["gradients"] == 0
    assert tensor_breakdown(model, assume_grads=True)["gradients"] == tensor_breakdown(model)["trainable_weights"]


def _touch_and_free_200_mb(prof: MemoryProfiler, wait_for_sampler: bool) -> None:
    import mmap
    import time

    from minitune.rss import rss_bytes

    # fresh anonymous pages, touched: resident whatever the allocator holds already (inside a long
    # test session, malloc may serve 200 MB from memory that is resident and free)
    before = rss_bytes()
    region = mmap.mmap(-1, 200 * MB)
    big = torch.frombuffer(region, dtype=torch.uint8).fill_(1)
    assert rss_bytes() >= before + 150 * MB  # the allocation is in the RSS
    # a sampler thread sees it within a few periods; a busy machine may delay it (up to 2 s)
    deadline = time.monotonic() + 2.0
    while wait_for_sampler and prof._watch.read() < before + 150 * MB and time.monotonic() < deadline:
        time.sleep(0.01)
    del big
    region.close()  # unmapped: freed within microseconds of being touched when not waiting


@pytest.mark.parametrize("kernel_peak", [True, False], ids=["kernel-peak", "sampler-thread"])
def test_cpu_peak_is_per_step_and_resets(kernel_peak, monkeypatch):
    from minitune.rss import KernelPeakRss

    if kernel_peak and KernelPeakRss.open() is None:
        pytest.skip("no resettable kernel peak RSS here (not Linux, or /proc/self/clear_refs not writable)")
    if not kernel_peak:
        monkeypatch.setattr(KernelPeakRss, "open", classmethod(lambda cls: None))
    with MemoryProfiler("cpu", sample_interval_s=0.002) as prof:
        assert prof.rss_source == ("kernel peak" if kernel_peak else "sampled")
        assert prof.summary()["peak_label"] == ("peak RSS" if kernel_peak else "peak RSS (sampled)")
        assert prof._watch.sampling != kernel_peak  # no thread where the kernel keeps the peak
        first = prof.step(1)
        assert first["mem/rss_mb"] > 0 and first["mem/peak_rss_mb"] >= first["mem/rss_mb"]
        _touch_and_free_200_mb(prof, wait_for_sampler=not kernel_peak)  # the kernel's mark needs no wait
        second = prof.step(2)
        assert second["mem/peak_rss_mb"] >= first["mem/rss_mb"] + 150
        assert second["mem/rss_mb"] < second["mem/peak_rss_mb"] - 150
        third = prof.step(3)
        assert third["mem/peak_rss_mb"] < second["mem/peak_rss_mb"] - 150
        assert prof.peak_bytes() >= second["mem/peak_rss_mb"] * MB
        assert prof.baseline_bytes > 0
        assert prof.peak_bytes(above_baseline=True) == prof.peak_bytes() - prof.baseline_bytes
    assert prof.rss_source == ("kernel peak" if kernel_peak else "sampled")  # still said after stop()


def test_kernel_peak_catches_a_peak_freed_at_once_and_reset_lowers_it():
    from minitune.rss import KernelPeakRss, rss_bytes

    counter = KernelPeakRss.open()
    if counter is None:
        pytest.skip("no resettable kernel peak RSS here")
    assert counter.peak_at_open >= rss_bytes() - 4 * MB
    counter.reset()
    low = counter.read()
    buf = bytearray(100 * MB)  # zero pages: write one byte a page to make them resident
    buf[::4096] = b"x" * len(buf[::4096])
    del buf
    assert counter.read() >= low + 90 * MB
    counter.reset()
    assert counter.read() < low + 50 * MB


def test_cuda_path_with_mocks():
    with mock.patch("torch.cuda.max_memory_allocated", return_value=300 * MB), \
            mock.patch("torch.cuda.memory_allocated", return_value=100 * MB), \
            mock.patch("torch.cuda.memory_reserved", return_value=400 * MB), \
            mock.patch("torch.cuda.reset_peak_memory_stats") as reset:
        prof = MemoryProfiler("cuda:0").start()
        rec = prof.step(1)
        prof.phase("load")
        prof.stop()
    assert rec == {"mem/allocated_mb": 100, "mem/reserved_mb": 400, "mem/peak_allocated_mb": 300}
    assert reset.call_count == 2  # at start and after the step's read
    assert prof.phases["load"]["mem/current_mb"] == 100


def test_mps_path_never_says_peak():
    with mock.patch("torch.mps.current_allocated_memory", return_value=50 * MB, create=True), \
            mock.patch("torch.mps.driver_allocated_memory", return_value=80 * MB, create=True), \
            mock.patch("torch.mps.recommended_max_memory", return_value=1000 * MB, create=True):
        with MemoryProfiler("mps", sample_interval_s=0.001) as prof:
            rec = prof.step(1)
    assert rec == {"mem/current_mb": 50, "mem/driver_mb": 80, "mem/max_sampled_mb": 50, "mem/headroom_mb": 920}
    assert not any("peak" in k for k in rec)
    assert "peak" not in prof.summary()["peak_label"]


def test_phases_summary_save_and_table(tmp_path):
    from rich.console import Console

    prof = MemoryProfiler("cpu", phases_every=2)
    assert prof.want_phases(2) and not prof.want_phases(3)
    with prof:
        prof.phase("load")
        prof.phase("lora")
        prof.step(1)
    prof.breakdown = tensor_breakdown(_tiny())
    prof.save(tmp_path / "memory.json")
    data = json.loads((tmp_path / "memory.json").read_text())
    assert set(data["phases"]) == {"load", "lora"} and data["steps"] == 1
    console = Console(record=True, width=120)
    console.print(prof.table())
    text = console.export_text()
    assert "after load" in text and "after lora" in text and "trainable_weights" in text


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * MB) == "3.0 MiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_allocator_trace_counts_exact_bytes_and_windows():
    keep = torch.empty(0)
    with AllocatorTrace() as trace:
        with trace.window("a"):
            keep = torch.empty(3 * MB, dtype=torch.uint8)  # held after the window
            tmp = torch.empty(5 * MB, dtype=torch.uint8)
            del tmp  # a peak of 8 MiB that lasts a moment
        with trace.window("b"):
            other = torch.empty(MB, dtype=torch.uint8)
            del other
    assert trace.peak("a") == 8 * MB  # exact: no page rounding, no sampling
    assert trace.peak("b") == 4 * MB  # the 3 MiB held when the window opened, plus 1 MiB
    assert trace.peak() == 8 * MB and trace.peak("never") == 0
    del keep


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads RSS after glibc's malloc_trim; other C allocators may keep freed pages resident")
def test_allocator_trace_keeps_no_event_per_operator():
    # only allocations and windows are recorded: operators that allocate nothing cost no memory
    # (an event per operator was ~200 bytes: 20 MiB here, 8 MiB a step of flan-t5-small)
    x, y = torch.ones(4), torch.ones(4)
    with AllocatorTrace() as trace:
        release_free_memory()
        before = rss_bytes()
        with trace.window("ops"):
            for _ in range(100_000):
                x.add_(y)  # in place, tensor operand: no allocation
        grown = rss_bytes() - before
    assert grown < 5 * MB, f"{grown / MB:.1f} MiB grown over 100k operators that allocate nothing"
    assert trace.peak("ops") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads RSS after glibc's malloc_trim; other C allocators may keep freed pages resident")
def test_allocator_trace_lets_go_of_the_profilers_events_when_it_ends():
    # the Python wrappers of the profiler's results (~1.6 KiB an event) must die when the trace ends,
    # not at the next full garbage collection, hours in (gc is off here: a cycle would keep them)
    x = torch.ones(4)
    gc.collect()
    gc.disable()
    try:
        with AllocatorTrace():
            for _ in range(15_000):  # 90k events: ~250 MiB of results when the trace stops
                x = x + 1
            release_free_memory()
            recording = rss_bytes()  # the profiler's own buffers are not the point here
        release_free_memory()
        kept = rss_bytes() - recording
    finally:
        gc.enable()
    assert kept < 40 * MB, f"{kept / MB:.0f} MiB of the trace's results still resident after it ended"


def test_profiler_training_peak_on_cpu_is_the_allocator_trace():
    other = torch.empty(8 * MB, dtype=torch.uint8)  # alive before the run (another model): not the run's
    prof = MemoryProfiler("cpu", window_steps=2).start()
    weights = torch.empty(4 * MB, dtype=torch.uint8)  # "loading"
    prof.training_starts()
    for step in (1, 2, 3):
        act = torch.empty((step + 1) * MB, dtype=torch.uint8)
        del act
        prof.optimizer_stepped()
        if step % 2 == 0:
            prof.step(step)  # records at log steps only: the window does not depend on them
    prof.stop()
    peak, what = prof.training_peak()
    # the run's tensors alive when training started (the 4 MiB "weights"; not the 8 MiB from before
    # the run), then step 2's 3 MiB on top; step 3 is not traced
    assert 4 * MB <= prof.held_at_start < 8 * MB and peak == prof.held_at_start + 3 * MB
    assert what == "held by the CPU allocator, steps 1-2"
    del weights, other


def test_kernel_peak_counters_share_the_mark_and_keep_their_own_peaks():
    from minitune.rss import KernelPeakRss, rss_bytes

    first = KernelPeakRss.open()
    if first is None:
        pytest.skip("no resettable kernel peak RSS here")
    buf = bytearray(100 * MB)
    buf[::4096] = b"x" * len(buf[::4096])
    del buf  # a 100 MB peak, gone
    second = KernelPeakRss.open()  # resets the process's one mark...
    assert second.read() < rss_bytes() + 20 * MB
    assert first.read() >= rss_bytes() + 90 * MB  # ...but the first counter keeps the peak it had not read
    first.reset()
    assert first.read() < rss_bytes() + 20 * MB


def test_profiler_samples_instead_when_the_kernel_peak_fails_mid_run(monkeypatch):
    from minitune.rss import KernelPeakRss

    with MemoryProfiler("cpu", sample_interval_s=0.002) as prof:
        if prof.rss_source != "kernel peak":
            pytest.skip("no resettable kernel peak RSS here")
        prof.step(1)

        def refused(self):
            raise PermissionError("clear_refs: Permission denied")

        monkeypatch.setattr(KernelPeakRss, "reset", refused)
        with pytest.warns(UserWarning, match="kernel's peak RSS failed .*Permission denied.*sampling"):
            record = prof.step(2)
        assert record["mem/peak_rss_mb"] > 0 and prof.rss_source == "sampled"
        watch = prof._watch
        assert watch.sampling
        assert prof.summary()["peak_label"] == "peak RSS (sampled)"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prof.step(3)  # goes on sampling, no second warning
    assert not watch.sampling and prof._watch is None


def test_an_unstopped_profiler_lets_go_of_the_kernels_mark_when_dropped():
    from minitune.rss import KernelPeakRss

    prof = MemoryProfiler("cpu").start()
    if prof.rss_source != "kernel peak":
        pytest.skip("no resettable kernel peak RSS here")
    alive = len(KernelPeakRss._alive)
    gc.disable()  # no cycle collection: the counter must go with the last reference
    try:
        del prof
        assert len(KernelPeakRss._alive) == alive - 1
    finally:
        gc.enable()


def test_a_last_read_that_fails_at_stop_is_said_to_be_sampled(monkeypatch):
    from minitune.rss import KernelPeakRss

    prof = MemoryProfiler("cpu").start()
    if prof.rss_source != "kernel peak":
        prof.stop()
        pytest.skip("no resettable kernel peak RSS here")

    def refused(self):
        raise PermissionError("/proc/self/status: Permission denied")

    monkeypatch.setattr(KernelPeakRss, "read", refused)
    with pytest.warns(UserWarning, match="kernel's peak RSS failed"):
        prof.stop()
    assert prof.rss_source == "sampled" and prof.summary()["peak_label"] == "peak RSS (sampled)"


def test_profiler_peak_stops_at_stop():
    with MemoryProfiler("cpu") as prof:
        prof.step(1)
    frozen = prof.peak_bytes()
    buf = bytearray(100 * MB)
    buf[::4096] = b"x" * len(buf[::4096])
    del buf  # after stop(): not the profiler's
    assert prof.peak_bytes() == frozen
    assert prof.summary()["peak_mb"] == frozen / MB
