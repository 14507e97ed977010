"""Callbacks without a framework: `on_step(state, metrics)` runs after every logged step, so your
codebase can send the metrics to its own system; returning a true value stops the run (which still
saves its final checkpoint).

    python examples/05_on_step_callback.py [OUTPUT_DIR]
"""

import sys
from pathlib import Path

import minitune

REPO = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-callback")
seen = []


def on_step(state: minitune.TrainState, metrics: dict) -> bool:
    seen.append((state.step, round(metrics["loss"], 4)))  # e.g. my_tracker.log(metrics, step=state.step)
    return state.step >= 3  # early stop: any true value


config = {
    "model": {"preset": "tiny-llama", "tokenizer": str(REPO / "tests/fixtures/tokenizers/gpt2")},
    "data": {"path": str(REPO / "data/english_quotes.jsonl"), "prompt": "{quote} ->: ", "response": "{tags}",
             "max_length": 64, "max_samples": 64},
    "training": {"output_dir": str(out), "max_steps": 50, "batch_size": 4, "overwrite": True},
    "logging": {"progress": "none"},
}
result = minitune.train(config, on_step=on_step)
print(f"callback saw {seen}")
print(f"stopped at step {result.state.step} ({result.state.stop_reason}); final checkpoint {result.checkpoint}")
