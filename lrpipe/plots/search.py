"""Figures of the learning-rate search, each a pure function of its tables.

``plot_x(tables, ax=None) -> Figure``: nothing is computed here that a reader would need as a
number (suggestions, bands and regrets come in their tables), nothing is saved or shown. With
no ``ax`` a new ``matplotlib.figure.Figure`` is made without pyplot, so no global figure list
grows across a sweep; the caller persists it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

DIVERGED_COLOR = "tab:red"
TOP = 0.96  # axes fraction where diverged rates are marked


def _axes(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    return fig, fig.subplots()


def _mark_top(ax: Axes, lrs: Sequence[float], label: str) -> None:
    """An x at the top of the axes above each rate (x in data, y in axes coordinates)."""
    if len(lrs) == 0:
        return
    top = blended_transform_factory(ax.transData, ax.transAxes)
    ax.scatter(lrs, np.full(len(lrs), TOP), marker="x", s=60, color=DIVERGED_COLOR,
               transform=top, label=label, zorder=3, clip_on=False)


def _log_xlim(ax: Axes, lrs: pd.Series) -> None:
    # Marks drawn in axes coordinates do not widen the data limits: set them from every rate.
    lrs = lrs[np.isfinite(lrs) & (lrs > 0)]
    ax.set_xscale("log")
    if len(lrs):
        ax.set_xlim(lrs.min() / 1.5, lrs.max() * 1.5)


def plot_range_test(
    df: pd.DataFrame, bands: Mapping[str, Sequence[float | None]], ax: Axes | None = None
) -> Figure:
    """Smoothed loss against rate (log x), one line per seed, and each rule's band.

    Args:
        df: ``range_test_seeds`` output: seed, lr, smoothed, stop_reason.
        bands: rule -> (median, lo, hi, ...) (``suggest_band`` output fits): a dashed line at
            the median and a shaded lo..hi band; a rule with a None median is listed as such.
    The last point of each seed is marked: x if it stopped on divergence or a non-finite loss,
    o if it completed the ramp.
    """
    fig, ax = _axes(ax)
    data = df.assign(seed=df["seed"].astype(str))
    sns.lineplot(data=data, x="lr", y="smoothed", hue="seed", estimator=None, ax=ax,
                 palette="Greys_d", linewidth=1.2)
    last = data.groupby("seed").tail(1)
    stopped = last[last["stop_reason"] != "completed"]
    done = last[last["stop_reason"] == "completed"]
    if len(stopped):
        ax.scatter(stopped["lr"], stopped["smoothed"], marker="x", s=60, color=DIVERGED_COLOR,
                   zorder=3, label="stopped: " + ", ".join(sorted(set(stopped["stop_reason"]))))
    if len(done):
        ax.scatter(done["lr"], done["smoothed"], marker="o", color="black", zorder=3,
                   label="completed")
    for color, (rule, band) in zip(sns.color_palette("tab10"), bands.items(), strict=False):
        median, lo, hi = band[0], band[1], band[2]
        if median is None:
            ax.plot([], [], color=color, linestyle="--", label=f"{rule}: no suggestion")
            continue
        ax.axvspan(lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.axvline(median, color=color, linestyle="--", label=f"{rule}: {median:.3g}")
    _log_xlim(ax, data["lr"])
    ax.set(xlabel="learning rate (log)", ylabel="smoothed training loss",
           title="LR range test (median and min..max over seeds)")
    ax.legend(fontsize="small")
    return fig


def plot_halving(ladder: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Final train loss of each stable rung against its rate; diverged rungs as x at the top.

    Args:
        ladder: ``HalvingResult.ladder``: lr, loss, diverged.
    """
    fig, ax = _axes(ax)
    diverged = ladder["diverged"].astype(bool)
    stable = ladder[~diverged].sort_values("lr")
    ax.plot(stable["lr"], stable["loss"], marker="o", color="tab:blue", label="stable rung")
    _mark_top(ax, ladder.loc[diverged, "lr"].to_numpy(), "diverged rung")
    _log_xlim(ax, ladder["lr"])
    ax.set(xlabel="learning rate (log)", ylabel="train loss after the budget",
           title="Halving search")
    ax.legend(fontsize="small")
    return fig


def plot_regret(
    results: pd.DataFrame, regret_df: pd.DataFrame, ax: Axes | None = None
) -> Figure:
    """Full-training val loss of the grid against rate, with the candidates marked.

    Args:
        results: one row per run: lr, val_loss, status; the line is the mean over runs of a
            rate with a min..max band; rates with a diverged run are x at the top.
        regret_df: ``regret_table`` output: each candidate drawn at (lr, val_loss), labelled with
            its regret, and the grid's best rate as a star.
    """
    fig, ax = _axes(ax)
    ok = results["status"] == "ok"
    bad = results.loc[~ok, "lr"].unique()
    sns.lineplot(data=results[ok & ~results["lr"].isin(bad)], x="lr", y="val_loss", marker="o",
                 errorbar=("pi", 100), color="grey", ax=ax, label="grid")
    _mark_top(ax, bad, "diverged")
    palette = sns.color_palette("tab10")
    for color, row in zip(palette, regret_df.itertuples(index=False), strict=False):
        ax.axvline(row.lr, color=color, linestyle=":", linewidth=1)
        if np.isfinite(row.val_loss):
            ax.scatter([row.lr], [row.val_loss], color=color, s=50, zorder=4,
                       label=f"{row.name} {row.lr:.3g} (regret {row.regret:+.1%})")
        else:
            ax.plot([], [], color=color, linestyle=":", label=f"{row.name} {row.lr:.3g} diverged")
    if len(regret_df):
        best = regret_df.iloc[0]
        # Hollow, so a candidate at the best rate still shows through.
        ax.scatter([best["best_lr"]], [best["best_val_loss"]], marker="*", s=260,
                   facecolor="none", edgecolor="black", zorder=5,
                   label=f"grid best {best['best_lr']:.3g}")
    _log_xlim(ax, pd.concat([results["lr"], regret_df["lr"]]))
    ax.set(xlabel="learning rate (log)", ylabel="validation loss after full training",
           title="Candidates against the grid")
    ax.legend(fontsize="small")
    return fig
