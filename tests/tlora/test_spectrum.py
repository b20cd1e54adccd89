import numpy as np
import pytest
import torch
import zarr
from transformers.pytorch_utils import Conv1D

import tlora.spectrum as spectrum_module
from tlora import find_targets
from tlora.covariance import Covariance, collect_covariance
from tlora.models import model_fingerprint
from tlora.spectrum import (
    GRAM_TOLERANCE,
    PREFIX_SINE,
    compute_spectrum,
    gram_error_bound,
    load_spectrum,
    module_spectrum,
    save_spectrum,
)


def covariance_of(model, samples, batches):
    return collect_covariance(model, batches(samples(8, seed=4), 4), find_targets(model), precision="float64",
                              progress=False)


def oracle(model, cov, name):
    """numpy float64 SVD of W0·C, W0 in [d_out, d_in] (GPT-2 Conv1D stores [d_in, d_out])."""
    module = model.get_submodule(name)
    w = module.weight.detach().double().numpy()
    w = w.T if isinstance(module, Conv1D) else w
    _, s, vh = np.linalg.svd(w @ cov.matrix(name).numpy())
    return vh, s


def projector_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Spectral norm of the difference of the projectors onto the row spaces: sin of the largest angle."""
    return float(np.linalg.norm(a.T @ a - b.T @ b, 2))


def clear_prefixes(s: np.ndarray, r: int, d_in: int) -> list[int]:
    """Prefix lengths k <= r whose subspace is well defined (σ_k clearly above σ_{k+1})."""
    s = np.concatenate([s, [0.0]])
    return [k for k in range(1, r + 1) if k == d_in or s[k - 1] - s[k] > 1e-3 * s[0]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("solver", ["exact", "gram", "auto"])
def test_subspaces_match_numpy_svd(kind, solver, tiny_model, samples, batches):
    model = tiny_model(kind, dtype=torch.float64)
    cov = covariance_of(model, samples, batches)
    spectrum = compute_spectrum(model, cov, 40, solver=solver)
    assert list(spectrum.vectors) == list(cov.modules) and spectrum.r_max == 40
    checked = 0
    for name, target in find_targets(model).modules.items():
        vh, s = oracle(model, cov, name)
        v = spectrum.vectors[name].numpy()
        r = min(40, target.d_in, target.d_out)
        assert v.shape == (r, target.d_in) and v.dtype == np.float64
        assert np.abs(v @ v.T - np.eye(r)).max() < 1e-12, name  # orthonormal rows
        assert spectrum.solver[name] == solver or solver == "auto"
        tol = 1e-8 if spectrum.solver[name] == "exact" else 1e-6
        for k in clear_prefixes(s, r, target.d_in):
            assert projector_gap(v[:k], vh[:k]) < tol, (name, k)
            checked += 1
        top = s[: min(r, 8)]
        assert np.abs(spectrum.values[name].numpy()[: len(top)] - top).max() < 1e-8 * s[0], name
    assert checked > 100


def test_gram_routes_and_signs(tiny_model, samples, batches):
    model = tiny_model("llama", dtype=torch.float64)
    cov = covariance_of(model, samples, batches)
    names = ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj"]  # MMᵀ (16 < 32), MᵀM (48 > 32)
    gram = compute_spectrum(model, cov, 6, modules=names, solver="gram")
    exact = compute_spectrum(model, cov, 6, modules=names, solver="exact")
    for name in names:
        g, e = gram.vectors[name], exact.vectors[name]
        assert g.shape == (6, 32)
        top = g.gather(1, g.abs().argmax(1, keepdim=True))
        assert bool((top > 0).all())  # deterministic sign: largest-magnitude entry positive
        assert (g - e).abs().max() < 1e-6, name  # same signs, so the vectors themselves agree
        assert gram.solver[name] == "gram" and exact.solver[name] == "exact"


def constructed(model, name: str, sigma: np.ndarray) -> Covariance:
    """Set the module's weight to U·diag(σ)·Vᵀ and return an identity covariance, so that M = W0."""
    module = model.get_submodule(name)
    d_out, d_in = module.weight.shape
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((d_out, len(sigma))))[0]
    v = np.linalg.qr(rng.standard_normal((d_in, len(sigma))))[0]
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(u @ np.diag(sigma) @ v.T))
    eye = torch.eye(d_in, dtype=torch.float64)
    return Covariance(sums={name: eye}, modules={name: name}, n_tokens=1, n_samples=1)


