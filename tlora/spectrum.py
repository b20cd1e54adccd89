"""Spectral init of A: the top right singular vectors of M = W0·C per target module (DESIGN §1.3).

For each module, W0 ``[d_out, d_in]`` (GPT-2 ``Conv1D`` transposed) and C ``[d_in, d_in]`` its group's
activation covariance, both float64:

    M = W0·C = U·Σ·Vᴴ        A_r = Vᴴ[:r]   (orthonormal rows, no singular-value scaling)

The top ``r_max`` rows are computed once and sliced per budget, so every prefix of them must be right.
Solvers: ``exact`` is ``torch.linalg.svd`` (the oracle); ``gram`` takes the eigenvectors of the smaller
Gram matrix (MᵀM, or MMᵀ when d_out < d_in, then V = MᵀU/σ). Squaring M squares its condition, so
``auto`` keeps the gram result only where it is certified: either a priori, where a Davis–Kahan bound puts
every prefix subspace within ``GRAM_TOLERANCE`` of the exact one, or a posteriori, where the computed
eigenpairs' residuals against the Gram pass the same per-prefix test as the randomized solver below
(:func:`_ritz_certified`). Where only a leading part is certified (a Gram's dynamic range: an LLM's massive
activations), ``auto`` deflates that part and solves the rest again (:func:`_certified_gram`); it falls back
to ``exact`` per module where that does not certify every prefix either. Both certificates need only the
top r + 1 eigenpairs (σ_r+1 closes the last gap), so on CPU the gram solver forms one triangle of the Gram
(BLAS SYRK) and asks LAPACK for those r + 1 pairs alone (:func:`_top_eigh`): the tridiagonal reduction is
then most of its cost (elsewhere: the full Gram product and a full ``torch.linalg.eigh``). For a tall W0
(an MLP's up and gate projections) ``auto`` on CPU solves the square R·S, R the Cholesky factor of W0ᵀW0, which has
the same right singular pairs at 0.6× the work (:func:`_gram_operand`).
``randomized`` is block subspace iteration on the smaller Gram matrix with a block of ``2·r`` vectors,
finished by a Rayleigh–Ritz step on M itself (the SVD of the thin ``M·Q``); it stops when the Ritz
residuals put every prefix within ``RANDOMIZED_SINE`` of its exact subspace, or, for a prefix whose last
singular value nearly coincides with the next one (relative gap below ``NEAR_GAP``: the subspace itself is
ill-defined there), when they put its captured energy ‖M·Aᵀ‖²_F within ``RANDOMIZED_ENERGY`` of the exact.
It falls back to ``exact`` when it does not get there in ``RANDOMIZED_MAX_ITER`` steps. (At SmolLM2's
shapes a full ``eigh`` of the 576-wide Gram is cheaper than the ~11 steps the iteration needs, so ``auto``
no longer takes it.)
Invariant (tested): rows orthonormal, and the span of every prefix equals the exact SVD's within tolerance
(or, across a near-coincident pair, its energy does).
Each vector's sign is fixed (largest-magnitude entry positive), so results are reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.linalg.blas import dsymm, dsyrk, dtrmm
from scipy.linalg.lapack import dpotrf, dstein, dsterf, dsytrd, dsytrd_lwork
from torch import nn

from tlora._zarr_store import open_complete, read_float64, write_matrix, writing
from tlora.covariance import Covariance
from tlora.models import model_fingerprint as fingerprint_model
from tlora.targets import get_module, weight_out_in

log = logging.getLogger(__name__)

Solver = Literal["auto", "exact", "gram", "randomized"]
GRAM_TOLERANCE = 1e-6
"""Largest estimated principal-angle error (sin θ) for which ``auto`` keeps the gram solution."""
RANDOMIZED_SINE = 1e-5
"""Largest estimated sin θ of a prefix subspace at which the randomized solver stops."""
RANDOMIZED_ENERGY = 1e-10
"""Largest estimated relative error of a prefix's captured energy ‖M·Aᵀ‖²_F, where its gap is near zero."""
NEAR_GAP = 1e-2
"""Relative gap (σ_k − σ_k+1)/σ_k below which prefix k is judged by energy instead of angle."""
RANDOMIZED_MAX_ITER = 24
PEEL_ROUNDS = 3
"""Most gram solves per module in ``auto``, each after deflating the leading vectors the last one certified."""
R_SCALE_LIMIT = 1e3
"""Largest ratio of the R·S operand's rounding scale ‖W0ᵀW0‖_F·‖S‖²_F to σ₁² at which ``auto`` keeps a solve that
its residuals certify (20–224 on SmolLM2's MLPs). The residual test, for W0·S as for R·S, does not see how the Gram
was rounded; R·S multiplies that rounding by up to this ratio (measured on SmolLM2's up/gate: worst sin θ 3e-12
against the exact SVD). Past it, only the a-priori bound, which counts the scale, keeps R·S; else W0·S is formed."""
SUBSET_RATIO = 3
"""On CPU the gram solver asks LAPACK for the top k = r + 1 pairs only where SUBSET_RATIO·k ≤ n (the Gram's
width); past that a full ``eigh`` is as cheap (1 thread, Gram product included: k = 65 of n = 576, 21–34 ms
against 46–54 ms; of n = 192, 2.7 ms either way)."""
_UNCHECKED = 2  # first steps without the Ritz check (it cannot pass yet)
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Spectrum:
    """Per module, the top-``r_max`` right singular vectors and singular values of ``M = W0·C``."""

    vectors: dict[str, torch.Tensor]  # module -> [r_max_i, d_in], float64, orthonormal rows (rows of Vᴴ)
    values: dict[str, torch.Tensor]  # module -> [r_max_i], float64, descending
    r_max: int
    solver: dict[str, str] = field(default_factory=dict)  # module -> "exact" | "gram" | "randomized"
    model_fingerprint: str | None = None


