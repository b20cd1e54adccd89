import pytest
import torch.nn.functional as F

from tlora.sensitivity import Scores, score_sensitivity
from tlora.targets import find_targets

KINDS = ["llama", "gpt2"]  # BERT has no causal-LM loss


def _weight(model, name):
    return model.get_submodule(name).weight


def _oracle_per_sample(model, samples, names):
    """Batch of one, every gradient materialised by a plain backward, float64 sums."""
    totals = dict.fromkeys(names, 0.0)
    for s in samples:
        model.zero_grad(set_to_none=True)
        model(**{k: v[None] for k, v in s.items()}).loss.backward()
        for name in names:
            w = _weight(model, name)
            totals[name] += (w * w.grad).abs().mean().item()
    model.zero_grad(set_to_none=True)
    return {name: t / len(samples) for name, t in totals.items()}


def _oracle_batched(model, samples, batch_size, names):
    """One backward per batch of the sum of its samples' losses, each run alone without padding."""
    totals = dict.fromkeys(names, 0.0)
    for start in range(0, len(samples), batch_size):
        model.zero_grad(set_to_none=True)
        loss = 0.0
        for s in samples[start:start + batch_size]:
            logits = model(input_ids=s["input_ids"][None]).logits[0, :-1]
            loss = loss + F.cross_entropy(logits, s["labels"][1:], ignore_index=-100)
        loss.backward()
        for name in names:
            w = _weight(model, name)
            totals[name] += (w * w.grad).abs().mean().item()
    model.zero_grad(set_to_none=True)
    return {name: t / len(samples) for name, t in totals.items()}


def _assert_close(got, want, rel=1e-10):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=rel, abs=0), name


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_matches_full_gradient_oracle(kind, tiny_model, samples, batches):
    model = tiny_model(kind).double()
    data = samples(5, seed=1)
    targets = find_targets(model)
    want = _oracle_per_sample(model, data, targets.names)
    assert min(want.values()) > 0 and len(set(want.values())) == len(want)  # the comparison is not trivial
    scores = score_sensitivity(model, batches(data, 2), targets, progress=False)
    assert (scores.n_samples, scores.mode) == (5, "per_sample")
    _assert_close(scores.scores, want)


def test_per_sample_ignores_padding_side_and_batch_size(tiny_model, samples, batches):
    model = tiny_model("llama").double()
    data = samples(5, seed=2)
    runs = [score_sensitivity(model, batches(data, size, side=side), "all-linear", progress=False).scores
            for size, side in [(1, "right"), (2, "right"), (3, "left")]]
    for other in runs[1:]:
        _assert_close(other, runs[0], rel=1e-12)


@pytest.mark.parametrize(("kind", "side"), [("llama", "right"), ("llama", "left"), ("gpt2", "left")])
def test_batched_matches_oracle_and_bounds_per_sample(kind, side, tiny_model, samples, batches):
    model = tiny_model(kind).double()
    data = samples(5, seed=3)
    # no prompt in the samples padded in their batch: with left padding the first real token follows a pad
    for s in data[1::2]:
        s["labels"] = s["input_ids"].clone()
    targets = find_targets(model)
    scores = score_sensitivity(model, batches(data, 3, side=side), targets, mode="batched", progress=False)
    assert (scores.n_samples, scores.mode) == (5, "batched")
    _assert_close(scores.scores, _oracle_batched(model, data, 3, targets.names))
    # triangle inequality: |Σ g_s| ≤ Σ |g_s|, strictly for some module once a batch holds several samples
    per_sample = score_sensitivity(model, batches(data, 3, side=side), targets, progress=False).scores
    assert all(scores.scores[n] <= per_sample[n] * (1 + 1e-6) for n in per_sample)
    assert any(scores.scores[n] < per_sample[n] * 0.99 for n in per_sample)


