"""Spectral init of A: the top right singular vectors of M = W0·C per target module (DESIGN §1.3).

For each module, W0 ``[d_out, d_in]`` (GPT-2 ``Conv1D`` transposed) and C ``[d_in, d_in]`` its group's
activation covariance (float64 sums S = n·C; W0·S has the same singular vectors as M):

    M = W0·C = U·Σ·Vᴴ        A_r = Vᴴ[:r]   (orthonormal rows, no singular-value scaling)

The top ``r_max`` rows are computed once and sliced per budget, so every prefix of them must be right.

Solvers:

* ``exact``: ``torch.linalg.svd`` of the dense float64 W0·S, the oracle (O(d³)).
* ``gram``: eigenvectors of the smaller dense Gram matrix (MᵀM, or MMᵀ when d_out < d_in, then V = MᵀU/σ),
  with no check (O(d³)).
* ``krylov``: block Krylov (block Golub–Kahan–Lanczos with full reorthogonalization, float64, seeded start)
  that touches M only through products, M·X = W0·(S·X) and Mᵀ·Y = S·(W0ᵀ·Y), never forming M or a Gram:
  O((d_in² + d_out·d_in)·L) per module for a basis of L columns (:func:`_krylov`). Its Rayleigh–Ritz step is
  an SVD of M restricted to the basis, so the σ of an LLM's massive activations (σ₁/σ₂ ≈ 2e4 in SmolLM2's
  down projections) do not square. Where the check below fails after ``KRYLOV_MAX_STEPS`` blocks, it takes
  ``exact`` for that module. Float32 products are not used: measured on SmolLM2, a float32 iteration stalls
  near sin θ 1e-6 on ordinary modules and gives a useless subspace (sin θ ≈ 1) where σ₁/σ₂ ≈ 2e4.
* ``auto``: ``krylov`` where a module is wide enough that it is faster (min(d_in, d_out) ≥ ``KRYLOV_MIN_WIDTH``
  and ``KRYLOV_MIN_BLOCKS`` blocks fit in it), on CPU and CUDA alike; else the gram solution where its check
  passes for every prefix, after deflating a leading part that passes where needed (:func:`_peeled_gram`);
  else ``exact``. On CPU the gram path forms one triangle of the Gram (BLAS SYRK) and asks LAPACK for the top
  r + 1 pairs alone (:func:`_top_eigh`), and for a tall W0 (an MLP's up and gate projections) solves the
  square R·S, R the Cholesky factor of W0ᵀW0, with the same right singular pairs at 0.6× the work
  (:func:`_gram_operand`); elsewhere it takes the full Gram product and a full ``torch.linalg.eigh``.

What is checked, and what is not. The check (:func:`_prefix_check`) is an a-posteriori estimate from
computed residuals, a heuristic, not a proof. For computed pairs (θ_i = σ_i², v_i) of the Gram G = MᵀM with
residuals r_i = G·v_i − θ_i·v_i, Davis–Kahan gives, for prefix k, sin θ_k ≤ (Σ_{i≤k} ‖r_i‖²/(θ_i − λ_k+1)²)^½
with λ_k+1 the exact next eigenvalue. It is estimated by θ_k+1 + ‖r_k+1‖, and accepted below ``PREFIX_SINE``;
where σ_k and σ_k+1 nearly coincide (relative gap below ``NEAR_GAP``: the subspace itself is ill-defined)
the prefix is accepted instead when a Kato–Temple estimate puts its captured energy ‖M·Aᵀ‖²_F within
``PREFIX_ENERGY`` of the exact. It can be wrong where (a) an exact eigenvalue that no computed pair has
seen lies between θ_k+1 and θ_k (a block method misses a direction its start vectors are blind to; the
seeded Gaussian start makes that improbable, not impossible), (b) rounding in forming or applying the
operand is not in the residual: a Gram's own rounding (~eps·σ₁², which hides σ_i below ~√eps·σ₁: hence the
gram path's deflation) and, for R·S, that of W0ᵀW0 (bounded through ``R_SCALE_LIMIT``); Krylov's residuals
are computed by products in float64 and projected off the basis, so their rounding stays at ~eps·σ₁·σ_i, or
(c) Kato–Temple's gap is taken to the smallest computed pair, not to the exact spectrum. Tests compare
every prefix with a numpy float64 SVD; the benchmark (``benchmarks/spectrum_width.py``) with the exact
solver on all of SmolLM2's modules. ``gram_error_bound`` is the a-priori Davis–Kahan estimate of the gram
path's error from the Gram's rounding (also an estimate: it takes the rounding as ~eps·(d_in + d_out)·σ₁²).
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

Solver = Literal["auto", "exact", "gram", "krylov"]
GRAM_TOLERANCE = 1e-6
"""Largest a-priori estimate of sin θ (:func:`gram_error_bound`) for which ``auto`` keeps the gram solution."""
PREFIX_SINE = 1e-5
"""Largest estimated sin θ of a prefix subspace that the residual check accepts."""
PREFIX_ENERGY = 1e-10
"""Largest estimated relative error of a prefix's captured energy ‖M·Aᵀ‖²_F, where its gap is near zero."""
NEAR_GAP = 1e-2
"""Relative gap (σ_k − σ_k+1)/σ_k below which prefix k is judged by energy instead of angle."""
KRYLOV_MIN_WIDTH = 1024
"""Smallest min(d_in, d_out) at which ``auto`` takes the Krylov solver. Below it the dense Gram is faster (1 CPU
thread, r = 32: at SmolLM2's 576 a Krylov basis needs ~300 columns, half the width; random Llama shapes at d = 512:
gram 45–104 ms, Krylov 49–175 ms; at d = 1024: gram 245–594 ms, Krylov 208–545 ms)."""
KRYLOV_OVERSAMPLE = 16
"""Krylov block size b = r + KRYLOV_OVERSAMPLE."""
KRYLOV_MAX_STEPS = 40
"""Most Krylov blocks per module (the basis holds at most this many times b columns, and at most min(d_in, d_out))
before ``exact``. Flat spectra need many: a LLaMA-2-7B-shaped random model on 8 × 128 tokens (σ₁/σ₃₂ ≈ 1.3, relative
gaps down to 4e-4) failed the check within 12 blocks in k, v and down projections and passed within 30, while the
exact fallback of a 4096 × 11008 module costs minutes and ~1 GB of workspace."""
KRYLOV_MIN_BLOCKS = 4
"""``auto`` takes the Krylov solver only where at least this many blocks fit in min(d_in, d_out)."""
_KRYLOV_FIRST_CHECK = 3  # blocks before the first residual check (it costs about one block and cannot pass yet)
PEEL_ROUNDS = 3
"""Most gram solves per module in ``auto``, each after deflating the leading vectors the last one accepted."""
R_SCALE_LIMIT = 1e3
"""Largest ratio of the R·S operand's rounding scale ‖W0ᵀW0‖_F·‖S‖²_F to σ₁² at which ``auto`` keeps a solve that
passes its residual check (20–224 on SmolLM2's MLPs). The residual check, for W0·S as for R·S, does not see how the
Gram was rounded; R·S multiplies that rounding by up to this ratio (measured on SmolLM2's up/gate: worst sin θ 3e-12
against the exact SVD). Past it, only the a-priori estimate, which counts the scale, keeps R·S; else W0·S is formed."""
SUBSET_RATIO = 3
"""On CPU the gram solver asks LAPACK for the top k = r + 1 pairs only where SUBSET_RATIO·k ≤ n (the Gram's
width); past that a full ``eigh`` is as cheap (1 thread, Gram product included: k = 65 of n = 576, 21–34 ms
against 46–54 ms; of n = 192, 2.7 ms either way)."""
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Spectrum:
    """Per module, the top-``r_max`` right singular vectors and singular values of ``M = W0·C``."""

    vectors: dict[str, torch.Tensor]  # module -> [r_max_i, d_in], float64, orthonormal rows (rows of Vᴴ)
    values: dict[str, torch.Tensor]  # module -> [r_max_i], float64, descending
    r_max: int
    solver: dict[str, str] = field(default_factory=dict)  # module -> "exact" | "gram" | "krylov"
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
        solver: ``exact``, ``gram``, ``krylov`` (exact where its residual check fails), or ``auto`` (krylov for
            wide modules, else gram where its a-priori estimate or its residual check accepts it, after deflating
            an accepted leading part where needed; exact where neither accepts; see the module docstring).
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
             ", ".join(f"{sum(u == k for u in used.values())} {k}" for k in ("krylov", "gram", "exact")))
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
    if solver == "gram":
        v, sv, _, _ = _gram(_product(weight, s), r)
        return v, sv, "gram"
    if solver == "krylov" or (solver == "auto" and _krylov_pays(*weight.shape, r)):
        found = _krylov(weight, s, r)
        return (*found, "krylov") if found is not None else (*_exact(_product(weight, s), r), "exact")
    m, scale = _gram_operand(weight, s)
    if scale is not None:  # R·S: kept where one solve passes the check and W0ᵀW0's rounding stays small beside σ₁²
        v, sv, sigma, ok = _gram(m, r, check=True)
        trusted = bool(ok.all()) and scale <= R_SCALE_LIMIT * float(sigma[0]) ** 2
        if trusted or gram_error_bound(sigma, r, *reversed(weight.shape), scale=scale) <= GRAM_TOLERANCE:
            return v, sv, "gram"
        m = _product(weight, s)  # R lost what squaring W0 hides: deflation needs W0·S itself
    found = _peeled_gram(m, r)
    return (*found, "gram") if found is not None else (*_exact(m, r), "exact")


