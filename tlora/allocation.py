"""Budgeted allocation of per-module rank r_i and scale alpha_i from sensitivity scores (DESIGN §1.5).

N target modules with scores s_i ≥ 0, config rank ``r`` and alpha, total rank budget ``R`` (N·r by default)
or a trainable-parameter budget ``P``. Rank modes:

- ``reference``: the released code's rule, reproduced exactly. ``r_i = round(R·s_i/Σs)`` with Python's
  ``round`` (half to even: 2.5 -> 2, 3.5 -> 4), computed as ``round(R * s_i / sum(s))`` in float64 with ``sum``
  in score order; then, while ``Σr_i ≠ R``, one unit is added (or removed) at the module with the largest rank
  (the first one in score order on ties, ``np.argmax`` semantics), the argmax recomputed after every unit.
  Rank 0 is allowed; min/max bounds are ignored, but ``r_i > min(d_in, d_out)`` is an error when shapes are known.
- ``balanced``: quotas ``q_i = λ·s_i`` clipped to ``[lo_i, hi_i]`` with ``Σq_i = R`` (water-filling;
  ``lo_i = min_rank``, ``hi_i = min(max_rank, d_in, d_out)``), then ``floor(q_i)`` plus one unit each for the
  largest remainders (ties: higher score, then score order). With a parameter budget each unit of rank costs
  ``c_i = d_out`` (only B trains) or ``d_in + d_out`` (A and B): quotas share P in proportion to s_i, and units
  are added greedily by remainder while they fit, so ``Σc_i·r_i ≤ P`` and no module below its cap could take
  one more unit. A zero-score module's quota exceeds ``lo_i`` only when every scored module is at its cap.
- ``uniform``: ``r_i = r`` for every module (the "rank allocation off" ablation).

Scale modes set ``scaling_i``, the multiplier of B·A (``alpha_i = scaling_i · r``):

- ``reference``: ``alpha_i = max(alpha, round(N·alpha·s_i/Σs))``, ``scaling_i = alpha_i / r`` (config r, not r_i).
- ``normalized``: the reference alpha_i's shares, rescaled so the mean scaling over kept modules is alpha/r
  (the reference rule lets alpha_i reach several times alpha, which diverged at a LoRA-safe learning rate).
- ``uniform``: ``scaling_i = alpha / r``.

Invariants (tested): ``Σr_i == R`` for a rank budget, bounds hold in ``balanced`` mode, ``reference`` reproduces
the rule exactly. Modules of rank 0 stay in the allocation with rank 0 and are dropped from the adapter
(deviation: the reference passes them to PEFT, which rejects r = 0). PEFT computes ``lora_alpha / r_i``, so the
adapter carries ``alpha_pattern[name] = scaling_i · r_i`` (:attr:`ModuleAllocation.peft_alpha`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

RankMode = Literal["reference", "balanced", "uniform"]
ScaleMode = Literal["reference", "normalized", "uniform"]
Trainable = Literal["B", "AB"]


class Budget(BaseModel):
    """What the adapters may spend: a total rank R or a trainable-parameter count P, exactly one."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    rank: int | None = Field(default=None, gt=0)
    """Total rank R = Σ r_i."""
    params: int | None = Field(default=None, gt=0)
    """Trainable parameters P ≥ Σ c_i·r_i (c_i = d_out when only B trains, d_in + d_out for A and B)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        if (self.rank is None) == (self.params is None):
            raise ValueError(f"give exactly one of rank or params, got rank={self.rank}, params={self.params}")
        return self


class ModuleAllocation(BaseModel):
    """What one module gets: rank r_i, alpha_i, and the effective scaling of its update B·A."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(ge=0)
    alpha: float
    scaling: float
    """Effective multiplier of B·A: ``alpha_i / r`` (config r, not r_i) in the reference rule."""

    @property
    def peft_alpha(self) -> float:
        """``lora_alpha`` for PEFT's ``alpha_pattern``: PEFT divides by r_i, so this is ``scaling · r_i``."""
        return self.scaling * self.rank


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
    """Total rank budget R (N·r by default); with a parameter budget, the Σ r_i it bought."""
    budget_params: int | None = None
    """Trainable-parameter budget P when the budget was given in parameters (Σ c_i·r_i ≤ P)."""

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    @property
    def kept(self) -> list[str]:
        """Modules with rank > 0, in score order: the ones the adapter holds."""
        return [name for name, m in self.modules.items() if m.rank > 0]

    def trainable_params(self, shapes: Mapping[str, tuple[int, int]], trainable: Trainable = "B") -> int:
        """Count trainable adapter parameters: Σ r_i·d_out (B only) or Σ r_i·(d_in + d_out) (A and B)."""
        return sum(m.rank * _unit_cost(shapes[name], trainable) for name, m in self.modules.items())


