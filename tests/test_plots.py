"""Sweep and search figures: what a reader must see, checked on the artists drawn."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb

from lrpipe.plots import search
from lrpipe.plots import sweep as plots


def _history(statuses=(("ok", 4), ("ok", 4), ("diverged", 2))):
    rows = []
    for lr, (status, epochs) in zip((0.01, 0.1, 10.0), statuses, strict=True):
        for e in range(epochs):
            rows.append(dict(lr=lr, epoch=e, train_loss=2 / (1 + e * lr * 10),
                             val_loss=2.1 / (1 + e * lr * 9), train_error=0.5 / (1 + e),
                             val_error=0.55 / (1 + e), status=status))
    return pd.DataFrame(rows)


def _inside(fig, ax, artist) -> bool:
    fig.canvas.draw()
    box, axbox = artist.get_window_extent(), ax.get_window_extent()
    return box.x0 < axbox.x1 and box.x1 > axbox.x0 and box.y0 < axbox.y1 and box.y1 > axbox.y0


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
    ends = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(ends) == 1 and list(ends[0].get_xdata()) == [1]  # its last finite epoch


def test_neighbouring_rates_get_distinct_colours():
    for n, least in ((3, 0.25), (8, 0.25), (12, 0.15)):
        colors = list(plots.lr_palette(np.logspace(-4, 0, n)).values())
        gaps = [np.linalg.norm(np.subtract(to_rgb(a), to_rgb(b)))
                for a, b in zip(colors, colors[1:], strict=False)]
        assert min(gaps) >= least, (n, min(gaps))  # viridis gave 0.13 at 8, 0.08 at 12


def test_loss_axis_has_readable_ticks_and_legend_outside():
    fig = plots.plot_learning_curves(_history(), "loss")
    ax = fig.axes[0]
    fig.canvas.draw()
    low, high = ax.get_ylim()
    shown = [t for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1]
             <= high]
    assert len(shown) >= 3  # the old axis showed a single "1.00"
    assert not _inside(fig, ax, ax.get_legend())


@pytest.mark.parametrize("name", ["loss_vs_epoch", "error_vs_epoch", "gap_vs_epoch"])
def test_epoch_ticks_are_integers(name):
    fig = plots.sweep_figures(_history())[name]
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_chosen_rate_is_thick_and_named():
    fig = plots.plot_learning_curves(_history(), "loss", chosen_lr=0.1)
    ax = fig.axes[0]
    widths = {line.get_linewidth() for line in ax.lines if line.get_linestyle() == "-"}
    assert max(widths) > 2 * min(widths)
    assert "lr=0.1 (chosen)" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="chosen_lr: got 0.5; allowed: None or one of"):
        plots.plot_learning_curves(_history(), "loss", chosen_lr=0.5)


def test_no_progress_run_has_its_own_marker_and_legend_entry():
    df = _history((("no_progress", 2), ("ok", 4), ("diverged", 2)))
    ax = plots.plot_learning_curves(df, "loss").axes[0]
    squares = [line for line in ax.lines if line.get_marker() == "s"]
    assert len(squares) == 1 and list(squares[0].get_xdata()) == [1]
    assert "stopped: no progress" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="df.status: got \\['weird'\\]; allowed: ok, diverged"):
        plots.plot_learning_curves(df.assign(status="weird"), "loss")


def test_step_table_is_drawn_faintly_in_the_rate_colour():
    steps = pd.DataFrame({"lr": 0.1, "step": range(8), "epoch": np.arange(8) / 2,
                          "train_loss_smooth": np.linspace(2, 1, 8)})
    ax = plots.plot_learning_curves(_history(), "loss", steps=steps).axes[0]
    faint = [line for line in ax.lines if line.get_alpha() == plots.STEP_ALPHA]
    assert len(faint) == 1 and list(faint[0].get_xdata()) == list(np.arange(8) / 2)
    train = [line for line in ax.lines if line.get_linestyle() == "-" and
             line.get_alpha() is None and to_rgb(line.get_color()) == to_rgb(faint[0].get_color())]
    assert len(train) == 1  # the per-epoch train curve of the same rate
    with pytest.raises(ValueError, match="steps: missing columns \\['train_loss_smooth'\\]"):
        plots.plot_learning_curves(_history(), "loss", steps=steps.drop(columns=[
            "train_loss_smooth"]))


def test_final_vs_lr_has_no_twin_axis_and_marks_divergence_and_best():
    fig = plots.plot_final_vs_lr(_history())
    loss, error = fig.axes
    assert loss.get_xscale() == "log" and loss.get_shared_x_axes().joined(loss, error)
    assert "best lr=0.1" in [t.get_text() for t in loss.texts]
    for ax in (loss, error):
        assert "diverged (at the top)" in [t.get_text() for t in ax.get_legend().get_texts()]
        assert not _inside(fig, ax, ax.get_legend())


def test_final_by_lr_takes_the_last_finite_epoch():
    df = _history()
    df.loc[(df["lr"] == 10.0) & (df["epoch"] == 1), ["val_loss", "train_loss"]] = np.nan
    final = plots.final_by_lr(df)
    assert list(final["lr"]) == [0.01, 0.1, 10.0]
    assert list(final["epoch"]) == [3, 3, 0]


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="allowed: loss, error"):
        plots.plot_learning_curves(_history(), "accuracy")


def test_sweep_figures_are_all_built():
    figs = plots.sweep_figures(_history(), chosen_lr=0.01)
    assert set(figs) == {"loss_vs_epoch", "error_vs_epoch", "final_vs_lr", "gap_vs_epoch"}


# --- the range test ---

def _range_df():
    """Three seeds: a 2.3 -> 1.8 descent, then a climb to 11 where seeds 0 and 1 diverge."""
    lrs = np.logspace(-5, 1, 60)
    frames = []
    for seed in (0, 1, 2):
        x = np.log10(lrs)
        loss = 2.3 - 0.5 / (1 + np.exp(-(x + 2 + 0.1 * seed) * 3))
        n = 60 if seed == 2 else 52 + seed
        if seed < 2:
            loss[n - 4:n] = np.linspace(2.0, 11.0, 4)
        frames.append(pd.DataFrame({"seed": seed, "step": range(n), "lr": lrs[:n],
                                    "smoothed": loss[:n] + 0.01 * seed,
                                    "stop_reason": "diverged" if seed < 2 else "completed"}))
    return pd.concat(frames, ignore_index=True)


BANDS = {"steepest": (0.008, 0.006, 0.01), "valley": (0.02, 0.015, 0.03),
         "min_over_10": (0.05, 0.04, 0.07), "halving": (0.04, 0.02, 0.08)}


def test_range_test_draws_a_median_with_a_min_max_band():
    fig = search.plot_range_test(_range_df(), BANDS)
    ax = fig.axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1 and bands[0].get_label() == "min..max over 3 seeds"
    median = [line for line in ax.lines if line.get_label() == "median"]
    assert len(median) == 1
    assert "median and min..max over 3 seeds" in ax.get_title()


def test_range_test_clips_the_spike_and_marks_it_at_the_top():
    ax = search.plot_range_test(_range_df(), BANDS).axes[0]
    low, high = ax.get_ylim()
    assert low < 1.8 and 2.3 < high < 2.5  # the descent fills the axis, not the spike to 11
    stops = [c for c in ax.collections if c.get_label().startswith("stopped: diverged")]
    assert len(stops) == 1 and len(stops[0].get_offsets()) == 2
    assert any("11" in t.get_text() and "off the top" in t.get_text() for t in ax.texts)


def test_suggestions_are_labelled_points_on_the_curve_in_distinct_colours():
    ax = search.plot_range_test(_range_df(), BANDS).axes[0]
    points = {c.get_label().split(":")[0]: c for c in ax.collections
              if c.get_label().split(":")[0] in BANDS}
    assert set(points) == set(BANDS)
    colors = [tuple(c.get_facecolor()[0][:3]) for c in points.values()]
    diverged = to_rgb(search.DIVERGED_COLOR)
    assert len(set(colors)) == len(BANDS) and diverged not in colors
    assert all(np.linalg.norm(np.subtract(c, to_rgb("tab:red"))) > 0.1 for c in colors)
    median = next(line for line in ax.lines if line.get_label() == "median")
    for rule, (lr, *_rest) in BANDS.items():
        x, y = points[rule].get_offsets()[0]
        on_curve = np.interp(np.log10(lr), np.log10(median.get_xdata()), median.get_ydata())
        assert x == pytest.approx(lr) and y == pytest.approx(on_curve)
    labels = {t.get_text() for t in ax.texts}
    assert {"steepest 0.008", "valley 0.02", "min_over_10 0.05", "halving 0.04"} <= labels


def test_range_test_legend_is_outside_and_search_colours_match_regret():
    fig = search.plot_range_test(_range_df(), BANDS)
    assert not _inside(fig, fig.axes[0], fig.axes[0].get_legend())
    assert search.rule_colors(list(BANDS))["min_over_10"] != "tab:red"
