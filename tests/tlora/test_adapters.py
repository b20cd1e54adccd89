"""The paper's promises about the adapter: step-0 identity, frozen A, B-only optimizer, stock reload."""

import numpy as np
import pytest
import torch
from peft import PeftModel

from tlora.adapters import AdapterInfo, init_adapters, load_adapters, save_adapters, scalings, trainable_parameters
from tlora.allocation import Allocation, ModuleAllocation
from tlora.spectrum import Spectrum
from tlora.targets import find_targets, weight_out_in


def _random_spectrum(model, targets, r_max=8, seed=0):
    """Top right singular vectors of W0·C for a random SPD C, by numpy float64 SVD (independent of tlora)."""
    rng = np.random.default_rng(seed)
    vectors, values = {}, {}
    for name, t in targets.modules.items():
        x = rng.standard_normal((4 * t.d_in, t.d_in))
        c = x.T @ x
        w = weight_out_in(model.get_submodule(name)).detach().double().numpy()
        _, s, vh = np.linalg.svd(w @ c)
        k = min(r_max, t.d_in, t.d_out)
        vectors[name], values[name] = torch.from_numpy(vh[:k].copy()), torch.from_numpy(s[:k].copy())
    return Spectrum(vectors=vectors, values=values, r_max=r_max)


def _allocation(targets, ranks, r=4, alpha=8.0):
    modules = {n: ModuleAllocation(rank=ranks[i % len(ranks)], alpha=alpha * (1 + i % 3),
                                   scaling=alpha * (1 + i % 3) / r)
               for i, n in enumerate(targets.names)}
    return Allocation(modules=modules, r=r, alpha=alpha, mode="balanced", scale="reference",
                      budget_rank=sum(m.rank for m in modules.values()))


@pytest.fixture(params=["llama", "gpt2"])
def adapted(request, tiny_model):
    base = tiny_model(request.param, seed=1)
    targets = find_targets(base, "all-linear")
    spectrum = _random_spectrum(base, targets)
    allocation = _allocation(targets, ranks=[2, 5, 0, 3])
    reference = tiny_model(request.param, seed=1)
    return init_adapters(base, spectrum, allocation), reference, spectrum, allocation


def _ids():
    return torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))


def test_step0_logits_equal_base(adapted):
    peft_model, reference, *_ = adapted
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_is_spectrum_and_ranks_scalings_follow_allocation(adapted):
    peft_model, _, spectrum, allocation = adapted
    kept = {n: m for n, m in allocation.modules.items() if m.rank > 0}
    assert len(kept) < len(allocation.modules)  # some rank-0 modules were dropped
    got = scalings(peft_model)
    assert set(got) == set(kept)
    for name, m in kept.items():
        layer = peft_model.base_model.model.get_submodule(name)
        a = layer.lora_A["default"].weight
        assert a.shape[0] == m.rank
        torch.testing.assert_close(a.double(), spectrum.vectors[name][: m.rank], rtol=0, atol=1e-7)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert got[name] == pytest.approx(m.scaling)


def test_training_moves_b_only_and_optimizer_holds_b_only(adapted):
    peft_model, *_ = adapted
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n, _ in trainable)
    a_before = {n: b.clone() for n, b in peft_model.named_buffers() if "lora_A" in n}
    b_before = {n: p.detach().clone() for n, p in trainable}
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    ids = _ids()
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(b, a_before[n]) for n, b in peft_model.named_buffers() if "lora_A" in n)
    assert all(not torch.equal(p, b_before[n]) for n, p in trainable)
    state_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert state_params == {id(p) for _, p in trainable}
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert trainable_parameters(peft_model) == lora_params  # no A among the parameters at all


def test_a_stays_frozen_after_set_adapter(adapted):
    peft_model, *_ = adapted
    peft_model.set_adapter("default")
    peft_model.base_model.model.requires_grad_(True)
    assert not any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_save_and_stock_reload_give_identical_logits(adapted, tiny_model, tmp_path):
    peft_model, reference, _, allocation = adapted
    with torch.no_grad():  # move B off zero so the check is not trivially the base model
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = _ids()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert not torch.allclose(expected, reference(input_ids=ids).logits)
    save_adapters(peft_model, tmp_path, AdapterInfo(freeze_a=True, init="spectrum", allocation=allocation))
    kind = "gpt2" if "gpt2" in type(reference).__name__.lower() else "llama"
    stock = PeftModel.from_pretrained(tiny_model(kind, seed=1), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert scalings(stock) == pytest.approx(scalings(peft_model))
    ours = load_adapters(tiny_model(kind, seed=1), tmp_path, is_trainable=True)
    assert all("lora_B" in n for n, p in ours.named_parameters() if p.requires_grad)
    assert any("lora_B" in n for n, p in ours.named_parameters() if p.requires_grad)


def test_rank_above_spectrum_is_a_clear_error(tiny_model):
    base = tiny_model("llama")
    targets = find_targets(base, ["q_proj"])
    spectrum = _random_spectrum(base, targets, r_max=2)
    with pytest.raises(ValueError, match="r_max >= 5"):
        init_adapters(base, spectrum, _allocation(targets, ranks=[5]))


def test_all_zero_ranks_is_a_clear_error(tiny_model):
    base = tiny_model("llama")
    targets = find_targets(base, ["q_proj"])
    with pytest.raises(ValueError, match="rank 0"):
        init_adapters(base, None, _allocation(targets, ranks=[0]), init="lora")


def test_spectrum_init_needs_a_spectrum(tiny_model):
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a spectrum"):
        init_adapters(base, None, _allocation(find_targets(base, ["q_proj"]), ranks=[2]))


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_baseline_inits_train_a_and_b(tiny_model, init):
    base = tiny_model("llama", seed=1)
    targets = find_targets(base, "all-linear")
    peft_model = init_adapters(base, None, _allocation(targets, ranks=[2, 3]), init=init)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    ids = _ids()
    with torch.no_grad():  # both inits preserve the base output at step 0 (PiSSA through its residual W)
        torch.testing.assert_close(peft_model(input_ids=ids).logits,
                                   tiny_model("llama", seed=1)(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def _saved_activation_bytes(model, ids):
    """Bytes of the distinct non-weight storages autograd keeps for backward during one forward pass."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_b_only_keeps_no_lora_a_input_for_backward(tiny_model, kind):
    # LoRA's lora_A matmul keeps its input x for A's gradient; with A a frozen buffer autograd keeps A·x (B's
    # gradient needs it) and A, never x. So B-only keeps one x fewer per shared-input group with an adapter,
    # except the attention output projection's: its input is SDPA's output, which SDPA keeps anyway.
    ids = _ids()
    saved = {}
    for init in ("spectrum", "lora"):
        base = tiny_model(kind, seed=1)
        targets = find_targets(base, "all-linear")
        allocation = _allocation(targets, ranks=[2, 5, 0, 3])
        spectrum = _random_spectrum(base, targets) if init == "spectrum" else None
        saved[init] = _saved_activation_bytes(init_adapters(base, spectrum, allocation, init=init), ids)
    adapted = {n for n, m in allocation.modules.items() if m.rank > 0}
    inputs = [g for g, members in targets.groups.items()
              if adapted & set(members) and not g.endswith(("self_attn.o_proj", "attn.c_proj"))]
    assert len(inputs) >= 4
    assert saved["lora"] - saved["spectrum"] == sum(targets[g].d_in for g in inputs) * ids.numel() * 4
