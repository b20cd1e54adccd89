"""The shared stage shape: keys (DESIGN §3), reuse or recompute, the Prefect cache key, MLflow runs and tags."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import Field

import flows.stage
import flows.store
from flows.adapt import AllocationParams
from flows.stage import UNKEYED, StageOutput, StageParams, StageResult, prefect_cache_key, run_stage
from tests.flows.conftest import REPO, context
from tlora.methods import Method

STAGE = "allocation"  # any registered stage name; the compute below is a toy


class ToyParams(StageParams):
    upstream: StageResult | None = None
    value: int
    batch_size: int = Field(1, json_schema_extra=UNKEYED)


def toy(p: ToyParams, ctx, out: Path) -> StageOutput:
    """Write the value; count calls so a test can tell compute from reuse."""
    toy.calls += 1
    (out / "value.json").write_text(json.dumps({"value": p.value}))
    return StageOutput(metrics={"value": p.value})


toy.calls = 0


def ref(key: str, run_id: str | None = "producer") -> StageResult:
    return StageResult(stage="model", key=key, uri=f"/nowhere/model/{key}", run_id=run_id, parent_run_id=None)


ALLOCATION = ("AllocationParams(model=StageResult(stage='model', key='m', uri='u', run_id=None, parent_run_id=None), "
              "sensitivity=None, targets=['q_proj', 'v_proj'], method=Method(), r=2, alpha=4.0, budget=None, "
              "min_rank=0, max_rank=8).key('allocation')")


def test_keys_follow_config_and_inputs_not_unkeyed_settings():
    base = ToyParams(upstream=ref("a"), value=1)
    assert base.key(STAGE) == ToyParams(upstream=ref("a", run_id="other"), value=1, batch_size=8).key(STAGE)
    assert base.key(STAGE) != ToyParams(upstream=ref("b"), value=1).key(STAGE)  # an upstream key changes it
    assert base.key(STAGE) != ToyParams(upstream=ref("a"), value=2).key(STAGE)
    assert base.key(STAGE) != base.key("init")  # and so does the stage
    assert base.key_config() == {"value": 1} and list(base.inputs()) == ["upstream"]


def test_keys_are_the_same_in_another_process():
    here = eval(ALLOCATION, {"AllocationParams": AllocationParams, "StageResult": StageResult, "Method": Method})
    code = ("from flows.adapt import AllocationParams; from flows.stage import StageResult; "
            f"from tlora.methods import Method; print({ALLOCATION})")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    assert there.stdout.strip() == here


def test_compute_then_reuse_then_recompute_when_damaged(workspace):
    ctx = context(workspace())
    params = ToyParams(upstream=ref("a"), value=3)
    toy.calls = 0
    first = run_stage(ctx, STAGE, params, toy)
    assert toy.calls == 1 and Path(first.uri).name == params.key(STAGE)
    run = ctx.tracker().client.get_run(first.run_id)
    tags = run.data.tags
    assert tags["tlora.stage"] == STAGE and tags["tlora.key"] == first.key and tags["tlora.uri"] == first.uri
    assert tags["tlora.upstream.upstream"] == "producer" and tags["tlora.code_version"]
    assert run.data.params == {"value": "3"} and run.data.metrics == {"value": 3.0}
    assert run.info.status == "FINISHED"

    assert run_stage(ctx, STAGE, params, toy) == first and toy.calls == 1  # reused, same producer

    (Path(first.uri) / "value.json").write_text('{"value": 4}')  # corrupted: recomputed, by a new run
    again = run_stage(ctx, STAGE, params, toy)
    assert toy.calls == 2 and again.run_id != first.run_id
    assert json.loads((Path(again.uri) / "value.json").read_text()) == {"value": 3}


def test_the_prefect_cache_key_stands_for_a_verified_artifact(workspace):
    ctx = context(workspace())
    inputs = {"ctx": ctx, "params": ToyParams(value=5)}
    assert prefect_cache_key(STAGE, None, inputs) is None  # nothing computed yet: no cache entry is trusted
    result = run_stage(ctx, STAGE, inputs["params"], toy)
    cached = prefect_cache_key(STAGE, None, inputs)
    assert cached is not None and cached.startswith(f"{STAGE}-{result.key}-")
    (Path(result.uri) / "value.json").unlink()
    assert prefect_cache_key(STAGE, None, inputs) is None
    run_stage(ctx, STAGE, inputs["params"], toy)
    assert prefect_cache_key(STAGE, None, inputs) not in (None, cached)  # a recomputed artifact is a new entry


def test_a_verified_artifact_is_hashed_again_only_once_a_file_changes(workspace, monkeypatch):
    ctx = context(workspace())
    params = ToyParams(value=7)
    result = run_stage(ctx, STAGE, params, toy)
    monkeypatch.setattr(flows.stage, "STAMP_MARGIN_S", 0.05)
    hashed = []
    real = flows.store._sha256
    monkeypatch.setattr(flows.store, "_sha256", lambda path: hashed.append(path) or real(path))
    time.sleep(0.1)
    first = ctx.store().verify(STAGE, result.key)
    assert first is not None and len(hashed) == 1  # value.json, in full, then stamped
    assert ctx.store().verify(STAGE, result.key) == first and ctx.open(result) == Path(result.uri)
    assert prefect_cache_key(STAGE, None, {"ctx": ctx, "params": params}) is not None and len(hashed) == 1
    time.sleep(0.05)
    (Path(result.uri) / "value.json").write_text('{"value": 8}')  # same size, other bytes
    assert ctx.store().verify(STAGE, result.key) is None and len(hashed) == 2
    assert prefect_cache_key(STAGE, None, {"ctx": ctx, "params": params}) is None
    with pytest.raises(FileNotFoundError):
        ctx.open(result)


def test_failed_compute_marks_its_run_failed_and_publishes_nothing(workspace):
    ctx = context(workspace())
    params = ToyParams(value=6)

    def broken(p, ctx, out):
        (out / "half.json").write_text("{")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(ctx, STAGE, params, broken)
    assert ctx.store().verify(STAGE, params.key(STAGE)) is None
    runs = ctx.tracker().client.search_runs([ctx.tracker().experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_mlflow_finds_an_artifact_kept_in_another_store(workspace):
    cfg = workspace()
    ctx = context(cfg)
    params = ToyParams(value=7)
    first = run_stage(ctx, STAGE, params, toy)
    elsewhere = ctx.model_copy(update={"stages": str(Path(ctx.root) / "other-stages")})
    calls = toy.calls
    found = run_stage(elsewhere, STAGE, params, toy)
    assert found.uri == first.uri and found.run_id == first.run_id and toy.calls == calls
