"""Figures for the decay comparison: pure functions of DataFrames, returning a Figure.

Each ``plot_x(df, ax=None)`` draws on ``ax`` (or a new Figure) and returns the Figure; no
savefig, show or logging inside: the caller persists. Numbers shown come from the named pure
functions of ``lrpipe.experiments.decay`` (bands, gap-growth epoch), never from ad hoc math here.
Figures are built without pyplot, so they are safe to make on worker threads.
"""

from __future__ import annotations

import math

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lrpipe.experiments.decay import gap_growth_epoch, metric_bands, require_columns

BANDS = ("range", "std")


def _axes(ax: Axes | None, size: tuple[float, float] = (7.0, 4.5)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _decay_label(name: str, decay: float) -> str:
    return f"{name} (val-loss driven)" if math.isnan(decay) else f"{name} ({decay:.3g}x)"


def plot_schedules(preview_df: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Rate against epoch for every schedule, log y; the legend gives each one's total decay.

    Args:
        preview_df: ``decay.schedule_previews`` output: schedule, epoch, lr, total_decay
            (NaN = depends on validation loss, as for plateau, drawn at its upper bound).
    """
    require_columns(preview_df, ("schedule", "epoch", "lr", "total_decay"), "preview_df")
    fig, ax = _axes(ax)
    labels = {name: _decay_label(name, float(group["total_decay"].iloc[0]))
              for name, group in preview_df.groupby("schedule", sort=False)}
    data = preview_df.assign(label=preview_df["schedule"].map(labels))
    sns.lineplot(data=data, x="epoch", y="lr", hue="label", estimator=None, ax=ax)
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="learning rate", title="Schedules (legend: peak/last decay)")
    ax.legend(title="schedule", fontsize="small")
    return fig


def plot_metric_band(df: pd.DataFrame, metric: str = "val_loss", ax: Axes | None = None,
                     band: str = "range") -> Figure:
    """Mean of ``metric`` over seeds against epoch per schedule, with a shaded band.

    Args:
        df: long-form runs (schedule, seed, epoch, metric).
        band: "range" shades min..max over seeds; "std" shades mean +- one std. The title says
            which.
    """
    if band not in BANDS:
        raise ValueError(f"band: got {band!r}; allowed: {', '.join(BANDS)}")
    stats = metric_bands(df, metric)
    low, high = (stats["min"], stats["max"]) if band == "range" else (
        stats["mean"] - stats["std"].fillna(0.0), stats["mean"] + stats["std"].fillna(0.0))
    stats = stats.assign(low=low, high=high)
    fig, ax = _axes(ax)
    palette = sns.color_palette(n_colors=stats["schedule"].nunique())
    for color, (name, rows) in zip(palette, stats.groupby("schedule", sort=False), strict=True):
        ax.plot(rows["epoch"], rows["mean"], color=color, label=name)
        ax.fill_between(rows["epoch"], rows["low"], rows["high"], color=color, alpha=0.2)
    what = "min..max" if band == "range" else "+-1 std"
    ax.set(xlabel="epoch", ylabel=metric,
           title=f"{metric}: mean over seeds, band = {what} over seeds")
    ax.legend(title="schedule", fontsize="small")
    return fig


def plot_final_errors(summary: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Mean final validation error per schedule (rank order), error bars = min..max over seeds.

    Args:
        summary: ``decay.summarize_runs`` output.
    """
    cols = ("schedule", "rank", "final_val_error_mean", "final_val_error_min",
            "final_val_error_max")
    require_columns(summary, cols, "summary")
    rows = summary.sort_values("rank")
    fig, ax = _axes(ax)
    sns.barplot(data=rows, x="schedule", y="final_val_error_mean", order=rows["schedule"],
                hue="schedule", legend=False, ax=ax)
    below = rows["final_val_error_mean"] - rows["final_val_error_min"]
    above = rows["final_val_error_max"] - rows["final_val_error_mean"]
    ax.errorbar(range(len(rows)), rows["final_val_error_mean"], yerr=[below, above],
                fmt="none", ecolor="black", capsize=4)
    ax.set(xlabel="schedule (ranked by final val loss)", ylabel="final val error",
           title="Final validation error: mean, bars = min..max over seeds")
    ax.tick_params(axis="x", labelrotation=30)
    return fig


def plot_gap(history: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Train and validation loss against epoch, the gap shaded, ``gap_growth_epoch`` marked.

    Args:
        history: one run's rows (epoch, train_loss, val_loss).
    """
    require_columns(history, ("epoch", "train_loss", "val_loss"), "history")
    rows = history.sort_values("epoch")
    growth = gap_growth_epoch(rows)
    fig, ax = _axes(ax)
    ax.plot(rows["epoch"], rows["train_loss"], label="train loss (eval mode)")
    ax.plot(rows["epoch"], rows["val_loss"], label="val loss")
    ax.fill_between(rows["epoch"], rows["train_loss"], rows["val_loss"], color="grey",
                    alpha=0.25, label="gap (val - train)")
    if growth is not None:
        ax.axvline(growth, color="red", linestyle="--", label=f"gap grows from epoch {growth}")
    ax.set(xlabel="epoch", ylabel="cross-entropy",
           title="Generalization gap" + ("" if growth is not None else " (no lasting growth)"))
    ax.legend(fontsize="small")
    return fig
