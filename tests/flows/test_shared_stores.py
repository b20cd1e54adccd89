"""Shared stores for a team: artifacts and Zarr on S3 (moto server), MLflow server on PostgreSQL with S3 artifacts.

Two "machines" (two local roots with nothing in common) run the tiny pipeline against the same S3 bucket and
the same MLflow server: the second reuses every stage from the first, through MLflow's durable look-up and the
artifacts' checksums, and the lineage walk crosses machines. All servers bind 127.0.0.1 and are stopped by pid.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from flows.config import PipelineConfig
from flows.lineage import TAG_REUSED, walk
from flows.pipeline import pipeline
from flows.store import MANIFEST, verify_folder
from tests.flows.conftest import context, tiny_config
from tests.servers import mlflow_server, postgres_bin, postgres_server, s3_server
from tlora.covariance import load_covariance

pytestmark = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL's server programs are not installed "
                                "(.ci/run installs Debian's postgresql)")

STAGES = "s3://tlora-team/stages"


@pytest.fixture(scope="module")
def team(prefect_server, tiny_sources, tmp_path_factory):
    """S3 + PostgreSQL + MLflow server; the tiny pipeline run on machine A, then on machine B."""
    home = tmp_path_factory.mktemp("team")
    with (pytest.MonkeyPatch.context() as mp, s3_server(home, ("tlora-team", "mlflow-team")) as s3_env,
          postgres_server() as pg_uri,
          mlflow_server(home, pg_uri, "s3://mlflow-team/artifacts", s3_env) as mlflow_url):
        for k, v in s3_env.items():
            mp.setenv(k, v)

        def machine(name: str) -> PipelineConfig:
            return PipelineConfig.model_validate(tiny_config(
                tiny_sources, home / name, store={"stages": STAGES}, tracking={"uri": mlflow_url}))

        a, b = machine("machine-a"), machine("machine-b")
        first, second = pipeline(a), pipeline(b)
        yield SimpleNamespace(home=home, a=a, b=b, first=first, second=second, pg_uri=pg_uri,
                              client=MlflowClient(mlflow_url), s3_env=s3_env)


def test_artifacts_live_in_s3_with_their_manifests(team):
    import s3fs

    fs = s3fs.S3FileSystem()
    for s in team.first.stages():
        assert s.uri == f"{STAGES}/{s.stage}/{s.key}" and not s.reused
        manifest = json.loads(fs.cat(f"{s.uri}/{MANIFEST}"))
        assert set(manifest["files"]) == {p[len(s.uri.removeprefix("s3://")) + 1:]
                                          for p in fs.find(s.uri) if not p.endswith(MANIFEST)}
    assert not (team.home / "machine-a" / "stages").exists()  # nothing published locally


def test_zarr_covariance_is_read_straight_from_s3(team):
    result = next(s for s in team.first.stages() if s.stage == "covariance")
    cov = load_covariance(f"{result.uri}/covariance.zarr")
    local = context(team.a).open(result)  # downloaded into machine A's cache
    assert local == team.home / "machine-a" / "cache" / "stages" / "covariance" / result.key
    assert verify_folder(local) is not None
    cached = load_covariance(local / "covariance.zarr")
    assert cov.modules == cached.modules and cov.n_tokens == cached.n_tokens
    for group, s in cov.sums.items():
        assert s.dtype == torch.float64 and torch.equal(s, cached.sums[group])


def test_second_machine_reuses_every_stage_from_the_shared_stores(team):
    first = {s.stage: s for s in team.first.stages()}
    second = {s.stage: s for s in team.second.stages()}
    assert list(second) == list(first)
    for stage, s in second.items():
        assert s.reused, stage
        assert s.key == first[stage].key and s.uri == first[stage].uri
        run = team.client.get_run(s.run_id) if s.run_id else None
        assert run is None or run.data.tags.get("tlora.stage") == stage
    # machine B verified each artifact from S3 into its own empty cache
    cache = team.home / "machine-b" / "cache" / "stages"
    assert {p.parent.parent.name for p in cache.glob("*/*/manifest.json")} >= {"calibration", "covariance", "train"}


def test_runs_are_in_postgres_and_lineage_walks_across_machines(team):
    import psycopg2

    exp = team.client.get_experiment_by_name(team.b.tracking.experiment)
    runs = team.client.search_runs([exp.experiment_id], max_results=1000)
    with psycopg2.connect(team.pg_uri.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from runs where experiment_id = %s", (int(exp.experiment_id),))
        assert cur.fetchone()[0] == len(runs) > 20
    reused = [r for r in runs if TAG_REUSED in r.data.tags]
    producers = {r.info.run_id for r in runs if TAG_REUSED not in r.data.tags and "tlora.stage" in r.data.tags}
    assert reused and all(r.data.tags[TAG_REUSED] in producers for r in reused)

    train_b = next(r for r in reused if r.data.tags["tlora.stage"] == "train")
    chain = walk(team.client, train_b.data.tags[TAG_REUSED])
    assert {n.stage for n in chain} >= {"train", "init", "spectrum", "covariance", "calibration", "model"}


def test_mlflow_artifacts_go_to_s3_through_the_server(team):
    import s3fs

    parent = team.client.get_run(team.first.parent_run_id)
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    fs = s3fs.S3FileSystem()
    logged = [p for p in fs.find("mlflow-team/artifacts") if p.endswith("config.yaml")]
    assert any(team.first.parent_run_id in p for p in logged)
    assert Path(team.client.download_artifacts(team.first.parent_run_id, "config.yaml",
                                               str(team.home))).read_text().startswith("allocation:")
