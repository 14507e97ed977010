"""How many distinct batch widths a run sees, and what padding to a multiple costs (a benchmark).

    python bench/batch_widths.py                    # the opt-125m soak's data: quotes, gpt2 tokens, batch 4 x <=128, 2 epochs

Each new width costs RSS once (the CPU kernels keep a cache entry per shape: bench/shape_cache.py),
so what matters is how many widths there are and how late new ones still appear. For
data.pad_to_multiple_of = 0 (pad to the longest example), 8 and 16, over a seeded order drawn as the run draws it:
padded positions (the compute) against the real tokens, distinct widths, and the step of the last new one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--multiples", type=int, nargs="+", default=[0, 8, 16])
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from minitune.config import DataArgs
    from minitune.data import build_data, make_dataloader

    tok = AutoTokenizer.from_pretrained(str(REPO / "tests/fixtures/tokenizers/gpt2"))
    print("| pad_to_multiple_of | padded positions | vs 0 | distinct widths | new widths after step 100 | last new width at step |")
    print("|---:|---:|---:|---:|---:|---:|")
    first_total = None
    for m in args.multiples:
        data_args = DataArgs(path=str(REPO / "data/english_quotes.jsonl"), prompt="{quote} ->: ", response="{tags}",
                             max_length=128, max_samples=2000, validation_fraction=0, pad_to_multiple_of=m)
        data = build_data(data_args, tok, seq2seq=False, batch_size=4)
        loader = make_dataloader(data.train, data.collator, batch_size=4, shuffle=True, seed=42)
        total, first = 0, {}
        step = 0
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                step += 1
                total += batch["attention_mask"].numel()
                first.setdefault(batch["input_ids"].shape[1], step)
        first_total = first_total or total
        print(f"| {m} | {total:,} | {total / first_total - 1:+.1%} | {len(first)} | "
              f"{sum(1 for s in first.values() if s > 100)} | {max(first.values())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
