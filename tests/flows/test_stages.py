"""The task-side stages through ``task.fn`` on a tiny model: a calibration mixture equals one pass over the union;
``store.compress`` compresses the Zarr arrays and changes no key."""

import pytest
import torch
import zarr

from flows import prepare
from flows.prepare import (
    CalibrationParams,
    CovarianceParams,
    MixParams,
    ModelParams,
    SensitivityParams,
    SpectrumParams,
)
from tests.flows.conftest import context
from tlora.covariance import collect_covariance, load_covariance
from tlora.data import load_calibration
from tlora.models import load_model
from tlora.sensitivity import Scores, score_sensitivity
from tlora.targets import find_targets


@pytest.fixture
def mixture(workspace, tiny_sources):
    """Two datasets calibrated and scored on their own (8 and 6 samples), through the stage tasks."""
    cfg = workspace(calibration={"n_calib": 8, "max_length": 32, "mixture": [
        {"task": {"name": "tiny", "source": "json", "path": str(tiny_sources / "task"), "id_field": "id"}},
        {"task": {"name": "tiny-b", "source": "json", "path": str(tiny_sources / "task-b"), "id_field": "id"},
         "n_calib": 6}]})
    ctx = context(cfg)
    model = prepare.model.fn(ctx, ModelParams.of(cfg))
    calibs = [prepare.calibration.fn(ctx, CalibrationParams.of(cfg, s, model)) for s in cfg.calibration_sources]
    covs = [prepare.covariance.fn(ctx, CovarianceParams.of(cfg, model, c)) for c in calibs]
    scores = [prepare.sensitivity.fn(ctx, SensitivityParams.of(cfg, model, c)) for c in calibs]
    base, _ = load_model(ctx.open(model))
    parts = [load_calibration(ctx.open(c)) for c in calibs]
    return ctx, base, parts, covs, scores


def union_batches(parts, weights):
    """One pass over the union: each sample of part d appears weights[d] times (integer weights)."""
    return [b for part, w in zip(parts, weights, strict=True) for _ in range(w) for b in part.batches(4)]


@pytest.mark.parametrize("weights", [(1, 1), (1, 3)])
def test_mixed_covariance_equals_one_pass_over_the_union(mixture, weights):
    ctx, base, parts, covs, _ = mixture
    mixed_ref = prepare.covariance_mix.fn(ctx, MixParams(parts=covs, weights=[float(w) for w in weights]))
    mixed = load_covariance(ctx.open(mixed_ref) / "covariance.zarr")
    union = collect_covariance(base, union_batches(parts, weights), find_targets(base, "all-linear"), progress=False)
    assert mixed.n_samples == sum(len(p.input_ids) for p in parts) == 14  # real samples, not weighted copies
    assert mixed.n_tokens == sum(int(p.attention_mask.sum()) for p in parts)
    for module in union.modules:
        torch.testing.assert_close(mixed.matrix(module), union.matrix(module), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(load_covariance(ctx.open(covs[0]) / "covariance.zarr").matrix(module),
                              union.matrix(module))  # sanity: the mixture is not just its first part


@pytest.mark.parametrize("weights", [(1, 1), (2, 1)])
def test_mixed_scores_equal_one_pass_over_the_union(mixture, weights):
    ctx, base, parts, _, scores = mixture
    mixed_ref = prepare.sensitivity_mix.fn(ctx, MixParams(parts=scores, weights=[float(w) for w in weights]))
    mixed = Scores.model_validate_json((ctx.open(mixed_ref) / "scores.json").read_text())
    union = score_sensitivity(base, union_batches(parts, weights), "all-linear", progress=False)
    assert mixed.n_samples == 14 and list(mixed.scores) == list(union.scores)
    for name, value in union.scores.items():
        assert mixed.scores[name] == pytest.approx(value, rel=1e-5)


def test_a_new_mixture_reuses_the_parts(mixture):
    ctx, _, _, covs, _ = mixture
    runs_before = len(ctx.tracker().client.search_runs([ctx.tracker().experiment_id]))
    a = prepare.covariance_mix.fn(ctx, MixParams(parts=covs, weights=[1.0, 2.0]))
    b = prepare.covariance_mix.fn(ctx, MixParams(parts=covs, weights=[2.0, 1.0]))
    assert a.key != b.key  # the weights are part of the key
    runs = ctx.tracker().client.search_runs([ctx.tracker().experiment_id])
    assert len(runs) == runs_before + 2  # two mixing runs; the parts' covariances were not recomputed
    assert {r.data.tags["tlora.upstream.parts.0"] for r in runs[:2]} == {covs[0].run_id}


def test_store_compress_compresses_the_zarr_arrays_and_keeps_the_keys(workspace):
    cfg = workspace(store={"compress": True})
    ctx = context(cfg)
    model = prepare.model.fn(ctx, ModelParams.of(cfg))
    calib = prepare.calibration.fn(ctx, CalibrationParams.of(cfg, cfg.calibration_sources[0], model))
    cov = prepare.covariance.fn(ctx, CovarianceParams.of(cfg, model, calib))
    spec = prepare.spectrum.fn(ctx, SpectrumParams.of(cfg, model, cov))
    plain = workspace()  # the same settings, uncompressed: the same keys
    assert cov.key == CovarianceParams.of(plain, model, calib).key("covariance")
    assert spec.key == SpectrumParams.of(plain, model, cov).key("spectrum")
    for result, name in ((cov, "covariance.zarr"), (spec, "spectrum.zarr")):
        arrays = [a for _, a in zarr.open_group(str(ctx.open(result) / name), mode="r").arrays()]
        arrays += [a for _, g in zarr.open_group(str(ctx.open(result) / name), mode="r").groups()
                   for _, a in g.arrays()]
        assert arrays and all(a.compressors for a in arrays), name  # Blosc on every array
    assert load_covariance(ctx.open(cov) / "covariance.zarr").n_samples == 8