def allocate(
    scores: Mapping[str, float],
    budget: Budget | int | Mapping[str, int] | None = None,
    *,
    r: int,
    alpha: float,
    mode: RankMode = "balanced",
    scale: ScaleMode = "normalized",
    shapes: Mapping[str, tuple[int, int]] | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    trainable: Trainable = "B",
) -> Allocation:
    """Allocate ranks and scales to modules from their sensitivity scores under a budget.

    Args:
        scores: module -> s_i ≥ 0, in module order (the order breaks ties).
        budget: a :class:`Budget` (or its dict), a plain int (total rank R), or None for R = N·r.
        shapes: module -> ``(d_out, d_in)``; caps r_i at ``min(d_in, d_out)``, required for a params budget.
        min_rank, max_rank: bounds of r_i in ``balanced`` mode (ignored by ``reference`` and ``uniform``).
        trainable: which factors a params budget pays for.

    Raises:
        ValueError: invalid scores or settings, or a budget no allocation can meet (the message gives the bounds).
    """
    names = list(scores)
    s = [float(scores[name]) for name in names]
    budget = _check(names, s, budget, r=r, alpha=alpha, mode=mode, shapes=shapes, min_rank=min_rank,
                    max_rank=max_rank)
    n = len(names)
    if mode == "reference":
        ranks = _reference_ranks(s, budget.rank)
        limits = {name: min(shapes[name]) for name in names} if shapes is not None else {}
        for name, rank in zip(names, ranks, strict=True):
            if name in limits and rank > limits[name]:
                raise ValueError(f"reference rule gives {name!r} rank {rank} > min(d_in, d_out) = {limits[name]}; "
                                 f"lower the budget or use mode='balanced', which caps r_i there")
    elif mode == "uniform":
        ranks = [r] * n
        for name in names:
            if shapes is not None and r > min(shapes[name]):
                raise ValueError(f"uniform rank r={r} exceeds min(d_in, d_out) = {min(shapes[name])} of {name!r}")
    else:
        cap = [max_rank if max_rank is not None else math.inf] * n
        if shapes is not None:
            cap = [min(c, *shapes[name]) for c, name in zip(cap, names, strict=True)]
        for name, c in zip(names, cap, strict=True):
            if min_rank > c:
                raise ValueError(f"min_rank={min_rank} exceeds the rank cap {c} of {name!r}; lower min_rank")
        hi = [None if c == math.inf else int(c) for c in cap]
        cost = [1] * n if budget.params is None else [_unit_cost(shapes[name], trainable) for name in names]
        ranks = _balanced_ranks(s, cost, [min_rank] * n, hi, budget.rank or budget.params)
        if sum(ranks) == 0:
            raise ValueError(f"params budget {budget.params} buys no rank: one unit costs {min(cost)} or more")
    alphas, scalings = _scales(s, ranks, r=r, alpha=alpha, scale=scale)
    dropped = [name for name, rank in zip(names, ranks, strict=True) if rank == 0]
    if dropped:
        logger.info("rank 0 for %d of %d modules; they are left out of the adapter", len(dropped), n)
    return Allocation(
        modules={name: ModuleAllocation(rank=ranks[i], alpha=alphas[i], scaling=scalings[i])
                 for i, name in enumerate(names)},
        r=r, alpha=alpha, mode=mode, scale=scale, budget_rank=sum(ranks), budget_params=budget.params,
    )


