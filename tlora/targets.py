"""Find the linear modules an adapter targets, their shapes, and which of them read the same input.

A *target* is an ``nn.Linear`` or a GPT-2 ``Conv1D`` named by its full module name
(``model.layers.3.self_attn.q_proj``). Targets that read the same input tensor (q/k/v; gate/up in
Llama; c_attn alone in GPT-2) form one *group*: their activation covariance is one matrix (DESIGN §1.2).
Groups are found by running one tiny forward pass and comparing the input tensors the hooks see, so
no per-architecture table is needed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers.pytorch_utils import Conv1D

TargetSpec = str | Sequence[str]
"""``"all-linear"``, a regex matched against full module names, or a list of names / name suffixes."""


class Target(BaseModel):
    """One adapted module: its shape in ``[d_out, d_in]`` terms and its shared-input group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    d_in: int
    d_out: int
    layout: Literal["out_in", "in_out"]
    """``in_out`` for GPT-2 ``Conv1D``, whose weight is stored transposed."""
    group: str
    """Name of the shared-input group: the first member's module name."""


class Targets(BaseModel):
    """The target modules of a model in module order, and their shared-input groups."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: dict[str, Target]
    groups: dict[str, list[str]]

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):  # iterate like a dict of names, not like a pydantic model
        return iter(self.modules)

    def __getitem__(self, name: str) -> Target:
        return self.modules[name]


def find_targets(
    model: nn.Module,
    targets: TargetSpec = "all-linear",
    *,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
) -> Targets:
    """Select target modules and group those that read the same input tensor.

    Args:
        targets: ``"all-linear"`` (every linear layer but the output head), a regex that must match the
            whole module name, or a list whose entries match a module name exactly or as a dotted suffix
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), as in PEFT.
        example_inputs: keyword inputs for the grouping forward pass; defaults to the model's
            ``dummy_inputs``. Without either, every module is its own group.

    Raises:
        ValueError: nothing matched (the message lists the linear layer names that exist).
    """
    linear = {name: m for name, m in model.named_modules() if _is_linear(m)}
    head = _output_head(model)
    chosen = [name for name, m in linear.items() if _matches(name, targets) and not (
        targets == "all-linear" and m is head)]
    if not chosen:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"no target module matched {targets!r}; linear layers in this model end in: {leaves}")
    groups = _shared_input_groups(model, {n: linear[n] for n in chosen}, example_inputs)
    group_of = {member: group for group, members in groups.items() for member in members}
    modules = {}
    for name in chosen:
        d_out, d_in = weight_out_in(linear[name]).shape
        layout = "in_out" if isinstance(linear[name], Conv1D) else "out_in"
        modules[name] = Target(name=name, d_in=d_in, d_out=d_out, layout=layout, group=group_of[name])
    return Targets(modules=modules, groups=groups)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight in ``[d_out, d_in]`` layout (a view; GPT-2 ``Conv1D`` is transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.T  # Conv1D stores [d_in, d_out]
    return module.weight


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``, with an error that names it when it is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"module {name!r} does not exist in {type(model).__name__}") from err


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _matches(name: str, targets: TargetSpec) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _shared_input_groups(
    model: nn.Module, modules: dict[str, nn.Module], example_inputs: Mapping[str, torch.Tensor] | None
) -> dict[str, list[str]]:
    """Group modules by the identity of the input tensor they receive in one forward pass."""
    if example_inputs is None:
        example_inputs = getattr(model, "dummy_inputs", None)
    if not example_inputs:
        return {name: [name] for name in modules}
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, args):
            seen.setdefault(name, args[0])  # first call only; holding the tensor keeps its identity

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in modules.items()]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in example_inputs.items()})
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, list[str]] = {}
    leaders: list[tuple[str, torch.Tensor | None]] = []
    for name in modules:  # module order, so a group is named after its first member
        x = seen.get(name)
        leader = next((g for g, t in leaders if x is not None and t is x), None)
        if leader is None:
            leaders.append((name, x))
            groups[name] = [name]
        else:
            groups[leader].append(name)
    return groups
