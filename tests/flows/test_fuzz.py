"""Property tests over bad input: every invalid config is refused naming its field; any allocation input either
fails with a ValueError before any work or gives an allocation inside its budget and bounds."""

from __future__ import annotations

import math
import typing
from typing import Any

import pytest
from annotated_types import Ge, Gt, Lt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flows.config import ConfigError, PipelineConfig, apply_override, validate_config
from tlora.allocation import Budget, allocate

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = {"name": "fuzz", "task": {"name": "t", "source": "json", "path": "/nowhere", "id_field": "id"},
         "model": {"source": "/nowhere/model"}}
SECTIONS = {name: field.annotation for name, field in PipelineConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            and name not in ("task", "method")}


def bad_values(annotation: Any, metadata: list[Any]) -> list[Any]:
    """Values a field of this type and these constraints must refuse."""
    out: list[Any] = [{"nested": 1}]
    args = typing.get_args(annotation)
    base = [a for a in args if a is not type(None)] if args else [annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return [*out, "not-one-of-them", 12345]
    if base and typing.get_origin(base[0]) is typing.Literal:
        return [*out, "not-one-of-them"]
    if int in base or float in base:
        out.append("seven")
        for m in metadata:
            if isinstance(m, Gt):
                out += [m.gt, m.gt - 1]
            if isinstance(m, Ge):
                out.append(m.ge - 1)
            if isinstance(m, Lt):
                out += [m.lt, m.lt + 5]
    if bool in base:
        out.append("perhaps")
    if list in {typing.get_origin(a) for a in base}:
        out.append(7)
    return out


CASES = [(section, field, value) for section, model in SECTIONS.items()
         for field, info in model.model_fields.items()
         for value in bad_values(info.annotation, info.metadata)
         if info.annotation is not str]


def test_the_fuzz_covers_every_constrained_field():
    fields = {(s, f) for s, f, _ in CASES}
    for expected in [("allocation", "r"), ("train", "warmup_ratio"), ("train", "precision"), ("spectrum", "r_max"),
                     ("covariance", "precision"), ("evaluate", "max_generate"), ("train", "save_steps")]:
        assert expected in fields, expected
    assert len(CASES) > 60


@FAST
@given(case=st.sampled_from(CASES), data=st.data())
def test_an_invalid_field_is_refused_naming_it(case, data):
    section, field, value = case
    config = apply_override(VALID, f"{section}.{field}=0")  # a section present, then the bad value in place
    config[section][field] = value
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    assert f"{section}.{field}" in str(raised.value)


@FAST
@given(section=st.sampled_from(sorted(SECTIONS)), name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
       value=st.one_of(st.integers(), st.text(max_size=5), st.none()))
def test_an_unknown_field_is_refused_naming_it(section, name, value):
    if name in SECTIONS[section].model_fields:
        return
    config = {**VALID, section: {name: value}}
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    assert f"{section}.{name}" in str(raised.value)


@FAST
@given(name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_an_unknown_section_is_refused_naming_it(name):
    if name in PipelineConfig.model_fields:
        return
    with pytest.raises(ConfigError) as raised:
        validate_config({**VALID, name: {"x": 1}})
    assert name in str(raised.value)


@FAST
@given(override=st.text(max_size=30))
def test_any_override_text_is_applied_or_refused_with_a_config_error(override):
    try:
        data = apply_override(VALID, override)
    except ConfigError as err:
        assert "override" in str(err)
        return
    try:
        validate_config(data)
    except ConfigError as err:
        assert "is not a valid config" in str(err)


# ---------------------------------------------------------------- allocation inputs

names = st.lists(st.from_regex(r"m[0-9]{1,3}", fullmatch=True), min_size=0, max_size=10, unique=True)
score = st.one_of(st.floats(0, 10), st.floats(allow_nan=True, allow_infinity=True), st.just(0.0))


@st.composite
def allocation_inputs(draw):
    modules = draw(names)
    scores = {m: draw(score) for m in modules}
    mode = draw(st.sampled_from(["reference", "balanced", "uniform"]))
    shapes = {m: (draw(st.integers(0, 24)), draw(st.integers(1, 24))) for m in modules} if draw(st.booleans()) \
        else None
    budget = draw(st.one_of(st.none(), st.integers(-3, 120), st.builds(Budget, rank=st.integers(1, 120)),
                            st.builds(Budget, params=st.integers(1, 3000))))
    kwargs = {"r": draw(st.integers(-1, 8)), "alpha": draw(st.floats(-1, 32)), "mode": mode,
              "scale": draw(st.sampled_from(["reference", "normalized"])), "shapes": shapes,
              "min_rank": draw(st.integers(-1, 4)), "max_rank": draw(st.one_of(st.none(), st.integers(-1, 12))),
              "trainable": draw(st.sampled_from(["B", "AB"]))}
    return scores, budget, kwargs


@settings(max_examples=200, deadline=None)
@given(problem=allocation_inputs())
def test_any_allocation_input_is_refused_or_respects_budget_and_bounds(problem):
    scores, budget, kw = problem
    try:
        alloc = allocate(scores, budget, **kw)
    except ValueError:  # pydantic's ValidationError is one too; anything else (ZeroDivision, Index...) fails
        return
    ranks = alloc.ranks
    assert list(ranks) == list(scores) and all(k >= 0 for k in ranks.values())
    default = len(scores) * kw["r"]
    plan = budget if isinstance(budget, Budget) else Budget(rank=budget if budget is not None else default)
    if kw["shapes"] is not None:
        assert all(k <= min(kw["shapes"][m]) for m, k in ranks.items())
    if plan.params is not None:
        cost = {m: d_out if kw["trainable"] == "B" else d_out + d_in for m, (d_out, d_in) in kw["shapes"].items()}
        assert 0 < sum(k * cost[m] for m, k in ranks.items()) <= plan.params
    else:
        assert sum(ranks.values()) == plan.rank == alloc.budget_rank
    if kw["mode"] == "balanced":
        hi = kw["max_rank"] if kw["max_rank"] is not None else math.inf
        assert all(kw["min_rank"] <= k <= hi for k in ranks.values())
    if kw["mode"] == "uniform":
        assert set(ranks.values()) == {kw["r"]}
    for m in alloc.modules.values():
        assert math.isfinite(m.alpha) and math.isfinite(m.scaling) and m.scaling >= 0  # 0 only by underflow
