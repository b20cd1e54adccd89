"""Sharded covariance and sensitivity: shards of the calibration samples as mapped tasks, then one exact reduce.

    calibration ─► shard 0 ┐
                ─► shard 1 ┼─► reduce ─► covariance (or scores), the artifact of DESIGN §2
                ─► shard k ┘

A shard is a contiguous slice of the samples cut between whole batches (between backward steps for
sensitivity), so it runs the very batches one pass would, and its artifact is the stage's own format over
its slice: float64 sums plus counts for covariance, the mean score plus its sample count for sensitivity.
Each shard is its own cached stage (key: model, calibration, the slice), published as soon as it finishes,
so an interrupted run loses at most the shards in flight and a rerun computes only those. The reduce adds
the partial sums (:func:`tlora.covariance.merge_covariances`; ``Σ n_d s_d / Σ n_d`` for scores), so it equals
one pass over all samples up to float64 summation order.

Shards run as ``task.map`` in a subflow whose task runner the config picks: Prefect's thread pool, Ray or Dask
(a local cluster started once per invocation, or a running one). A failed shard is retried on its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from prefect import flow, unmapped
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

import flows
from flows.config import CalibrationSource, PipelineConfig, RunnerConfig, check_shard_count
from flows.prepare import (
    CovarianceParams,
    SensitivityParams,
    compute_covariance,
    compute_sensitivity,
    mix_scores,
)
from flows.stage import (
    UNKEYED,
    Compute,
    RunContext,
    StageOutput,
    StageParams,
    StageResult,
    result_storage,
    settle,
    stage_task,
)
from flows.store import read_manifest
from tlora.covariance import load_covariance, merge_covariances, save_covariance
from tlora.data import Calibration, CalibrationMeta
from tlora.sensitivity import Scores

Stage = Literal["covariance", "sensitivity"]


class Shard(BaseModel):
    """The slice ``[start, stop)`` of the calibration samples a shard reads; it is part of the shard's key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=0)
    stop: int = Field(gt=0)
    index: int = Field(ge=0, json_schema_extra=UNKEYED)
    """Which shard (for logs); the slice alone says what is computed."""
    count: int = Field(gt=0, json_schema_extra=UNKEYED)

    def samples(self, calib: Calibration) -> Calibration:
        return slice_calibration(calib, self.start, self.stop)


class CovarianceShardParams(Shard, CovarianceParams):
    """A covariance stage over one slice of the samples."""


class SensitivityShardParams(Shard, SensitivityParams):
    """A sensitivity stage over one slice of the samples."""


class ReduceParams(StageParams):
    """The calibration the shards cut, and the shards' artifacts in sample order."""

    calibration: StageResult
    shards: list[StageResult]


