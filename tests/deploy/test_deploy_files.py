"""deploy/ checked without Docker or Kubernetes: Prefect's own prefect.yaml model, the flows' parameter validation,
the work-pool templates (GPU fields present and templated, in step with their generator) and the compose file."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel

from flows.config import PipelineConfig, load_config
from flows.pipeline import pipeline, sweep, train_stages

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
FLOWS = {"flows/pipeline.py:pipeline": pipeline, "flows/pipeline.py:sweep": sweep,
         "flows/pipeline.py:train_stages": train_stages}


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def test_prefect_yaml_has_the_pipeline_and_sweep_on_cpu_and_training_on_gpu(prefect_yaml):
    model = PrefectYamlModel.model_validate(prefect_yaml)
    by_flow = {FLOWS[d.entrypoint].name: d for d in model.deployments}
    assert set(by_flow) == {"tlora-pipeline", "tlora-sweep", "tlora-train"}
    assert {f: d.work_pool.name for f, d in by_flow.items()} == {
        "tlora-pipeline": "tlora-cpu", "tlora-sweep": "tlora-cpu", "tlora-train": "tlora-gpu"}
    train = by_flow["tlora-train"]
    for name in ("tlora-pipeline", "tlora-sweep"):  # both hand training to the gpu deployment
        assert by_flow[name].parameters["gpu_deployment"] == f"tlora-train/{train.name}"
    (schedule,) = by_flow["tlora-pipeline"].schedules
    assert schedule.cron == "0 3 * * 1" and schedule.timezone == "UTC"
    assert model.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TLORA_REPO }}"}}]


def test_deployment_parameters_validate_against_the_flows(prefect_yaml):
    model = PrefectYamlModel.model_validate(prefect_yaml)
    for d in model.deployments:
        if d.parameters:
            FLOWS[d.entrypoint].validate_parameters(d.parameters)  # raises on a field the flow does not accept
    sweep_params = next(d for d in model.deployments if FLOWS[d.entrypoint] is sweep).parameters
    assert len(sweep_params["budgets"]) > 1 and len(sweep_params["methods"]) > 1  # a budget sweep


def test_the_deployed_config_is_the_demo_config(prefect_yaml):
    assert PipelineConfig.model_validate(prefect_yaml["definitions"]["config"]) == load_config(
        DEPLOY.parent / "configs" / "demo.yaml")


def test_templates_carry_the_gpu_fields_and_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_templates", DEPLOY / "work-pools" / "make_templates.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    files = {p.name: json.loads(p.read_text()) for p in (DEPLOY / "work-pools").glob("*.json")}
    assert files == generator.templates()  # regenerate with make_templates.py after a Prefect upgrade
    for name, t in files.items():
        assert set(t) == {"job_configuration", "variables"}, name
        referenced = {m for v in _strings(t["job_configuration"]) for m in re.findall(r"{{\s*(\w+)\s*}}", v)}
        assert referenced <= set(t["variables"]["properties"]), name  # every placeholder has a variable

    assert files["process-cpu.json"]["variables"]["properties"]["env"]["default"] == {"CUDA_VISIBLE_DEVICES": ""}
    assert "CUDA_VISIBLE_DEVICES" not in files["process-gpu.json"]["variables"]["properties"]["env"]["default"]

    docker = files["docker-gpu.json"]
    assert docker["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"
    (request,) = docker["variables"]["properties"]["container_create_kwargs"]["default"]["device_requests"]
    assert request == {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    assert "container_create_kwargs" not in files["docker-cpu.json"]["job_configuration"]
    assert {files[f"docker-{p}.json"]["variables"]["properties"]["image"]["default"] for p in ("cpu", "gpu")} == {
        "tlora:latest"}

    def container(t):
        return t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]

    kube = files["kubernetes-gpu.json"]
    assert container(kube)["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert kube["variables"]["properties"]["gpu_limit"]["default"] == 1
    assert "nvidia.com/gpu" not in container(files["kubernetes-cpu.json"])["resources"]["limits"]


def test_compose_runs_prefect_and_mlflow_on_postgres_with_s3():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect", "mlflow", "minio"} <= set(services)
    assert "postgresql+asyncpg://" in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "postgresql://" in services["mlflow"]["command"] and "s3://" in services["mlflow"]["command"]
    for service in services.values():  # published on loopback only
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node
