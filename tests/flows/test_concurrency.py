"""Two flow runs started at once on the same keys both succeed and leave one consistent artifact per stage."""

import shutil
import subprocess
import sys

from mlflow import MlflowClient

from flows.config import PipelineConfig
from flows.store import verify_folder
from tests.flows.conftest import cli_env, context, tiny_config, write_yaml


def test_two_runs_at_once_share_every_artifact(prefect_server, tiny_sources, mlflow_template, tmp_path):
    (tmp_path / "artifacts" / "mlflow").mkdir(parents=True)
    shutil.copy(mlflow_template, tmp_path / "artifacts" / "mlflow" / "mlflow.db")
    cfg = PipelineConfig.model_validate(tiny_config(tiny_sources, tmp_path / "artifacts"))
    path = write_yaml(tmp_path / "tiny.yaml", cfg)
    command = [sys.executable, "-m", "flows.cli", "run", str(path), "--no-progress"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=cli_env(prefect_server), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]

    stages = tmp_path / "artifacts" / "stages"
    for folder in sorted(p for p in stages.iterdir() if p.name != ".locks"):
        entries = sorted(e.name for e in folder.iterdir())
        assert len(entries) == 1 and not entries[0].startswith("."), (folder.name, entries)  # no temp leftovers
        assert verify_folder(folder / entries[0]) is not None, folder.name
    client = MlflowClient(context(cfg).tracking_uri)
    runs = client.search_runs([context(cfg).tracker().experiment_id], filter_string="attributes.status = 'FINISHED'")
    stage_runs = [r for r in runs if "tlora.stage" in r.data.tags]
    producers = [r for r in stage_runs if "tlora.reused_from" not in r.data.tags]
    keys = [r.data.tags["tlora.key"] for r in producers]
    assert len(keys) == len(set(keys)) == 10  # each artifact computed once, by one of the two runs
    assert len(stage_runs) == 20  # and each run recorded all ten stages