@pytest.mark.parametrize("lapack", [True, False])  # False: torch's full eigh, the path CUDA takes
@pytest.mark.parametrize("name", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"])  # MᵀM, MMᵀ
def test_auto_peels_a_dominant_vector_off_or_falls_back_to_exact(name, lapack, tiny_model, monkeypatch):
    if not lapack:
        monkeypatch.setattr(spectrum_module, "SUBSET_RATIO", 10**9)
    model = tiny_model("llama", dtype=torch.float64)
    clear = np.linspace(1.0, 0.1, 32)
    cov = constructed(model, name, clear)
    assert compute_spectrum(model, cov, 8, solver="auto").solver[name] == "gram"
    # Squaring M squares its condition: σ₂² − σ₃² is ~1e-12·σ₁², below what eigh of the Gram resolves
    # (as in an LLM's down projection, whose massive activations put σ₁/σ₂ at ~1e5).
    near = np.concatenate([[1.0, 1e-6, 5e-7], np.linspace(1e-7, 1e-8, 29)])
    cov = constructed(model, name, near)
    vh, s = oracle(model, cov, name)
    gram = compute_spectrum(model, cov, 8, solver="gram")
    assert projector_gap(gram.vectors[name][:2].numpy(), vh[:2]) > GRAM_TOLERANCE  # the trap is real
    # auto accepts the first vector, deflates it, and solves the rest at σ₁ = 1e-6, where the gaps resolve.
    spectrum = compute_spectrum(model, cov, 8, solver="auto")
    assert spectrum.solver[name] == "gram"
    v = spectrum.vectors[name].numpy()
    assert np.abs(v @ v.T - np.eye(8)).max() < 1e-12
    for k in clear_prefixes(s, 8, v.shape[1]):
        assert projector_gap(v[:k], vh[:k]) < 1e-8, k
    assert np.abs(spectrum.values[name].numpy() - s[:8]).max() < 1e-12
    monkeypatch.setattr(spectrum_module, "PEEL_ROUNDS", 1)  # no deflation: the exact SVD takes over
    spectrum = compute_spectrum(model, cov, 8, solver="auto")
    assert spectrum.solver[name] == "exact"
    for k in (1, 2, 3):
        assert projector_gap(spectrum.vectors[name][:k].numpy(), vh[:k]) < 1e-8, k
    assert np.abs(spectrum.values[name].numpy() - s[:8]).max() < 1e-12


def test_gram_error_bound():
    sigma = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    assert gram_error_bound(sigma, 2, 3, 3) < GRAM_TOLERANCE
    assert gram_error_bound(sigma, 3, 3, 3) == gram_error_bound(sigma, 2, 3, 3)  # all of R^3: always exact
    assert gram_error_bound(torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64), 1, 3, 3) == float("inf")
    assert gram_error_bound(torch.tensor([1.0, 1.0 - 1e-10, 0.5], dtype=torch.float64), 1, 3, 3) > GRAM_TOLERANCE


