import numpy as np
import pytest
import torch
import zarr

from tlora import find_targets
from tlora.covariance import (
    Covariance,
    CovarianceStats,
    collect_covariance,
    load_covariance,
    merge_covariances,
    save_covariance,
)


def collect(model, batches, targets=r".*(layers|h|layer)\.\d+\..*", **kw):  # BERT's pooler reads no tokens
    return collect_covariance(model, batches, find_targets(model, targets), progress=False, **kw)


def oracle(model, samples, names):
    """Per module: Σ_s (X_s − μ_s)ᵀ(X_s − μ_s) in float64 numpy, from an unpadded forward per sample."""
    seen: dict[str, np.ndarray] = {}

    def keep(name):
        return lambda _m, args: seen.__setitem__(name, args[0][0].detach().double().numpy())  # [T, d]

    handles = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    sums = dict.fromkeys(names, 0.0)
    try:
        with torch.no_grad():
            for s in samples:
                model(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None])
                for n in names:
                    xc = seen[n] - seen[n].mean(0)
                    sums[n] = sums[n] + xc.T @ xc
    finally:
        for h in handles:
            h.remove()
    return sums


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_matches_per_sample_oracle(kind, tiny_model, samples, batches):
    model = tiny_model(kind, dtype=torch.float64)
    data = samples(6, seed=1)
    cov = collect(model, batches(data, 4), precision="float64")
    expected = oracle(model, data, list(cov.modules))
    assert cov.n_samples == 6 and cov.n_tokens == sum(len(s["input_ids"]) for s in data)
    for name, s in expected.items():
        assert rel_err(cov.matrix(name), s / 6) < 1e-12, name


def test_output_head_as_a_target_sees_every_token(tiny_model, samples, batches):
    model = tiny_model("llama", dtype=torch.float64)
    data = samples(3)
    cov = collect(model, batches(data, 3), ["lm_head"], precision="float64")
    assert rel_err(cov.matrix("lm_head"), oracle(model, data, ["lm_head"])["lm_head"] / 3) < 1e-12


def test_float32_gemm_is_close_to_float64(tiny_model, samples, batches):
    model = tiny_model("llama")
    data = batches(samples(6), 3)
    c32, c64 = collect(model, data), collect(model, data, precision="float64")
    for group, s in c64.sums.items():
        assert c32.sums[group].dtype == torch.float64
        assert rel_err(c32.sums[group], s) < 1e-5, group


@pytest.mark.parametrize(("kind", "side"), [("llama", "right"), ("llama", "left"), ("gpt2", "left")])
def test_batch_size_and_padding_side_do_not_change_c(kind, side, tiny_model, samples, batches):
    model = tiny_model(kind, dtype=torch.float64)
    data = samples(8, seed=2)
    one = collect(model, batches(data, 1), precision="float64")
    four = collect(model, batches(data, 4, side=side), precision="float64")
    assert (one.n_tokens, one.n_samples) == (four.n_tokens, four.n_samples)
    assert any(len(s["input_ids"]) != len(data[0]["input_ids"]) for s in data[:4])  # padding did happen
    for group, s in one.sums.items():
        assert rel_err(four.sums[group], s) < 1e-12, group


def test_shards_merge_to_one_pass(tiny_model, samples, batches):
    model = tiny_model("llama", dtype=torch.float64)
    data = samples(8, seed=3)
    whole = collect(model, batches(data, 4), precision="float64", data_fingerprint="all")
    parts = [collect(model, batches(data[:3], 2), precision="float64"),
             collect(model, batches(data[3:], 4), precision="float64")]
    merged = merge_covariances(parts, data_fingerprint="all")
    assert merged.stats == whole.stats
    for group, s in whole.sums.items():
        assert rel_err(merged.sums[group], s) < 1e-12, group


def test_merge_refuses_mismatched_parts(tiny_model, samples, batches):
    model = tiny_model("llama")
    data = batches(samples(2), 2)
    cov = collect(model, data)
    with pytest.raises(ValueError, match="another model"):
        merge_covariances([cov, collect(tiny_model("llama", seed=1), data)])
    with pytest.raises(ValueError, match="other modules"):
        merge_covariances([cov, collect(model, data, ["q_proj"])])
    with pytest.raises(ValueError, match="at least one"):
        merge_covariances([])


def test_shared_inputs_share_one_matrix(tiny_model, samples, batches):
    model = tiny_model("llama")
    cov = collect(model, batches(samples(3), 3))
    assert len(cov.modules) == 14 and len(cov.sums) == 8  # per layer: qkv, o, gate/up, down
    layer = "model.layers.1."
    q, k, v = (cov.matrix(layer + f"self_attn.{p}_proj") for p in "qkv")
    assert torch.equal(q, k) and torch.equal(q, v)
    assert torch.equal(cov.matrix(layer + "mlp.gate_proj"), cov.matrix(layer + "mlp.up_proj"))
    assert not torch.equal(q, cov.matrix(layer + "mlp.gate_proj"))
    assert cov.groups[layer + "mlp.gate_proj"] == [layer + "mlp.gate_proj", layer + "mlp.up_proj"]


