"""Run a whole fine-tuning job from Python: `minitune.train(config, overrides)`.

The config can be a YAML path, a nested dict or a `minitune.Config`; overrides are `key=value`
strings (as on the command line) or a nested dict. Here: a 2-layer random Llama on the english
quotes shipped with minitune, in a few seconds on CPU.

    python examples/01_train_from_python.py [OUTPUT_DIR]
"""

import sys
from pathlib import Path

import minitune

REPO = Path(__file__).resolve().parents[1]  # the minitune checkout: data and tokenizer live there
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-train")

# 1. a YAML path plus command-line style overrides
result = minitune.train(
    REPO / "configs/tiny-llama.yaml",
    [f"training.output_dir={out / 'from-yaml'}", "training.max_steps=6", "training.overwrite=true",
     f"model.tokenizer={REPO / 'tests/fixtures/tokenizers/gpt2'}", f"data.path={REPO / 'data/english_quotes.jsonl'}"],
)
print(f"yaml: {result.state.step} steps, loss {result.metrics['loss']:.4f}, adapter in {result.checkpoint}")

# 2. the same job as a nested dict (what the YAML file holds)
config = {
    "model": {"preset": "tiny-llama", "tokenizer": str(REPO / "tests/fixtures/tokenizers/gpt2")},
    "lora": {"r": 4, "alpha": 8},
    "data": {"path": str(REPO / "data/english_quotes.jsonl"), "prompt": "{quote} ->: ", "response": "{tags}",
             "max_length": 64, "max_samples": 64},
    "training": {"output_dir": str(out / "from-dict"), "max_steps": 6, "batch_size": 4, "overwrite": True},
    "logging": {"progress": "none"},
}
result = minitune.train(config)
print(f"dict: {result.state.step} steps, loss {result.metrics['loss']:.4f}, adapter in {result.checkpoint}")
print(f"dict: {result.trainable_line}")
print(f"dict: peak memory {result.memory['peak_mb']:.0f} MiB ({result.memory['peak_label']})")
