"""Only the preparation: take a model you loaded yourself, let minitune freeze it, upcast the
norms to fp32, enable gradient checkpointing and attach LoRA, then train it with any loop. Here the
loop is `transformers.Trainer`.

    python examples/03_prepare_only.py [OUTPUT_DIR]
"""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import minitune

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-prepare")
torch.manual_seed(0)
# your model: any transformers model, quantized or not (here a tiny random Llama in bf16)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)

model, report = minitune.prepare_model(
    model,
    {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},  # or a LoraArgs; None: full FT
    fp32_norms="norms",
    gradient_checkpointing=True,
)
print(report.trainable_line)
print(f"fp32 norm casting: {report.fp32_cast_params:,} parameters in {len(report.fp32_cast_modules)} modules, "
      f"+{report.fp32_cast_bytes:,} bytes")
print(f"gradient checkpointing: {report.gradient_checkpointing}; LoRA on {report.lora_targets}")

g = torch.Generator().manual_seed(0)
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (32, 24), generator=g)]
args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
                         use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", bf16=False)
history = Trainer(model=model, args=args, train_dataset=data).train()
print(f"Trainer took {history.global_step} steps, mean loss {history.training_loss:.4f}")
