"""Every method of the comparison table builds through one path, with the right trainable weights."""

import pytest

from tests.tlora.test_adapters import _random_spectrum
from tlora.methods import ABLATIONS, Method, build_adapter, plan_allocation
from tlora.targets import find_targets


def test_the_table_has_the_papers_rows():
    assert sorted(ABLATIONS) == sorted(["lora", "pissa", "+RA", "+SA", "+RA+SA", "+Init", "+Init+RA", "+Init+SA",
                                        "tlora"])
    assert Method().label == "tlora" and Method(init=False, rank=False, scale=False).label == "lora"


@pytest.mark.parametrize("label", sorted(ABLATIONS))
def test_each_method_trains_what_it_should(tiny_model, label):
    method = ABLATIONS[label]
    base = tiny_model("llama", seed=2)
    targets = find_targets(base, "all-linear")
    shapes = {n: (t.d_out, t.d_in) for n, t in targets.modules.items()}
    scores = {n: float(i + 1) for i, n in enumerate(shapes)}  # distinct, so allocation is not uniform
    allocation = plan_allocation(method, scores, shapes, r=4, alpha=8)
    ranks = {m.rank for m in allocation.modules.values()}
    scalings = {round(m.scaling, 9) for m in allocation.modules.values()}
    assert (len(ranks) > 1) == (method.name == "tlora" and method.rank)
    assert (len(scalings) > 1) == (method.name == "tlora" and method.scale)
    assert sum(m.rank for m in allocation.modules.values()) == 4 * len(shapes)
    spectrum = _random_spectrum(base, targets, r_max=16) if method.needs_spectrum else None
    model = build_adapter(base, method, allocation, spectrum)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n in trained)
    assert any("lora_A" in n for n in trained) == (not method.needs_spectrum)


def test_scores_are_required_where_used():
    with pytest.raises(ValueError, match="pass scores"):
        plan_allocation(Method(), None, {"a": (4, 4)}, r=2, alpha=4)
