"""Flow-test fixtures: one Prefect test server and one migrated MLflow database per session, tiny model and task.

Prefect's home and the environment defaults are set here, at import, before ``flows`` (and so Prefect) loads.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tlora-prefect-home-")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import flows  # noqa: F401  (offline and quiet defaults)
from flows.config import PipelineConfig
from flows.stage import RunContext
from tests.conftest import build_tiny, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One Prefect test server for the whole session; yields its API URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow SQLite database migrated once (~2–6 s); tests copy it instead of migrating their own."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer as an HF folder, and a JSONL task over its words."""
    root = tmp_path_factory.mktemp("tiny-sources")
    model, tokenizer = build_tiny("llama", seed=0), build_tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_task(root / "task", seed=0)
    write_task(root / "task-b", seed=1)
    return root


def write_task(folder: Path, *, seed: int, sizes: tuple[int, int, int] = (40, 12, 8)) -> Path:
    """train/validation/test JSONL of random word prompts and responses over the tiny vocabulary."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "validation", "test"), sizes, strict=True):
        with (folder / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                prompt = " ".join(f"t{rng.randrange(3, 96)}" for _ in range(rng.randrange(3, 8)))
                response = " ".join(f"t{rng.randrange(3, 96)}" for _ in range(rng.randrange(2, 6)))
                f.write(json.dumps({"prompt": prompt, "response": response, "id": f"{folder.name}-{split}-{i}"})
                        + "\n")
    return folder


def tiny_config(sources: Path, root: Path, **sections) -> dict:
    """A pipeline config dict for the tiny model: seconds per stage, store under ``root``."""
    cfg = {
        "name": "tiny",
        "model": {"source": str(sources / "model")},
        "task": {"name": "tiny", "source": "json", "path": str(sources / "task"), "id_field": "id"},
        "calibration": {"n_calib": 8, "max_length": 32},
        "covariance": {"batch_size": 4},
        "spectrum": {"r_max": 8},
        "allocation": {"r": 2, "alpha": 4},
        "train": {"max_steps": 2, "batch_size": 4, "max_length": 32, "logging_steps": 1},
        "evaluate": {"max_examples": 6, "max_generate": 2, "max_new_tokens": 3, "max_length": 32},
        "store": {"root": str(root)},
        "threads": 1,
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg


@pytest.fixture
def workspace(tmp_path, tiny_sources, mlflow_template) -> Callable[..., PipelineConfig]:
    """Factory: ``workspace(**section_overrides)`` -> a validated tiny config whose store is this test's own."""
    root = tmp_path / "artifacts"
    (root / "mlflow").mkdir(parents=True)
    shutil.copy(mlflow_template, root / "mlflow" / "mlflow.db")

    def make(**sections) -> PipelineConfig:
        return PipelineConfig.model_validate(tiny_config(tiny_sources, root, **sections))

    return make


def context(cfg: PipelineConfig, parent_run_id: str | None = None) -> RunContext:
    """The run context a flow would build for ``cfg`` (no parent run unless given)."""
    from flows.lineage import tracking_uri

    root = str(Path(cfg.store.root).resolve())
    return RunContext(stages=str(Path(cfg.store.stages_uri).resolve()), root=root,
                      tracking_uri=tracking_uri(cfg.tracking.uri, root), experiment=cfg.tracking.experiment,
                      parent_run_id=parent_run_id, compress=cfg.store.compress)


def write_yaml(path: Path, cfg: dict | PipelineConfig) -> Path:
    data = cfg.model_dump(mode="json") if isinstance(cfg, PipelineConfig) else cfg
    path.write_text(yaml.safe_dump(data))
    return path


def cli_env(api_url: str) -> dict[str, str]:
    """The environment of a ``tlora`` subprocess that talks to the session's Prefect test server."""
    return {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
