"""TLoRA adapters as stock PEFT LoRA: A from the spectrum (frozen), B = 0, per-module rank and scale.

        x ──► W0 ─────────────────────────┐
        │                                 ▼
        └──► A [r_i, d_in] ──► B [d_out, r_i] ──► × scaling_i ──► (+) ──► y
             top-r_i right singular        zeros at init,
             vectors of W0·C, frozen       the only trained weights

B = 0, so step-0 logits equal the base model's. A is registered as a *buffer* of its ``lora_A``
Linear rather than a parameter: no optimizer, ``requires_grad_`` or PEFT ``set_adapter`` can train it,
and it is still saved under PEFT's usual key, so stock ``PeftModel.from_pretrained`` loads the folder.
Per-module rank and scaling travel as ``rank_pattern`` / ``alpha_pattern`` keyed by anchored full module
names; PEFT computes ``alpha_pattern / r_i``, so ``alpha_pattern[name] = scaling_i · r_i``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers.pytorch_utils import Conv1D

from tlora.allocation import Allocation
from tlora.spectrum import Spectrum
from tlora.targets import get_module

SIDECAR = "tlora.json"

Init = Literal["spectrum", "lora", "pissa"]
"""How A (and B) start: TLoRA's spectral A with B = 0; PEFT's default (Kaiming A, B = 0); PEFT's PiSSA."""


class AdapterInfo(BaseModel):
    """What stock PEFT does not record: that A is frozen, and the allocation it was built from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    freeze_a: bool
    init: Init
    allocation: Allocation


def init_adapters(
    model: nn.Module,
    spectrum: Spectrum | None,
    allocation: Allocation,
    *,
    init: Init = "spectrum",
    freeze_a: bool | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA adapter shaped by ``allocation`` and initialised by ``init``.

    The baselines and ablations are this call too: ``lora`` is ``init="lora"`` with a uniform
    allocation, "+RA"/"+SA" are ``init="lora"`` with rank/scale allocation on, and ``pissa`` is
    ``init="pissa"`` (PEFT's PiSSA, which also rewrites W0 into its residual).

    Args:
        spectrum: required for ``init="spectrum"``: A is its top-``r_i`` vectors of each module.
        allocation: per-module rank and scaling; modules of rank 0 get no adapter.
        freeze_a: make A a buffer, so only B trains; defaults to ``True`` for ``spectrum`` only.

    Raises:
        ValueError: no module keeps a positive rank; a module is missing from the model or the spectrum;
            a rank exceeds the vectors the spectrum holds (recompute it with a larger ``r_max``).
    """
    if freeze_a is None:
        freeze_a = init == "spectrum"
    if init == "spectrum" and spectrum is None:
        raise ValueError('init="spectrum" needs a spectrum (tlora.compute_spectrum)')
    if init != "spectrum":
        spectrum = None
    kept = {name: m for name, m in allocation.modules.items() if m.rank > 0}
    if not kept:
        raise ValueError("the allocation gives every module rank 0: raise the budget")
    for name, m in kept.items():
        get_module(model, name)
        if spectrum is not None:
            if name not in spectrum.vectors:
                raise ValueError(f"module {name!r} is allocated rank {m.rank} but the spectrum has no vectors for it")
            have = spectrum.vectors[name].shape[0]
            if m.rank > have:
                raise ValueError(f"module {name!r} is allocated rank {m.rank} but the spectrum holds {have} "
                                 f"vectors (r_max={spectrum.r_max}); recompute the spectrum with r_max >= {m.rank}")
    config = lora_config(allocation, dropout=dropout, fan_in_fan_out=_any_conv1d(model, kept),
                         init_lora_weights="pissa" if init == "pissa" else True)
    on_meta = any(get_module(model, name).weight.is_meta for name in kept)
    if on_meta and spectrum is None:
        raise ValueError(f"init={init!r} on a model skeleton (weights on the meta device) is not possible: load the "
                         "model's weights (only init='spectrum' needs no base weights)")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    for name, m in kept.items():
        layer = _lora_layer(peft_model, name)
        if on_meta:  # a streamed model's skeleton: A and B are real, the base weights stay where they are
            for lora in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                lora.to_empty(device="cpu")
        with torch.no_grad():
            a = layer.lora_A[adapter_name].weight  # [r_i, d_in]
            if spectrum is not None:
                a.copy_(spectrum.vectors[name][: m.rank].to(a.dtype))
                layer.lora_B[adapter_name].weight.zero_()  # B = 0: step-0 output equals the base model's
        if freeze_a:
            _freeze(layer.lora_A[adapter_name])
    return peft_model


def lora_config(
    allocation: Allocation, *, dropout: float = 0.0, fan_in_fan_out: bool = False, init_lora_weights: bool | str = True
) -> LoraConfig:
    """A ``LoraConfig`` carrying the allocation as anchored ``rank_pattern`` / ``alpha_pattern``."""
    kept = {name: m for name, m in allocation.modules.items() if m.rank > 0}
    return LoraConfig(
        r=allocation.r,
        lora_alpha=allocation.alpha,
        target_modules=sorted(kept),  # full names; a sorted list, never a set, so the config is stable
        rank_pattern={_anchor(name): m.rank for name, m in kept.items()},
        alpha_pattern={_anchor(name): m.scaling * m.rank for name, m in kept.items()},
        lora_dropout=dropout,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=init_lora_weights,
        bias="none",
    )


def save_adapters(peft_model: PeftModel, folder: str | Path, info: AdapterInfo) -> Path:
    """Save the PEFT adapter folder plus a ``tlora.json`` sidecar (stock PEFT ignores it)."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    (folder / SIDECAR).write_text(info.model_dump_json(indent=2))
    return folder


def load_adapters(model: nn.Module, folder: str | Path, *, is_trainable: bool = False) -> PeftModel:
    """Load an adapter folder with stock PEFT, then re-freeze A where the sidecar says TLoRA froze it."""
    folder = Path(folder)
    peft_model = PeftModel.from_pretrained(model, folder, is_trainable=is_trainable)
    sidecar = folder / SIDECAR
    if sidecar.is_file() and AdapterInfo.model_validate_json(sidecar.read_text()).freeze_a:
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for lora_a in module.lora_A.values():
                    _freeze(lora_a)
    return peft_model


def read_adapter_info(folder: str | Path) -> AdapterInfo | None:
    sidecar = Path(folder) / SIDECAR
    return AdapterInfo.model_validate_json(sidecar.read_text()) if sidecar.is_file() else None


def scalings(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, float]:
    """Effective per-module scaling as PEFT applies it, keyed by the base model's module names."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): module.scaling[adapter_name]
            for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.scaling}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _freeze(linear: nn.Linear) -> None:
    """Turn ``linear.weight`` from a parameter into a buffer of the same name, key and value."""
    if "weight" not in linear._parameters:
        return
    weight = linear._parameters.pop("weight").detach()
    linear.register_buffer("weight", weight)


def _anchor(name: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", name): escaping the dots and the `$`
    # make "model.layers.1.mlp.up_proj" match that module only (never layers.11 or a look-alike).
    return re.escape(name)


def _lora_layer(peft_model: PeftModel, name: str) -> LoraLayer:
    layer = peft_model.base_model.model.get_submodule(name)
    if not isinstance(layer, LoraLayer):
        raise ValueError(f"PEFT did not wrap {name!r} (got {type(layer).__name__})")
    return layer


def _any_conv1d(model: nn.Module, names) -> bool:
    return any(isinstance(model.get_submodule(n), Conv1D) for n in names)

