"""Layer-streamed preparation (tlora.stream, tlora.preparation) against the whole-model path, on tiny random models."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from tlora import allocate, collect_covariance, compute_spectrum, find_targets, init_adapters, score_sensitivity
from tlora.adapters import AdapterInfo, save_adapters
from tlora.covariance import load_covariance
from tlora.models import model_fingerprint
from tlora.preparation import prepare, stream_covariance, stream_spectrum
from tlora.sensitivity import stream_sensitivity
from tlora.spectrum import load_spectrum
from tlora.stream import LayerStream, ModelFolder

SPECS = {"llama": "all-linear", "gpt2": "all-linear", "bert": r".*encoder.*"}  # BERT's pooler reads one vector


def saved(model, tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def sine(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between the row spaces of a and b (orthonormal rows)."""
    a, b = a.numpy(), b.numpy()
    return float(np.linalg.norm(a.T @ a - b.T @ b, 2))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_streamed_equals_whole_model(kind, precision, tiny_model, samples, batches, tmp_path):
    dtype = torch.float64 if precision == "float64" else torch.float32
    model = tiny_model(kind, dtype=dtype)
    data = batches(samples(7, seed=2), 3, side="left")
    targets = find_targets(model, SPECS[kind])
    ref = collect_covariance(model, data, targets, precision=precision, progress=False)
    ref_spec = compute_spectrum(model, ref, 8)
    stream = LayerStream(saved(model, tmp_path), dtype=dtype)
    cov, spec = stream_covariance(stream, data, SPECS[kind], r_max=8, precision=precision, progress=False)
    assert cov.modules == ref.modules and cov.groups == ref.groups
    assert (cov.n_tokens, cov.n_samples) == (ref.n_tokens, ref.n_samples)
    assert cov.model_fingerprint == model_fingerprint(model)  # hashed one tensor at a time
    tol = 1e-12 if precision == "float64" else 1e-5
    for g, s in ref.sums.items():
        assert float((cov.sums[g] - s).abs().max() / s.abs().max()) <= tol, g
    for name, v in ref_spec.vectors.items():
        vals = ref_spec.values[name]
        for k in range(1, len(vals) + 1):  # every prefix with a clear gap
            if k == len(vals) or vals[k - 1] - vals[k] > 1e-3 * vals[0]:
                assert sine(spec.vectors[name][:k], v[:k]) <= 1e-4, (name, k)
    assert stream.peak_resident == 1 and stream.materialised_layers() == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streamed_sensitivity_equals_per_sample(kind, tiny_model, samples, batches, tmp_path):
    model = tiny_model(kind)
    data = batches(samples(5, seed=3), 2, side="right")
    ref = score_sensitivity(model, data, find_targets(model), progress=False)
    stream = LayerStream(saved(model, tmp_path))
    for chunk in (None, 2):
        got = stream_sensitivity(stream, data, chunk_size=chunk, progress=False)
        assert list(got.scores) == list(ref.scores) and got.n_samples == ref.n_samples == 5
        for name, s in ref.scores.items():
            assert abs(got.scores[name] - s) <= 1e-4 * abs(s), (chunk, name)


def test_at_most_one_layer_materialised(tiny_model, samples, batches, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    stream = LayerStream(saved(model, tmp_path))
    counts = []
    load = stream.load

    def counting_load(i):  # counted from the modules themselves, after every load
        layer = load(i)
        counts.append(stream.materialised_layers())
        return layer

    stream.load = counting_load
    data = batches(samples(4, seed=5), 2)
    prepare(stream, data, r_max=4, progress=False)
    assert len(counts) == 5 + 5 + 5  # covariance: each layer once; sensitivity: forward then backward
    assert max(counts) == 1 and stream.materialised_layers() == 0


def test_sums_split_by_group_and_resident_layers_give_the_same_numbers(tiny_model, samples, batches, tmp_path):
    model = tiny_model("llama")
    folder = saved(model, tmp_path)
    data = batches(samples(5, seed=4), 2)
    ref = prepare(folder, data, r_max=4, progress=False)
    one_group = 32 * 32 * 12  # the bytes of one [32, 32] sum and its float32 scratch: one group per pass
    split, _ = stream_covariance(LayerStream(folder), data, max_sum_bytes=one_group, progress=False)
    for g, s in ref.covariance.sums.items():
        assert torch.equal(split.sums[g], s), g
    stream = LayerStream(folder)
    resident = prepare(stream, data, r_max=4, max_memory=stream.weight_bytes(), progress=False)
    assert stream.loads == 2  # each layer read once for covariance and sensitivity together
    assert resident.scores == ref.scores


def test_prepare_streams_a_folder_or_takes_a_model(tiny_model, samples, batches, tmp_path):
    model = tiny_model("llama")
    data = batches(samples(4, seed=6), 2)
    whole = prepare(model, data, r_max=6, progress=False)
    streamed = prepare(saved(model, tmp_path), data, r_max=6, out=tmp_path / "stats", progress=False)
    assert type(streamed.covariance.sums).__name__ == "StoredSums"  # read from the store, one group at a time
    for g in whole.covariance.sums:
        assert torch.equal(streamed.covariance.sums[g], whole.covariance.sums[g])
    assert streamed.scores.scores.keys() == whole.scores.scores.keys()
    for name, v in whole.spectrum.vectors.items():
        assert sine(streamed.spectrum.vectors[name], v) < 1e-6
    again = load_covariance(tmp_path / "stats" / "covariance.zarr")  # a complete store, as save_covariance writes
    assert again.modules == whole.covariance.modules
    assert load_spectrum(tmp_path / "stats" / "spectrum.zarr").r_max == 6


def test_spectrum_from_a_stored_covariance_needs_no_forward(tiny_model, samples, batches, tmp_path):
    model = tiny_model("llama")
    data = batches(samples(4, seed=6), 2)
    folder = saved(model, tmp_path)
    cov, spec = stream_covariance(LayerStream(folder), data, r_max=5, out=tmp_path / "s", progress=False)
    stream = LayerStream(folder)
    again = stream_spectrum(stream, cov, 5, progress=False)  # a new r_max would take this path
    for name, v in spec.vectors.items():
        assert torch.allclose(again.vectors[name], v, atol=1e-12)
    assert stream.peak_resident == 1


def test_init_on_a_skeleton_gives_the_whole_model_adapter(tiny_model, samples, batches, tmp_path):
    model = tiny_model("llama")
    data = batches(samples(4, seed=7), 2)
    folder = saved(model, tmp_path)
    prepared = prepare(folder, data, r_max=8, progress=False)
    skeleton = LayerStream(folder).model  # weights on the meta device: only shapes
    shapes = {n: (t.d_out, t.d_in) for n, t in find_targets(skeleton, example_inputs={}).modules.items()}
    allocation = allocate(prepared.scores.scores, r=4, alpha=8, mode="balanced", shapes=shapes, max_rank=8)
    adapter = save_adapters(init_adapters(skeleton, prepared.spectrum, allocation), tmp_path / "adapter",
                            AdapterInfo(freeze_a=True, init="spectrum", allocation=allocation))
    whole = init_adapters(tiny_model("llama"), compute_spectrum(model, prepared.covariance, 8), allocation)
    with torch.no_grad():
        for module in whole.modules():  # B = 0 hides A from the logits: give B a value to compare A through
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), adapter)
    loaded.load_state_dict({k: v for k, v in whole.state_dict().items() if "lora_B" in k}, strict=False)
    x = data[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, whole(input_ids=x).logits, atol=1e-5)


