"""minitune.presets: architectures built from config alone."""

from __future__ import annotations

import pytest
import torch

from minitune.config import ModelArgs
from minitune.model import build_from_config
from minitune.presets import PRESETS, expected_parameters, preset_config


def test_every_preset_has_a_config_and_tiny_ones_no_expected_count():
    for name in PRESETS:
        config = preset_config(name)
        assert type(config).__name__ == PRESETS[name][0]
        assert (expected_parameters(name) is None) == name.startswith("tiny-")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="known presets: flan-t5-small"):
        preset_config("no-such-preset")


@pytest.mark.parametrize("name", ["flan-t5-small", "opt-125m"])
def test_full_size_presets_have_the_real_parameter_count(name):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_from_config(ModelArgs(preset=name))
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(name)
