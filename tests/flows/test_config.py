"""PipelineConfig: YAML and dotted overrides validated before anything runs, errors that name the field."""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.config import ConfigError, PipelineConfig, apply_override, load_config, validate_config
from tlora.allocation import Budget
from tlora.methods import Method

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config(DEMO, ["allocation.budget.rank=840", "train.learning_rate=1e-4", "method.name=lora",
                             "targets=[q_proj, v_proj]"])
    assert cfg.allocation.budget == Budget(rank=840)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.method.name == "lora" and cfg.targets == ["q_proj", "v_proj"]
    assert load_config(DEMO).allocation.budget is None  # the file itself is untouched


@pytest.mark.parametrize(("override", "field"), [
    ("allocation.r=0", "allocation.r"),
    ("allocation.rr=4", "allocation.rr"),
    ("train.max_steps=many", "train.max_steps"),
    ("method.name=dora", "method.name"),
    ("calibration.mixture=[{task: {name: x, source: json}}]", "calibration.mixture.0.task"),
])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match="(?m)^  " + re.escape(field)):
        load_config(DEMO, [override])


def test_cross_field_rules_say_what_to_change():
    with pytest.raises(ConfigError, match=r"spectrum\.r_max"):
        load_config(DEMO, ["allocation.max_rank=64"])
    load_config(DEMO, ["allocation.max_rank=64", "method.name=lora"])  # LoRA reads no spectrum
    with pytest.raises(ConfigError, match="names a task twice"):
        load_config(DEMO, ["calibration.mixture=[{task: {name: a}}, {task: {name: a}}]"])


def test_malformed_overrides_and_files():
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        apply_override({}, "train.max_steps")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"train": 3}, "train.max_steps=2")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
    with pytest.raises(ConfigError, match="task"):
        validate_config({})  # the task has no default


def test_sections_are_frozen_and_mixtures_fill_in_n_calib():
    cfg = load_config(DEMO, ["calibration.mixture=[{task: {name: a}, n_calib: 4, weight: 2}, {task: {name: b}}]"])
    with pytest.raises(ValidationError):
        cfg.train.max_steps = 3
    assert [(s.task.name, s.n_calib, s.weight) for s in cfg.calibration_sources] == [("a", 4, 2.0), ("b", 16, 1.0)]
    single = load_config(DEMO).calibration_sources
    assert [(s.task.name, s.n_calib) for s in single] == [("stdlib-code", 16)]


def test_a_branch_is_the_config_with_another_budget_and_method():
    cfg = load_config(DEMO)
    branch = cfg.with_branch(budget=Budget(rank=100), method=Method(name="pissa"))
    assert isinstance(branch, PipelineConfig)
    assert branch.allocation.budget == Budget(rank=100) and branch.method.label == "pissa"
    assert branch.train == cfg.train and cfg.method.label == "tlora"