def test_errors_before_compute(tiny_model, samples, batches):
    model = tiny_model("llama")
    cov = covariance_of(model, samples, batches)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        compute_spectrum(model, cov, 0)
    with pytest.raises(ValueError, match="covariance was collected on another model"):
        compute_spectrum(tiny_model("llama", seed=1), cov, 4)
    assert compute_spectrum(tiny_model("llama", seed=1), cov, 4, check_fingerprint=False).vectors
    with pytest.raises(ValueError, match="covariance was collected on another model"):
        compute_spectrum(model, cov, 4, model_fingerprint="f" * 64)  # a given fingerprint is checked as is
    given = compute_spectrum(model, cov, 4, model_fingerprint=cov.model_fingerprint)
    assert given.model_fingerprint == cov.model_fingerprint == model_fingerprint(model)
    with pytest.raises(ValueError, match="'nope' is not in the covariance"):
        compute_spectrum(model, cov, 4, modules=["nope"])
    name = "model.layers.0.mlp.down_proj"  # d_in 48
    wrong = Covariance(sums={name: torch.eye(32, dtype=torch.float64)}, modules={name: name}, n_tokens=4,
                       n_samples=1)
    with pytest.raises(ValueError, match=r"down_proj'.*\(32, 48\) needs a \[48, 48\] covariance, got \[32, 32\]"):
        compute_spectrum(model, wrong, 4)
    ghost = "model.layers.9.mlp.up_proj"
    absent = Covariance(sums={ghost: torch.eye(32, dtype=torch.float64)}, modules={ghost: ghost}, n_tokens=4,
                        n_samples=1)
    with pytest.raises(ValueError, match="does not exist"):
        compute_spectrum(model, absent, 4)


def test_zarr_round_trip_and_incomplete_store(tiny_model, samples, batches, tmp_path):
    model = tiny_model("gpt2")
    spectrum = compute_spectrum(model, covariance_of(model, samples, batches), 5)
    path = tmp_path / "spectrum.zarr"
    save_spectrum(path, spectrum)
    back = load_spectrum(path)
    assert back.r_max == 5 and back.solver == spectrum.solver
    assert back.model_fingerprint == spectrum.model_fingerprint
    assert list(back.vectors) == list(spectrum.vectors)
    for name, v in spectrum.vectors.items():
        assert torch.equal(back.vectors[name], v) and torch.equal(back.values[name], spectrum.values[name])
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    with pytest.raises(ValueError, match="incomplete"):
        load_spectrum(path)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"])  # MᵀM, MMᵀ
def test_near_coincident_pair_is_judged_by_energy(name, tiny_model):
    model = tiny_model("llama", dtype=torch.float64)
    sigma = np.concatenate([[1.0, 0.8, 0.6, 0.5, 0.5 - 1e-9], np.linspace(0.45, 0.1, 27)])
    cov = constructed(model, name, sigma)
    vh, _ = oracle(model, cov, name)
    d_out, d_in = model.get_submodule(name).weight.shape
    # The a-priori Davis–Kahan estimate cannot accept the gram result here: only the residual check can.
    assert gram_error_bound(torch.from_numpy(sigma), 4, d_in, d_out) > GRAM_TOLERANCE
    spectrum = compute_spectrum(model, cov, 4, solver="auto")
    assert spectrum.solver[name] == "gram"
    v = spectrum.vectors[name].numpy()
    for k in (1, 2, 3):  # clear gaps: the subspaces themselves
        assert projector_gap(v[:k], vh[:k]) < PREFIX_SINE, k
    w = model.get_submodule(name).weight.detach().numpy()  # M = W0 (identity covariance)
    energy, exact = (np.linalg.norm(w @ a.T) for a in (v, vh[:4]))
    assert abs(energy / exact - 1) < 1e-8  # the 4th vector may mix with the 5th; the captured energy may not drop