def test_folder_without_index_or_with_a_missing_shard_is_refused(tiny_model, tmp_path):
    model = tiny_model("llama")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    ModelFolder(folder)  # complete: accepted
    (folder / shard).rename(tmp_path / shard)
    with pytest.raises(ValueError, match=f"shard file {shard} named by model.safetensors.index.json is missing"):
        LayerStream(folder)
    (tmp_path / shard).rename(folder / shard)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"safetensors files .* but no model\.safetensors\.index\.json"):
        LayerStream(folder)


RESUME = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import collate, make_samples
    from tlora.preparation import stream_covariance
    from tlora.stream import LayerStream
    torch.set_num_threads(1)

    def on_layer(i, what):
        if i == 2:  # layers 0-2 are in the store: die as a killed worker does, with no cleanup
            os.kill(os.getpid(), signal.SIGKILL)

    stream_covariance(LayerStream({folder!r}), collate(make_samples(6, seed=8), 3), r_max=4, out={out!r},
                      progress=False, on_layer=on_layer)
""")


def test_killed_run_resumes_at_its_first_unfinished_layer(samples, batches, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2)
    folder = saved(LlamaForCausalLM(cfg).eval(), tmp_path)
    out = tmp_path / "killed"
    script = RESUME.format(tests=str(Path(__file__).parents[1]), folder=str(folder), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with pytest.raises(ValueError, match="incomplete"):
        load_covariance(out / "covariance.zarr")
    events = []
    data = batches(samples(6, seed=8), 3)
    cov, spec = stream_covariance(LayerStream(folder), data, r_max=4, out=out, progress=False,
                                  on_layer=lambda i, what: events.append((i, what)))
    assert events == [(0, "replayed"), (1, "replayed"), (2, "replayed"), (3, "computed"), (4, "computed")]
    ref_cov, ref_spec = stream_covariance(LayerStream(folder), data, r_max=4, out=tmp_path / "whole", progress=False)
    for g in ref_cov.sums:
        assert torch.equal(cov.sums[g], ref_cov.sums[g]), g  # bit-identical
    for name, v in ref_spec.vectors.items():
        assert torch.equal(spec.vectors[name], v), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streamed_on_cuda_equals_whole_model_on_cpu(kind, tiny_model, samples, batches, tmp_path):
    model = tiny_model(kind)
    data = batches(samples(6, seed=9), 3, side="left")
    targets = find_targets(model)
    ref = collect_covariance(model, data, targets, progress=False)
    ref_scores = score_sensitivity(model, data, targets, progress=False)
    got = prepare(saved(model, tmp_path), data, r_max=6, device="cuda", dtype=torch.float32, progress=False)
    for g, s in ref.sums.items():  # CUDA GEMMs (TF32 off) against CPU SYRK: float32 rounding apart
        assert float((got.covariance.sums[g] - s).abs().max() / s.abs().max()) <= 1e-5, g
    for name, v in compute_spectrum(model, ref, 6).vectors.items():
        assert sine(got.spectrum.vectors[name], v) <= 1e-4, name
    for name, s in ref_scores.scores.items():
        assert abs(got.scores.scores[name] - s) <= 1e-3 * abs(s), name
    spilled, _ = stream_covariance(LayerStream(tmp_path / "model", device="cuda"), data, hidden_device="cpu",
                                   progress=False)  # hidden states on the host between layers: the same sums
    for g, s in got.covariance.sums.items():
        assert torch.equal(spilled.sums[g], s), g
