"""Will it fit? The planner from Python: a config on a named device, and your own model's peak.

`minitune.plan` answers for a config (the model is built on the meta device: no weights, no
download); `minitune.simulate` predicts the peak of a model you already built, for a config's
batch, precision, loss and optimizer (the model itself is not touched: it runs on a fake copy).

    python examples/06_will_it_fit.py
"""

import minitune

cfg = minitune.load_config("tiny-llama", ["training.batch_size=16", "data.max_length=256"])
result = minitune.plan(cfg, "T4")  # or "A100-80", "M4-16", "cpu"; budget=12 * 2**30 for a budget of your own
print(f"T4: {result.prediction.total / 2**20:.1f} MiB of tensors, {result.process.total / 2**20:.1f} MiB with the CUDA "
      f"context, fits: {result.fits}")
print({role: round(n / 2**20, 1) for role, n in result.prediction.breakdown.items()})

# on CPU the process peak is the RSS before loading (this process's) + the tensors + malloc's overhead
cpu = minitune.plan(cfg, "cpu", suggest=False)
budget = cpu.process.total - cpu.prediction.total // 2  # half the tensors' memory short
tight = minitune.plan(cfg, "cpu", budget=budget, baseline=cpu.process.terms["baseline"])
first = next(s for s in tight.suggestions if s.fits)
print(f"over budget: first change that fits: {first.what} -> {first.process_peak / 2**20:.1f} MiB ({first.overrides})")

model = minitune.load_model(cfg.model)  # a model you have (real weights): simulated on a fake copy
prepared, _ = minitune.prepare_model(model, cfg.lora)
mine = minitune.simulate(prepared, cfg, seq_len=128)
print(f"own model, 16 x 128 tokens: {mine.total / 2**20:.1f} MiB, peak in the {mine.peak_phase} pass")