def synthetic(d_out: int, d_in: int, sigma: np.ndarray, seed: int = 0) -> torch.Tensor:
    """M = U·diag(σ)·Vᵀ with random orthonormal U, V (σ may hold zeros: rank-deficient M)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((d_out, len(sigma))))[0]
    v = np.linalg.qr(rng.standard_normal((d_in, len(sigma))))[0]
    return torch.from_numpy(u @ np.diag(sigma) @ v.T)


SPECTRA = {
    "clear": 0.8 ** np.arange(60.0),
    "near_pair": np.concatenate([[1.0, 0.8, 0.6, 0.5, 0.5 - 1e-9, 0.48, 0.47, 0.46, 0.46 - 1e-7],
                                 np.linspace(0.4, 1e-3, 51)]),
    "rank_deficient": np.concatenate([[1.0, 0.7, 0.5, 0.3, 0.2], np.zeros(55)]),
}


@pytest.mark.parametrize("shape", [(150, 60), (60, 150)])  # MᵀM (right vectors), MMᵀ (left, then V = MᵀU)
@pytest.mark.parametrize("kind", list(SPECTRA))
def test_gram_top_pairs_match_numpy_svd(shape, kind):
    r = 8
    m = synthetic(*shape, SPECTRA[kind])
    assert spectrum_module.SUBSET_RATIO * (r + 1) <= min(shape)  # LAPACK's top-(r+1) path, not the full eigh
    v, s, sigma, passed = spectrum_module._gram(m, r, check=True)
    _, s_ref, vh = np.linalg.svd(m.numpy())
    v = v.numpy()
    assert v.shape == (r, shape[1]) and np.abs(v @ v.T - np.eye(r)).max() < 1e-12
    prefixes = clear_prefixes(s_ref, r, shape[1])
    assert prefixes == ([1, 2, 3, 4, 5] if kind == "rank_deficient" else [1, 2, 3, 4, 5, 6, 7, 8] if kind == "clear"
                        else [1, 2, 3, 5, 6, 7])
    for k in prefixes:
        assert projector_gap(v[:k], vh[:k]) < 1e-10, k
    assert np.abs(s.numpy() - s_ref[:r]).max() < 1e-12  # ‖Mv‖ / ‖Mᵀu‖, not sqrt(λ): the zeros stay ~0
    assert len(sigma) == r + 1 and np.abs(sigma.numpy() - s_ref[: r + 1]).max() < 1e-7  # sqrt(λ): ~sqrt(eps)
    m_np = m.numpy()
    energy = [np.linalg.norm(m_np @ a[:r].T) for a in (v, vh)]
    assert abs(energy[0] / energy[1] - 1) < 1e-12  # across the near pairs too
    # Past a rank-deficient M's rank (σ_6 = σ_7 = 0) the prefixes are judged by energy, on noise-level σ:
    # whether they pass is not asserted; the vectors are right either way (above).
    assert bool(passed.all()) or kind == "rank_deficient"


@pytest.mark.parametrize("shape", [(150, 60), (60, 150)])
def test_lapack_top_pairs_equal_torch_full_eigh(shape):
    r = 8
    m = synthetic(*shape, SPECTRA["clear"], seed=1)
    right = shape[1] <= shape[0]
    lam_l, x_l, gx_l = spectrum_module._top_gram_eigh_lapack(m, right, r + 1, r)
    lam_t, x_t, _ = spectrum_module._top_gram_eigh_torch(m, r + 1, r)
    gram = (m.T @ m if right else m @ m.T).numpy()
    assert lam_l.shape == lam_t.shape == (r + 1,) and x_l.shape == x_t.shape == (min(shape), r + 1)
    assert torch.allclose(lam_l, lam_t, rtol=0, atol=1e-13)
    assert bool((lam_l[:-1] >= lam_l[1:]).all())  # descending, as the torch path
    signs = torch.sign((x_l * x_t).sum(0))  # clear gaps: the same vectors up to sign
    assert (x_l - x_t * signs).abs().max() < 1e-10
    assert np.abs(gx_l.numpy() - gram @ x_l[:, :r].numpy()).max() < 1e-12  # SYMM on one triangle = the full product


@pytest.mark.parametrize("routine", ["dsytrd", "dsterf", "dstein"])
def test_lapack_failure_takes_the_full_eigh(routine, monkeypatch):
    m = synthetic(150, 60, SPECTRA["clear"])
    expected = spectrum_module._gram(m, 8, check=True)
    real = getattr(spectrum_module, routine)

    def failing(*args, **kwargs):  # LAPACK's info > 0: did not converge
        *out, _ = real(*args, **kwargs)
        return (*out, 1)

    monkeypatch.setattr(spectrum_module, routine, failing)
    assert spectrum_module._top_gram_eigh_lapack(m, True, 9, 8) is None
    v, s, sigma, passed = spectrum_module._gram(m, 8, check=True)
    assert bool(passed.all()) and bool(expected[3].all())
    assert projector_gap(v.numpy(), expected[0].numpy()) < 1e-10
    assert torch.allclose(s, expected[1], rtol=1e-13, atol=0)
    assert len(sigma) == len(expected[2]) == 9


@pytest.mark.parametrize("shape", [(100, 60), (60, 100)])
def test_gram_of_a_zero_matrix_is_finite(shape):
    m = torch.zeros(shape, dtype=torch.float64)  # T = 0: inverse iteration has nothing to work on
    assert spectrum_module._top_gram_eigh_lapack(m, shape[1] <= shape[0], 9, 8) is None  # so torch's eigh
    v, s, _, passed = spectrum_module._gram(m, 8, check=True)
    assert not bool(passed.all()) and bool(torch.isfinite(v).all()) and bool((s == 0).all())
    assert (v @ v.T - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-12


def test_tall_weight_operand_has_the_right_singular_pairs_of_w0_s():
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.standard_normal((150, 60)))  # d_out > 7/6·d_in: R·S, [60, 60]
    x = rng.standard_normal((400, 60)) * np.exp(rng.standard_normal(60))
    s = torch.from_numpy(x.T @ x)
    m, scale = spectrum_module._gram_operand(w, s)
    assert m.shape == (60, 60) and m.is_contiguous()
    _, sv_ref, vh_ref = np.linalg.svd(w.numpy() @ s.numpy())
    _, sv, vh = np.linalg.svd(m.numpy())
    assert np.abs(sv / sv_ref - 1).max() < 1e-10
    assert np.abs(np.abs((vh * vh_ref).sum(1)) - 1).max() < 1e-10  # the same vectors up to sign (distinct σ)
    assert scale >= sv_ref[0] ** 2  # the Frobenius bound of ‖W0‖²·‖S‖²
    square, none = spectrum_module._gram_operand(w[:66], s)  # 66 ≤ 7/6·60: W0·S itself
    assert none is None and (square - w[:66] @ s).abs().max() < 1e-12 * (w[:66].abs() @ s.abs()).max()
    w[:, 5] = 0  # W0ᵀW0 singular: no Cholesky factor, W0·S itself
    product, none = spectrum_module._gram_operand(w, s)
    assert none is None and product.shape == (150, 60)


def test_auto_forms_w0_s_where_the_tall_operand_is_not_trusted(tiny_model, samples, batches, monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    cov = covariance_of(model, samples, batches)
    name = "model.layers.0.mlp.gate_proj"  # [48, 32]: the R·S operand
    vh, s = oracle(model, cov, name)
    products = []
    real = spectrum_module._product
    monkeypatch.setattr(spectrum_module, "_product", lambda *a: products.append(1) or real(*a))
    trusted = compute_spectrum(model, cov, 8, modules=[name], solver="auto")
    assert trusted.solver[name] == "gram" and not products  # W0·S never formed
    monkeypatch.setattr(spectrum_module, "R_SCALE_LIMIT", 0.0)  # neither check trusts R·S now
    monkeypatch.setattr(spectrum_module, "GRAM_TOLERANCE", 0.0)
    formed = compute_spectrum(model, cov, 8, modules=[name], solver="auto")
    assert formed.solver[name] == "gram" and len(products) == 1
    for spectrum in (trusted, formed):
        v = spectrum.vectors[name].numpy()
        for k in clear_prefixes(s, 8, 32):
            assert projector_gap(v[:k], vh[:k]) < 1e-8, k
        assert np.abs(spectrum.values[name].numpy() - s[:8]).max() < 1e-10 * s[0]


# --- krylov: M only through products, against a numpy float64 SVD of W0·C --------------------------------------------

def covariance_sum(d_in: int, lam: np.ndarray, seed: int = 0) -> torch.Tensor:
    """S = A·diag(λ)·Aᵀ with a random orthonormal A (the sum of n = 1 samples' covariance)."""
    a = np.linalg.qr(np.random.default_rng(seed + 100).standard_normal((d_in, d_in)))[0]
    s = (a * lam) @ a.T
    return torch.from_numpy((s + s.T) / 2)


def krylov_problem(d_out: int, d_in: int, massive: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random W0 scaled like an LLM init and S with a decaying spectrum, optionally one massive direction."""
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal((d_out, d_in)) / np.sqrt(d_in))
    lam = np.arange(1.0, d_in + 1) ** -1.5
    if massive:
        lam[0] = massive * lam[1]
    return w, covariance_sum(d_in, lam, seed)


def check_against_oracle(w: torch.Tensor, s: torch.Tensor, n: int, v: torch.Tensor, sv: torch.Tensor, r: int,
                         tol: float = PREFIX_SINE) -> None:
    """Every clear prefix's principal-angle sine, orthonormal rows, values, signs (W0 as given, rounded or not)."""
    m = w.double().numpy() @ (s.numpy() / n)
    _, s_ref, vh = np.linalg.svd(m)
    v = v.numpy()
    assert v.shape == (r, w.shape[1]) and v.dtype == np.float64
    assert np.abs(v @ v.T - np.eye(r)).max() < 1e-12
    prefixes = clear_prefixes(s_ref, r, w.shape[1])
    assert prefixes
    for k in prefixes:
        assert projector_gap(v[:k], vh[:k]) < tol, k
    assert np.abs(sv.numpy() - s_ref[:r]).max() < 1e-10 * s_ref[0]
    top = np.take_along_axis(v, np.abs(v).argmax(1)[:, None], 1)
    assert (top > 0).all()


@pytest.mark.parametrize("shape", [(160, 120), (120, 160), (120, 120)])  # d_out > d_in, d_out < d_in, square
def test_krylov_matches_numpy_svd(shape):
    w, s = krylov_problem(*shape)
    v, sv, used = module_spectrum(w, s, 3, 6, solver="krylov")
    assert used == "krylov"
    check_against_oracle(w, s, 3, v, sv, 6)
    again = module_spectrum(w, s, 3, 6, solver="krylov")
    assert torch.equal(again[0], v) and torch.equal(again[1], sv)  # seeded start: deterministic


@pytest.mark.parametrize("shape", [(160, 120), (120, 160)])
def test_krylov_massive_activation(shape):
    w, s = krylov_problem(*shape, massive=1e6)
    m = w.numpy() @ s.numpy()
    sv_ref = np.linalg.svd(m, compute_uv=False)
    assert sv_ref[0] / sv_ref[1] > 1e4  # one huge direction, as an LLM's down projection (σ₁/σ₂ ≈ 2e4 in SmolLM2)
    # The trap: eigh of the dense Gram resolves σ² only to ~eps·σ₁², which drowns σ_6² ≈ 1e-10·σ₁².
    gram = compute_gram_only(w, s, 6)
    _, _, vh = np.linalg.svd(m)
    assert projector_gap(gram[:6], vh[:6]) > 1e-4
    v, sv, used = module_spectrum(w, s, 1, 6, solver="krylov")
    assert used == "krylov"
    check_against_oracle(w, s, 1, v, sv, 6, tol=1e-8)


def compute_gram_only(w: torch.Tensor, s: torch.Tensor, r: int) -> np.ndarray:
    v, _, _ = module_spectrum(w, s, 1, r, solver="gram")
    return v.numpy()


def test_krylov_falls_back_to_exact_when_the_check_fails(monkeypatch):
    w, s = krylov_problem(160, 120)
    calls = []
    real = spectrum_module._krylov_ritz
    monkeypatch.setattr(spectrum_module, "_krylov_ritz", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(spectrum_module, "KRYLOV_MAX_STEPS", 1)  # one block: the check cannot pass
    v, sv, used = module_spectrum(w, s, 1, 6, solver="krylov")
    assert used == "exact" and calls == [1]
    check_against_oracle(w, s, 1, v, sv, 6, tol=1e-10)


def test_krylov_near_degenerate_and_rank_deficient():
    d_out, d_in = 150, 130
    rng = np.random.default_rng(5)
    u = np.linalg.qr(rng.standard_normal((d_out, d_in)))[0]
    vt = np.linalg.qr(rng.standard_normal((d_in, d_in)))[0]
    eye = torch.eye(d_in, dtype=torch.float64)  # S = I: M = W0
    near = np.concatenate([[1.0, 0.8, 0.6, 0.5, 0.5 - 1e-9], 0.45 * 0.8 ** np.arange(d_in - 5)])
    w = torch.from_numpy(u @ np.diag(near) @ vt.T)
    v, sv, used = module_spectrum(w, eye, 1, 4, solver="krylov")
    assert used == "krylov"
    check_against_oracle(w, eye, 1, v, sv, 4)  # prefixes 1-3; the 4th may mix with the 5th ...
    energy, exact = (np.linalg.norm(w.numpy() @ a.T) for a in (v.numpy(), vt[:, :4].T))
    assert abs(energy / exact - 1) < 1e-8  # ... its captured energy may not drop
    rank5 = np.concatenate([[1.0, 0.7, 0.5, 0.3, 0.2], np.zeros(d_in - 5)])
    w = torch.from_numpy(u @ np.diag(rank5) @ vt.T)
    v, sv, used = module_spectrum(w, eye, 1, 8, solver="krylov")
    assert used in ("krylov", "exact")
    check_against_oracle(w, eye, 1, v, sv, 8)  # the 5 defined prefixes; rows orthonormal past the rank too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_spectrum_takes_low_precision_weights(dtype):
    w, s = krylov_problem(160, 120)
    w = w.to(dtype)
    for solver in ("krylov", "auto", "exact"):
        v, sv, used = module_spectrum(w, s, 2, 6, solver=solver)
        assert used == {"auto": "gram"}.get(solver, solver)
        assert v.dtype == sv.dtype == torch.float64 and v.device.type == "cpu"
        check_against_oracle(w, s, 2, v, sv, 6)  # against the SVD of the weight as stored


def test_auto_takes_krylov_for_wide_modules(monkeypatch):
    w, s = krylov_problem(160, 120, massive=1e6)
    assert module_spectrum(w, s, 1, 6)[2] == "gram"  # narrower than KRYLOV_MIN_WIDTH
    monkeypatch.setattr(spectrum_module, "KRYLOV_MIN_WIDTH", 100)
    monkeypatch.setattr(spectrum_module, "KRYLOV_MIN_BLOCKS", 5)  # 5 blocks of 6 + 16 columns fit in 120
    v, sv, used = module_spectrum(w, s, 1, 6)
    assert used == "krylov"
    check_against_oracle(w, s, 1, v, sv, 6, tol=1e-8)
    assert module_spectrum(w[:, :100], s[:100, :100], 1, 6)[2] == "gram"  # 110 columns do not fit in 100


def test_prefix_check_counts_the_next_residual():
    theta = torch.tensor([4.0, 1.0, 0.25, 0.0625], dtype=torch.float64)
    small = torch.full((3,), 1e-7, dtype=torch.float64)
    assert bool(spectrum_module._prefix_check(theta, small, 2, 10).all())
    # a large residual of pair 3 says λ_3 may lie near θ_2: prefix 2's gap closes, prefix 1's does not
    ahead = torch.tensor([1e-7, 1e-7, 0.75 - 1e-12], dtype=torch.float64)
    assert spectrum_module._prefix_check(theta, ahead, 2, 10).tolist() == [True, False]
