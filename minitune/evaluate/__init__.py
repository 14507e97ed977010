"""Evaluation: perplexity, generations and a blind human-evaluation sheet, base vs fine-tuned.

    scoring.py  perplexity, generate, compare          results.py  EvalResult, eval.md, terminal tables
    sheet.py    the blind A/B sheet and its scores     merge.py    LoRA merged into a plain model
    job.py      evaluate_checkpoint: what eval.py runs

Each piece works on its own, with any model and loader:
    perplexity(model, loader)          exp of the mean token NLL over every target token (fp32)
    generate(model, tokenizer, ...)    greedy or sampled continuations, batched and seeded
    compare(model, loader, ...)        both of the above for the base and the fine-tuned model
    write_sheet / summarize_scores     a blind A/B sheet for people to score, and its summary
    merge_adapter(model, out_dir)      LoRA merged into a standalone transformers model
:func:`evaluate_checkpoint` (job.py) puts them together for a minitune checkpoint (what `eval.py` runs): the
base model, tokenizer, data and templates come from the checkpoint's saved `config.yaml`.

For a LoRA checkpoint the base is the very same model with its adapter disabled (peft's
``disable_adapter()``), so the base is loaded once. A full fine-tuning checkpoint is compared with
a base rebuilt from the config. A preset (random init) base is rebuilt from `training.seed`, which
gives the weights the adapter was trained on (``load_model`` seeds the init the same way).
"""

from __future__ import annotations

from .job import eval_dir_for, evaluate_checkpoint, load_checkpoint_config
from .merge import merge_adapter
from .results import EvalResult, render_result, render_scores, to_markdown
from .scoring import compare, generate, perplexity
from .sheet import key_path_for, sheet_path_in, summarize_scores, write_sheet

__all__ = [
    "EvalResult",
    "compare",
    "eval_dir_for",
    "evaluate_checkpoint",
    "generate",
    "key_path_for",
    "load_checkpoint_config",
    "merge_adapter",
    "perplexity",
    "render_result",
    "render_scores",
    "sheet_path_in",
    "summarize_scores",
    "to_markdown",
    "write_sheet",
]
