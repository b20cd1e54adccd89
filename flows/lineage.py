"""Lineage in MLflow (DESIGN §4): a parent run per invocation, a child run per stage, and the walk back.

Every stage run carries the tags ``tlora.stage``, ``tlora.key``, ``tlora.uri``, ``tlora.code_version`` and,
per input, ``tlora.upstream.<role>`` = the run that produced that input. A stage that was reused gets a child
run too, tagged ``tlora.reused_from`` = the producing run. So from any adapter the chain of producing runs
leads back to the model and the calibration samples (:func:`walk`), and ``search_runs`` on ``tags.tlora.key``
finds an artifact durably, from another process or machine. Only the ``MlflowClient`` API is used (no active
run state), so concurrent flows in one process do not mix their runs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

TAG_STAGE, TAG_KEY, TAG_URI = "tlora.stage", "tlora.key", "tlora.uri"
TAG_REUSED, TAG_CODE, TAG_UPSTREAM = "tlora.reused_from", "tlora.code_version", "tlora.upstream."
TAG_PARENT = "mlflow.parentRunId"
TAG_PROCESS = "tlora.process"
"""``<host>/<boot id>.<pid namespace>/<pid>/<process start>`` of the process that opened a run: lets a later run
on the same machine tell a run left RUNNING by a killed process (marked KILLED) from one still in progress."""
_MAX_PARAM = 6000  # MLflow's limit on a param value


class Dataset(BaseModel):
    """A dataset to log as a run input: its rows (small: ids and indices), where it lives, its digest."""

    model_config = ConfigDict(frozen=True)

    name: str
    context: str
    """``calibration``, ``train`` or ``evaluation``."""
    source: str
    digest: str
    rows: dict[str, list[Any]]


class Node(BaseModel):
    """One producing stage run of a lineage chain, and the runs of its inputs by role."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    stage: str
    key: str
    uri: str
    inputs: dict[str, str]
    datasets: list[str]


def tracking_uri(configured: str | None, root: str | Path) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else SQLite under ``<root>/mlflow``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = Path(root).resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


@functools.cache
def code_version() -> str:
    """The installed ``tlora`` version and, in a git checkout, its commit (``+dirty`` with local changes)."""
    try:
        version = importlib.metadata.version("tlora")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}" + (".dirty" if dirty else "")


class Tracker:
    """The pipeline's runs in one MLflow experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        self.uri = uri
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # A local database keeps run artifacts beside it; a tracking server decides for itself (e.g. S3).
            local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
            location = Path(artifact_root).resolve().as_uri() if artifact_root is not None and local else None
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # another process created it first
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found is not None:
            self.experiment_id = found.experiment_id

    def start_parent(self, name: str, params: dict[str, Any], config_yaml: str) -> str:
        """Open the parent run of one invocation; its params are the flattened config.

        Runs that a killed process on this machine left RUNNING are marked KILLED first (:meth:`close_orphans`).
        """
        self.close_orphans()
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={TAG_CODE: code_version(), TAG_PROCESS: process_id()})
        self._log_params(run.info.run_id, params)
        self.client.log_text(run.info.run_id, config_yaml, "config.yaml")
        return run.info.run_id

    def start_stage(self, parent: str | None, stage: str, key: str, uri: str, inputs: dict[str, str],
                    params: dict[str, Any]) -> str:
        """Open the child run that computes a stage; ``inputs`` maps role -> producing run id."""
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=self._tags(parent, stage, key, uri,
                                                                                           inputs))
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_reuse(self, parent: str | None, stage: str, key: str, uri: str, inputs: dict[str, str],
                  producer: str | None) -> str:
        """Record that this invocation reused a stage's artifact: a finished child run pointing at its producer."""
        tags = self._tags(parent, stage, key, uri, inputs) | {TAG_REUSED: producer or "unknown"}
        run = self.client.create_run(self.experiment_id, run_name=f"{stage} (reused)", tags=tags)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def finish(self, run_id: str, metrics: dict[str, float] | None = None, status: str = "FINISHED") -> None:
        now = int(time.time() * 1000)
        if metrics:
            batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
            self.client.log_batch(run_id, metrics=batch)
        self.client.set_terminated(run_id, status)

    def log_series(self, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
        """Log metric histories, e.g. the training loss per logging step."""
        now = int(time.time() * 1000)
        batch = [Metric(name, float(v), now, int(step)) for name, points in series.items() for step, v in points]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def log_datasets(self, run_id: str, datasets: list[Dataset]) -> None:
        """Log each dataset as a run input (``mlflow.data`` pandas dataset of its rows, with its context)."""
        import mlflow.data
        import pandas as pd

        inputs = []
        with warnings.catch_warnings():  # source-type guessing and integer-schema hints are noise here
            warnings.simplefilter("ignore")
            for d in datasets:
                frame = pd.DataFrame(d.rows)
                ds = mlflow.data.from_pandas(frame, source=d.source, name=d.name, digest=d.digest[:36])
                inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", d.context)]))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def register(self, name: str, run_id: str, source: str, key: str) -> str:
        """Register an adapter folder as a new version of model ``name``; returns the version."""
        try:
            self.client.create_registered_model(name, tags={"tlora": "adapter"})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, source=source, run_id=run_id, tags={TAG_KEY: key})
        return str(version.version)

    def close_orphans(self) -> list[str]:
        """Mark KILLED the RUNNING runs opened by a process of this machine that no longer exists; their ids.

        Runs of other machines, and of live processes here, are left alone: nothing here can tell whether they
        still run.
        """
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                       max_results=1000)
        dead = [r.info.run_id for r in runs if orphaned(r.data.tags.get(TAG_PROCESS, ""))]
        for run_id in dead:
            self.client.set_terminated(run_id, "KILLED")
        if dead:
            log.warning("marked %d run(s) left RUNNING by killed processes as KILLED", len(dead))
        return dead

    def producer(self, key: str) -> Run | None:
        """The newest finished run that computed the artifact of ``key`` (reuse runs excluded)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_KEY}` = '{key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=50)
        return next((r for r in runs if TAG_REUSED not in r.data.tags), None)

    def _tags(self, parent: str | None, stage: str, key: str, uri: str, inputs: dict[str, str]) -> dict[str, str]:
        tags = {TAG_STAGE: stage, TAG_KEY: key, TAG_URI: uri, TAG_CODE: code_version(), TAG_PROCESS: process_id()}
        if parent:
            tags[TAG_PARENT] = parent
        return tags | {TAG_UPSTREAM + role: run for role, run in inputs.items() if run}

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=flat[i:i + 100])


def process_id(pid: int | None = None) -> str:
    """``<host>/<boot id>.<pid namespace>/<pid>/<start time>`` of a process (this one by default): unique across
    pid reuse and containers."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_boot_id()}/{pid}/{_start_time(pid)}"


