"""Sharded covariance and sensitivity: the reduce equals one pass, a failed shard is retried alone, and a rerun after
an interruption computes only the shards that had not finished. Shards run on Prefect's thread pool, on Ray and on
Dask."""

from collections import Counter

import pytest
import torch
from prefect import flow
from pydantic import ValidationError

from flows import prepare, shards
from flows.pipeline import prepare_task
from flows.stage import call
from flows.store import verify_folder
from tests.flows.conftest import context
from tlora.covariance import collect_covariance, load_covariance
from tlora.data import load_calibration
from tlora.methods import Method
from tlora.models import load_model
from tlora.sensitivity import Scores, score_sensitivity
from tlora.targets import find_targets


@pytest.mark.parametrize(("n", "step", "k", "expected"), [
    (8, 4, 2, [(0, 4), (4, 8)]),
    (8, 2, 3, [(0, 4), (4, 6), (6, 8)]),  # 4 batches dealt 2, 1, 1
    (10, 4, 3, [(0, 4), (4, 8), (8, 10)]),  # the last batch is short, as in one pass
    (7, 1, 7, [(i, i + 1) for i in range(7)]),
    (5, 3, 1, [(0, 5)]),
])
def test_shards_are_whole_batches_that_tile_the_samples(n, step, k, expected):
    assert shards.shard_ranges(n, step, k) == expected


def test_more_shards_than_batches_is_refused_by_the_config(workspace):
    with pytest.raises(ValidationError, match=r"covariance\.shards=3 exceeds the 2 steps of 4"):
        workspace(covariance={"shards": 3})  # 8 samples in batches of 4
    with pytest.raises(ValidationError, match=r"sensitivity\.shards=3 exceeds the 2 steps"):
        workspace(sensitivity={"mode": "batched", "batch_size": 4, "shards": 3})
    workspace(sensitivity={"shards": 8})  # per-sample scoring: one step per sample
    with pytest.raises(ValueError, match=r"shards=5 exceeds the 4 steps of 2 sample\(s\) in 8 calibration samples"):
        shards.shard_ranges(8, 2, 5)


def test_one_shard_keeps_the_one_pass_keys_and_shards_have_keys_of_their_own(workspace):
    one, four = workspace(), workspace(covariance={"batch_size": 2, "shards": 4})
    ctx = context(one)
    model = prepare.model.fn(ctx, prepare.ModelParams.of(one))
    calib = prepare.calibration.fn(ctx, prepare.CalibrationParams.of(one, one.calibration_sources[0], model))
    key = prepare.CovarianceParams.of(one, model, calib).key("covariance")
    assert prepare.CovarianceParams.of(four, model, calib).key("covariance") == key
    cut = shards.covariance_shards(four, four.calibration_sources[0], model, calib)
    assert [(p.start, p.stop) for p in cut] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    keys = {p.key("covariance") for p in cut}
    assert len(keys) == 4 and key not in keys


class Injected(RuntimeError):
    pass


@pytest.fixture
def computed(monkeypatch):
    """Counts each shard's computations by slice; ``fail[slice] = n`` makes its next n computations raise."""
    calls: Counter = Counter()
    fail: Counter = Counter()
    original = shards.slice_calibration

    def counting(calib, start, stop):
        calls[(start, stop)] += 1
        if fail[(start, stop)] > 0:
            fail[(start, stop)] -= 1
            raise Injected(f"shard [{start}, {stop}) failed on purpose")
        return original(calib, start, stop)

    monkeypatch.setattr(shards, "slice_calibration", counting)
    return calls, fail


def one_pass(ctx, up):
    """The oracle: covariance and scores over all calibration samples in one pass, straight from ``tlora``."""
    base, _ = load_model(ctx.open(up.model))
    calib = load_calibration(ctx.open(up.calibrations[0]))
    cov = collect_covariance(base, calib.batches(4), find_targets(base, "all-linear"), progress=False)
    return cov, score_sensitivity(base, calib.batches(1), "all-linear", progress=False)


def assert_equal_to_one_pass(ctx, up):
    cov_ref, scores_ref = one_pass(ctx, up)
    cov = load_covariance(ctx.open(up.covariance) / "covariance.zarr")
    scores = Scores.model_validate_json((ctx.open(up.sensitivity) / "scores.json").read_text())
    assert (cov.n_samples, cov.n_tokens) == (cov_ref.n_samples, cov_ref.n_tokens)
    for group, s in cov_ref.sums.items():
        torch.testing.assert_close(cov.sums[group], s, rtol=1e-12, atol=1e-12 * float(s.abs().max()))
    part = load_covariance(ctx.open(up.shards[0]) / "covariance.zarr")
    assert part.n_samples < cov.n_samples and not torch.allclose(part.sums[group], s)  # sanity: a real shard
    assert scores.n_samples == scores_ref.n_samples and list(scores.scores) == list(scores_ref.scores)
    for name, value in scores_ref.scores.items():
        assert scores.scores[name] == pytest.approx(value, rel=1e-12, abs=0)


