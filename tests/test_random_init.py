"""minitune.random_init: presets built block by block, each block from a seed of its own, and a
quantized load that makes each block when the loader reads it."""

import pytest
import torch
import transformers

from minitune.config import ModelArgs, QuantizationArgs
from minitune.model import build_from_config, construct, load_model
from minitune.presets import PRESETS
from minitune.random_init import UnitBuild, block_roots, build_units

TINY = ["tiny-llama", "tiny-opt", "tiny-bloom", "tiny-gpt-neo", "tiny-t5"]


def _transformers_build(name: str) -> torch.nn.Module:
    """The preset as transformers builds it on the CPU: every weight initialised at once."""
    cls, kwargs, _ = PRESETS[name]
    config = getattr(transformers, cls)(**kwargs)
    kind = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    return kind.from_config(config)


@pytest.mark.parametrize("name", TINY)
def test_each_block_is_initialised_as_transformers_initialises_it(name):
    ours, theirs = build_from_config(ModelArgs(preset=name), seed=0), _transformers_build(name)
    assert len(block_roots(ours)) >= 2  # the layers are units of their own
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    if set(mine) - set(ref):  # tiny-t5, like flan-t5: an output layer of its own, built as the embedding
        assert set(mine) - set(ref) == {"lm_head.weight"} and torch.equal(mine.pop("lm_head.weight"), ours.shared.weight)
    assert mine.keys() == ref.keys()
    for key, p in mine.items():
        q = ref[key]
        if q.std() == 0:  # constants (norms, biases) to the bit
            assert torch.equal(p, q), key
        else:  # random: the same distribution, other draws (6 standard errors apart at most)
            assert not torch.equal(p, q), key
            assert p.mean().item() == pytest.approx(q.mean().item(), abs=6 * q.std().item() / q.numel() ** 0.5), key
            assert p.std().item() == pytest.approx(q.std().item(), rel=max(0.1, 6 / q.numel() ** 0.5)), key
    for (key, b), (_, c) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        assert torch.equal(b, c), key  # rotary frequencies, position ids: computed, not drawn


def test_a_block_does_not_depend_on_the_order_blocks_are_made_in():
    reference = build_from_config(ModelArgs(preset="tiny-llama"), seed=3)
    build = UnitBuild(construct(ModelArgs(preset="tiny-llama", dtype="float32")), torch.device("cpu"), seed=3)
    state = build.deferred_state_dict()
    taken = {k: state[k][...] for k in reversed(list(state))}  # the last block first
    for key, t in reference.state_dict().items():
        assert torch.equal(taken[key], t), key
    assert not build._pending  # every tensor handed over once, none kept
    assert all(t.device.type == "meta" for t in build.model.state_dict().values())  # nor left in the model
    with pytest.raises(RuntimeError, match="read twice"):
        state["model.norm.weight"][...]


def test_other_seeds_give_other_blocks():
    a = construct(ModelArgs(preset="tiny-opt", dtype="float32"))
    b = construct(ModelArgs(preset="tiny-opt", dtype="float32"))
    build_units(a, torch.device("cpu"), 0)
    build_units(b, torch.device("cpu"), 1)
    for (key, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if p.std() > 0:
            assert not torch.equal(p, q), key


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-t5"])
def test_a_quantized_load_holds_the_unquantized_builds_weights(name):
    """8-bit: every tensor bitsandbytes leaves alone equals the unquantized build's, and every quantized
    weight is the build's to within one step of its row's int8 scale."""
    reference = dict(build_from_config(ModelArgs(preset=name), seed=0).named_parameters())
    model = load_model(ModelArgs(preset=name), QuantizationArgs(mode="8bit"), seed=0)
    quantized = 0
    for key, p in model.named_parameters():
        ref = reference[key]
        if p.dtype == torch.int8:
            quantized += 1
            step = (ref.abs().amax(dim=1) / 127)[:, None]
            assert ((p.float() * p.SCB[:, None] / 127 - ref).abs() <= step).all(), key
        else:
            assert torch.equal(p, ref), key
    assert quantized >= 2 * len(block_roots(model))
