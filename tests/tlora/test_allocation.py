"""Allocation: the reference rule on cases worked by hand, the balanced solver's bounds and properties, scales."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tlora.allocation import Allocation, Budget, _water_fill, allocate

FAST = settings(max_examples=60, deadline=None)


def named(*scores: float) -> dict[str, float]:
    return {name: s for name, s in zip("abcdefghijklmnop", scores, strict=False)}


def ranks(alloc: Allocation) -> list[int]:
    return list(alloc.ranks.values())


# ---------------------------------------------------------------- reference rule, worked by hand


@pytest.mark.parametrize(
    ("scores", "budget", "expected"),
    [
        # Σs = 10, R = 5: quotas 2.5, 1.5, 1.0 -> round half to even 2, 2, 1 (half up would give 3, 2, 1);
        # Σ = 5 = R, no correction.
        ((5, 3, 2), 5, [2, 2, 1]),
        # Σs = 4, R = 2: quotas 0.5, 0.5, 1.0 -> 0, 0, 1 (Σ 1); +1 at the largest rank (c) -> 0, 0, 2.
        # a and b keep rank 0 in the allocation.
        ((1, 1, 2), 2, [0, 0, 2]),
        # Σs = 8, R = 4: quotas 1.5, 1.5, 1.0 -> 2, 2, 1 (Σ 5); −1 at the largest rank, a and b tie at 2,
        # the first (a) loses it -> 1, 2, 1.
        ((3, 3, 2), 4, [1, 2, 1]),
        # Σs = 7, R = 10: quotas 10/7 ≈ 1.43 each -> 1 × 7 (Σ 7); +3, and every +1 goes to the argmax,
        # which stays a once it leads -> 4, 1, 1, 1, 1, 1, 1.
        ((1, 1, 1, 1, 1, 1, 1), 10, [4, 1, 1, 1, 1, 1, 1]),
        # Σs = 30, R = 15: quotas 3.5 × 4, 1.0 -> 4, 4, 4, 4, 1 (Σ 17); −1 at a (first of the tied 4s),
        # argmax recomputed: −1 at b -> 3, 3, 4, 4, 1.
        ((7, 7, 7, 7, 2), 15, [3, 3, 4, 4, 1]),
    ],
)
def test_reference_rule_by_hand(scores, budget, expected):
    alloc = allocate(named(*scores), budget, r=4, alpha=8, mode="reference", scale="reference")
    assert ranks(alloc) == expected
    assert alloc.budget_rank == budget
    assert alloc.kept == [n for n, k in alloc.ranks.items() if k > 0]


def test_reference_default_budget_is_n_times_r():
    # N = 3, r = 4 -> R = 12; Σs = 6: quotas 2, 4, 6 exactly.
    alloc = allocate(named(1, 2, 3), r=4, alpha=8, mode="reference")
    assert ranks(alloc) == [2, 4, 6]
    assert alloc.budget_rank == 12


def test_reference_alpha_floor_and_growth():
    # N = 3, alpha = 8, Σs = 10: N·alpha·s_i/Σs = 12, 7.2, 4.8 -> round 12, 7, 5 -> max(8, ·) = 12, 8, 8.
    alloc = allocate(named(5, 3, 2), 5, r=4, alpha=8, mode="reference", scale="reference")
    assert [m.alpha for m in alloc.modules.values()] == [12, 8, 8]
    assert [m.scaling for m in alloc.modules.values()] == [3, 2, 2]  # alpha_i / r with config r = 4, not r_i
    assert [m.peft_alpha for m in alloc.modules.values()] == [3 * 2, 2 * 2, 2 * 1]  # scaling_i · r_i for PEFT


def _reference_oracle(scores: list[float], total: int) -> list[int]:
    """The rule as the reference writes it: numpy rint (half to even) and argmax."""
    s = np.asarray(scores)
    r = np.rint(total * s / sum(scores)).astype(int)
    while r.sum() != total:
        r[np.argmax(r)] += 1 if r.sum() < total else -1
    return r.tolist()


score_lists = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=1, max_size=12).filter(
    lambda s: sum(s) > 0
)


@FAST
@given(scores=score_lists, budget=st.integers(1, 200))
def test_reference_matches_numpy_oracle(scores, budget):
    alloc = allocate(named(*scores), budget, r=8, alpha=16, mode="reference")
    assert ranks(alloc) == _reference_oracle(scores, budget)
    assert sum(ranks(alloc)) == budget


def test_reference_rank_above_shape_is_an_error():
    # R = 20, equal scores -> 10 each, but a is [8, 64]: rank 10 > min(d_in, d_out) = 8.
    with pytest.raises(ValueError, match=r"'a' rank 10 > min\(d_in, d_out\) = 8"):
        allocate(named(1, 1), 20, r=4, alpha=8, mode="reference", shapes={"a": (8, 64), "b": (64, 64)})


# ---------------------------------------------------------------- balanced, worked by hand


@pytest.mark.parametrize(
    ("scores", "budget", "kwargs", "expected"),
    [
        # quotas 2.5, 1.5, 1.0 -> floors 2, 1, 1 (Σ 4); one unit left, remainders .5, .5, 0 tie: higher score a.
        ((5, 3, 2), 5, {}, [3, 1, 1]),
        # quotas 4/3 each -> floors 1, 1, 1; one unit left, equal remainders and scores: first module.
        ((1, 1, 1), 4, {}, [2, 1, 1]),
        # max_rank 4: quotas 6, 3, 1 -> a capped at 4; 6 left for b, c at 3:1 = 4.5, 1.5 -> b capped at 4;
        # c takes the remaining 2.
        ((6, 3, 1), 10, {"max_rank": 4}, [4, 4, 2]),
        # min_rank 2: quotas 8, 1, 1 -> b, c raised to 2; a gets the remaining 6.
        ((8, 1, 1), 10, {"min_rank": 2}, [6, 2, 2]),
        # shape cap: a is [8, 64] so r_a ≤ 8; quotas 10, 10 -> a = 8, b = 12.
        ((1, 1), 20, {"shapes": {"a": (8, 64), "b": (64, 64)}}, [8, 12]),
        # a zero score gets rank only once every scored module is capped: a = 6, b takes the other 4 ...
        ((1, 0), 10, {"max_rank": 6}, [6, 4]),
        # ... and without a cap it gets 0 and is dropped.
        ((1, 0), 10, {}, [10, 0]),
    ],
)
def test_balanced_by_hand(scores, budget, kwargs, expected):
    alloc = allocate(named(*scores), budget, r=4, alpha=8, **kwargs)
    assert ranks(alloc) == expected
    assert alloc.kept == [n for n, k in zip(alloc.modules, expected, strict=True) if k > 0]


def test_balanced_params_budget_by_hand():
    shapes = {"a": (10, 100), "b": (20, 100)}  # (d_out, d_in)
    # B only: costs 10, 20 per rank. P = 100 split 50/50 -> rank quotas 5, 2.5 -> floors 5, 2 (90 spent);
    # b's unit (20) does not fit in the 10 left, a's (10) does -> 6, 2 using exactly 100.
    alloc = allocate(named(1, 1), Budget(params=100), r=4, alpha=8, shapes=shapes)
    assert ranks(alloc) == [6, 2]
    assert alloc.trainable_params(shapes) == 100
    assert (alloc.budget_params, alloc.budget_rank) == (100, 8)
    # A and B: costs 110, 120. P = 1000 -> quotas 500/110 ≈ 4.55, 500/120 ≈ 4.17 -> 4, 4 (920); 80 left fits nothing.
    alloc = allocate(named(1, 1), {"params": 1000}, r=4, alpha=8, shapes=shapes, trainable="AB")
    assert ranks(alloc) == [4, 4]
    assert alloc.trainable_params(shapes, "AB") == 920


def test_uniform_ranks():
    alloc = allocate(named(5, 0, 1), r=4, alpha=8, mode="uniform", scale="uniform")
    assert ranks(alloc) == [4, 4, 4]
    assert {m.scaling for m in alloc.modules.values()} == {2.0}


# ---------------------------------------------------------------- balanced, properties


@st.composite
def bounded_problems(draw):
    scores = draw(score_lists)
    n = len(scores)
    min_rank = draw(st.integers(0, 3))
    max_rank = draw(st.one_of(st.none(), st.integers(max(min_rank, 1), 24)))
    shapes = {name: (draw(st.integers(4, 40)), 64) for name in named(*scores)} if draw(st.booleans()) else None
    hi = [min([max_rank or math.inf, *(shapes[name] if shapes else ())]) for name in named(*scores)]
    budget = draw(st.integers(max(min_rank * n, 1), int(min(sum(hi), 300))))
    return scores, budget, {"min_rank": min_rank, "max_rank": max_rank, "shapes": shapes}, hi


@FAST
@given(problem=bounded_problems())
def test_balanced_sums_to_budget_within_bounds(problem):
    scores, budget, kwargs, hi = problem
    got = ranks(allocate(named(*scores), budget, r=8, alpha=16, **kwargs))
    assert sum(got) == budget
    assert all(kwargs["min_rank"] <= k <= h for k, h in zip(got, hi, strict=True))


@FAST
@given(problem=bounded_problems(), cost=st.lists(st.integers(1, 9), min_size=12, max_size=12))
def test_water_fill_matches_bisection_on_lambda(problem, cost):
    # Oracle: q_i(λ) = clip(λ·w_i, lo_i, hi_i) with w_i = s_i / c_i, and λ found by bisection on Σ c_i·q_i(λ) = total.
    scores, _, kwargs, hi = problem
    scores = [x or 1.0 for x in scores]  # zero weights share equally once the rest cap: not a λ rule
    n = len(scores)
    lo, cost = np.full(n, kwargs["min_rank"]), np.asarray(cost[:n])
    w, hi = np.asarray(scores) / cost, np.asarray(hi, dtype=float)
    total = int(min((cost * hi).sum(), 500) + (cost * lo).sum()) // 2

    def q_of(lam: float) -> np.ndarray:
        return np.clip(lam * w, lo, hi)

    a, b = 0.0, 1.0
    while (cost * q_of(b)).sum() < total:
        b *= 2
    for _ in range(200):
        a, b = ((a + b) / 2, b) if (cost * q_of((a + b) / 2)).sum() < total else (a, (a + b) / 2)
    got = _water_fill([Fraction(x) / c for x, c in zip(scores, cost.tolist(), strict=True)], cost.tolist(),
                      lo.tolist(), [None if h == math.inf else int(h) for h in hi], total)
    assert sum(c * q for c, q in zip(cost.tolist(), got, strict=True)) == total
    np.testing.assert_allclose([float(q) for q in got], q_of(b), rtol=1e-6, atol=1e-6)


@FAST
@given(scores=score_lists, budget=st.integers(1, 300))
def test_balanced_unbounded_is_monotone_and_near_quota(scores, budget):
    got = ranks(allocate(named(*scores), budget, r=8, alpha=16))
    assert sum(got) == budget
    for i, (s_i, k_i) in enumerate(zip(scores, got, strict=True)):
        assert abs(k_i - budget * s_i / sum(scores)) < 1 + 1e-9  # floor or floor + 1 of the quota
        assert all(k_i >= k_j for s_j, k_j in zip(scores[i:], got[i:], strict=True) if s_i > s_j)
        assert all(k_i <= k_j for s_j, k_j in zip(scores[i:], got[i:], strict=True) if s_i < s_j)


@FAST
@given(
    scores=score_lists,
    d_out=st.lists(st.integers(4, 64), min_size=12, max_size=12),
    trainable=st.sampled_from(["B", "AB"]),
    fraction=st.floats(0.05, 1.0),
    max_rank=st.one_of(st.none(), st.integers(1, 16)),
)
def test_params_budget_respected_and_filled(scores, d_out, trainable, fraction, max_rank):
    shapes = {name: (d_out[i], 32) for i, name in enumerate(named(*scores))}
    cost = {name: d if trainable == "B" else d + 32 for name, (d, _) in shapes.items()}
    hi = {name: min(max_rank or 32, *shapes[name]) for name in shapes}
    params = max(min(cost.values()), int(fraction * sum(cost[n] * hi[n] for n in shapes)))
    alloc = allocate(named(*scores), {"params": params}, r=8, alpha=16, shapes=shapes, max_rank=max_rank,
                     trainable=trainable)
    spent = alloc.trainable_params(shapes, trainable)
    assert spent <= params
    assert all(0 <= alloc.ranks[n] <= hi[n] for n in shapes)
    # Maximal: no module below its cap could take one more unit.
    assert all(cost[n] > params - spent for n in shapes if alloc.ranks[n] < hi[n])


# ---------------------------------------------------------------- scales


@FAST
@given(scores=score_lists, budget=st.integers(1, 100), mode=st.sampled_from(["reference", "balanced"]),
       r=st.integers(1, 16), alpha=st.floats(0.5, 64))
def test_normalized_mean_scaling_over_kept_is_alpha_over_r(scores, budget, mode, r, alpha):
    alloc = allocate(named(*scores), budget, r=r, alpha=alpha, mode=mode, scale="normalized")
    ref = allocate(named(*scores), budget, r=r, alpha=alpha, mode=mode, scale="reference")
    kept = alloc.kept
    assert np.mean([alloc.modules[n].scaling for n in kept]) == pytest.approx(alpha / r)
    for m, m_ref in zip(alloc.modules.values(), ref.modules.values(), strict=True):
        assert m.alpha == pytest.approx(m.scaling * r)
        # same shares as the reference alphas: the ratio is one constant for every module
        assert m.alpha / m_ref.alpha == pytest.approx(alloc.modules[kept[0]].alpha / ref.modules[kept[0]].alpha)


def test_normalized_by_hand_with_a_dropped_module():
    # ranks 0, 0, 2 (reference case above); reference alphas 8, 8, 12 (N·alpha·s/Σs = 6, 6, 12);
    # only c is kept, so its scaling is alpha / r = 2 and its alpha 8; the others keep their share 8/12.
    alloc = allocate(named(1, 1, 2), 2, r=4, alpha=8, mode="reference", scale="normalized")
    assert [m.alpha for m in alloc.modules.values()] == pytest.approx([8 * 8 / 12, 8 * 8 / 12, 8])
    assert alloc.modules["c"].scaling == pytest.approx(2)


def test_json_round_trip():
    alloc = allocate(named(5, 3, 2, 0), Budget(rank=7), r=4, alpha=8, shapes={n: (16, 16) for n in "abcd"})
    again = Allocation.model_validate_json(alloc.model_dump_json())
    assert again == alloc
    assert list(again.modules) == list(alloc.modules)
    assert (again.mode, again.scale, again.budget_rank, again.budget_params) == ("balanced", "normalized", 7, None)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("scores", "budget", "kwargs", "match"),
    [
        ({}, None, {}, "scores is empty"),
        (named(1, -1), None, {}, "finite and ≥ 0"),
        (named(1, math.nan), None, {}, "finite and ≥ 0"),
        (named(1, math.inf), None, {}, "finite and ≥ 0"),
        (named(0, 0), None, {}, "all scores are zero"),
        (named(1, 1), None, {"r": 0}, "r must be ≥ 1"),
        (named(1, 1), None, {"alpha": 0}, "alpha must be a positive"),
        (named(1, 1), None, {"alpha": -2}, "alpha must be a positive"),
        (named(1, 1), None, {"min_rank": 3, "max_rank": 2}, "min_rank ≤ max_rank"),
        (named(1, 1), None, {"min_rank": -1}, "min_rank must be ≥ 0"),
        (named(1, 1), None, {"shapes": {"a": (8, 8)}}, "shapes lacks 1"),
        (named(1, 1), None, {"min_rank": 5, "shapes": {"a": (4, 8), "b": (8, 8)}}, "exceeds the rank cap 4 of 'a'"),
        (named(1, 1, 1), 5, {"min_rank": 2}, "allow 6 to inf"),
        (named(1, 1, 1), 7, {"max_rank": 2}, "allow 0 to 6"),
        (named(1, 1), Budget(params=10**9), {"shapes": {"a": (8, 8), "b": (8, 8)}}, "allow 0 to 128"),
        (named(1, 1), Budget(params=100), {}, "needs mode='balanced'.*and shapes"),
        (named(1, 1), Budget(params=7), {"shapes": {"a": (8, 8), "b": (8, 8)}}, "buys no rank: one unit costs 8"),
        (named(1, 1), Budget(params=100), {"mode": "reference", "shapes": {"a": (8, 8), "b": (8, 8)}}, "params budget"),
        (named(1, 1), 7, {"mode": "uniform"}, r"N·r = 8"),
        (named(1, 1), None, {"mode": "uniform", "shapes": {"a": (2, 8), "b": (8, 8)}}, "exceeds min"),
    ],
)
def test_errors(scores, budget, kwargs, match):
    kwargs = {"r": 4, "alpha": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        allocate(scores, budget, **kwargs)


def test_budget_needs_exactly_one():
    with pytest.raises(ValidationError, match="exactly one"):
        Budget()
    with pytest.raises(ValidationError, match="exactly one"):
        Budget(rank=8, params=100)
    with pytest.raises(ValidationError):
        Budget(rank=0)
    with pytest.raises(ValidationError):
        Budget(rank=8, extra=1)
