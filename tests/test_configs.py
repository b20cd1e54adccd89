"""Every shipped config validates (all of configs/, recursively), so none can drift from the schema."""

from pathlib import Path

import pytest

from flows.config import PipelineConfig, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_the_expected_configs_are_found():
    names = [p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS]
    assert names == ["baselines/lora.yaml", "baselines/pissa.yaml", "demo.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.model.source == "demo" and cfg.task.name == "stdlib-code"