@pytest.mark.parametrize("mode", ["per_sample", "batched"])
def test_at_most_one_target_gradient_alive(mode, tiny_model, samples, batches):
    model = tiny_model("gpt2")
    targets = find_targets(model)
    calls = []

    def on_reduce(name, held):
        alive = sum(p.grad is not None for p in model.parameters())  # after the free: none anywhere
        calls.append((name, held, alive))

    score_sensitivity(model, batches(samples(4), 2), targets, mode=mode, progress=False, _on_reduce=on_reduce)
    assert {(held, alive) for _, held, alive in calls} == {(1, 0)}
    n_backward = 4 if mode == "per_sample" else 2
    assert sorted(name for name, _, _ in calls) == sorted(targets.names * n_backward)


def _snapshot(model):
    return ({n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def _assert_clean(model, before):
    assert _snapshot(model) == before
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert not p._post_accumulate_grad_hooks, name


@pytest.mark.parametrize("failure", [None, "forward", "hook"])
def test_state_restored(failure, tiny_model, samples, batches):
    model = tiny_model("gpt2").train()  # dropout on: scoring must switch it off
    model.transformer.h[0].attn.eval()
    model.transformer.wte.weight.requires_grad_(False)
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    before = _snapshot(model)
    data = batches(samples(4), 2)
    if failure is None:
        first = score_sensitivity(model, data, "all-linear", progress=False)
        _assert_clean(model, before)
        assert score_sensitivity(model, data, "all-linear", progress=False) == first  # deterministic: eval mode
        return
    calls = []
    if failure == "forward":
        data[1]["input_ids"][0, 0] = 10_000  # past the vocabulary: the embedding raises in batch 1
    else:  # a hook that runs before ours and raises mid-backward, leaving a gradient behind
        foreign = model.transformer.h[0].mlp.c_proj.weight.register_post_accumulate_grad_hook(_raise)
    with pytest.raises((RuntimeError, IndexError)) as err:
        score_sensitivity(model, data, "all-linear", progress=False, _on_reduce=lambda name, _: calls.append(name))
    assert len(calls) > 0  # the failure came after some gradients were reduced
    if failure == "hook":
        assert "boom" in str(err.value)
        foreign.remove()
    _assert_clean(model, before)


def _raise(_):
    raise RuntimeError("boom in hook")


def _no_targets(data):
    data[0]["labels"][1] = -100
    data[0]["labels"][1, 0] = 7  # the first token is never predicted, so this is still no target
    return data


def _all_padding(data):
    data[1]["attention_mask"][0] = 0
    return data


@pytest.mark.parametrize(("change", "match"), [
    (lambda data: [], "no calibration samples"),
    (lambda data: [{k: v for k, v in b.items() if k != "labels"} for b in data], r"batch 0 has no \['labels'\]"),
    (_no_targets, "sample 1 of batch 0 has no target tokens"),
    (_all_padding, "sample 0 of batch 1 is all padding"),
    (lambda data: [{**b, "labels": b["labels"][:, 1:]} for b in data], "must share one"),
])
def test_bad_input(change, match, tiny_model, samples, batches):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        score_sensitivity(model, change(batches(samples(4), 2)), "all-linear", progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        score_sensitivity(model, batches(samples(2), 2), "all-linear", mode="fast", progress=False)


@pytest.mark.parametrize(("mode", "match"), [("per_sample", "sample 0 of batch 0"), ("batched", "sample 1 of batch 0")])
def test_non_finite_loss_names_the_sample(mode, match, tiny_model, samples, batches):
    model = tiny_model("llama")
    targets = find_targets(model)
    data = batches(samples(4), 2)
    if mode == "per_sample":
        model.model.norm.weight.data[0] = float("nan")
    else:
        data[0]["input_ids"][1] = 5
        model.model.embed_tokens.weight.data[5] = float("inf")  # only sample 1 reads token 5
    with pytest.raises(ValueError, match=f"loss of {match} is nan"):
        score_sensitivity(model, data, targets, mode=mode, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_scores_json_round_trip(tiny_model, samples, batches):
    scores = score_sensitivity(tiny_model("llama"), batches(samples(2), 2), ["q_proj", "down_proj"], progress=False)
    assert len(scores.scores) == 4
    assert Scores.model_validate_json(scores.model_dump_json()) == scores
    with pytest.raises(ValueError, match="extra"):
        Scores(scores={}, n_samples=0, mode="batched", extra_field=1)