def test_sharded_stages_equal_one_pass_and_a_failed_shard_is_retried_alone(prefect_server, workspace, computed):
    calls, fail = computed
    cfg = workspace(covariance={"shards": 2}, sensitivity={"shards": 3}, runner={"num_cpus": 2, "retries": 1})
    fail[(4, 8)] = fail[(3, 6)] = 1  # covariance shard 1 and sensitivity shard 1 fail once each
    ctx = context(cfg)
    up = flow(name="task-side")(prepare_task)(ctx, cfg, [Method()])  # the shards' subflow runs inside a flow run
    assert calls == {(0, 4): 1, (4, 8): 2, (0, 3): 1, (3, 6): 2, (6, 8): 1}  # retried alone, the others ran once
    assert [(s.stage, verify_folder(ctx.open(s)).config["start"]) for s in up.shards] == [
        ("covariance", 0), ("covariance", 4), ("sensitivity", 0), ("sensitivity", 3), ("sensitivity", 6)]
    assert_equal_to_one_pass(ctx, up)


def test_an_interrupted_run_keeps_its_finished_shards_and_a_rerun_computes_only_the_rest(
        prefect_server, workspace, computed):
    calls, fail = computed
    cfg = workspace(covariance={"batch_size": 2, "shards": 4}, runner={"num_cpus": 1, "retries": 0})
    ctx = context(cfg)
    model = prepare.model.fn(ctx, prepare.ModelParams.of(cfg))
    calib = prepare.calibration.fn(ctx, prepare.CalibrationParams.of(cfg, cfg.calibration_sources[0], model))
    cut = shards.covariance_shards(cfg, cfg.calibration_sources[0], model, calib)
    fail[(4, 6)] = 99  # shard 2 keeps failing: the run is interrupted there

    first = ctx.model_copy(update={"parent_run_id": ctx.tracker().start_parent("first", {}, "")})
    with pytest.raises(Injected):
        shards.run_shards(first, cfg, "covariance", cut)
    assert calls == {(0, 2): 1, (2, 4): 1, (4, 6): 1, (6, 8): 1}
    store = ctx.store()
    flushed = {(p.start, p.stop): store.verify("covariance", p.key("covariance")) for p in cut}
    assert [s for s, m in flushed.items() if m is None] == [(4, 6)]  # every other shard's sums are on disk

    fail.clear()
    calls.clear()
    second = ctx.model_copy(update={"parent_run_id": ctx.tracker().start_parent("second", {}, "")})
    done = shards.run_shards(second, cfg, "covariance", cut)
    assert calls == {(4, 6): 1}  # only the missing shard was computed
    for p, r in zip(cut, done, strict=True):
        if (p.start, p.stop) == (4, 6):
            assert not r.reused and r.parent_run_id == second.parent_run_id
        else:
            assert r.reused and r.run_id == flushed[(p.start, p.stop)].run_id
    reduced = call(second, shards.covariance_reduce, shards.ReduceParams(calibration=calib, shards=done))
    assert load_covariance(ctx.open(reduced) / "covariance.zarr").n_samples == 8


def test_a_reduce_refuses_shards_that_do_not_tile_the_samples(prefect_server, workspace):
    cfg = workspace(covariance={"shards": 2})
    ctx = context(cfg)
    model = prepare.model.fn(ctx, prepare.ModelParams.of(cfg))
    calib = prepare.calibration.fn(ctx, prepare.CalibrationParams.of(cfg, cfg.calibration_sources[0], model))
    first, second = shards.covariance_shards(cfg, cfg.calibration_sources[0], model, calib)
    done = [prepare.covariance.fn(ctx, p) for p in (second, first)]  # out of order
    with pytest.raises(ValueError, match=r"do not tile the 8 calibration samples"):
        shards.covariance_reduce.fn(ctx, shards.ReduceParams(calibration=calib, shards=done))
    with pytest.raises(ValueError, match="do not tile"):
        shards.covariance_reduce.fn(ctx, shards.ReduceParams(calibration=calib, shards=done[1:]))
    whole = prepare.covariance.fn(ctx, prepare.CovarianceParams.of(cfg, model, calib))
    with pytest.raises(ValueError, match="not a shard"):
        shards.covariance_reduce.fn(ctx, shards.ReduceParams(calibration=calib, shards=[whole]))


@pytest.mark.parametrize("kind", ["ray", "dask"])
def test_shards_on_a_cluster_equal_one_pass(prefect_server, workspace, kind):
    import ray

    from flows.shards import _DASK

    cfg = workspace(covariance={"shards": 2}, sensitivity={"shards": 2}, runner={"kind": kind, "num_cpus": 2})
    ctx = context(cfg)
    try:
        up = prepare_task(ctx, cfg, [Method()])
    finally:
        assert not ray.is_initialized() and _DASK.get() is None  # the runner shut its local cluster down
    assert len(up.shards) == 4 and not any(s.reused for s in up.shards)
    client = ctx.tracker().client
    for s in up.shards:
        metrics = client.get_run(s.run_id).data.metrics
        assert metrics["torch_threads"] == 1, s  # the cluster's workers compute with one torch thread
    assert_equal_to_one_pass(ctx, up)


def test_a_dask_runner_connects_to_a_given_scheduler_or_starts_its_own():
    from flows.config import RunnerConfig

    assert shards.task_runner(RunnerConfig(kind="dask", address="tcp://10.0.0.1:8786")).address == "tcp://10.0.0.1:8786"
    own = shards.task_runner(RunnerConfig(kind="dask", num_cpus=3))
    assert own.address is None and own.cluster_kwargs["n_workers"] == 3
    assert own.cluster_kwargs["env"]["OMP_NUM_THREADS"] == "1"
