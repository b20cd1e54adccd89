"""Spectral init of A: top right singular vectors of W0·C per module (DESIGN §1.3).

(Types only so far; the solver lands with the spectrum work.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Spectrum:
    """Per module, the top-``r_max`` right singular vectors and singular values of ``M = W0·C``."""

    vectors: dict[str, torch.Tensor]  # module -> [r_max_i, d_in], float64, orthonormal rows (rows of Vᴴ)
    values: dict[str, torch.Tensor]  # module -> [r_max_i], float64, descending
    r_max: int
    solver: dict[str, str] = field(default_factory=dict)  # module -> "exact" | "gram"
    model_fingerprint: str | None = None