def compute_spectrum(
    model: nn.Module,
    covariance: Covariance,
    r_max: int,
    *,
    modules: Sequence[str] | None = None,
    solver: Solver = "auto",
    check_fingerprint: bool = True,
    model_fingerprint: str | None = None,
) -> Spectrum:
    """Compute the top ``min(r_max, d_in, d_out)`` right singular vectors of ``W0·C`` for each module.

    Args:
        modules: the modules to compute (default: every module of the covariance).
        solver: ``exact``, ``gram``, ``randomized`` (exact where it does not converge), or ``auto``
            (gram where its a-priori bound or its residuals certify it, after deflating a certified leading part
            where needed; else exact).
        check_fingerprint: refuse a covariance recorded for another model.
        model_fingerprint: the model's fingerprint when the caller has it (the pipeline records it once, in
            the model stage); hashed from the model's weights when ``None`` (~0.4 s at 135M parameters).

    Returns:
        Float64 vectors and values on CPU, the solver each module used, and the model's fingerprint.

    Raises:
        ValueError (before any compute): ``r_max < 1``; a covariance from another model; a module missing
        from the covariance or the model; a covariance whose shape does not match the module's d_in.
    """
    if r_max < 1:
        raise ValueError(f"r_max must be >= 1, got {r_max}")
    fingerprint = model_fingerprint if model_fingerprint is not None else fingerprint_model(model)
    if check_fingerprint and covariance.model_fingerprint not in (None, fingerprint):
        raise ValueError(f"covariance was collected on another model: its fingerprint is "
                         f"{covariance.model_fingerprint}, this model's is {fingerprint} "
                         "(pass check_fingerprint=False to use it anyway)")
    names = list(covariance.modules) if modules is None else list(modules)
    weights = {}
    for name in names:
        if name not in covariance.modules:
            raise ValueError(f"module {name!r} is not in the covariance (it covers {len(covariance.modules)} "
                             f"modules, e.g. {list(covariance.modules)[:3]})")
        weight = weight_out_in(get_module(model, name))
        c_shape = tuple(covariance.sums[covariance.modules[name]].shape)
        if weight.dim() != 2 or c_shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"module {name!r}: weight [d_out, d_in] = {tuple(weight.shape)} needs a "
                             f"[{weight.shape[-1]}, {weight.shape[-1]}] covariance, got {list(c_shape)}")
        weights[name] = weight
    vectors, values, used = {}, {}, {}
    cache: dict[str, torch.Tensor] = {}  # group -> S on the weight's device, shared by q/k/v
    for name, weight in weights.items():
        group = covariance.modules[name]
        if group not in cache:
            cache = {group: covariance.sums[group].to(weight.device)}
        r = min(r_max, *weight.shape)
        vectors[name], values[name], used[name] = module_spectrum(weight, cache[group], covariance.n_samples, r,
                                                                  solver)
    log.info("spectrum of %d modules (r_max=%d): %s", len(used), r_max,
             ", ".join(f"{sum(u == k for u in used.values())} {k}" for k in ("randomized", "gram", "exact")))
    return Spectrum(vectors=vectors, values=values, r_max=r_max, solver=used, model_fingerprint=fingerprint)


