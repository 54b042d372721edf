"""Update/weight ratio heatmaps: hand-made frames with known geometric means, the cells and
axes the figures draw, the colour scale centred on the 1e-3 rule of thumb, and a real run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import QuadMesh
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lrpipe.engine.train import train
from lrpipe.plots.ratios import (
    RULE_OF_THUMB,
    plot_update_ratio,
    plot_update_ratio_by_lr,
    ratio_layers,
    ratio_matrix,
)

torch.set_num_threads(1)


def sweep_frame() -> pd.DataFrame:
    """Three rates x two seeds x epochs 0..3; lr=1 diverged after epoch 2 (no epoch 3).

    fc1's ratio is lr x 1e-2 for seed 0 and lr x 1e-2 x 100 for seed 1 (geometric mean
    lr x 1e-1); head's is lr x 3e-3 for both seeds. Epoch 0 has no ratio (NaN), as in train().
    """
    rows = []
    for lr in (1.0, 0.01, 0.1):  # deliberately unsorted
        for seed in (0, 1):
            for epoch in range(4):
                if lr == 1.0 and epoch == 3:
                    continue
                fc1 = math.nan if epoch == 0 else lr * 1e-2 * (100 if seed else 1)
                head = math.nan if epoch == 0 else lr * 3e-3
                rows.append({"lr": lr, "seed": seed, "epoch": epoch, "val_loss": 1.0,
                             "ratio/fc1": fc1, "ratio/head": head})
    return pd.DataFrame(rows)


def _mesh(fig: Figure) -> QuadMesh:
    meshes = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    return meshes[0]


def test_ratio_matrix_geometric_means_by_hand():
    m = ratio_matrix(sweep_frame(), by="lr")
    assert list(m.index) == [(0.01, "fc1"), (0.01, "head"), (0.1, "fc1"), (0.1, "head"),
                             (1.0, "fc1"), (1.0, "head")]
    assert list(m.columns) == [1, 2, 3]  # epoch 0 has no ratio: no column
    assert m.loc[(0.1, "fc1"), 1] == pytest.approx(0.1 * 1e-1)  # sqrt(1e-3 * 1e-1)
    assert m.loc[(0.01, "head"), 2] == pytest.approx(0.01 * 3e-3)
    assert np.isnan(m.loc[(1.0, "fc1"), 3])  # the diverged rate never reached epoch 3
    one = ratio_matrix(sweep_frame()[lambda d: d["lr"] == 0.1])
    assert list(one.index) == ["fc1", "head"]
    assert one.loc["head", 3] == pytest.approx(3e-4)


def test_groups_keep_their_order_of_appearance_when_not_numeric():
    df = sweep_frame().assign(optimizer=lambda d: d["lr"].map(
        {1.0: "sgd", 0.01: "adam", 0.1: "rprop"}))
    m = ratio_matrix(df, by="optimizer")
    assert list(m.index.get_level_values(0)[::2]) == ["sgd", "adam", "rprop"]


def test_plot_update_ratio_cells_axes_and_scale():
    df = sweep_frame()[lambda d: d["lr"] == 0.1]
    fig = plot_update_ratio(df)
    ax = fig.axes[0]
    values = np.ma.filled(_mesh(fig).get_array(), np.nan).reshape(2, 3)
    np.testing.assert_allclose(values, [[1e-2] * 3, [3e-4] * 3])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fc1", "head"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert ax.get_xlabel() == "epoch" and "1e-3" in ax.get_title()
    norm = _mesh(fig).norm  # log scale, symmetric about 1e-3, whole decades
    assert isinstance(norm, LogNorm)
    assert norm.vmin * norm.vmax == pytest.approx(RULE_OF_THUMB**2)
    assert norm.vmax == pytest.approx(1e-2)  # the farthest cell is 1 decade above 1e-3
    colorbar_lines = fig.axes[1].lines
    assert [line.get_ydata()[0] for line in colorbar_lines] == [RULE_OF_THUMB]
    labels = sorted({t.get_text() for t in ax.texts})
    assert labels == ["1e-2", "3e-4"]


def test_plot_update_ratio_by_lr_has_one_block_per_rate():
    fig = plot_update_ratio_by_lr(sweep_frame())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "lr=0.01  fc1", "lr=0.01  head", "lr=0.1  fc1", "lr=0.1  head", "lr=1  fc1",
        "lr=1  head"]
    values = np.ma.filled(_mesh(fig).get_array(), np.nan).reshape(6, 3)
    assert np.isnan(values[4:, 2]).all() and np.isfinite(values[:, :2]).all()
    separators = [line.get_ydata()[0] for line in ax.lines]
    assert separators == [2, 4]  # between the rate blocks
    assert values[4, 0] > RULE_OF_THUMB > values[1, 0]  # lr=1 fc1 too high, lr=0.01 head low


def test_draws_on_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_update_ratio(sweep_frame(), ax=ax, by="lr") is fig


def test_bad_frames_are_refused_naming_the_columns():
    with pytest.raises(ValueError, match="ratio/<layer>"):
        ratio_layers(pd.DataFrame({"epoch": [1], "val_loss": [0.5]}))
    with pytest.raises(ValueError, match="lr"):
        plot_update_ratio_by_lr(sweep_frame().drop(columns="lr"))
    with pytest.raises(ValueError, match="by"):
        ratio_matrix(sweep_frame(), by="optimizer")
    with pytest.raises(ValueError, match="no finite"):
        ratio_matrix(sweep_frame()[lambda d: d["epoch"] == 0])


def test_a_real_run_has_a_ratio_per_layer_and_epoch(digits_cfg):
    history = train(digits_cfg).history.assign(lr=digits_cfg.optim.lr)
    assert ratio_layers(history) == ["fc1", "head"]
    m = ratio_matrix(history, by="lr")
    assert m.shape == (2, digits_cfg.epochs) and (m.to_numpy() > 0).all()
    fig = plot_update_ratio_by_lr(history)
    assert np.isfinite(np.ma.filled(_mesh(fig).get_array(), np.nan)).all()