def shard_ranges(n_samples: int, step: int, n_shards: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous ``[start, stop)`` slices of ``n_samples``, cut between steps of ``step`` samples.

    The steps are dealt out as evenly as possible (earlier shards take the extra one), so every shard runs
    the batches one pass would.

    Raises:
        ValueError: fewer steps than shards, or a count below 1.
    """
    if n_samples < 1 or step < 1 or n_shards < 1:
        raise ValueError(f"need n_samples, step and n_shards >= 1, got {n_samples}, {step}, {n_shards}")
    n_steps = check_shard_count(n_shards, n_samples, step)
    per, extra = divmod(n_steps, n_shards)
    bounds = [0]
    for i in range(n_shards):
        bounds.append(bounds[-1] + per + (i < extra))
    return [(bounds[i] * step, min(bounds[i + 1] * step, n_samples)) for i in range(n_shards)]


def slice_calibration(calib: Calibration, start: int, stop: int) -> Calibration:
    """Samples ``[start, stop)`` with their manifest narrowed to them (a fingerprint of their own)."""
    n = len(calib.input_ids)
    if not 0 <= start < stop <= n:
        raise ValueError(f"shard [{start}, {stop}) is not a slice of the {n} calibration samples")
    meta = calib.meta
    digest = hashlib.sha256(f"{meta.data_fingerprint}[{start}:{stop}]".encode()).hexdigest()
    meta = CalibrationMeta.model_validate(meta.model_dump() | {
        "n_calib": stop - start, "indices": meta.indices[start:stop], "ids": meta.ids[start:stop],
        "data_fingerprint": digest})
    return dataclasses.replace(calib, input_ids=calib.input_ids[start:stop],
                               attention_mask=calib.attention_mask[start:stop], labels=calib.labels[start:stop],
                               meta=meta)


def covariance_shards(cfg: PipelineConfig, source: CalibrationSource, model: StageResult,
                      calibration: StageResult) -> list[CovarianceShardParams]:
    base = CovarianceParams.of(cfg, model, calibration).model_dump()
    return [CovarianceShardParams(**base, start=a, stop=b, index=i, count=cfg.covariance.shards)
            for i, (a, b) in enumerate(shard_ranges(source.n_calib, cfg.covariance.batch_size,
                                                    cfg.covariance.shards))]


def sensitivity_shards(cfg: PipelineConfig, source: CalibrationSource, model: StageResult,
                       calibration: StageResult) -> list[SensitivityShardParams]:
    base = SensitivityParams.of(cfg, model, calibration).model_dump()
    return [SensitivityShardParams(**base, start=a, stop=b, index=i, count=cfg.sensitivity.shards)
            for i, (a, b) in enumerate(shard_ranges(source.n_calib, cfg.sensitivity.step, cfg.sensitivity.shards))]


def run_shards(ctx: RunContext, cfg: PipelineConfig, stage: Stage, params: list[StageParams]) -> list[StageResult]:
    """Each shard as a mapped task on ``cfg.runner``; results in shard order, reuse recorded as by ``call``.

    Raises:
        The first failed shard's error, after every other shard has finished (and published its artifact).
    """
    start = time.perf_counter()
    mapped = map_shards.with_options(task_runner=task_runner(cfg.runner),
                                     flow_run_name=f"{stage}-shards")
    results = mapped(ctx, stage, params, cfg.runner.retries)
    return [settle(ctx, p, r, start) for p, r in zip(params, results, strict=True)]


@flow(name="tlora-shards", validate_parameters=False)
def map_shards(ctx: RunContext, stage: Stage, params: list[StageParams], retries: int) -> list[StageResult]:
    """Map the stage's shard task over its shards; wait for all of them before raising the first failure."""
    shard_task = SHARD_TASKS[stage].with_options(retries=retries, result_storage=result_storage(ctx))
    futures = shard_task.map(ctx=unmapped(ctx), params=params)
    wait(futures)  # every shard that can finish is published, so a rerun recomputes only the failed ones
    return [f.result() for f in futures]


def task_runner(runner: RunnerConfig) -> TaskRunner:
    """Prefect's thread pool, or a Ray or Dask runner (on the cluster that :func:`cluster` started, when it did)."""
    if runner.kind == "default":
        return ThreadPoolTaskRunner(max_workers=runner.num_cpus or os.cpu_count())  # Prefect's default: unbounded
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        local = _DASK.get()  # by address: the flow (and its runner) is pickled with every task, a cluster is not
        address = local.scheduler_address if local is not None else runner.address
        return DaskTaskRunner(address=address) if address else DaskTaskRunner(
            cluster_kwargs=_dask_cluster(runner, threads=1))
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(address=runner.address, init_kwargs=_ray_init(runner, threads=1))


@contextlib.contextmanager
def cluster(cfg: PipelineConfig) -> Iterator[None]:
    """One local Ray or Dask cluster for every sharded stage of an invocation (started here, shut down after), so
    workers stay warm.

    Nothing happens unless ``runner.kind`` is ``ray`` or ``dask``, a stage is sharded and no cluster is given
    (``address``) or running already. Workers import ``flows`` and ``tlora`` from this checkout and use
    ``threads`` (default 1) torch threads.
    """
    sharded = cfg.covariance.shards > 1 or cfg.sensitivity.shards > 1
    threads = cfg.threads or 1
    if cfg.runner.kind == "dask" and sharded and cfg.runner.address is None and _DASK.get() is None:
        from distributed import LocalCluster

        with LocalCluster(**_dask_cluster(cfg.runner, threads=threads)) as local:
            token = _DASK.set(local)
            try:
                yield
            finally:
                _DASK.reset(token)
        return
    if cfg.runner.kind != "ray" or not sharded:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(cfg.runner.address, **_ray_init(cfg.runner, threads=threads))
    try:
        yield
    finally:
        ray.shutdown()


_DASK: contextvars.ContextVar = contextvars.ContextVar("tlora_dask_cluster", default=None)
"""The local Dask cluster :func:`cluster` started for this invocation, if any."""


def _worker_env(threads: int, *, local: bool = True) -> dict[str, str]:
    """Environment of workers: ``threads`` BLAS/torch threads, and, for a local cluster, this checkout importable."""
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if not local:
        return env
    root = str(Path(flows.__file__).resolve().parents[1])
    return env | {"PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def _ray_init(runner: RunnerConfig, *, threads: int) -> dict:
    env = _worker_env(threads, local=runner.address is None)
    init: dict = {"include_dashboard": False, "log_to_driver": False, "runtime_env": {"env_vars": env}}
    if runner.address is None and runner.num_cpus is not None:  # a local Ray, on the CPUs asked for
        init["num_cpus"] = runner.num_cpus
    return init


def _dask_cluster(runner: RunnerConfig, *, threads: int) -> dict:
    """``LocalCluster`` arguments: one single-threaded worker process per CPU asked for, no dashboard."""
    return {"n_workers": runner.num_cpus or os.cpu_count(), "threads_per_worker": 1, "processes": True,
            "dashboard_address": None, "env": _worker_env(threads)}


def compute_covariance_reduce(p: ReduceParams, ctx: RunContext, out: Path) -> StageOutput:
    """The covariance of all samples: the shards' sums and counts added, as ``covariance.zarr``."""
    meta = _check_tiling(p, ctx)
    parts = [load_covariance(ctx.open(r) / "covariance.zarr") for r in p.shards]
    cov = merge_covariances(parts, data_fingerprint=meta.data_fingerprint)
    save_covariance(out / "covariance.zarr", cov, compressors=ctx.compressors)
    return StageOutput(metrics={"n_tokens": cov.n_tokens, "n_samples": cov.n_samples, "n_groups": len(cov.sums),
                                "n_modules": len(cov.modules), "n_shards": len(parts)})


def compute_sensitivity_reduce(p: ReduceParams, ctx: RunContext, out: Path) -> StageOutput:
    """The mean score over all samples from the shards' means and counts, as ``scores.json``."""
    _check_tiling(p, ctx)
    parts = [Scores.model_validate_json((ctx.open(r) / "scores.json").read_text()) for r in p.shards]
    scores = mix_scores(parts, [1.0] * len(parts))
    (out / "scores.json").write_text(scores.model_dump_json(indent=2))
    return StageOutput(metrics={"n_samples": scores.n_samples, "n_modules": len(scores.scores),
                                "n_shards": len(parts)})


def _check_tiling(p: ReduceParams, ctx: RunContext) -> CalibrationMeta:
    """The calibration's manifest, once the shards are known to cover its samples exactly once, in order."""
    meta = CalibrationMeta.model_validate_json((ctx.open(p.calibration) / "meta.json").read_text())
    slices = []
    for r in p.shards:
        manifest = read_manifest(ctx.open(r))
        if manifest.inputs.get("calibration") != p.calibration.key:
            raise ValueError(f"shard {r.key[:12]} was cut from another calibration than {p.calibration.key[:12]}")
        if "start" not in manifest.config:
            raise ValueError(f"{r.stage} {r.key[:12]} read all the samples: it is not a shard")
        slices.append((manifest.config["start"], manifest.config["stop"]))
    ends = [0] + [b for _, b in slices]
    if [a for a, _ in slices] != ends[:-1] or ends[-1] != meta.n_calib:
        raise ValueError(f"shards {slices} do not tile the {meta.n_calib} calibration samples")
    return meta


def _with_slice(compute: Compute) -> Compute:
    """``compute`` over a shard, its output metrics telling the slice and the torch threads it ran with."""

    def run(p: Shard, ctx: RunContext, out: Path) -> StageOutput:
        output = compute(p, ctx, out)
        return output.model_copy(update={"metrics": output.metrics | {
            "start": p.start, "stop": p.stop, "torch_threads": torch.get_num_threads()}})

    run.__doc__ = compute.__doc__
    return run


covariance_shard = stage_task("covariance", _with_slice(compute_covariance), name="covariance-shard")
sensitivity_shard = stage_task("sensitivity", _with_slice(compute_sensitivity), name="sensitivity-shard")
covariance_reduce = stage_task("covariance", compute_covariance_reduce, name="covariance-reduce")
sensitivity_reduce = stage_task("sensitivity", compute_sensitivity_reduce, name="sensitivity-reduce")
SHARD_TASKS = {"covariance": covariance_shard, "sensitivity": sensitivity_shard}