def module_spectrum(weight: torch.Tensor, s: torch.Tensor, n_samples: int, r: int, solver: Solver = "auto"
                    ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One module's top-``r`` right singular vectors ``[r, d_in]`` and values ``[r]`` of ``M = W0·C`` (float64, CPU).

    ``weight`` is W0 in ``[d_out, d_in]`` layout (any float dtype), ``s`` its group's float64 sum S = n·C on the
    same device. Vectors have fixed signs; the solver that made them is returned with them. The layer-streamed
    path (:mod:`tlora.stream`) calls this per module as each layer completes.
    """
    # W0·S = n·M (C = S/n): the same singular vectors, σ scaled by n, and no pass over S to divide it.
    v, sv, used = _top_right_singular(weight.detach(), s, r, solver)
    return _fix_signs(v).cpu(), (sv / n_samples).cpu(), used


def gram_error_bound(sigma: torch.Tensor, r: int, d_in: int, d_out: int, *, scale: float | None = None) -> float:
    """Estimated largest sin θ between the gram and exact spans of the top-k vectors, over k = 1..r.

    ``sigma`` holds M's singular values as the gram solver sees them (descending, all of the Gram's
    dimension). Forming the Gram and eigh perturb it by about ``eps·(d_in + d_out)·σ₁²``; Davis–Kahan turns
    that into ``sin θ_k ≲ eps·(d_in + d_out)·σ₁² / (σ_k² − σ_{k+1}²)``, with σ beyond rank M equal to 0.
    ``scale`` replaces σ₁² where it is larger: a Gram formed through W0ᵀW0 (:func:`_gram_operand`).
    """
    lam = sigma.to(torch.float64).square()
    if r >= d_in:  # the top-d_in right singular space is all of R^d_in: nothing to get wrong
        r = d_in - 1
    if r < 1:
        return 0.0
    nxt = torch.cat([lam[1:], lam.new_zeros(1)])
    gaps = (lam - nxt)[:r]
    if lam[0] <= 0 or bool((gaps <= 0).any()):
        return float("inf")
    return float(_EPS * (d_in + d_out) * max(float(lam[0]), scale or 0.0) / gaps.min())


def save_spectrum(path: str | Path, spectrum: Spectrum, *, compressors: Any = "default") -> None:
    """Write ``spectrum`` as a Zarr v3 group: ``<module>/vectors`` and ``<module>/values`` per module.

    ``complete`` is written ``false`` first and ``true`` last, so an interrupted write is refused on load.
    ``compressors``: ``"default"``, ``"compact"`` or zarr codecs, as for :func:`tlora.covariance.save_covariance`.
    """
    with writing(path) as root:
        for name, vec in spectrum.vectors.items():
            for key, t in (("vectors", vec), ("values", spectrum.values[name])):
                write_matrix(root, f"{name}/{key}", t, compressors=compressors)
        root.attrs.update({"modules": list(spectrum.vectors), "r_max": spectrum.r_max, "solver": spectrum.solver,
                           "model_fingerprint": spectrum.model_fingerprint})


def load_spectrum(path: str | Path) -> Spectrum:
    """Read a store written by :func:`save_spectrum`.

    Raises:
        ValueError: no store at ``path``, an incomplete store, or one with missing attributes or arrays.
    """
    root, attrs = open_complete(path, "spectrum")
    try:
        names = attrs["modules"]
        vectors = {n: read_float64(root[f"{n}/vectors"]) for n in names}
        values = {n: read_float64(root[f"{n}/values"]) for n in names}
        return Spectrum(vectors=vectors, values=values, r_max=int(attrs["r_max"]), solver=dict(attrs["solver"]),
                        model_fingerprint=attrs["model_fingerprint"])
    except KeyError as err:
        raise ValueError(f"spectrum store {path} is malformed: missing {err}") from err


def _top_right_singular(weight: torch.Tensor, s: torch.Tensor, r: int, solver: Solver
                        ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Top-r right singular vectors ``[r, d_in]`` and values ``[r]`` of W0·S, and the solver that made them."""
    if solver == "exact":
        return (*_exact(_product(weight, s), r), "exact")
    if solver == "randomized":
        m = _product(weight, s)
        found = _randomized(m, r)
        return (*found, "randomized") if found is not None else (*_exact(m, r), "exact")
    if solver == "gram":
        v, sv, _, _ = _gram(_product(weight, s), r)
        return v, sv, "gram"
    m, scale = _gram_operand(weight, s)
    if scale is not None:  # R·S: kept where one solve certifies it and W0ᵀW0's rounding stays small beside σ₁²
        v, sv, sigma, ok = _gram(m, r, certify=True)
        trusted = bool(ok.all()) and scale <= R_SCALE_LIMIT * float(sigma[0]) ** 2
        if trusted or gram_error_bound(sigma, r, *reversed(weight.shape), scale=scale) <= GRAM_TOLERANCE:
            return v, sv, "gram"
        m = _product(weight, s)  # R lost what squaring W0 hides: deflation needs W0·S itself
    found = _certified_gram(m, r)
    return (*found, "gram") if found is not None else (*_exact(m, r), "exact")


