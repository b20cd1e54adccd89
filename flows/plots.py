"""The plots a stage writes into its artifact folder's ``plots/`` subfolder (DESIGN §2), as PNG.

- allocation: sensitivity score and allocated rank as layer × module-kind heatmaps (``allocation.png``);
- spectrum: singular values of ``W0·C`` of a few modules, first to last layer (``spectrum.png``);
- train: training loss, and eval loss where the Trainer logged one, from ``trainer_state.json``'s
  ``log_history`` (``loss.png``).

The files are part of the stage artifact (in its sha256 manifest) and are logged to the stage's MLflow run
by :func:`flows.stage.run_stage`. matplotlib's Agg backend only: no display is needed or touched.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless workers have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

PLOTS = "plots"
"""The subfolder of a stage's artifact folder that holds its plots."""
DPI = 110
_LAYER = re.compile(r"\.(\d+)\.")


def layer_grid(values: Mapping[str, float]) -> tuple[list[str], list[str], np.ndarray]:
    """Arrange per-module values as a layer × module-kind grid.

    The layer is the first ``.<int>.`` of a module's name (``model.layers.3.self_attn.q_proj`` -> 3, ``-`` when
    there is none), the kind its last component (``q_proj``). Cells without a module are NaN.

    Returns:
        (layer labels, kind labels, float64 array ``[n_layers, n_kinds]``).
    """
    cells: dict[tuple[str, str], float] = {}
    for name, value in values.items():
        match = _LAYER.search(name)
        layer = match.group(1) if match else "-"
        kind = name.rsplit(".", 1)[-1]
        if (layer, kind) in cells:
            raise ValueError(f"two modules map to layer {layer}, kind {kind!r}: cannot lay {name!r} on the grid")
        cells[(layer, kind)] = float(value)
    layers = sorted({lay for lay, _ in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0))
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in values))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), value in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = value
    return layers, kinds, grid


def allocation_figure(ranks: Mapping[str, int], scores: Mapping[str, float] | None, title: str = "") -> Figure:
    """Heatmaps of the sensitivity scores (when the method used any) and the allocated ranks."""
    panels = ([("sensitivity score", scores, "viridis", "{:.2g}")] if scores else []) + [
        ("allocated rank", ranks, "magma", "{:.0f}")]
    layers, kinds, _ = layer_grid(ranks)
    width, height = max(3.6, 1.6 + 0.55 * len(kinds)), max(2.8, 1.6 + 0.28 * len(layers))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, (label, values, cmap, fmt) in zip(axes[0], panels, strict=True):
        rows, cols, grid = layer_grid(values)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=10)
        if grid.size <= 400:  # numbers stay legible up to ~20 × 20 cells
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    r, g, b, _ = image.cmap(image.norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # dark cell: white text
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
        fig.colorbar(image, ax=ax, fraction=0.05)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def spectrum_figure(values: Mapping[str, Sequence[float]], n_modules: int = 4) -> Figure:
    """Singular values of ``W0·C`` (log scale) of ``n_modules`` modules spread from the first to the last."""
    names = pick_spread(list(values), n_modules)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in names:
        sigma = np.asarray(values[name], dtype=np.float64)
        ax.semilogy(np.arange(1, len(sigma) + 1), np.maximum(sigma, np.finfo(np.float64).tiny), marker=".",
                    label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("σᵢ of W0·C")
    ax.set_title(f"singular values, {len(names)} of {len(values)} modules", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_figure(log_history: Sequence[Mapping[str, Any]]) -> Figure:
    """Training loss per logging step, and eval loss where ``log_history`` has one."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        raise ValueError("log_history has no loss: set logging_steps at most max_steps")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points, style in (("train loss", train, "-"), ("eval loss", evals, "--")):
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, style, marker=".", label=label)
    return _finish(fig, ax, "loss", "training")


def loss_comparison_figure(series: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Training loss per step of several runs on one axis, one line per label."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        if points:
            steps, losses = zip(*sorted(points), strict=True)
            ax.plot(steps, losses, marker=".", label=label)
    return _finish(fig, ax, "train loss", "training loss by method and budget")


def _finish(fig: Figure, ax: Axes, ylabel: str, title: str) -> Figure:
    """The loss plots' shared frame: steps on x, a legend, a light grid."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig: Figure, folder: str | Path, name: str) -> Path:
    """Write ``fig`` as ``<folder>/plots/<name>.png`` and close it (figures are not garbage collected)."""
    out = Path(folder) / PLOTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    path.write_bytes(png_bytes(fig))
    return path


def png_bytes(fig: Figure) -> bytes:
    """``fig`` as PNG bytes (closed afterwards), for pages that embed their images."""
    buffer = io.BytesIO()
    try:
        # metadata without the Software/date keys: the same figure gives the same bytes, hence the same digest
        fig.savefig(buffer, dpi=DPI, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buffer.getvalue()


def pick_spread(names: list[str], n: int) -> list[str]:
    """At most ``n`` of ``names``, evenly spaced from the first to the last, in order."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if len(names) <= n:
        return list(names)
    return [names[i] for i in np.linspace(0, len(names) - 1, n).round().astype(int)]
