"""The methods one pipeline compares: TLoRA, its ablations, and the LoRA / PiSSA baselines.

A method is three switches plus a baseline init, so every variant runs through the same
``allocate`` → ``init_adapters`` → ``train`` path (no loop copied per variant):

| method        | A init            | A trained | ranks          | scales            |
|---------------|-------------------|-----------|----------------|-------------------|
| ``lora``      | Kaiming (PEFT)    | yes       | uniform r      | uniform α/r       |
| ``pissa``     | PiSSA (PEFT)      | yes       | uniform r      | uniform α/r       |
| ``tlora``     | spectrum of W0·C  | no        | allocated      | allocated         |

and the paper's ablation table is ``tlora`` with ``init``, ``rank``, ``scale`` switched independently
("+RA" = rank only, "+Init+SA" = init and scale, ...; all three off is ``lora``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from peft import PeftModel
from pydantic import BaseModel, ConfigDict
from torch import nn

from tlora.adapters import init_adapters
from tlora.allocation import Allocation, Budget, RankMode, ScaleMode, allocate
from tlora.spectrum import Spectrum

MethodName = Literal["tlora", "lora", "pissa"]


class Method(BaseModel):
    """Which adapter to build: a baseline, or TLoRA with each of its three parts on or off."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: MethodName = "tlora"
    init: bool = True
    """TLoRA only: A from the spectrum and frozen (off: PEFT's Kaiming A, trained with B)."""
    rank: bool = True
    """TLoRA only: per-module ranks from the sensitivity scores (off: every module gets r)."""
    scale: bool = True
    """TLoRA only: per-module scaling from the scores (off: α/r everywhere)."""
    rank_mode: RankMode = "balanced"
    scale_mode: ScaleMode = "normalized"

    @property
    def label(self) -> str:
        """``lora``, ``pissa``, ``tlora``, or the paper's ablation name such as ``+Init+RA``."""
        if self.name != "tlora":
            return self.name
        parts = [p for p, on in (("Init", self.init), ("RA", self.rank), ("SA", self.scale)) if on]
        if len(parts) == 3:
            return "tlora"
        return "+" + "+".join(parts) if parts else "lora"

    @property
    def needs_spectrum(self) -> bool:
        return self.name == "tlora" and self.init

    @property
    def needs_scores(self) -> bool:
        return self.name == "tlora" and (self.rank or self.scale)


ABLATIONS: dict[str, Method] = {
    m.label: m
    for m in (
        Method(name="lora"),
        Method(name="pissa"),
        *(Method(init=i, rank=r, scale=s) for i in (False, True) for r in (False, True) for s in (False, True)
          if (i, r, s) != (False, False, False)),
    )
}
"""Every method of the paper's table by label: lora, pissa, +RA, +SA, +RA+SA, +Init, ..., tlora."""


def plan_allocation(
    method: Method,
    scores: Mapping[str, float] | None,
    shapes: Mapping[str, tuple[int, int]],
    *,
    r: int,
    alpha: float,
    budget: Budget | int | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
) -> Allocation:
    """The allocation ``method`` trains with: scores decide ranks and scales only where switched on."""
    if method.needs_scores and scores is None:
        raise ValueError(f"method {method.label} allocates from sensitivity scores: pass scores")
    ranks_on = method.name == "tlora" and method.rank
    scales_on = method.name == "tlora" and method.scale
    return allocate(
        scores if method.needs_scores else dict.fromkeys(shapes, 1.0),
        budget if ranks_on else None,
        r=r,
        alpha=alpha,
        mode=method.rank_mode if ranks_on else "uniform",
        scale=method.scale_mode if scales_on else "uniform",
        shapes=shapes,
        min_rank=min_rank,
        max_rank=max_rank,
    )


def build_adapter(model: nn.Module, method: Method, allocation: Allocation, spectrum: Spectrum | None = None,
                  *, dropout: float = 0.0) -> PeftModel:
    """The PEFT model for ``method``: TLoRA's frozen spectral A, or a baseline's own init."""
    init = "spectrum" if method.needs_spectrum else ("pissa" if method.name == "pissa" else "lora")
    return init_adapters(model, spectrum, allocation, init=init, dropout=dropout)