def _certified_gram(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gram solution of M where it is certified for every prefix, peeling certified leading vectors off;
    else None.

    Where the Gram's dynamic range hides the lower vectors (an LLM's massive activations: σ₁/σ₂ up to ~1e5
    in a down projection, so eigh of the Gram resolves σ² only to ~eps·σ₁²), the leading prefix that is
    certified at a clear gap is kept, deflated (M ← M − M·VᵀV, which leaves the other singular pairs as they
    are), and the rest solved again at the smaller σ₁ (at most ``PEEL_ROUNDS`` solves; ~2 Gram solves instead
    of an SVD). Each prefix of the result is certified by the solve that made it; what deflating by the kept
    vectors' own small error adds (about σ₁ times their certified sine) is not in the later certificates.
    """
    d_out, d_in = m.shape
    rows, vals, done, scale = [], [], 0, None
    for peel in range(PEEL_ROUNDS):
        v, sv, sigma, ok = _gram(m, r - done, certify=True)
        if bool(ok.all()) or gram_error_bound(sigma, r - done, d_in, d_out, scale=scale) <= GRAM_TOLERANCE:
            rows.append(v)
            vals.append(sv)
            break
        run = int(ok.int().cumprod(0).sum())  # the leading prefixes that are certified
        clear = (sigma[1:run + 1] < (1 - NEAR_GAP) * sigma[:run]).nonzero()  # ... and end at a clear gap
        if len(clear) == 0 or peel == PEEL_ROUNDS - 1:
            return None
        kept = int(clear.max()) + 1
        rows.append(v[:kept])
        vals.append(sv[:kept])
        done += kept
        scale = scale or float(sigma[0]) ** 2  # M's rounding stays at the first solve's σ₁², not the deflated one's
        m = m - (m @ v[:kept].T) @ v[:kept]
    if len(rows) == 1:
        return rows[0], vals[0]
    q, tri = torch.linalg.qr(torch.cat(rows).T)  # the pieces are orthogonal up to rounding: make it exact
    return (q * torch.where(tri.diagonal() < 0, -1.0, 1.0)).T, torch.cat(vals)


def _product(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W0·S in float64 ``[d_out, d_in]``; on CPU by numpy's BLAS (OpenBLAS: ~14 % faster than torch's MKL here)."""
    if weight.device.type != "cpu":
        return weight.to(torch.float64) @ s
    return torch.from_numpy(weight.to(torch.float64).numpy() @ s.numpy())


