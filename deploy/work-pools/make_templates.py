"""Write the six base job templates of deploy/work-pools/ from Prefect's defaults, with TLoRA's edits.

    python deploy/work-pools/make_templates.py      # rewrites {process,docker,kubernetes}-{cpu,gpu}.json

Each starts from ``prefect work-pool get-default-base-job-template --type <type>`` (Prefect ships the docker and
kubernetes defaults, no worker package needed) and changes only what TLoRA needs: which GPUs a flow run sees, the
image, a volume for the shared store. Run it again after a Prefect upgrade and review the diff.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE = "tlora:latest"
"""Built from deploy/Dockerfile: ``docker build -f deploy/Dockerfile -t tlora:latest .``"""
STORE_VOLUME = "tlora-artifacts:/opt/tlora/artifacts"
"""One docker host: a named volume shared by the cpu and gpu containers (several hosts: S3 + an MLflow server)."""


def default_template(kind: str) -> dict[str, Any]:
    """What ``prefect work-pool get-default-base-job-template --type <kind>`` prints, read without a server.

    The process template comes from Prefect's own worker; docker and kubernetes from the worker metadata Prefect
    bundles (the CLI reads the same file when the online collection registry is out of reach).
    """
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    import prefect.server.api.collections_data as data

    views = Path(data.__path__[0]) / "views" / "aggregate-worker-metadata.json"
    return json.loads(views.read_text())[f"prefect-{kind}"][kind]["default_base_job_configuration"]


def variable(template: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    template["variables"]["properties"][name] = {**template["variables"]["properties"].get(name, {}), **schema}


def process(base: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """One worker per host; the flow run inherits the worker's environment (CUDA_VISIBLE_DEVICES included)."""
    t = copy.deepcopy(base)
    env = ({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"} if gpu else {"CUDA_VISIBLE_DEVICES": ""})
    variable(t, "env", {"default": env, "description": (
        "Environment of the flow run, on top of the worker's. GPU pool: the run sees the GPUs of the worker's "
        "CUDA_VISIBLE_DEVICES (start one worker per GPU host, or per GPU with CUDA_VISIBLE_DEVICES=<i>)."
        if gpu else "Environment of the flow run, on top of the worker's. CPU pool: GPUs hidden.")})
    return t


def docker(base: dict[str, Any], gpu: bool) -> dict[str, Any]:
    t = copy.deepcopy(base)
    variable(t, "image", {"default": IMAGE})
    variable(t, "image_pull_policy", {"default": "IfNotPresent"})
    variable(t, "volumes", {"default": [STORE_VOLUME]})
    if gpu:
        # docker-py's create(device_requests=...): the API form of `docker run --gpus all --shm-size 8g`.
        variable(t, "container_create_kwargs", {
            "title": "Container Create Kwargs", "type": "object",
            "description": "Extra docker-py containers.create() arguments: the GPUs the container gets.",
            "default": {"device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}],
                        "shm_size": "8g"}})
        t["job_configuration"]["container_create_kwargs"] = "{{ container_create_kwargs }}"
    return t


def kubernetes(base: dict[str, Any], gpu: bool) -> dict[str, Any]:
    t = copy.deepcopy(base)
    variable(t, "image", {"default": IMAGE})
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if gpu:
        variable(t, "gpu_limit", {"title": "GPUs", "type": "integer", "default": 1,
                                  "description": "nvidia.com/gpu limit of the job's container (the device plugin's "
                                                 "resource); the run sees exactly these GPUs."})
        container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_limit }}"
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return t


def templates() -> dict[str, dict[str, Any]]:
    """``{"process-cpu.json": template, ...}``: the six templates as this script writes them."""
    out = {}
    for kind, edit in (("process", process), ("docker", docker), ("kubernetes", kubernetes)):
        base = default_template(kind)
        for pool in ("cpu", "gpu"):
            out[f"{kind}-{pool}.json"] = edit(base, pool == "gpu")
    return out


def main() -> None:
    for name, template in templates().items():
        (HERE / name).write_text(json.dumps(template, indent=2) + "\n")
        print(f"deploy/work-pools/{name}")


if __name__ == "__main__":
    main()