def test_module_without_token_input_is_refused(tiny_model, samples, batches):
    with pytest.raises(ValueError, match=r"'pooler\.dense' reads \(2, 32\), not one vector per token"):
        collect(tiny_model("bert"), batches(samples(2), 2), "all-linear")


def test_accepts_a_target_spec_and_records_fingerprints(tiny_model, samples, batches):
    from tlora.models import model_fingerprint

    model = tiny_model("gpt2")
    cov = collect_covariance(model, batches(samples(2), 2), ["c_fc"], data_fingerprint="d1", progress=False)
    assert list(cov.modules) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert cov.model_fingerprint == model_fingerprint(model) and cov.data_fingerprint == "d1"


def test_bad_data_is_refused_before_any_forward(tiny_model, samples, batches):
    model = tiny_model("llama")
    targets = find_targets(model)
    model.forward = lambda **_: pytest.fail("forward ran on invalid data")
    good = batches(samples(3), 3)[0]
    padded = {k: v.clone() for k, v in good.items()}
    padded["attention_mask"][1] = 0
    cases = [
        ([], "no calibration batches"),
        ([{"input_ids": good["input_ids"]}], "batch 0 has no attention_mask"),
        ([good, {"attention_mask": good["attention_mask"]}], "batch 1 has no input_ids"),
        ([good, padded], "sample 1 of batch 1 is all padding"),
        ([{**good, "attention_mask": torch.zeros_like(good["attention_mask"])}], "all padding"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            collect_covariance(model, data, targets, progress=False)


def test_nan_activation_names_module_and_hooks_are_removed(tiny_model, samples, batches):
    model = tiny_model("llama").train()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*'model\.layers\.1\.mlp\.gate_proj' \(shared by .*up_proj\)"):
        collect(model, batches(samples(2), 2))
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.training and torch.is_grad_enabled()


def test_zarr_round_trip_is_exact(tiny_model, samples, batches, tmp_path):
    model = tiny_model("llama")
    cov = collect(model, batches(samples(3), 2), data_fingerprint="d")
    save_covariance(tmp_path / "covariance.zarr", cov)
    root = zarr.open_group(str(tmp_path / "covariance.zarr"), mode="r")
    assert sorted(root.array_keys()) == sorted(cov.sums)
    assert root.attrs["complete"] is True and root.attrs["centering"] == "per_sample"
    back = load_covariance(tmp_path / "covariance.zarr")
    assert back.stats == cov.stats
    assert all(torch.equal(back.sums[g], s) for g, s in cov.sums.items())
    assert CovarianceStats.model_validate_json(cov.stats.model_dump_json()) == cov.stats


def test_incomplete_store_is_refused(tiny_model, samples, batches, tmp_path):
    cov = collect(tiny_model("llama"), batches(samples(2), 2), ["q_proj"])
    path = tmp_path / "covariance.zarr"
    save_covariance(path, cov)
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    with pytest.raises(ValueError, match="incomplete"):
        load_covariance(path)
    with pytest.raises(ValueError, match="no covariance store"):
        load_covariance(tmp_path / "missing.zarr")


def test_covariance_checks_its_own_fields():
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="without a sum"):
        Covariance(sums={"a": eye}, modules={"a": "a", "b": "b"}, n_tokens=3, n_samples=1)
    with pytest.raises(ValueError, match="square float64"):
        Covariance(sums={"a": eye.float()}, modules={"a": "a"}, n_tokens=3, n_samples=1)
    cov = Covariance(sums={"a": eye}, modules={"a": "a"}, n_tokens=3, n_samples=2)
    assert torch.equal(cov.matrix("a"), eye / 2)
    with pytest.raises(ValueError, match="has no covariance"):
        cov.matrix("b")


def test_store_keeps_each_sum_whole_in_unpadded_row_chunks(tmp_path, monkeypatch):
    """DESIGN §2's contract: one float64 [d_in, d_in] array per group, readable by plain zarr."""
    import tlora._zarr_store as zs

    monkeypatch.setattr(zs, "_CHUNK_VALUES", 12)  # force several row chunks on small matrices
    rng = np.random.default_rng(0)
    sums = {f"g{d}": torch.from_numpy(rng.standard_normal((d, d))) for d in (5, 6, 1)}
    cov = Covariance(sums=sums, modules={g: g for g in sums}, n_tokens=9, n_samples=2)
    path = tmp_path / "covariance.zarr"
    save_covariance(path, cov)
    root = zarr.open_group(str(path), mode="r")
    for g, s in sums.items():
        arr = root[g]
        assert arr.shape == s.shape and arr.dtype == np.float64 and np.array_equal(arr[...], s.numpy())
        rows = arr.chunks[0]
        assert arr.chunks[1] == s.shape[1] and (rows * s.shape[1] <= 12 or rows == 1)
        assert -(-s.shape[0] // rows) * rows - s.shape[0] < -(-s.shape[0] // rows)  # padding < one row per chunk
    assert root["g6"].chunks == (2, 6) and root["g5"].chunks == (2, 5)
    back = load_covariance(path)
    assert all(torch.equal(back.sums[g], s) for g, s in sums.items())


def _padded_sums(monkeypatch) -> dict[str, torch.Tensor]:
    """Matrices in several row chunks, the last one padded, and a 1-row one (as spectrum values are stored)."""
    import tlora._zarr_store as zs

    monkeypatch.setattr(zs, "_CHUNK_VALUES", 12)
    rng = np.random.default_rng(1)
    return {f"g{d}": torch.from_numpy(rng.standard_normal((d, d))) for d in (7, 4, 1)}


def test_default_store_is_read_from_its_chunk_files_as_zarr_reads_it(tmp_path, monkeypatch):
    """The uncompressed default is read file by file, not through zarr's codec pipeline, and gives what zarr gives."""
    import tlora._zarr_store as zs

    sums = _padded_sums(monkeypatch) | {"zeros": torch.zeros(5, 5, dtype=torch.float64)}
    cov = Covariance(sums=sums, modules={g: g for g in sums}, n_tokens=9, n_samples=2)
    path = tmp_path / "covariance.zarr"
    save_covariance(path, cov)
    root = zarr.open_group(str(path), mode="r")
    assert all(root[g].compressors == () for g in sums)
    assert (path / "zeros" / "c" / "2" / "0").is_file()  # an all-zero chunk is written too
    oracle = {g: root[g][...] for g in sums}  # zarr's own reading
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda *a: pytest.fail("read through zarr's pipeline"))
    back = load_covariance(path)
    assert all(np.array_equal(back.sums[g].numpy(), oracle[g]) and torch.equal(back.sums[g], s)
               for g, s in sums.items())
    values = torch.arange(5, dtype=torch.float64)  # 1-D, as spectrum values
    zs.write_matrix(zarr.open_group(str(tmp_path / "v.zarr"), mode="w"), "v", values)
    assert torch.equal(zs.read_float64(zarr.open_group(str(tmp_path / "v.zarr"), mode="r")["v"]), values)


def test_default_store_is_written_byte_for_byte_as_zarr_writes_it(tmp_path, monkeypatch):
    """The uncompressed default's files are written directly: the same files, byte for byte, as zarr's own write
    (padded chunks, an all-zero matrix, a 1-D array, a nested name with its parent group)."""
    import tlora._zarr_store as zs

    arrays = _padded_sums(monkeypatch) | {"zeros": torch.zeros(5, 5, dtype=torch.float64),
                                          "mod.a/values": torch.arange(5, dtype=torch.float64)}
    ours = zarr.open_group(str(tmp_path / "ours.zarr"), mode="w")
    zarrs = zarr.open_group(str(tmp_path / "zarr.zarr"), mode="w")
    for name, t in arrays.items():
        zs.write_matrix(ours, name, t)
        rows = ours[name].chunks[0]
        arr = zarrs.create_array(name=name, shape=t.shape, dtype="float64", chunks=(rows, *t.shape[1:]),
                                 compressors=None, config={"write_empty_chunks": True})
        arr[...] = t.numpy()

    def files(root):
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    written, expected = files(tmp_path / "ours.zarr"), files(tmp_path / "zarr.zarr")
    assert written.keys() == expected.keys() and "g7/c/3/0" in written and "mod.a/zarr.json" in written
    assert written == expected
    monkeypatch.setattr(zs, "_write_raw", lambda *a: pytest.fail("wrote directly"))  # compressed: through zarr
    zs.write_matrix(ours, "compact", arrays["g7"], compressors="compact")
    assert torch.equal(zs.read_float64(ours["compact"]), arrays["g7"])


def test_other_stores_are_read_through_zarr(tmp_path, monkeypatch):
    """Compressed arrays, and an uncompressed one with a chunk left unwritten, go through zarr, exactly."""
    import tlora._zarr_store as zs

    sums = _padded_sums(monkeypatch)
    cov = Covariance(sums=sums, modules={g: g for g in sums}, n_tokens=9, n_samples=2)
    save_covariance(tmp_path / "compact.zarr", cov, compressors=zs.COMPACT_CODEC)
    root = zarr.open_group(str(tmp_path / "compact.zarr"), mode="r")
    assert root["g7"].compressors and zs._read_raw_chunks(root["g7"]) is None
    assert all(torch.equal(load_covariance(tmp_path / "compact.zarr").sums[g], s) for g, s in sums.items())
    save_covariance(tmp_path / "raw.zarr", cov)
    (tmp_path / "raw.zarr" / "g7" / "c" / "1" / "0").unlink()  # zarr reads a missing chunk as the fill value
    root = zarr.open_group(str(tmp_path / "raw.zarr"), mode="r")
    assert zs._read_raw_chunks(root["g7"]) is None
    expect = sums["g7"].clone()
    expect[2:4] = 0  # chunks of 2 rows (12 values / 7 per row -> 4 equal blocks of 2 rows)
    assert root["g7"].chunks == (2, 7) and torch.equal(load_covariance(tmp_path / "raw.zarr").sums["g7"], expect)


def test_collected_sums_are_exactly_symmetric(tiny_model, samples, batches):
    for precision in ("float32", "float64"):
        cov = collect(tiny_model("llama"), batches(samples(3), 2), precision=precision)
        assert all(torch.equal(s, s.T) for s in cov.sums.values()), precision


class _Odd(torch.nn.Module):
    """Embedding of width 7 (not a multiple of the 4 accumulation blocks) into one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(20, 7)
        self.proj = torch.nn.Linear(7, 5)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.embed(input_ids) * 3.0 + 1.0)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_block_accumulation_matches_oracle_at_any_width(precision, samples, batches):
    model = _Odd()
    data = [{k: v.clamp(max=19) if k == "input_ids" else v for k, v in s.items()} for s in samples(5, seed=7)]
    cov = collect_covariance(model, batches(data, 2), find_targets(model, ["proj"]), precision=precision,
                             progress=False)
    expected = oracle(model, data, ["proj"])["proj"]
    assert torch.equal(cov.sums["proj"], cov.sums["proj"].T)
    assert rel_err(cov.sums["proj"], expected) < (1e-12 if precision == "float64" else 1e-6)


@pytest.mark.parametrize("syrk", [True, False], ids=["scipy-syrk", "torch-gemm"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_both_accumulation_paths_match_oracle(syrk, precision, tiny_model, samples, batches, monkeypatch):
    """The CPU SYRK path and the block-GEMM path (what CUDA runs) against the float64 numpy oracle."""
    monkeypatch.setattr("tlora.covariance._use_syrk", lambda xc: syrk)
    model = tiny_model("llama", dtype=torch.float64)
    data = samples(5, seed=3)
    cov = collect(model, batches(data, 2), precision=precision)
    expected = oracle(model, data, list(cov.modules))
    for name, s in expected.items():
        assert torch.equal(cov.matrix(name), cov.matrix(name).T), name
        assert rel_err(cov.matrix(name), s / 5) < (1e-12 if precision == "float64" else 1e-5), name


@pytest.mark.parametrize("cap", [1, 7, 10**9])
def test_float32_partial_sums_flushed_at_any_token_count(cap, samples, batches, monkeypatch):
    """Float32 SYRK partial sums spanning one batch, a few, or all of them add up to the oracle's S."""
    monkeypatch.setattr("tlora.covariance._FP32_TOKENS", cap)
    model = _Odd()
    data = [{k: v.clamp(max=19) if k == "input_ids" else v for k, v in s.items()} for s in samples(7, seed=5)]
    cov = collect_covariance(model, batches(data, 2), find_targets(model, ["proj"]), progress=False)
    expected = oracle(model, data, ["proj"])["proj"]
    assert torch.equal(cov.sums["proj"], cov.sums["proj"].T)
    assert rel_err(cov.sums["proj"], expected) < 1e-6


@pytest.mark.parametrize("syrk", [True, False], ids=["scipy-syrk", "torch-gemm"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_in_a_later_batch_names_module_and_batch(bad, precision, syrk, monkeypatch):
    """The check reads S's diagonal: a NaN/Inf first seen in batch 2 is reported there, by module."""
    monkeypatch.setattr("tlora.covariance._use_syrk", lambda xc: syrk)
    model = _Odd()
    with torch.no_grad():
        model.embed.weight[19, 3] = bad  # only token 19 carries it
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    good, poisoned = ids.clone(), ids.clone()
    poisoned[1, 1] = 19
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in (good, good, poisoned, good)]
    with pytest.raises(ValueError, match=r"non-finite.*'proj' in batch 2"):
        collect_covariance(model, data, find_targets(model, ["proj"]), precision=precision, progress=False)
    assert not model.proj._forward_pre_hooks
