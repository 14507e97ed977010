"""What `logging.memory=true` costs a real run: train.py with it on and off, alternated, each run a
whole process.

    python bench/profiler_cost.py                  # the default job, 30 steps, 3 pairs
    python bench/profiler_cost.py --pairs 2 --steps 12 --config smollm2-quotes

Per run: the kernel's peak RSS of the process (`wait4`; with the profiler on, which resets that peak
each step, the highest of it and the peaks in the run's memory.json), its wall time, and the steps' own time from
its log.jsonl (`step_time_s`): all steps, and the steps after the allocator trace's window
(`build.TRACE_STEPS`), which is what the profiler costs tokens/s in a long run. The start-up's
planner simulation (the prediction the measurement is compared with) runs only with the profiler on
and is in the wall time, not in the steps. Last, the profiler's own calls timed in this process:
after the trace's window they are all it does (on Linux no thread samples RSS: the kernel keeps the
peak), so their time over a step's is its cost to tokens/s, without the runs' noise. Prints a table; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minitune.build import TRACE_STEPS  # noqa: E402  (after the path)
from minitune.rss import MiB, max_rss_bytes  # noqa: E402


def run(config: str, steps: int, memory: bool, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "train.py"), "--config", config, f"training.max_steps={steps}",
           "data.validation_fraction=0", "logging.report=false", "training.overwrite=true", "logging.progress=none",
           f"training.output_dir={out}", f"logging.memory={'true' if memory else 'false'}"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    peak = max_rss_bytes(usage) / MiB  # the process's peak RSS, for an 'off' run
    if memory:  # the profiler resets the kernel's peak at each step: ru_maxrss covers the time since its last
        # reset; its memory.json has the peak from its start on and the process's peak before it
        summary = json.loads((out / "memory.json").read_text())
        peak = max(peak, summary["peak_mb"], summary.get("peak_before_start_mb") or 0)
    return {"memory": memory, "wall_s": wall, "peak_rss_mib": peak,
            "steps_s": sum(times), "after_trace_s": sum(times[TRACE_STEPS:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smollm2-quotes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pairs", type=int, default=3)
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for memory in ((True, False) if i % 2 == 0 else (False, True)):  # on off, off on, ...
                runs.append(run(args.config, args.steps, memory, Path(tmp) / f"run{len(runs)}"))
    print(f"# logging.memory on vs off: {args.config}, {args.steps} steps, {args.pairs} pairs (commit: git log -1)\n")
    print(f"| run | memory | wall s | all steps s | steps 1-{TRACE_STEPS} s | steps after them s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {'on' if r['memory'] else 'off'} | {r['wall_s']:.1f} | {r['steps_s']:.2f} | "
              f"{r['steps_s'] - r['after_trace_s']:.2f} | {r['after_trace_s']:.2f} | {r['peak_rss_mib']:.1f} |")
    on = [r for r in runs if r["memory"]]
    off = [r for r in runs if not r["memory"]]

    def ratio(key: str) -> str:
        return f"{statistics.median(r[key] for r in on) / statistics.median(r[key] for r in off):.3f}"

    def traced(group: list[dict]) -> float:
        return statistics.median(r["steps_s"] - r["after_trace_s"] for r in group)

    print(f"\nmedians, on / off: wall {ratio('wall_s')}, all steps {ratio('steps_s')}, "
          f"steps after the trace {ratio('after_trace_s')}, peak RSS {ratio('peak_rss_mib')}; "
          f"steps 1-{TRACE_STEPS} (traced when on) {traced(on):.2f} s / {traced(off):.2f} s")
    print("\nwhat the profiler's calls cost after the trace, timed here (the loop calls `step()` at each logged step, "
          f"`phase()` three times at a phased one): {calls_cost()}")
    return 0


def calls_cost(n: int = 2000) -> str:
    """Microseconds per MemoryProfiler.step() and .phase() on this machine's CPU, and where the peak
    RSS comes from (no thread runs beside training when it is the kernel's)."""
    from minitune.memory import MemoryProfiler

    with MemoryProfiler("cpu") as prof:
        t = time.perf_counter()
        for i in range(n):
            prof.step(i)
        step_us = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        for _ in range(n):
            prof.phase("forward")
        phase_us = (time.perf_counter() - t) / n * 1e6
        source = prof.rss_source
    return f"step() {step_us:.0f} us, phase() {phase_us:.0f} us, peak RSS: {source}"


if __name__ == "__main__":
    sys.exit(main())