def orphaned(owner: str) -> bool:
    """Whether ``owner`` (a :func:`process_id`) names a process of this machine that no longer runs; runs of other
    machines, and of live processes here, cannot be judged from here."""
    return owner.rsplit("/", 2)[0] == process_id().rsplit("/", 2)[0] and not process_alive(owner)


def process_alive(owner: str) -> bool:
    """Whether the process named by :func:`process_id` still runs (same pid and same start time)."""
    try:
        pid = int(owner.rsplit("/", 2)[1])
    except (IndexError, ValueError):
        return True  # not ours to judge
    return _start_time(pid) == owner.rsplit("/", 1)[1] != "gone"


@functools.cache
def _boot_id() -> str:
    """This boot of the kernel and this pid namespace: pids mean the same process only within both."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").rstrip("]")
    except OSError:
        return "noboot"
    return f"{boot}.{namespace}"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), ``alive`` elsewhere, ``gone`` when none runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass
    return "alive"


def walk(client: MlflowClient, run_id: str) -> list[Node]:
    """The producing runs behind ``run_id``, depth first from it back to the model and calibration runs.

    A reuse run is followed to its producer; each producing run appears once.
    """
    nodes: dict[str, Node] = {}
    stack = [run_id]
    while stack:
        run = client.get_run(stack.pop())
        producer = run.data.tags.get(TAG_REUSED)
        if producer and producer != "unknown":
            run = client.get_run(producer)
        tags = run.data.tags
        if run.info.run_id in nodes or TAG_STAGE not in tags:
            continue
        inputs = {k.removeprefix(TAG_UPSTREAM): v for k, v in sorted(tags.items()) if k.startswith(TAG_UPSTREAM)}
        datasets = [f"{d.dataset.name} ({d.dataset.digest})" for d in run.inputs.dataset_inputs]
        nodes[run.info.run_id] = Node(run_id=run.info.run_id, stage=tags[TAG_STAGE], key=tags[TAG_KEY],
                                      uri=tags.get(TAG_URI, ""), inputs=inputs, datasets=datasets)
        stack.extend(reversed(list(inputs.values())))
    return list(nodes.values())


def children(client: MlflowClient, parent: Run) -> list[Run]:
    """The child runs of a parent run (one invocation), oldest first."""
    query = f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'"
    return client.search_runs([parent.info.experiment_id], filter_string=query,
                              order_by=["attributes.start_time ASC"], max_results=5000)


def leaves(client: MlflowClient, parent_run_id: str) -> list[str]:
    """The stage runs of a parent run whose output no other stage run of it read: where its chains end."""
    runs = children(client, client.get_run(parent_run_id))
    used = {v for r in runs for k, v in r.data.tags.items() if k.startswith(TAG_UPSTREAM)}
    return [r.info.run_id for r in runs if TAG_STAGE in r.data.tags
            and r.info.run_id not in used and r.data.tags.get(TAG_REUSED) not in used]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
