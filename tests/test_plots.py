import pandas as pd
import pytest

from lrpipe.plots import sweep as plots


def _history():
    rows = []
    for lr, status, epochs in [(0.01, "ok", 4), (0.1, "ok", 4), (10.0, "diverged", 2)]:
        for e in range(epochs):
            rows.append(dict(lr=lr, epoch=e, train_loss=2 / (1 + e * lr * 10),
                             val_loss=2.1 / (1 + e * lr * 9), train_error=0.5 / (1 + e),
                             val_error=0.55 / (1 + e), status=status))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("metric", ["loss", "error"])
def test_learning_curves_one_train_and_one_val_line_per_rate(metric):
    fig = plots.plot_learning_curves(_history(), metric)
    ax = fig.axes[0]
    solid = [line for line in ax.lines if line.get_linestyle() == "-"]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(solid) == 3 and len(dashed) == 3
    assert ax.get_xlabel() == "epoch"
    markers = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(markers) == 1  # the diverged rate is marked where it blew up
    assert list(markers[0].get_xdata()) == [2]  # last finite epoch 1, so epoch 2


def test_final_vs_lr_marks_divergence_and_best():
    fig = plots.plot_final_vs_lr(_history())
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    texts = [t.get_text() for t in ax.texts]
    assert "diverged" in texts and any(t.startswith("best lr=0.1") for t in texts)


def test_final_by_lr_takes_the_last_finite_epoch():
    final = plots.final_by_lr(_history())
    assert list(final["lr"]) == [0.01, 0.1, 10.0]
    assert list(final["epoch"]) == [3, 3, 1]


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="allowed: loss, error"):
        plots.plot_learning_curves(_history(), "accuracy")


def test_sweep_figures_are_all_built():
    figs = plots.sweep_figures(_history())
    assert set(figs) == {"loss_vs_epoch", "error_vs_epoch", "final_vs_lr", "gap_vs_epoch"}
