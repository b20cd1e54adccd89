"""The pipeline as Prefect flows: the diagram of DESIGN §2, one line per stage.

    model ─► calibration ─┬─► covariance ─► spectrum ─┐
                          └─► sensitivity ────────────┴─► allocation ─► init ─► train ─► evaluate, merge

The task side (model to sensitivity) is computed once per invocation and shared by every branch; a branch is one
(budget, method): its allocation and everything below. Methods that need no spectrum or no scores (LoRA, PiSSA,
ablations) skip those stages. A calibration mixture calibrates each dataset on its own (cached per dataset) and
mixes the partial sums. With ``shards`` > 1, covariance and sensitivity map over shards of the samples on the
configured runner (threads, Ray or Dask, see ``flows/shards.py``) and reduce them exactly. ``pipeline`` runs the
config's own branch, ``sweep`` several in one flow run.

Train, evaluate and merge are the stages that want a GPU. By default they run in the calling process, like the
rest. Given ``gpu_deployment`` (``tlora-train/gpu`` in deploy/prefect.yaml), every branch's allocation and init run
here, then all branches at once run them as runs of that deployment of the ``tlora-train`` flow, on the gpu work
pool (as many at a time as it has workers and slots), and the flow waits for them all; the stages' artifacts and
MLflow runs land in the same store and parent run as if they had run here (the store must be shared with the gpu
workers).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import yaml
from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from flows import adapt, prepare, shards
from flows.config import CalibrationSource, PipelineConfig
from flows.lineage import tracking_uri
from flows.prepare import resolve_device
from flows.stage import RunContext, StageParams, StageResult, call
from tlora.allocation import Budget
from tlora.methods import Method

log = logging.getLogger(__name__)


class Upstream(BaseModel):
    """The task-side stages, shared by every branch."""

    model_config = ConfigDict(frozen=True)

    model: StageResult
    calibrations: list[StageResult]
    shards: list[StageResult] = []
    """Covariance and sensitivity shards, where ``shards`` > 1 (each reduced into its stage's artifact)."""
    covariance: StageResult | None = None
    spectrum: StageResult | None = None
    sensitivity: StageResult | None = None


class Branch(BaseModel):
    """One (budget, method): its stages and its evaluation metrics."""

    model_config = ConfigDict(frozen=True)

    method: str
    budget: Budget | None
    allocation: StageResult
    init: StageResult
    train: StageResult
    evaluate: StageResult
    merge: StageResult | None
    metrics: dict


class PipelineResult(BaseModel):
    """What one invocation produced, and where its lineage is recorded."""

    model_config = ConfigDict(frozen=True)

    parent_run_id: str
    tracking_uri: str
    upstream: Upstream
    branches: list[Branch]

    def stages(self) -> list[StageResult]:
        """Every stage result, upstream first, in the order they ran."""
        up = self.upstream
        out = [up.model, *up.calibrations, *up.shards, up.covariance, up.spectrum, up.sensitivity]
        for b in self.branches:
            out += [b.allocation, b.init, b.train, b.evaluate, b.merge]
        return [s for s in out if s is not None]


@flow(name="tlora-pipeline")
def pipeline(config: PipelineConfig, progress: bool = False, gpu_deployment: str | None = None) -> PipelineResult:
    """TLoRA end to end for the config's own budget and method (train → merge on ``gpu_deployment`` if given)."""
    return run_branches(config, [(config.allocation.budget, config.method)], progress=progress,
                        gpu_deployment=gpu_deployment)


@flow(name="tlora-sweep")
def sweep(config: PipelineConfig, budgets: list[Budget | None], methods: list[Method],
          progress: bool = False, gpu_deployment: str | None = None) -> PipelineResult:
    """Every (budget, method) pair in one flow run, sharing the task-side stages."""
    return run_branches(config, [(b, m) for m in methods for b in budgets], progress=progress,
                        gpu_deployment=gpu_deployment)


@flow(name="tlora-train")
def train_stages(ctx: RunContext, config: PipelineConfig, model: StageResult, init: StageResult) -> list[StageResult]:
    """Train → evaluate (→ merge) of one branch, on this machine's own device: what the gpu pool runs."""
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = ctx.model_copy(update={"device": resolve_device(config.device)})
    return [s for s in gpu_stages(ctx, config, model, init) if s is not None]


def run_branches(config: PipelineConfig, branches: list[tuple[Budget | None, Method]], *,
                 progress: bool = False, gpu_deployment: str | None = None) -> PipelineResult:
    """The flow body: open the parent run, prepare the task side once, run each branch, close the run."""
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = open_invocation(config, branches, progress=progress)
    tracker = ctx.tracker()
    try:
        up = prepare_task(ctx, config, [m for _, m in branches])
        configs = [config.with_branch(budget=b, method=m) for b, m in branches]
        done = ([run_branch(ctx, cfg, up) for cfg in configs] if gpu_deployment is None
                else run_branches_on_gpu_pool(gpu_deployment, ctx, configs, up))
    except BaseException:
        tracker.finish(ctx.parent_run_id, status="FAILED")
        raise
    tracker.finish(ctx.parent_run_id, {f"{b.method}.{k}": v for b in done for k, v in b.metrics.items()
                                       if isinstance(v, int | float)} if len(done) > 1 else done[0].metrics)
    return PipelineResult(parent_run_id=ctx.parent_run_id, tracking_uri=ctx.tracking_uri, upstream=up,
                          branches=done)


def prepare_task(ctx: RunContext, cfg: PipelineConfig, methods: list[Method]) -> Upstream:
    """Model, calibration per dataset, then covariance → spectrum and sensitivity where a method needs them."""
    model = call(ctx, prepare.model, prepare.ModelParams.of(cfg))
    sources = cfg.calibration_sources
    calibs = [call(ctx, prepare.calibration, prepare.CalibrationParams.of(cfg, s, model)) for s in sources]
    weights = [s.weight for s in sources]
    parts: list[StageResult] = []
    covs: list[StageResult] = []
    scores: list[StageResult] = []
    with shards.cluster(cfg):  # one Ray or Dask cluster for every sharded stage when runner.kind asks for one
        if any(m.needs_spectrum for m in methods):
            covs = [sharded(ctx, cfg, "covariance", model, s, c, parts) for s, c in zip(sources, calibs, strict=True)]
        if any(m.needs_scores for m in methods):
            scores = [sharded(ctx, cfg, "sensitivity", model, s, c, parts)
                      for s, c in zip(sources, calibs, strict=True)]
    covariance = mix(ctx, prepare.covariance_mix, covs, weights) if covs else None
    spectrum = call(ctx, prepare.spectrum, prepare.SpectrumParams.of(cfg, model, covariance)) if covs else None
    sensitivity = mix(ctx, prepare.sensitivity_mix, scores, weights) if scores else None
    return Upstream(model=model, calibrations=calibs, shards=parts, covariance=covariance, spectrum=spectrum,
                    sensitivity=sensitivity)


def run_branch(ctx: RunContext, cfg: PipelineConfig, up: Upstream) -> Branch:
    """Allocation → init → train → evaluate (→ merge) for the config's budget and method."""
    allocation, init = branch_init(ctx, cfg, up)
    return branch(ctx, cfg, allocation, init, *gpu_stages(ctx, cfg, up.model, init))


def run_branches_on_gpu_pool(deployment: str, ctx: RunContext, configs: list[PipelineConfig],
                             up: Upstream) -> list[Branch]:
    """Allocation → init of every branch here, then all their ``tlora-train`` runs on the gpu pool at once."""
    inits = [branch_init(ctx, cfg, up) for cfg in configs]
    runs = [submit_to_gpu_pool(deployment, ctx, cfg, up.model, init) for cfg, (_, init) in zip(configs, inits,
                                                                                                 strict=True)]
    failed = [f"{run.name} ({run.id}): {state}" for run, state in zip(runs, wait_for_runs(runs), strict=True)
              if state != "COMPLETED"]
    if failed:
        raise RuntimeError(f"flow run(s) of deployment {deployment} did not complete: {'; '.join(failed)} "
                           "(the branches that completed are published and will be reused)")
    return [branch(ctx, cfg, allocation, init, *published_gpu_stages(deployment, ctx, cfg, up.model, init))
            for cfg, (allocation, init) in zip(configs, inits, strict=True)]


def branch_init(ctx: RunContext, cfg: PipelineConfig, up: Upstream) -> tuple[StageResult, StageResult]:
    """Allocation → init: the branch's stages before training."""
    allocation = call(ctx, adapt.allocation, adapt.AllocationParams.of(cfg, up.model, up.sensitivity))
    return allocation, call(ctx, adapt.init, adapt.InitParams.of(cfg, up.model, allocation, up.spectrum))


def branch(ctx: RunContext, cfg: PipelineConfig, allocation: StageResult, init: StageResult, trained: StageResult,
           evaluated: StageResult, merged: StageResult | None) -> Branch:
    """A finished branch, with the metrics its evaluate stage wrote."""
    metrics = yaml.safe_load((ctx.open(evaluated) / "metrics.json").read_text())
    return Branch(method=cfg.method.label, budget=cfg.allocation.budget, allocation=allocation, init=init,
                  train=trained, evaluate=evaluated, merge=merged, metrics=metrics)


def sharded(ctx: RunContext, cfg: PipelineConfig, stage: shards.Stage, model: StageResult, source: CalibrationSource,
            calib: StageResult, parts: list[StageResult]) -> StageResult:
    """One pass over the samples, or their shards mapped on ``cfg.runner`` (appended to ``parts``) and reduced."""
    if stage == "covariance" and cfg.covariance.shards == 1:
        return call(ctx, prepare.covariance, prepare.CovarianceParams.of(cfg, model, calib))
    if stage == "sensitivity" and cfg.sensitivity.shards == 1:
        return call(ctx, prepare.sensitivity, prepare.SensitivityParams.of(cfg, model, calib))
    cut, reduce = SHARDED[stage]
    done = shards.run_shards(ctx, cfg, stage, cut(cfg, source, model, calib))
    parts += done
    return call(ctx, reduce, shards.ReduceParams(calibration=calib, shards=done))


SHARDED = {"covariance": (shards.covariance_shards, shards.covariance_reduce),
           "sensitivity": (shards.sensitivity_shards, shards.sensitivity_reduce)}


def gpu_stages(ctx: RunContext, cfg: PipelineConfig, model: StageResult,
               init: StageResult) -> tuple[StageResult, StageResult, StageResult | None]:
    """Train → evaluate (→ merge): the stages a gpu pool runs."""
    trained = call(ctx, adapt.train, adapt.TrainParams.of(cfg, model, init))
    evaluated = call(ctx, adapt.evaluate, adapt.EvaluateParams.of(cfg, model, trained))
    merged = call(ctx, adapt.merge, adapt.MergeParams.of(cfg, model, trained)) if cfg.merge.enabled else None
    return trained, evaluated, merged


def submit_to_gpu_pool(deployment: str, ctx: RunContext, cfg: PipelineConfig, model: StageResult,
                       init: StageResult) -> FlowRun:
    """Start ``tlora-train`` for one branch as a run of ``deployment`` (a subflow of this run); do not wait."""
    parameters = {"ctx": ctx.model_dump(mode="json"), "config": cfg.model_dump(mode="json"),
                  "model": model.model_dump(mode="json"), "init": init.model_dump(mode="json")}
    log.info("train, evaluate%s of %s on deployment %s", ", merge" if cfg.merge.enabled else "",
             cfg.method.label, deployment)
    return run_deployment(deployment, parameters=parameters, timeout=0,
                          tags=["tlora", f"tlora.method:{cfg.method.label}"])


def wait_for_runs(runs: list[FlowRun], poll_s: float = 2.0) -> list[str]:
    """Wait until every flow run is in a final state; their state types (``COMPLETED``, ``FAILED``, …)."""
    from prefect.client.orchestration import get_client

    states: dict = {}
    with get_client(sync_client=True) as client:
        while True:
            for run in runs:
                if run.id not in states:
                    state = client.read_flow_run(run.id).state
                    if state is not None and state.is_final():
                        states[run.id] = state.type.value
            if len(states) == len(runs):
                return [states[run.id] for run in runs]
            time.sleep(poll_s)


def published_gpu_stages(deployment: str, ctx: RunContext, cfg: PipelineConfig, model: StageResult,
                         init: StageResult) -> tuple[StageResult, StageResult, StageResult | None]:
    """What a ``tlora-train`` run published for this branch, read back from the store's manifests.

    The gpu run records its stages (or their reuse) under this invocation's MLflow parent run and publishes them
    to this store, so nothing is computed or recorded twice.
    """
    trained = published(ctx, "train", adapt.TrainParams.of(cfg, model, init), deployment)
    evaluated = published(ctx, "evaluate", adapt.EvaluateParams.of(cfg, model, trained), deployment)
    merged = published(ctx, "merge", adapt.MergeParams.of(cfg, model, trained), deployment) if cfg.merge.enabled \
        else None
    return trained, evaluated, merged


def published(ctx: RunContext, stage: str, params: StageParams, deployment: str) -> StageResult:
    """The verified artifact another flow run published for ``params`` in this invocation's store."""
    key = params.key(stage)
    store = ctx.store()
    manifest = store.verify(stage, key)
    if manifest is None:
        raise RuntimeError(f"deployment {deployment} completed, but no {stage} artifact {key[:12]} is in "
                           f"{ctx.stages}: the gpu workers must share the store (store.stages) with this one")
    return StageResult(stage=stage, key=key, uri=store.uri(stage, key), run_id=manifest.run_id,
                       parent_run_id=manifest.parent_run_id, reused=manifest.parent_run_id != ctx.parent_run_id)


def mix(ctx: RunContext, mix_task, parts: list[StageResult], weights: list[float]) -> StageResult:
    """A single dataset's result as is; several datasets' results mixed by per-sample weight."""
    if len(parts) == 1:
        return parts[0]
    return call(ctx, mix_task, prepare.MixParams(parts=parts, weights=weights))


def open_invocation(config: PipelineConfig, branches: list[tuple[Budget | None, Method]], *,
                    progress: bool = False) -> RunContext:
    """The run context of one invocation, with its MLflow parent run opened."""
    root = str(Path(config.store.root).resolve())
    stages = config.store.stages_uri
    if "://" not in stages:
        stages = str(Path(stages).resolve())
    ctx = RunContext(stages=stages, root=root, tracking_uri=tracking_uri(config.tracking.uri, root),
                     experiment=config.tracking.experiment, device=resolve_device(config.device), progress=progress,
                     compress=config.store.compress)
    params = config.model_dump(mode="json") | {"branches": [
        {"method": m.label, "budget": b.model_dump(mode="json") if b else None} for b, m in branches]}
    run_name = f"{config.name}-{flow_run.name}" if flow_run.name else config.name
    parent = ctx.tracker().start_parent(run_name, params, yaml.safe_dump(config.model_dump(mode="json")))
    if flow_run.id:
        ctx.tracker().client.set_tag(parent, "prefect.flow_run_id", str(flow_run.id))
    log.info("parent run %s", parent)
    return ctx.model_copy(update={"parent_run_id": parent})
