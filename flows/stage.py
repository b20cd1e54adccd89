"""The one shape every stage has: key -> reuse? -> compute -> write -> MLflow run -> StageResult.

A stage is a compute function ``(params, ctx, out) -> StageOutput`` that writes its artifact files into the
folder ``out``, plus a :class:`StageParams` model of what it reads: settings and upstream
:class:`StageResult` references. :func:`stage_task` turns it into a Prefect task whose cache key is the
stage's key (DESIGN §3) joined with the digest of the artifact behind it, or None (no caching) when that
artifact is missing or fails its checksum, so a Prefect cache hit always stands for a verified artifact.
Inside the task, :func:`run_stage` reuses a verified artifact from the store, else one that MLflow knows
under the same key, else computes, publishes and records it. Tasks return references, never tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from flows.lineage import Dataset, Tracker, code_version
from flows.plots import PLOTS
from flows.store import Manifest, Store

log = logging.getLogger(__name__)

STAGE_VERSIONS = {"model": 1, "calibration": 1, "covariance": 1, "spectrum": 1, "sensitivity": 1, "allocation": 1,
                  "init": 1, "train": 1, "evaluate": 1, "merge": 1}
"""Bump a stage's version when its computation or artifact format changes: its key and all below it change."""
STAMP_MARGIN_S = 2.0
"""A verification stamp is written only for files last changed this long before (``Store.verify``)."""
UNKEYED = {"keyed": False}
"""``Field(json_schema_extra=UNKEYED)``: a setting that does not change the artifact (batch size, paths)."""


class StageResult(BaseModel):
    """A reference to a stage's artifact: its key, where it is, and the MLflow runs that made it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    key: str
    uri: str
    run_id: str | None
    """The MLflow run that computed the artifact."""
    parent_run_id: str | None
    """The invocation (parent run) that computed it."""
    reused: bool = False
    """Set by :func:`call` when this invocation reused the artifact instead of computing it."""


class StageParams(BaseModel):
    """What a stage reads. Fields holding :class:`StageResult` (or lists of them) are its inputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def inputs(self) -> dict[str, StageResult]:
        """Upstream results by role (``covariance.0``, ``covariance.1`` for lists)."""
        out: dict[str, StageResult] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, StageResult):
                out[name] = value
            elif isinstance(value, list) and value and all(isinstance(v, StageResult) for v in value):
                out.update({f"{name}.{i}": v for i, v in enumerate(value)})
        return out

    def key_config(self) -> dict[str, Any]:
        """The settings that determine the artifact, as JSON: everything but inputs and unkeyed fields."""
        skip = {name for name, field in type(self).model_fields.items()
                if field.json_schema_extra == UNKEYED or _mentions(field.annotation, StageResult)}
        return self.model_dump(mode="json", exclude=skip)

    def key(self, stage: str) -> str:
        """sha256 of the stage, its version, its config as canonical JSON and its inputs' keys (DESIGN §3)."""
        body = {"stage": stage, "version": STAGE_VERSIONS[stage], "config": self.key_config(),
                "inputs": {role: r.key for role, r in self.inputs().items()}}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()


class StageOutput(BaseModel):
    """What a compute function reports besides its files: metrics, datasets read, a model to register."""

    model_config = ConfigDict(extra="forbid")

    metrics: dict[str, float | None] = Field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = Field(default_factory=dict)
    """Metric histories as (step, value), e.g. the training loss."""
    datasets: list[Dataset] = Field(default_factory=list)
    register_as: str | None = None
    """Register the published artifact as a version of this MLflow model."""


class RunContext(BaseModel):
    """Where one invocation keeps artifacts and records runs (passed to every task; never part of a key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: str
    root: str
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    device: str = "cpu"
    progress: bool = False
    compress: bool = False
    """``store.compress``: the covariance and spectrum Zarr arrays compressed (Blosc LZ4)."""

    @property
    def compressors(self) -> Literal["default", "compact"]:
        """What the stages pass to ``save_covariance``/``save_spectrum`` as ``compressors``."""
        return "compact" if self.compress else "default"

    def store(self, uri: str | None = None) -> Store:
        """The configured store, or the store holding the artifact at ``uri`` (``<base>/<stage>/<key>``)."""
        base = self.stages if uri is None else uri.rstrip("/").rsplit("/", 2)[0]
        return Store(base, self.root, stamp_margin_s=STAMP_MARGIN_S)

    def tracker(self) -> Tracker:
        return _tracker(self.tracking_uri, self.experiment, str(Path(self.root) / "mlflow" / "artifacts"))

    def open(self, result: StageResult) -> Path:
        """A verified local folder with ``result``'s artifact."""
        return self.store(result.uri).path(result.stage, result.key)


Compute = Callable[[Any, RunContext, Path], StageOutput]


def stage_task(stage: str, compute: Compute, *, name: str | None = None):
    """The Prefect task running ``compute`` as ``stage``: cached on the stage key and its artifact's digest."""

    def run(ctx: RunContext, params: StageParams) -> StageResult:
        return run_stage(ctx, stage, params, compute)

    run.__name__ = run.__qualname__ = name or stage
    run.__doc__ = compute.__doc__
    return task(run, name=name or stage, cache_key_fn=functools.partial(prefect_cache_key, stage),
                persist_result=True, result_serializer="json")