def _check(
    names: list[str],
    s: list[float],
    budget: Budget | int | Mapping[str, int] | None,
    *,
    r: int,
    alpha: float,
    mode: RankMode,
    shapes: Mapping[str, tuple[int, int]] | None,
    min_rank: int,
    max_rank: int | None,
) -> Budget:
    """Validate the inputs before any work; return the budget as a :class:`Budget` with R = N·r filled in."""
    if not names:
        raise ValueError("scores is empty: pass one score per target module")
    bad = {name: v for name, v in zip(names, s, strict=True) if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"scores must be finite and ≥ 0, got {bad}; recompute the sensitivity scores")
    if sum(s) == 0:
        raise ValueError("all scores are zero, so they give no shares; use mode='uniform' or recompute the scores")
    if r < 1:
        raise ValueError(f"config rank r must be ≥ 1, got {r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if min_rank < 0:
        raise ValueError(f"min_rank must be ≥ 0, got {min_rank}")
    if max_rank is not None and (max_rank < 1 or min_rank > max_rank):
        raise ValueError(f"need 1 ≤ max_rank and min_rank ≤ max_rank, got min_rank={min_rank}, max_rank={max_rank}")
    if budget is None or isinstance(budget, int):
        budget = Budget(rank=budget if budget is not None else len(names) * r)
    elif not isinstance(budget, Budget):
        budget = Budget.model_validate(budget)
    if shapes is not None:
        missing = [name for name in names if name not in shapes]
        if missing:
            raise ValueError(f"shapes lacks {len(missing)} scored modules, e.g. {missing[:3]}; give all (d_out, d_in)")
        bad_shapes = {name: shapes[name] for name in names if len(shapes[name]) != 2 or min(shapes[name]) < 1}
        if bad_shapes:
            raise ValueError(f"shapes must be (d_out, d_in) with positive sizes, got {bad_shapes}")
    if budget.params is not None and (mode != "balanced" or shapes is None):
        raise ValueError(f"a params budget needs mode='balanced' (got {mode!r}) and shapes (module -> (d_out, d_in))")
    if mode == "uniform" and budget.rank != len(names) * r:
        raise ValueError(f"mode='uniform' gives every module r={r}, so the budget must be N·r = {len(names) * r} "
                         f"or None, got {budget.rank}")
    return budget


def _unit_cost(shape: tuple[int, int], trainable: Trainable) -> int:
    """Trainable parameters per unit of rank: B is [d_out, r_i], A is [r_i, d_in]."""
    d_out, d_in = shape
    return d_out if trainable == "B" else d_in + d_out


def _reference_ranks(s: list[float], total: int) -> list[int]:
    """Round shares like the reference code, then fix the sum one unit at a time at the largest rank."""
    denom = sum(s)
    ranks = [round(total * v / denom) for v in s]  # Python round: half to even, as the reference
    while (gap := total - sum(ranks)) != 0:
        i = ranks.index(max(ranks))  # first largest, as np.argmax
        ranks[i] += 1 if gap > 0 else -1
    return ranks


def _balanced_ranks(s: list[float], cost: list[int], lo: list[int], hi: list[int | None], total: int) -> list[int]:
    """Integer ranks r_i ∈ [lo_i, hi_i] spending ``total`` units of cost (exactly, when every cost is 1).

    Exact rational arithmetic, so equal shares tie exactly and a higher score never rounds to a lower rank.
    """
    n = len(s)
    low = sum(c * v for c, v in zip(cost, lo, strict=True))
    high = math.inf if None in hi else sum(c * v for c, v in zip(cost, hi, strict=True))
    if not low <= total <= high:
        unit = "rank" if set(cost) == {1} else "parameters"
        raise ValueError(f"budget {total} ({unit}) is infeasible: the bounds allow {low} to {high}; "
                         f"change the budget, min_rank or max_rank")
    weight = [Fraction(v) / c for v, c in zip(s, cost, strict=True)]  # λ·weight_i is the rank quota
    quota = _water_fill(weight, cost, lo, hi, total)
    ranks = [math.floor(q) for q in quota]
    left = total - sum(c * k for c, k in zip(cost, ranks, strict=True))
    order = sorted(range(n), key=lambda i: (ranks[i] - quota[i], -s[i], i))  # largest remainder first
    grew = True
    while grew and left > 0:  # one pass suffices for a rank budget; params may need more to fill P
        grew = False
        for i in order:
            if cost[i] <= left and (hi[i] is None or ranks[i] < hi[i]):
                ranks[i] += 1
                left -= cost[i]
                grew = True
    return ranks


def _water_fill(w: list[Fraction], cost: list[int], lo: list[int], hi: list[int | None], total: int) -> list[Fraction]:
    """Quotas ``q_i = clip(λ·w_i, lo_i, hi_i)`` with ``Σ cost_i·q_i == total``.

    Each pass clamps the violators of the side that overshoots more: if the clipped sum is short of the
    total, λ must grow, so the modules above their cap stay there (and symmetrically), which keeps the rest
    of the problem feasible. When only zero-weight modules remain free they take equal rank quotas.
    """
    fixed: dict[int, Fraction] = {}
    while True:
        free = [i for i in range(len(w)) if i not in fixed]
        rest = total - sum(cost[i] * q for i, q in fixed.items())
        if not free:
            assert rest == 0, "water-filling lost budget"
            return [fixed[i] for i in range(len(w))]
        u = {i: w[i] for i in free} if any(w[i] for i in free) else dict.fromkeys(free, Fraction(1))
        lam = rest / sum(cost[i] * u[i] for i in free)
        q = {i: lam * u[i] for i in free}
        over = [i for i in free if hi[i] is not None and q[i] > hi[i]]
        under = [i for i in free if q[i] < lo[i]]
        if not over and not under:
            return [fixed[i] if i in fixed else q[i] for i in range(len(w))]
        excess = sum(cost[i] * (q[i] - hi[i]) for i in over)
        shortfall = sum(cost[i] * (lo[i] - q[i]) for i in under)
        bound, clamped = (hi, over) if excess >= shortfall else (lo, under)
        for i in clamped:
            fixed[i] = Fraction(bound[i])


def _scales(
    s: list[float], ranks: list[int], *, r: int, alpha: float, scale: ScaleMode
) -> tuple[list[float], list[float]]:
    """Per-module (alpha_i, scaling_i) with ``scaling_i = alpha_i / r``."""
    n = len(s)
    if scale == "uniform":
        return [alpha] * n, [alpha / r] * n
    denom = sum(s)
    ref = [float(max(alpha, round(n * alpha * v / denom))) for v in s]  # the reference rule; round half to even
    if scale == "normalized":
        kept = [a for a, k in zip(ref, ranks, strict=True) if k > 0]
        mean = sum(kept) / len(kept)
        ref = [alpha * a / mean for a in ref]  # same shares as the reference, mean scaling alpha / r
    return ref, [a / r for a in ref]
