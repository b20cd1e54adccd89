"""Stage plots: the layer × kind grid puts each module in its cell; figures save as PNGs that decode."""


import matplotlib.image as mpimg
import numpy as np
import pytest

from flows import plots

NAMES = [f"model.layers.{i}.{part}" for i in (0, 1, 10) for part in ("self_attn.q_proj", "mlp.down_proj")]


def test_layer_grid_places_each_module_by_layer_number_and_kind():
    values = {name: float(k) for k, name in enumerate(NAMES)} | {"lm_head": 99.0}
    layers, kinds, grid = plots.layer_grid(values)
    assert layers == ["0", "1", "10", "-"]  # numeric order, not string order; unnumbered last
    assert kinds == ["q_proj", "down_proj", "lm_head"]
    for name, value in values.items():
        layer = name.split(".")[2] if name.startswith("model.") else "-"
        assert grid[layers.index(layer), kinds.index(name.rsplit(".", 1)[-1])] == value
    assert np.isnan(grid).sum() == grid.size - len(values)


def test_layer_grid_refuses_two_modules_in_one_cell():
    with pytest.raises(ValueError, match="two modules map to layer 0"):
        plots.layer_grid({"a.0.attn.q": 1.0, "b.0.mlp.q": 2.0})


def test_pick_spread_keeps_the_ends_and_order():
    names = [f"m{i}" for i in range(10)]
    assert plots.pick_spread(names, 4) == ["m0", "m3", "m6", "m9"]
    assert plots.pick_spread(names[:3], 4) == names[:3]
    with pytest.raises(ValueError):
        plots.pick_spread(names, 0)


@pytest.mark.parametrize("kind", ["allocation", "allocation-no-scores", "spectrum", "loss"])
def test_figures_save_as_decodable_pngs_under_plots(tmp_path, kind):
    ranks = {name: k % 3 for k, name in enumerate(NAMES)}
    if kind.startswith("allocation"):
        scores = None if kind.endswith("no-scores") else {n: 1e-3 * (k + 1) for k, n in enumerate(NAMES)}
        fig = plots.allocation_figure(ranks, scores, title="tlora")
        assert len(fig.axes) == (4 if scores else 2)  # a heatmap and its colorbar per panel
    elif kind == "spectrum":
        fig = plots.spectrum_figure({n: [10.0 / (i + 1) for i in range(8)] + [0.0] for n in NAMES}, n_modules=3)
        assert len(fig.axes[0].get_lines()) == 3
    else:
        history = [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 1.5},
                                                                      {"step": 3, "train_loss": 2.0}]
        fig = plots.loss_figure(history)
        lines = fig.axes[0].get_lines()
        assert [list(line.get_ydata()) for line in lines] == [[3.0, 1.5, 1.0], [1.5]]
    path = plots.save(fig, tmp_path, kind)
    assert path == tmp_path / "plots" / f"{kind}.png"
    image = mpimg.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0  # decodes, and is not blank


def test_loss_figure_without_any_loss_says_why():
    with pytest.raises(ValueError, match="no loss"):
        plots.loss_figure([{"step": 1, "train_runtime": 1.0}])
