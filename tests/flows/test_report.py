"""``tlora report``: a sweep's plots reach the artifacts and MLflow, and the HTML page renders them in Chromium.

One tiny sweep (TLoRA and LoRA) and a second invocation with a new budget that reuses the task side, on the
session's Prefect test server; the report is read back from MLflow and rendered by headless Chromium.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from flows.config import PipelineConfig
from flows.pipeline import sweep
from flows.report import METRICS, collect, latest_parent, render
from flows.store import read_manifest
from tests.flows.conftest import tiny_config
from tlora.allocation import Budget
from tlora.methods import Method

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOTTED = {"spectrum": "spectrum", "allocation": "allocation", "train": "loss"}


@pytest.fixture(scope="module")
def sweeps(prefect_server, tiny_sources, mlflow_template, tmp_path_factory):
    home = tmp_path_factory.mktemp("report")
    (home / "artifacts" / "mlflow").mkdir(parents=True)
    shutil.copy(mlflow_template, home / "artifacts" / "mlflow" / "mlflow.db")
    cfg = PipelineConfig.model_validate(tiny_config(tiny_sources, home / "artifacts",
                                                    train={"max_steps": 3}, merge={"enabled": False}))
    first = sweep(cfg, [None], [Method(), Method(name="lora")])
    second = sweep(cfg, [Budget(rank=20)], [Method()])
    return SimpleNamespace(cfg=cfg, first=first, second=second, home=home,
                           client=MlflowClient(first.tracking_uri))


def test_plots_are_artifact_files_and_logged_to_the_stage_run(sweeps):
    stages = [s for s in sweeps.first.stages() if s.stage in PLOTTED]
    assert sorted({s.stage for s in stages}) == sorted(PLOTTED)
    for s in stages:
        rel = f"plots/{PLOTTED[s.stage]}.png"
        assert rel in read_manifest(s.uri).files, s.stage  # in the checksummed file set
        local = sweeps.client.download_artifacts(s.run_id, rel, str(sweeps.home / s.run_id))
        assert Path(local).read_bytes() == (Path(s.uri) / rel).read_bytes()


def test_collect_reads_each_branch_back_from_mlflow(sweeps):
    report = collect(sweeps.client, [sweeps.first.parent_run_id, sweeps.second.parent_run_id])
    assert [(b.method, b.budget) for b in report.branches] == [("tlora", "default"), ("lora", "uniform r"),
                                                               ("tlora", "rank=20")]
    done = [*sweeps.first.branches, *sweeps.second.branches]
    for b, branch in zip(report.branches, done, strict=True):
        expected = json.loads((Path(branch.evaluate.uri) / "metrics.json").read_text())
        assert b.metrics == {k: expected[k] for k in METRICS}
        assert b.trainable_params == json.loads((Path(branch.train.uri) / "train_result.json").read_text())[
            "trainable_params"]
        assert {s.stage: s.run_id for s in b.stages}["train"] == branch.train.run_id
        history = json.loads((Path(branch.train.uri) / "trainer_state.json").read_text())["log_history"]
        assert b.train_loss == [(h["step"], pytest.approx(h["loss"])) for h in history if "loss" in h]
        assert len(b.train_loss) == 3
        assert {p.name for p in b.plots} == ({"spectrum", "allocation", "loss"} if b.method == "tlora"
                                             else {"allocation", "loss"})
    tlora, lora = report.branches[0], report.branches[1]
    assert tlora.trainable_params < lora.trainable_params  # B alone against A and B
    reused = {s.stage for s in report.branches[2].stages if s.reused}
    assert reused == {"model", "calibration", "covariance", "spectrum", "sensitivity"}
    assert not any(s.reused for s in tlora.stages)
    assert all(s.seconds is not None and s.seconds >= 0 for b in report.branches for s in b.stages)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_the_page_renders_offline_in_headless_chromium(sweeps, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", sweeps.first.parent_run_id, sweeps.second.parent_run_id,
                                      "--out", str(out), "--tracking-uri", sweeps.first.tracking_uri],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page.replace("http://127.0.0.1:5000", ""))  # offline
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*args, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert len(re.findall(r"<tr class=\"branch\">", dom)) == 3
    for method, budget in (("tlora", "default"), ("lora", "uniform r"), ("tlora", "rank=20")):
        assert f"<td>{method}</td><td>{budget}</td><td>lr {sweeps.cfg.train.learning_rate}, 3 steps</td>" in dom
    n_images = 1 + 1 + 3 + 3  # the loss of all branches, one shared spectrum, a heatmap and a loss curve per branch
    assert len(re.findall(r"<img ", dom)) == n_images
    assert 'data-images="decoded"' in dom and f'data-decoded="{n_images}"' in dom, dom[:300]
    assert dom.count(f"/runs/{sweeps.first.branches[0].train.run_id}") >= 2  # lineage links of the train stage
    shot = tmp_path / "report.png"
    subprocess.run([*args, "--window-size=1400,2400", f"--screenshot={shot}", out.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.stat().st_size > 10_000


def test_latest_and_bad_ids(sweeps, tmp_path):
    assert latest_parent(sweeps.client, sweeps.cfg.tracking.experiment) == sweeps.second.parent_run_id
    stage_run = sweeps.first.branches[0].train.run_id
    with pytest.raises(ValueError, match="stage run, not a pipeline"):
        collect(sweeps.client, [stage_run])
    result = CliRunner().invoke(app, ["report", "nope", "--out", str(tmp_path / "r.html"), "--tracking-uri",
                                      sweeps.first.tracking_uri], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "error" in result.output, result.output
    assert "<table id='quality'>" in render(collect(sweeps.client, [sweeps.second.parent_run_id]))


def test_long_stages_left_prefect_progress_artifacts_at_100(sweeps):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["covariance-progress", "sensitivity-progress", "train-progress"]
    flow_runs = {UUID(sweeps.client.get_run(r.parent_run_id).data.tags["prefect.flow_run_id"])
                 for r in (sweeps.first, sweeps.second)}  # the session's server also holds other tests' runs
    with get_client(sync_client=True) as client:
        found = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
                 if a.flow_run_id in flow_runs]
    by_key = {k: [a for a in found if a.key == k] for k in keys}
    assert len(by_key["train-progress"]) >= 3  # one per trained branch (tlora, lora, tlora at rank 20)
    for key, artifacts in by_key.items():
        assert artifacts and all(a.type == "progress" and float(a.data) == 100.0 for a in artifacts), key
        assert all(a.task_run_id is not None for a in artifacts), key