def prefect_cache_key(stage: str, _task_ctx: Any, inputs: dict[str, Any]) -> str | None:
    """``<stage>-<key>-<artifact digest>`` when the artifact verifies, else None: no cache entry is trusted."""
    ctx, params = inputs["ctx"], inputs["params"]
    key = params.key(stage)
    manifest = ctx.store().verify(stage, key)
    return None if manifest is None else f"{stage}-{key}-{manifest.digest[:16]}"


def run_stage(ctx: RunContext, stage: str, params: StageParams, compute: Compute) -> StageResult:
    """Reuse the verified artifact of the stage's key, or compute it, publish it and record its run."""
    key = params.key(stage)
    store, tracker = ctx.store(), ctx.tracker()
    uri = store.uri(stage, key)
    with store.lock(stage, key):
        manifest = store.verify(stage, key)
        if manifest is not None:
            return StageResult(stage=stage, key=key, uri=uri, run_id=manifest.run_id,
                               parent_run_id=manifest.parent_run_id)
        found = _durable(ctx, tracker, stage, key, uri)
        if found is not None:
            return found
        inputs = params.inputs()
        run_id = tracker.start_stage(ctx.parent_run_id, stage, key, uri, {r: v.run_id for r, v in inputs.items()},
                                     params.key_config())
        try:
            with store.staging(stage, key) as tmp:
                output = compute(params, ctx, tmp)
                if (tmp / PLOTS).is_dir():
                    tracker.client.log_artifacts(run_id, str(tmp / PLOTS), PLOTS)
                manifest = store.publish(tmp, Manifest(
                    stage=stage, key=key, stage_version=STAGE_VERSIONS[stage], run_id=run_id,
                    parent_run_id=ctx.parent_run_id, code_version=code_version(), config=params.key_config(),
                    inputs={role: r.key for role, r in inputs.items()}, files={}))
            tracker.log_datasets(run_id, output.datasets)
            tracker.log_series(run_id, output.series)
            if output.register_as:
                tracker.register(output.register_as, run_id, uri, key)
            tracker.finish(run_id, output.metrics)
        except BaseException as err:
            _close_failed(tracker, run_id, "FAILED" if isinstance(err, Exception) else "KILLED")
            raise
    return StageResult(stage=stage, key=key, uri=uri, run_id=manifest.run_id, parent_run_id=manifest.parent_run_id)


def call(ctx: RunContext, stage_task_: Any, params: StageParams) -> StageResult:
    """Run a stage task in the current flow; record a reuse run when it returned an earlier invocation's artifact."""
    runner = stage_task_.with_options(result_storage=result_storage(ctx))
    start = time.perf_counter()
    return settle(ctx, params, runner(ctx, params), start)


def result_storage(ctx: RunContext) -> Path:
    """Where Prefect persists the invocation's task results (its cache)."""
    return Path(ctx.root).resolve() / "prefect" / "results"


def settle(ctx: RunContext, params: StageParams, result: StageResult, start: float) -> StageResult:
    """``result`` marked reused (with a reuse run) when it is an earlier invocation's artifact; logs its line."""
    if result.parent_run_id != ctx.parent_run_id or result.run_id is None:
        inputs = {role: r.run_id for role, r in params.inputs().items()}
        ctx.tracker().log_reuse(ctx.parent_run_id, result.stage, result.key, result.uri, inputs, result.run_id)
        result = result.model_copy(update={"reused": True})
    log.info("%-12s %-8s %5.1fs  %s", result.stage, "reused" if result.reused else "computed",
             time.perf_counter() - start, result.uri)
    return result


def _durable(ctx: RunContext, tracker: Tracker, stage: str, key: str, uri: str) -> StageResult | None:
    """An artifact of this key that MLflow knows at another URI and that verifies there."""
    run = tracker.producer(key)
    other = run.data.tags.get("tlora.uri") if run is not None else None
    if other is None or other == uri:
        return None
    try:
        manifest = ctx.store(other).verify(stage, key)
    except (OSError, ValueError, ImportError):
        return None
    if manifest is None:
        return None
    log.info("%s %s found through MLflow at %s", stage, key[:12], other)
    return StageResult(stage=stage, key=key, uri=other, run_id=manifest.run_id, parent_run_id=manifest.parent_run_id)


def _close_failed(tracker: Tracker, run_id: str, status: str) -> None:
    """Mark the stage run ended; if MLflow itself is what failed, keep the original error, not this one."""
    try:
        tracker.finish(run_id, status=status)
    except Exception as err:  # the next run marks it KILLED (Tracker.close_orphans)
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(err).splitlines()[0][:200])


def _mentions(annotation: Any, cls: type) -> bool:
    """Whether a type annotation is ``cls`` or contains it (``StageResult | None``, ``list[StageResult]``)."""
    return annotation is cls or any(_mentions(arg, cls) for arg in get_args(annotation))


@functools.cache
def _tracker(uri: str, experiment: str, artifact_root: str) -> Tracker:
    return Tracker(uri, experiment, artifact_root)