def _gram_operand(weight: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """A matrix with the right singular pairs of W0·S for the gram solver, and its error scale for the bound.

    W0·S itself (scale ``None``), except on CPU for a tall weight (d_out > 7/6·d_in: an MLP's up and gate
    projections), where R·S is ``[d_in, d_in]``, with R the Cholesky factor of W0ᵀW0 (RᵀR = W0ᵀW0, so
    (R·S)ᵀ(R·S) = (W0·S)ᵀ(W0·S)): W0ᵀW0 by SYRK, its Cholesky, R·S by TRMM and the Gram by SYRK cost
    d_out·d_in²/2 + 7/6·d_in³ multiply-adds against 3/2·d_out·d_in² for W0·S and its Gram (0.6× at 1536 × 576).
    Squaring W0 makes the Gram's rounding scale with ‖W0‖²‖S‖² rather than σ₁²: ``scale`` is the Frobenius
    bound ‖W0ᵀW0‖_F·‖S‖²_F of it, for :func:`gram_error_bound`. W0·S where W0ᵀW0 is not positive definite.
    """
    d_out, d_in = weight.shape
    if weight.device.type != "cpu" or 6 * d_out <= 7 * d_in:
        return _product(weight, s), None
    w = weight.to(torch.float64).numpy()
    k = dsyrk(1.0, w.T, trans=0, lower=1)  # lower triangle of W0ᵀW0, zeros above (w.T: Fortran order, no copy)
    scale = float(np.sqrt(2 * np.square(k).sum() - np.square(k.diagonal()).sum())) * float(s.square().sum())
    chol, info = dpotrf(k, lower=1, overwrite_a=1)
    if info:
        return _product(weight, s), None
    rs_t = dtrmm(1.0, chol, s.numpy().T, side=1, lower=1)  # S·L = (Lᵀ·S)ᵀ = (R·S)ᵀ, Fortran order: R·S in C order
    return torch.from_numpy(rs_t.T), scale


def _exact(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    return vh[:r], s[:r]


def _gram(m: torch.Tensor, r: int, *, certify: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-solve the smaller Gram matrix for its top ``r + 1`` pairs; also return their σ (descending) for the
    error bound, and, with ``certify``, per prefix k = 1..r whether the top eigenvectors' residuals pass
    :func:`_ritz_certified` (all False without)."""
    right = _gram_is_right(m)
    n = min(m.shape)
    k = min(r + 1, n)  # σ_r+1 closes the last gap of both certificates
    subset = m.device.type == "cpu" and SUBSET_RATIO * k <= n  # else a full eigh is as cheap (measured)
    found = _top_gram_eigh_lapack(m, right, k, r) if subset else None
    lam, x, gx = found if found is not None else _top_gram_eigh_torch(m, k, r)
    x = x[:, :r]  # right singular vectors (MᵀM) or left ones (MMᵀ)
    certified = torch.zeros(r, dtype=torch.bool)
    if certify:  # the residuals of the computed pairs against the same Gram, as the randomized solver does
        residual = torch.linalg.vector_norm(gx - x * lam[:r], dim=0)
        certified = _ritz_certified(lam, residual, r, n)
    if right:
        v = x  # [d_in, r]
        s = torch.linalg.vector_norm(m @ v, dim=0)  # ‖Mv‖: second order in v's error, unlike sqrt(λ)
    else:  # V = MᵀU/σ; QR instead of dividing keeps the rows orthonormal when some σ is ~0.
        y = m.T @ x
        s = torch.linalg.vector_norm(y, dim=0)  # ‖Mᵀu‖: second order in u's error, like ‖Mv‖
        qq, rr = torch.linalg.qr(y)
        v = qq * torch.where(rr.diagonal() < 0, -1.0, 1.0)
    return v.T, s, lam.clamp(min=0).sqrt(), certified


def _top_gram_eigh_lapack(m: torch.Tensor, right: bool, k: int, r: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-k eigenpairs (descending) of the smaller Gram of a CPU ``m`` and the Gram times the first r vectors.

    One triangle by BLAS SYRK, then LAPACK for the top k pairs only (:func:`_top_eigh`) and SYMM for the
    residual product: about half the work of the full Gram product and a full ``eigh``. None where LAPACK
    reports a failure (the caller then takes the full torch solve).
    """
    a = m.detach().contiguous().numpy().T  # Mᵀ, Fortran-ordered [d_in, d_out], no copy
    gram = dsyrk(1.0, a, trans=0 if right else 1, lower=1)  # lower triangle of MᵀM (right) or MMᵀ (left)
    found = _top_eigh(gram, k)
    if found is None:
        return None
    lam, x = found
    gx = dsymm(1.0, gram, np.asfortranarray(x[:, :r].numpy()), side=0, lower=1)
    return lam, x, torch.from_numpy(np.ascontiguousarray(gx))


def _top_eigh(gram: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k eigenpairs (descending) of a symmetric matrix given by its lower triangle, or None on failure.

    LAPACK's pieces, each where it is fastest (1 thread, n = 576, k = 65: 16 ms against 23 ms for
    ``dsyevr`` asked for the same k pairs, whose bisection and back-transform cost more): blocked Householder
    tridiagonalization (``dsytrd``), every eigenvalue of the tridiagonal by ``dsterf`` (O(n²)), the top k
    eigenvectors of the tridiagonal by inverse iteration (``dstein``, which reorthogonalizes clusters), and
    the reflectors applied to those k vectors only (``ormqr``).
    """
    n = gram.shape[0]
    if n < 2:
        return None
    lwork, info = dsytrd_lwork(n, lower=1)
    packed, d, e, tau, info = dsytrd(gram, lower=1, lwork=max(int(lwork), n))
    if info:
        return None
    w, info = dsterf(d, e)  # ascending
    if info:
        return None
    block = np.zeros(n, dtype=np.int32)
    block[:k] = 1  # one block: T is treated whole (no split points), which inverse iteration handles
    split = np.zeros(n, dtype=np.int32)
    split[0] = n
    z, info = dstein(d, e, w[n - k:], block, split)
    if info or not np.isfinite(z).all():  # e.g. T = 0, where inverse iteration has nothing to iterate on
        return None
    # T = Qᵀ·G·Q with Q = diag(1, Q̃): Q̃'s reflectors are stored below the subdiagonal as a QR factorization's
    # (LAPACK's lower-triangle layout), so ormqr applies Q̃ to the rows 1: of the tridiagonal's eigenvectors.
    z = torch.from_numpy(np.ascontiguousarray(z[:, ::-1]))  # descending
    x = torch.empty_like(z)
    x[0] = z[0]
    x[1:] = torch.ormqr(torch.from_numpy(packed[1:, :-1]), torch.from_numpy(tau), z[1:])
    return torch.from_numpy(w[n - k:][::-1].copy()), x


def _top_gram_eigh_torch(m: torch.Tensor, k: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`_top_gram_eigh_lapack`, on any device: the full Gram product and a full ``torch.linalg.eigh``."""
    gram, _ = _smaller_gram(m)
    lam, q = torch.linalg.eigh(gram)  # ascending
    lam, x = lam.flip(0)[:k], q.flip(1)[:, :k]
    return lam, x, gram @ x[:, :r]


def _smaller_gram(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of ``m`` and whether it is MᵀM (right singular vectors) rather than MMᵀ."""
    right = _gram_is_right(m)
    return (m.T @ m if right else m @ m.T), right


def _gram_is_right(m: torch.Tensor) -> bool:
    """Whether MᵀM (d_in wide: right singular vectors) is the smaller Gram matrix, rather than MMᵀ."""
    return m.shape[1] <= m.shape[0]


def _block(r: int) -> int:
    """Block size of the subspace iteration: twice the wanted rank (oversampling r, at least 8)."""
    return r + max(r, 8)


def _randomized(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-r right singular vectors and values by subspace iteration, or None if it did not converge.

    G is the smaller Gram matrix (n × n); Q (n × l) an orthonormal block. Each step forms Y = G·Q, takes
    the Ritz pairs (θ, X = Q·W) of G in span(Q) and their residuals R = Y·W − X·diag(θ), and stops when
    :func:`_ritz_certified` accepts every prefix; else Q ← orth(Y).
    """
    gram, right = _smaller_gram(m)
    n, l = gram.shape[0], min(_block(r), gram.shape[0])
    start = torch.randn(n, l, dtype=m.dtype, device=m.device,
                        generator=torch.Generator(device=m.device).manual_seed(0))
    q = torch.linalg.qr(gram @ start).Q  # [n, l]
    for step in range(RANDOMIZED_MAX_ITER):
        y = gram @ q  # [n, l]
        if step < _UNCHECKED or (step - _UNCHECKED) % 2:  # the check every other step: it costs as much
            q = torch.linalg.qr(y).Q
            continue
        h = q.T @ y
        theta, w = torch.linalg.eigh((h + h.T) / 2)  # ascending
        theta, w = theta.flip(0), w.flip(1)
        x = q @ w[:, :r]  # [n, r] Ritz vectors
        residual = torch.linalg.vector_norm(y @ w[:, :r] - x * theta[:r], dim=0)  # [r]
        if bool(_ritz_certified(theta, residual, r, n).all()):
            break
        q = torch.linalg.qr(y).Q
    else:
        return None
    # Rayleigh–Ritz on M itself: the SVD of the thin projection keeps the small σ that the Gram squares away.
    # Through its l × l triangular factor: the same singular values and right vectors, a fraction of the cost.
    if right:
        tri = torch.linalg.qr(m @ q, mode="r").R  # M·Q = Q'·R, so M·Q's right vectors are R's
        _, s, wh = torch.linalg.svd(tri)
        v = (q @ wh.T)[:, :r].T
    else:
        qq, tri = torch.linalg.qr(m.T @ q)  # Qᵀ·M = Rᵀ·Q'ᵀ, so its right vectors are Q'·(Rᵀ's right vectors)
        _, s, wh = torch.linalg.svd(tri.T)
        v = (qq @ wh.T)[:, :r].T
    return v, s[:r]


def _ritz_certified(theta: torch.Tensor, residual: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """Per prefix k = 1..r, whether the residuals put it within tolerance of the exact (see module docstring).

    θ (descending, l ≥ r + 1 values) estimate λ = σ²; Davis–Kahan gives sin θ_k ≲ ‖R_k‖_F / (θ_k − θ_k+1),
    Kato–Temple λ_i − θ_i ≲ ‖r_i‖² / (θ_i − θ_l), θ_l the smallest Ritz value of the block.
    """
    theta = theta.clamp(min=0)
    if theta[0] <= 0:
        return torch.full((r,), r >= n, device=theta.device)
    if r >= n:  # prefix n is all of M's row space, so exact; the shorter ones still need the test
        ok = torch.ones(r, dtype=torch.bool, device=theta.device)
        if n > 1:
            ok[: n - 1] = _ritz_certified(theta, residual[: n - 1], n - 1, n)
        return ok
    lam = theta[: r + 1]
    res2 = residual.square().cumsum(0)  # ‖R_k‖²_F
    gap = lam[:r] - lam[1:]
    sine = res2.sqrt() / gap.clamp(min=_EPS * lam[0])
    outer = (lam[:r] - theta[-1]).clamp(min=_EPS * lam[0])
    energy = (residual.square() / outer).cumsum(0) / lam[:r].cumsum(0)
    sigma = lam.sqrt()
    near = (sigma[:r] - sigma[1:]) < NEAR_GAP * sigma[:r]
    return (sine <= RANDOMIZED_SINE) | (near & (energy <= RANDOMIZED_ENERGY))


def _fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive."""
    idx = v.abs().argmax(dim=1, keepdim=True)
    return v * torch.where(v.gather(1, idx) < 0, -1.0, 1.0).to(v.dtype)
