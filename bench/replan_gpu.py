"""The GPU memory cells of a `gpu_check.py` run, predicted again on any machine by today's planner.

    python bench/replan_gpu.py                                        # bench/results/gpu-2026-12-05-memory.md
    python bench/replan_gpu.py bench/results/<run>-memory.md --out bench/results/<run>-replanned.md

A GPU is lent now and then; the planner changes in between. This reads the measured cells of a run's
memory table (`bench/memory_grid.py --grid gpu`: model, method, batch x seq, peak allocated) and
predicts each again with the cell's own settings (bench/cell.py, the `gpu` grid's precision: fp32
weights, bf16 autocast, bf16 4-bit compute), as `minitune.planner.simulate` does for a CUDA run, on
fake tensors: no GPU and no weights needed (about 10 s a cell). The table: measured, predicted by
the run itself, predicted now, and the ratio measured / now. The tensor prediction leaves out
cuBLAS's workspaces, which `max_memory_allocated` counts (64 MiB on Hopper: the `process` terms
add them).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
MB = 2**20


def measured_cells(table: str) -> list[dict]:
    """The ok rows of a memory grid table: model, method label, batch, seq, peak and predicted MiB."""
    rows = []
    for line in table.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) < 8 or cols[3] != "ok" or not re.fullmatch(r"\d+x\d+", cols[2]):
            continue
        b, s = map(int, cols[2].split("x"))
        rows.append({"model": cols[0], "method": cols[1], "batch_size": b, "seq_len": s,
                     "peak_mb": float(cols[6].replace(",", "")), "then_mb": float(cols[7].replace(",", ""))})
    return rows


def predict(cell: dict) -> float:
    """Today's predicted peak (MiB) of a GPU grid cell."""
    import cell as cells
    from memory_grid import GRIDS, METHODS, cell_spec

    from minitune.device import resolve_precision
    from minitune.planner import simulate, target
    from minitune.planner.simulation import meta_model

    key = next(k for k, (label, _) in METHODS.items() if label == cell["method"])
    # the grid's own cell (the run's loss was the default, `auto`)
    spec = {**cells.DEFAULTS, **cell_spec(GRIDS["gpu"], cell["model"], METHODS[key][1], cell["batch_size"],
                                          cell["seq_len"], "auto")}
    cfg, _ = resolve_precision(cells.cell_config(spec), "cuda", caps=target("H100").caps)
    model = meta_model(cfg)[0]
    return simulate(model, cfg, steps=cells.cell_steps(spec, model.config.is_encoder_decoder), device_type="cuda",
                    cuda_capability=(9, 0)).total / MB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", nargs="?", type=Path, default=REPO / "bench/results/gpu-2026-12-05-memory.md")
    p.add_argument("--out", type=Path, help="write the markdown table here too")
    args = p.parse_args(argv)
    cells = measured_cells(args.table.read_text())
    if not cells:
        print(f"error: no measured cells in {args.table}: give a memory table of bench/memory_grid.py", file=sys.stderr)
        return 2
    lines = [f"Cells of `{args.table.relative_to(REPO) if args.table.is_relative_to(REPO) else args.table}`, "
             f"predicted again: `python bench/replan_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
             "", "| model | method | batch x seq | measured MiB | predicted then | predicted now | measured / now |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        now = predict(c)
        lines.append(f"| {c['model']} | {c['method']} | {c['batch_size']}x{c['seq_len']} | {c['peak_mb']:,.0f} | "
                     f"{c['then_mb']:,.0f} | {now:,.0f} | {c['peak_mb'] / now:.3f} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