def _krylov_pays(d_out: int, d_in: int, r: int) -> bool:
    """Whether ``auto`` takes the Krylov solver: a wide module in which ``KRYLOV_MIN_BLOCKS`` blocks fit."""
    return min(d_out, d_in) >= KRYLOV_MIN_WIDTH and KRYLOV_MIN_BLOCKS * (r + KRYLOV_OVERSAMPLE) <= min(d_out, d_in)


def _krylov(weight: torch.Tensor, s: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-r right singular vectors ``[r, d_in]`` and values ``[r]`` of M = W0·S by block Krylov, or None where the
    residual check fails for some prefix within ``KRYLOV_MAX_STEPS`` blocks (or the basis cannot grow).

    Block Golub–Kahan–Lanczos, float64, M applied only as products: X_0 a seeded Gaussian block of b = r +
    ``KRYLOV_OVERSAMPLE`` orthonormal columns; per step P_j = W0·(S·X_j), orthonormalized against the earlier
    Y blocks (P = Y·R, R block upper triangular) into Y_j; X_j+1 = S·(W0ᵀ·Y_j) orthonormalized against the
    earlier X blocks. span(X_0..X_j) is the block Krylov space of MᵀM, built through M and Mᵀ alternately, so
    each product's rounding is ~eps·σ₁ rather than a Gram's eps·σ₁². Rayleigh–Ritz: M·X = Y·R, so the SVD of
    the L × L matrix R gives the Ritz values σ̃ and right vectors X·W; residuals G·v − σ̃²·v come from one more
    product Mᵀ·(M·v) with the last Y, projected off span(X) (exact arithmetic: already orthogonal to it; in
    floating point this removes the rounding along the dominant directions, which span(X) contains).
    Cost per module ≈ 2·(d_in² + d_out·d_in)·L multiply-adds plus O((d_in + d_out)·L² + L³) for the bases and
    the checks, L ≤ ``KRYLOV_MAX_STEPS``·b.
    """
    d_out, d_in = weight.shape
    b = r + KRYLOV_OVERSAMPLE
    steps = min(KRYLOV_MAX_STEPS, min(d_out, d_in) // b)  # Y cannot hold more than d_out orthonormal columns
    if steps < 1:
        return None
    w = weight.to(torch.float64)  # [d_out, d_in]
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.linalg.qr(torch.randn(d_in, b, dtype=torch.float64, device=w.device, generator=gen)).Q
    xs: list[torch.Tensor] = [x]  # X blocks, each [d_in, b]
    ys: list[torch.Tensor] = []  # Y blocks, each [d_out, b]
    cols: list[torch.Tensor] = []  # R's block columns: [b·(j+1), b] each
    for step in range(steps):
        y, col = _orthonormalize(w @ (s @ x), torch.cat(ys, 1) if ys else None)  # M·X_j = Y·col
        ys.append(y)
        cols.append(col)
        if step + 1 >= min(_KRYLOV_FIRST_CHECK, steps):
            found = _krylov_ritz(w, s, torch.cat(xs, 1), torch.cat(ys, 1), cols, r)
            if found is not None:
                return found
        if step + 1 < steps:
            x, _ = _orthonormalize(s @ (w.T @ y), torch.cat(xs, 1))
            xs.append(x)
    return None


def _orthonormalize(z: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Z's new directions as an orthonormal block Q against ``basis`` (block Gram–Schmidt, twice), and the
    coefficients ``[basis columns + b, b]`` with Z = [basis, Q]·coefficients."""
    if basis is None:
        q, tri = torch.linalg.qr(z)
        return q, tri
    c = basis.T @ z
    z = z - basis @ c
    c2 = basis.T @ z  # the second pass: what rounding left of the basis in z
    z = z - basis @ c2
    q, tri = torch.linalg.qr(z)
    return q, torch.cat([c + c2, tri])


def _krylov_ritz(w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cols: list[torch.Tensor],
                 r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rayleigh–Ritz on span(X): the top-r pairs where every prefix passes :func:`_prefix_check`, else None."""
    n_cols = x.shape[1]
    tri = torch.zeros(n_cols, n_cols, dtype=torch.float64, device=x.device)  # M·X = Y·tri
    start = 0
    for col in cols:
        tri[: col.shape[0], start: start + col.shape[1]] = col
        start += col.shape[1]
    u, sigma, wh = torch.linalg.svd(tri)
    k = min(r + 1, n_cols)
    v = x @ wh[:k].T  # [d_in, k] Ritz vectors
    mv = y @ (u[:, :k] * sigma[:k])  # M·v = Y·tri·w = Y·u·σ, without another product with M
    g = s @ (w.T @ mv)  # Mᵀ·M·v, [d_in, k]
    for _ in range(2):  # the exact residual is orthogonal to span(X): keep what lies outside it
        g = g - x @ (x.T @ g)
    residual = torch.linalg.vector_norm(g, dim=0)
    if not bool(_prefix_check(sigma.square(), residual, r, min(w.shape)).all()):
        return None
    return v[:, :r].T, sigma[:r]


def _peeled_gram(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gram solution of M where every prefix passes the residual check, peeling accepted leading vectors
    off; else None.

    Where the Gram's dynamic range hides the lower vectors (an LLM's massive activations: σ₁/σ₂ up to ~1e5
    in a down projection, so eigh of the Gram resolves σ² only to ~eps·σ₁²), the leading prefix that passes
    at a clear gap is kept, deflated (M ← M − M·VᵀV, which leaves the other singular pairs as they
    are), and the rest solved again at the smaller σ₁ (at most ``PEEL_ROUNDS`` solves; ~2 Gram solves instead
    of an SVD). Each prefix of the result passed the check of the solve that made it; what deflating by the kept
    vectors' own small error adds (about σ₁ times their estimated sine) is not in the later checks.
    """
    d_out, d_in = m.shape
    rows, vals, done, scale = [], [], 0, None
    for peel in range(PEEL_ROUNDS):
        v, sv, sigma, ok = _gram(m, r - done, check=True)
        if bool(ok.all()) or gram_error_bound(sigma, r - done, d_in, d_out, scale=scale) <= GRAM_TOLERANCE:
            rows.append(v)
            vals.append(sv)
            break
        run = int(ok.int().cumprod(0).sum())  # the leading prefixes that pass
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


def _gram(m: torch.Tensor, r: int, *, check: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-solve the smaller Gram matrix for its top ``r + 1`` pairs; also return their σ (descending) for the
    error estimate, and, with ``check``, per prefix k = 1..r whether the top eigenvectors' residuals pass
    :func:`_prefix_check` (all False without)."""
    right = _gram_is_right(m)
    n = min(m.shape)
    k = min(r + 1, n)  # σ_r+1 closes the last gap of both estimates
    subset = m.device.type == "cpu" and SUBSET_RATIO * k <= n  # else a full eigh is as cheap (measured)
    found = _top_gram_eigh_lapack(m, right, k, r) if subset else None
    lam, x, gx = found if found is not None else _top_gram_eigh_torch(m, k, r)
    x = x[:, :r]  # right singular vectors (MᵀM) or left ones (MMᵀ)
    passed = torch.zeros(r, dtype=torch.bool)
    if check:  # the residuals of the computed pairs against the same Gram
        residual = torch.linalg.vector_norm(gx - x * lam[:r], dim=0)
        passed = _prefix_check(lam, residual, r, n)
    if right:
        v = x  # [d_in, r]
        s = torch.linalg.vector_norm(m @ v, dim=0)  # ‖Mv‖: second order in v's error, unlike sqrt(λ)
    else:  # V = MᵀU/σ; QR instead of dividing keeps the rows orthonormal when some σ is ~0.
        y = m.T @ x
        s = torch.linalg.vector_norm(y, dim=0)  # ‖Mᵀu‖: second order in u's error, like ‖Mv‖
        qq, rr = torch.linalg.qr(y)
        v = qq * torch.where(rr.diagonal() < 0, -1.0, 1.0)
    return v.T, s, lam.clamp(min=0).sqrt(), passed


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


def _prefix_check(theta: torch.Tensor, residual: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """Per prefix k = 1..r, whether the residuals put it within tolerance of the exact (module docstring).

    θ: computed eigenvalues of the Gram (descending, l ≥ r + 1 of them, the last the smallest the solver
    holds); ``residual``: ‖G·v_i − θ_i·v_i‖ for i = 1..r, or r + 1 (then λ_k+1 is estimated by θ_k+1 + ‖r_k+1‖,
    else by θ_k+1). n: the Gram's rank bound min(d_in, d_out).
    """
    theta = theta.clamp(min=0)
    if theta[0] <= 0:
        return torch.full((r,), r >= n, device=theta.device)
    if r >= n:  # prefix n is all of M's row space, so exact; the shorter ones still need the test
        ok = torch.ones(r, dtype=torch.bool, device=theta.device)
        if n > 1:
            ok[: n - 1] = _prefix_check(theta, residual[:n], n - 1, n)
        return ok
    lam = theta[: r + 1]
    res = residual[:r]
    ahead = residual[1: r + 1]
    nxt = lam[1:] + torch.cat([ahead, ahead.new_zeros(r - len(ahead))])  # estimates of λ_k+1, k = 1..r
    floor = _EPS * lam[0]
    gaps = (lam[:r, None] - nxt[None, :]).clamp(min=floor)  # [i, k]: θ_i − λ_k+1
    upper = torch.ones(r, r, dtype=torch.bool, device=theta.device).triu()  # i ≤ k
    sine = ((res[:, None] / gaps).square() * upper).sum(0).sqrt()
    outer = (lam[:r] - theta[-1]).clamp(min=floor)
    energy = (res.square() / outer).cumsum(0) / lam[:r].cumsum(0)
    sigma = lam.sqrt()
    near = (sigma[:r] - sigma[1:]) < NEAR_GAP * sigma[:r]
    return (sine <= PREFIX_SINE) | (near & (energy <= PREFIX_ENERGY))


def _fix_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive."""
    idx = v.abs().argmax(dim=1, keepdim=True)
    return v * torch.where(v.gather(1, idx) < 0, -1.0, 1.0).to(v.dtype)
