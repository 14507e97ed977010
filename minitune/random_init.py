"""Random initialisation of a model built on the meta device, one block at a time (`UnitBuild`).

A preset or config file is built on the meta device (`model.construct`) and given its tensors here,
unit by unit: what lies outside the repeated blocks (embeddings, final norms, heads) is the first unit,
each block of the outermost layer lists (a decoder layer, a T5 block) one more. A unit is initialised
by transformers' own init (`initialize_weights`, the path `from_pretrained` takes for weights a
checkpoint lacks) while the other units' tensors are still on the meta device, where init is a no-op,
and from a seed of its own, so its values do not depend on the order units are made in:

    build_units(model, device, seed)       every unit in place: the unquantized build
    UnitBuild(...).deferred_state_dict()   a state dict whose tensors are made when the loader reads
                                           them: a quantized load makes each block as bitsandbytes
                                           reaches its weights and lets the fp32 tensors go once they
                                           are quantized, so the whole model never exists in fp32

An ancestor's init that writes into a block's tensors (none in the architectures minitune's presets
use: T5's root writes its embedding and head, its attention and feed-forward modules their own
layers) would run while that block is on the meta device and be lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["UnitBuild", "build_units", "unit_of_names"]

_SEED_STRIDE = 100_003  # unit u of seed s draws from seed s * stride + u: no two (seed, unit) pairs collide


def block_roots(model: nn.Module) -> list[str]:
    """Names of the blocks: the items of every layer list (`nn.ModuleList`) not inside another one."""
    roots: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(r + ".") for r in roots):
            roots += [f"{name}.{child}" for child, _ in module.named_children()]
    return roots


def unit_of_names(model: nn.Module, names: Any) -> dict[str, int]:
    """The unit of each dotted name (a module, parameter or buffer of `model`): 0 outside every block,
    else 1 + the block's index in `block_roots`."""
    roots = block_roots(model)
    out = {}
    for name in names:
        out[name] = next((i + 1 for i, r in enumerate(roots) if name == r or name.startswith(r + ".")), 0)
    return out


@dataclass
class _Tensor:
    """One tensor of the meta model and every place that holds it (tied weights: several)."""

    meta: torch.Tensor
    unit: int
    slots: list[tuple[dict, str]] = field(default_factory=list)  # (module._parameters or _buffers, key)
    names: list[str] = field(default_factory=list)  # dotted names, state dict or not


class UnitBuild:
    """Makes and initialises a meta-device model's tensors on `device`, one unit at a time (see the
    module's docstring); on the meta device the tensors are made and init is skipped (the planner's
    replay of a build)."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int):
        self.model, self.device, self.seed = model, torch.device(device), seed
        self._tensors: dict[int, _Tensor] = {}
        modules = dict(model.named_modules(remove_duplicate=False))
        units = unit_of_names(model, modules)
        self.unit_modules: dict[int, list[nn.Module]] = {}
        for mname, module in modules.items():
            self.unit_modules.setdefault(units[mname], []).append(module)
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is None:
                        continue
                    entry = self._tensors.setdefault(id(t), _Tensor(t, units[mname]))
                    entry.slots.append((table, key))
                    entry.names.append(f"{mname}.{key}" if mname else key)
        self.units = sorted({e.unit for e in self._tensors.values()} | {0})
        self._by_name = {name: e for e in self._tensors.values() for name in e.names}
        self._state_names = dict.fromkeys(model.state_dict(keep_vars=True))  # keep_vars: no detached copies
        self._made: set[int] = set()
        self._pending: dict[str, torch.Tensor] = {}  # made, detached from the model, not yet read

    def make(self, unit: int) -> list[_Tensor]:
        """Give `unit`'s tensors to the model on the device and initialise them; returns its entries."""
        entries = [e for e in self._tensors.values() if e.unit == unit]
        for e in entries:
            new = torch.empty_like(e.meta, device=self.device)
            if isinstance(e.meta, nn.Parameter):
                new = nn.Parameter(new, requires_grad=e.meta.requires_grad)
            for table, key in e.slots:
                table[key] = new
        self._made.add(unit)
        if self.device.type != "meta":
            for module in self.unit_modules.get(unit, []):  # set by an earlier unit's pass, on meta tensors
                module.__dict__.pop("_is_hf_initialized", None)
            torch.manual_seed(self.seed * _SEED_STRIDE + unit)
            self.model.initialize_weights()  # modules already initialised are skipped
        return entries

    def take(self, name: str) -> torch.Tensor:
        """The tensor of state-dict `name`, made with its unit on the first read and detached from the
        model (its places get the meta tensor back): once the reader lets it go, it is freed."""
        if name not in self._pending:
            entry = self._by_name[name]
            if entry.unit in self._made:
                raise RuntimeError(f"{name} was read twice")
            for e in self.make(entry.unit):
                made = e.slots[0][0][e.slots[0][1]]
                for table, key in e.slots:
                    table[key] = e.meta
                # tied names each read once; a non-persistent buffer (no state-dict name) is the loader's to make
                self._pending.update(dict.fromkeys((n for n in e.names if n in self._state_names), made))
        return self._pending.pop(name)

    def deferred_state_dict(self) -> dict[str, _Deferred]:
        """The model's state dict (tied names included), each value made when read (`value[...]`, as
        transformers reads a safetensors slice)."""
        return {name: _Deferred(self, name) for name in self._state_names}


class _Deferred:
    """A state-dict value made on its first read, as a safetensors slice is (`tensor[...]`)."""

    def __init__(self, build: UnitBuild, name: str):
        self.build, self.name = build, name

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.build.take(self.name)[index]


def build_units(model: nn.Module, device: torch.device, seed: int) -> None:
    """Give a meta-device model its tensors on `device`, every unit in place, initialised (not on the
    meta device) from `seed` unit by unit; tied weights stay tied (one tensor per parameter)."""
    build = UnitBuild(model, device, seed)
    for unit in build.units:
        build.make(unit)
