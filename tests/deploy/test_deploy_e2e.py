"""deploy/prefect.yaml for real: a Prefect server, the cpu and gpu process pools, a worker each, `prefect deploy`.

The tiny pipeline runs as a run of ``tlora-pipeline/demo`` on the cpu pool, which starts ``tlora-train/gpu`` on the
gpu pool for train, evaluate and merge; the test checks where each ran, the artifacts of every stage and one MLflow
run per stage under one parent. Every process is started in its own session and killed by its group id afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from flows.store import verify_folder
from tests.conftest import build_tiny, build_tiny_tokenizer
from tests.flows.conftest import tiny_config, write_task

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
STAGES = ("model", "calibration", "covariance", "spectrum", "sensitivity", "allocation", "init", "train", "evaluate",
          "merge")
GPU_STAGES = ("train", "evaluate", "merge")


class Processes:
    """Long-running subprocesses, each in its own session, stopped by process group id."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []
        self.start_time, self.marks = time.perf_counter(), {}

    def mark(self, event: str) -> None:
        self.marks[event] = round(time.perf_counter() - self.start_time, 1)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen([PREFECT, *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, *args: str) -> str:
        proc = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.logs.glob("*.log")))


class Retry503(httpx.HTTPTransport):
    """Retry what a busy SQLite-backed server answers 503 (Prefect's own client does the same)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for wait in (1, 2, 4, 8):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(wait)
        return super().handle_request(request)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Iterator[tuple[httpx.Client, Processes, Path]]:
    """A Prefect server on a free port, the two pools from deploy/work-pools/, the deployments, a worker per pool."""
    home = tmp_path_factory.mktemp("deploy")
    (home / "prefect").mkdir()
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(REPO),
           "TLORA_REPO": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PREFECT_SERVER_DATABASE_TIMEOUT": "60",  # SQLite under a busy machine: wait for the lock, not 503
           "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = Processes(env, home)
    try:
        procs.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=60, transport=Retry503())
        _wait(lambda: _healthy(api), 90, "the Prefect server did not answer /api/health")
        procs.mark("server up")
        # Both ways of making a pool from a template: `work-pool create` (cpu) and a worker that creates its own (gpu).
        procs.start("worker-gpu", "worker", "start", "--pool", "tlora-gpu", "--type", "process", "--name",
                    "gpu-worker", "--base-job-template", "deploy/work-pools/process-gpu.json")
        procs.run("work-pool", "create", "tlora-cpu", "--type", "process", "--base-job-template",
                  "deploy/work-pools/process-cpu.json")
        procs.start("worker-cpu", "worker", "start", "--pool", "tlora-cpu", "--name", "cpu-worker")
        _wait(lambda: api.get("/work_pools/tlora-gpu").status_code == 200, 60, "the gpu worker made no pool")
        procs.mark("pools")
        procs.run("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        procs.mark("deployed")
        yield api, procs, home
    finally:
        procs.stop()
        print("timings:", procs.marks)


def test_the_pipeline_deployment_trains_on_the_gpu_pool_and_records_every_stage(deployed):
    api, procs, home = deployed
    names = {f"{d['name']}": d for d in api.post("/deployments/filter", json={}).json()}
    assert set(names) == {"demo", "gpu"} and len(api.post("/deployments/filter", json={}).json()) == 3
    pipeline = api.get("/deployments/name/tlora-pipeline/demo").json()
    assert pipeline["work_pool_name"] == "tlora-cpu" and pipeline["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    (schedule,) = pipeline["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * 1" and schedule["active"] is False
    assert api.get("/deployments/name/tlora-train/gpu").json()["work_pool_name"] == "tlora-gpu"
    assert api.get("/deployments/name/tlora-sweep/demo").json()["parameters"]["budgets"][1] == {"rank": 840}

    cfg = tiny_config(_sources(home / "sources"), home / "artifacts")
    response = api.post(f"/deployments/{pipeline['id']}/create_flow_run", json={"parameters": {"config": cfg}})
    assert response.status_code == 201, response.text  # gpu_deployment comes from the deployment's parameters
    flow_run = response.json()
    state = _wait(lambda: _final(api, flow_run["id"]), 240, "the pipeline run did not finish")
    procs.mark("pipeline run done")
    assert state == "COMPLETED", procs.tail()

    runs = api.post("/flow_runs/filter", json={}).json()
    (train_run,) = [r for r in runs if r["deployment_id"] == api.get("/deployments/name/tlora-train/gpu").json()["id"]]
    assert train_run["state_type"] == "COMPLETED" and train_run["work_pool_name"] == "tlora-gpu"
    assert train_run["parent_task_run_id"] is not None  # a subflow of the pipeline run
    assert api.get(f"/flow_runs/{flow_run['id']}").json()["work_pool_name"] == "tlora-cpu"
    gpu_tasks = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [train_run["id"]]}}}).json()
    assert sorted(t["name"].split("-")[0] for t in gpu_tasks) == sorted(GPU_STAGES)
    cpu_tasks = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()
    cpu_stages = {t["name"].split("-")[0] for t in cpu_tasks} & set(STAGES)
    assert cpu_stages == set(STAGES) - set(GPU_STAGES)  # the cpu run neither trained nor re-ran the gpu stages

    stages = home / "artifacts" / "stages"
    for stage in STAGES:
        (folder,) = (stages / stage).iterdir()
        assert verify_folder(folder) is not None, stage
    client = MlflowClient(f"sqlite:///{home / 'artifacts' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tlora")
    everything = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in everything if "tlora.stage" not in r.data.tags]
    children = [r for r in everything if "tlora.stage" in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"] == flow_run["id"]
    assert sorted(r.data.tags["tlora.stage"] for r in children) == sorted(STAGES)  # each once: none computed twice
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert "tlora.reused_from" not in run.data.tags
        assert verify_folder(Path(run.data.tags["tlora.uri"])).run_id == run.info.run_id
    assert "code_exact_match" not in json.loads((next((stages / "evaluate").iterdir()) / "metrics.json").read_text())


def test_a_sweep_submits_all_its_branches_to_the_gpu_pool_at_once(deployed):
    api, procs, home = deployed
    sweep = api.get("/deployments/name/tlora-sweep/demo").json()
    gpu_id = api.get("/deployments/name/tlora-train/gpu").json()["id"]
    before = {r["id"] for r in api.post("/flow_runs/filter", json={}).json()}
    cfg = tiny_config(_sources(home / "sources-sweep"), home / "artifacts-sweep")
    response = api.post(f"/deployments/{sweep['id']}/create_flow_run", json={"parameters": {
        "config": cfg, "budgets": [{"rank": 3}, {"rank": 5}], "methods": [{"name": "tlora"}]}})
    assert response.status_code == 201, response.text
    state = _wait(lambda: _final(api, response.json()["id"]), 300, "the sweep run did not finish")
    procs.mark("sweep run done")
    assert state == "COMPLETED", procs.tail()
    trains = [r for r in api.post("/flow_runs/filter", json={}).json()
              if r["deployment_id"] == gpu_id and r["id"] not in before]
    assert len(trains) == 2 and {r["state_type"] for r in trains} == {"COMPLETED"}
    # Both branches' train runs were submitted before either ran (one after another, the second would be created
    # after the first ended). Whether they then run side by side is the pool's business: workers, limits.
    assert max(r["created"] for r in trains) < min(r["start_time"] for r in trains)
    client = MlflowClient(f"sqlite:///{home / 'artifacts-sweep' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tlora").experiment_id])
    (parent,) = [r for r in runs if "tlora.stage" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["tlora.stage"] for r in runs if r.data.tags.get("tlora.stage") in GPU_STAGES) == \
        sorted(GPU_STAGES * 2)  # each branch's gpu stages recorded once, under the sweep's parent run


def _sources(root: Path) -> Path:
    model, tokenizer = build_tiny("llama", seed=0), build_tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_task(root / "task", seed=0)
    return root


def _final(api: httpx.Client, flow_run_id: str) -> str | None:
    state = api.get(f"/flow_runs/{flow_run_id}").json()["state_type"]
    return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def _healthy(api: httpx.Client) -> bool:
    try:
        return api.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def _wait(check, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
