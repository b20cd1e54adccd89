"""Budgeted allocation of per-module rank r_i and scale alpha_i from sensitivity scores (DESIGN §1.5).

(Types only so far; the solver lands with the allocation work.)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

RankMode = Literal["reference", "balanced", "uniform"]
ScaleMode = Literal["reference", "normalized", "uniform"]


class ModuleAllocation(BaseModel):
    """What one module gets: rank r_i, alpha_i, and the effective scaling of its update B·A."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int
    alpha: float
    scaling: float
    """Effective multiplier of B·A: ``alpha_i / r`` (config r, not r_i) in the reference rule."""


class Allocation(BaseModel):
    """Per-module ranks and scales under a budget; modules of rank 0 are dropped from the adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: dict[str, ModuleAllocation]
    r: int
    """Config rank: the rank every module would get without rank allocation."""
    alpha: float
    """Config alpha: scaling alpha / r without scale allocation."""
    mode: RankMode
    scale: ScaleMode
    budget_rank: int
    """Total rank budget R (N·r by default)."""
