"""Architecture presets: models built from config alone (random init), for tests and benchmarks.

Full-size presets reproduce the real checkpoints' shapes exactly, so their parameter counts (and
therefore memory) match the pretrained models; random weights cost the same memory and time.
Tiny presets are 2-layer versions of each architecture for fast tests.
"""

from __future__ import annotations

from typing import Any

# name -> (transformers config class name, kwargs, exact parameter count of the real checkpoint or None)
PRESETS: dict[str, tuple[str, dict[str, Any], int | None]] = {
    # --- full size (parameter counts of the hub checkpoints) ---
    "flan-t5-small": ("T5Config", dict(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ), 76_961_152),
    "t0-3b": ("T5Config", dict(
        vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    ), 2_849_757_184),
    "opt-125m": ("OPTConfig", dict(
        vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
        max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
        pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ), 125_239_296),
    "bloom-560m": ("BloomConfig", dict(
        vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16, pad_token_id=3, bos_token_id=1, eos_token_id=2,
    ), 559_214_592),
    "gpt-neo-1.3b": ("GPTNeoConfig", dict(
        vocab_size=50257, hidden_size=2048, num_layers=24, num_heads=16, max_position_embeddings=2048,
        attention_types=[[["global", "local"], 12]], window_size=256, bos_token_id=50256, eos_token_id=50256,
    ), 1_315_575_808),
    "gpt-neo-125m": ("GPTNeoConfig", dict(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=2048,
        attention_types=[[["global", "local"], 6]], window_size=256, bos_token_id=50256, eos_token_id=50256,
    ), 125_198_592),
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    ), 134_515_008),
    # --- tiny (2 layers), vocabularies match the shipped test tokenizers ---
    # causal ones use the GPT-2 tokenizer (50,257 tokens), t5 the SentencePiece one (1,101 tokens with extra ids)
    "tiny-llama": ("LlamaConfig", dict(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=50256, eos_token_id=50256,
    ), None),
    "tiny-opt": ("OPTConfig", dict(
        vocab_size=50257, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=50256, bos_token_id=50256,
        eos_token_id=50256,
    ), None),
    "tiny-bloom": ("BloomConfig", dict(
        vocab_size=50257, hidden_size=32, n_layer=2, n_head=4, bos_token_id=50256, eos_token_id=50256,
        pad_token_id=50256,
    ), None),
    "tiny-gpt-neo": ("GPTNeoConfig", dict(
        vocab_size=50257, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=512,
        attention_types=[[["global", "local"], 1]], window_size=64, bos_token_id=50256, eos_token_id=50256,
    ), None),
    "tiny-t5": ("T5Config", dict(
        vocab_size=1104, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    ), None),
}

# hub ids whose shapes a preset reproduces: `minitune plan` uses them when the model is not cached
HUB_PRESETS = {
    "google/flan-t5-small": "flan-t5-small", "bigscience/t0_3b": "t0-3b", "facebook/opt-125m": "opt-125m",
    "bigscience/bloomz-560m": "bloom-560m", "bigscience/bloom-560m": "bloom-560m",
    "eleutherai/gpt-neo-1.3b": "gpt-neo-1.3b", "eleutherai/gpt-neo-125m": "gpt-neo-125m",
    "huggingfacetb/smollm2-135m": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


def hub_preset(name_or_path: str) -> str | None:
    """The preset with the shapes of hub model `name_or_path` (case-insensitive), or None."""
    return HUB_PRESETS.get(name_or_path.strip().lower())


def preset_config(name: str) -> Any:
    """The transformers config object of a preset.

    Raises:
        KeyError: unknown preset (the message lists the known ones).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; known presets: {', '.join(PRESETS)}")
    import transformers  # here, not at the top: config validation reads PRESETS without loading transformers

    cls_name, kwargs, _ = PRESETS[name]
    return getattr(transformers, cls_name)(**kwargs)


def expected_parameters(name: str) -> int | None:
    """The real checkpoint's parameter count for full-size presets (None for tiny ones)."""
    return PRESETS[name][2]
