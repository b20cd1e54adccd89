"""One child process of ``perf_pipeline.py``: a pipeline invocation through the ``tlora`` CLI with each stage's
compute function timed inside its call, or the compute functions called directly on the same input artifacts.

The parent (``perf_pipeline.py --child SPEC``) passes a JSON spec with ``mode`` (mine, run, sweep or direct)
and ``out``, the path this process writes its measurements to.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(spec: dict) -> None:
    """In a child process: ``tlora run``/``tlora sweep`` through the CLI, or the compute functions directly."""
    start = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import logging

    calls: list[dict] = []

    class Calls(logging.Handler):
        """The per-stage records of ``flows.stage.call``: stage, status, exact seconds, artifact URI."""

        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.args, tuple) and len(record.args) == 4:
                stage, status, seconds, uri = record.args
                calls.append({"stage": stage, "status": status, "seconds": float(seconds), "uri": str(uri)})

    stage_log = logging.getLogger("flows.stage")
    stage_log.addHandler(Calls())
    stage_log.setLevel(logging.INFO)
    if spec["mode"] == "mine":
        from flows.config import validate_config
        from flows.prepare import task_splits

        cfg = validate_config(spec["config"])
        task_splits(cfg.task, cfg.store.root)
        out = {}
    elif spec["mode"] == "direct":
        out = direct(spec)
    else:
        cfg_path = Path(spec["out"]).with_suffix(".yaml")
        import yaml

        cfg_path.write_text(yaml.safe_dump(spec["config"]))
        import flows.stage
        from flows.cli import app

        computes: list[float] = []
        original = flows.stage.run_stage

        def timed_run_stage(ctx, stage, params, compute):
            """The task body as is, its compute function timed (the stage task looks run_stage up per call)."""
            def timed(p, c, out):
                t0 = time.perf_counter()
                try:
                    return compute(p, c, out)
                finally:
                    computes.append(time.perf_counter() - t0)
            return original(ctx, stage, params, timed)

        flows.stage.run_stage = timed_run_stage
        argv = [spec["mode"], str(cfg_path), "--no-progress"]
        argv += [a for b in spec.get("budgets", []) for a in ("--budget", b)]
        flow_start = time.perf_counter()
        app(argv, standalone_mode=False)
        computed = [c for c in calls if c["status"] == "computed"]
        if len(computed) != len(computes):
            raise RuntimeError(f"{len(computed)} computed stage calls but {len(computes)} compute calls timed")
        for c, seconds in zip(computed, computes, strict=True):
            c["compute_s"] = seconds
        out = {"flow_s": time.perf_counter() - flow_start, "import_s": flow_start - start, "calls": calls}
    Path(spec["out"]).write_text(json.dumps(out))


def direct(spec: dict) -> dict:
    """The compute functions in pipeline order, each on the same input artifacts as the pipeline run's stage."""
    import torch

    from flows import adapt, prepare
    from flows.config import validate_config
    from flows.stage import RunContext, StageResult

    cfg = validate_config(spec["config"])
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    res = {c["stage"]: StageResult(stage=c["stage"], key=c["uri"].rstrip("/").rsplit("/", 1)[1], uri=c["uri"],
                                   run_id=None, parent_run_id=None) for c in spec["calls"]}
    scratch = Path(spec["scratch"])
    root = Path(cfg.store.root).resolve()
    ctx = RunContext(stages=str(root / "stages"), root=str(scratch), tracking_uri=f"sqlite:///{scratch}/unused.db",
                     experiment="unused", device="cpu" if cfg.device == "auto" else cfg.device)
    source = cfg.calibration_sources[0]
    steps = [
        ("model", prepare.compute_model, lambda: prepare.ModelParams.of(cfg)),
        ("calibration", prepare.compute_calibration, lambda: prepare.CalibrationParams.of(cfg, source, res["model"])),
        ("covariance", prepare.compute_covariance,
         lambda: prepare.CovarianceParams.of(cfg, res["model"], res["calibration"])),
        ("spectrum", prepare.compute_spectrum_stage,
         lambda: prepare.SpectrumParams.of(cfg, res["model"], res["covariance"])),
        ("sensitivity", prepare.compute_sensitivity,
         lambda: prepare.SensitivityParams.of(cfg, res["model"], res["calibration"])),
        ("allocation", adapt.compute_allocation,
         lambda: adapt.AllocationParams.of(cfg, res["model"], res["sensitivity"])),
        ("init", adapt.compute_init, lambda: adapt.InitParams.of(cfg, res["model"], res["allocation"],
                                                                  res["spectrum"])),
        ("train", adapt.compute_train, lambda: adapt.TrainParams.of(cfg, res["model"], res["init"])),
        ("evaluate", adapt.compute_evaluate, lambda: adapt.EvaluateParams.of(cfg, res["model"], res["train"])),
        ("merge", adapt.compute_merge, lambda: adapt.MergeParams.of(cfg, res["model"], res["train"])),
    ]
    compute_s, verify_s = {}, {}
    for stage, compute, params_of in steps:
        if stage not in res:
            continue
        params = params_of()
        if params.key(stage) != res[stage].key:
            raise RuntimeError(f"{stage}: direct params give key {params.key(stage)}, the run had {res[stage].key}")
        out = scratch / "out" / stage
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        compute(params, ctx, out)
        compute_s[stage] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ctx.open(res[stage])  # what checking one artifact's checksums costs (each downstream open pays it)
        verify_s[stage] = time.perf_counter() - t0
    return {"compute_s": compute_s, "verify_s": verify_s}
