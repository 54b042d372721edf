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

DIVERGED_COLOR = "darkred"
TOP = 0.96  # axes fraction where diverged rates are marked
# One colour per rule, the same in every search figure; red is kept for divergence.
RULE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
               "tab:cyan", "tab:olive")
LABEL_ROW0, LABEL_ROW = 0.82, 0.075  # axes fractions: the first suggestion label, row step
HEADROOM = 0.12  # range test: y room above the start loss, as a fraction of the descent


def rule_colors(rules: Sequence[str]) -> dict[str, str]:
    """A colour per rule name, in the order given, never red (red marks divergence)."""
    return {rule: RULE_COLORS[i % len(RULE_COLORS)] for i, rule in enumerate(rules)}


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


def _legend_outside(ax: Axes) -> None:
    """The legend right of the axes, so it never covers a curve or a marker."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def seed_band(df: pd.DataFrame, column: str = "smoothed") -> pd.DataFrame:
    """Per rate of a multi-seed range test: median, min and max of ``column`` over the seeds
    that reached it (finite values only), and how many did. Columns lr, median, lo, hi, seeds.

    The seeds share the rate ramp (one rate per step), so rates line up across seeds.
    """
    finite = df[np.isfinite(df[column].astype(float))]
    stats = finite.groupby("lr", sort=True)[column].agg(["median", "min", "max", "count"])
    return stats.reset_index().rename(columns={"min": "lo", "max": "hi", "count": "seeds"})


def informative_ylim(band: pd.DataFrame) -> tuple[float, float]:
    """y limits that show the descent: from below the lowest loss to a little above the highest
    median before its minimum. The climb after it (divergence, a spike to 11
    above a 2.3 -> 1.8 descent) is cut off; the caller marks it at the top instead."""
    if band.empty:
        return 0.0, 1.0
    low = float(band["lo"].min())
    before = band.iloc[: int(np.argmin(band["median"].to_numpy())) + 1]
    high = float(before["median"].max())
    room = max(high - low, 1e-3 * max(abs(high), 1.0))
    return low - HEADROOM * room, high + HEADROOM * room


def _point_on(band: pd.DataFrame, lr: float) -> float:
    """The median curve's height at ``lr`` (linear in log rate): where a suggestion sits."""
    return float(np.interp(np.log10(lr), np.log10(band["lr"]), band["median"]))


def _draw_suggestions(ax: Axes, band: pd.DataFrame, bands: Mapping, ylim) -> None:
    """Each rule's median rate as a labelled point on the median curve, its min..max over seeds
    as a bar through it and a dashed drop line to the axis; labels staggered so none overlap."""
    colors = rule_colors(list(bands))
    found = sorted(((b[0], rule, b) for rule, b in bands.items() if b[0] is not None),
                   key=lambda t: t[0])
    for rule, b in bands.items():
        if b[0] is None:
            ax.plot([], [], color=colors[rule], linestyle="--", label=f"{rule}: no suggestion")
    for i, (median, rule, b) in enumerate(found):
        y, color = _point_on(band, median), colors[rule]
        ax.plot([median, median], [ylim[0], y], color=color, linestyle="--", linewidth=1,
                alpha=0.7)
        ax.plot([b[1], b[2]], [y, y], color=color, linewidth=3, alpha=0.5,
                solid_capstyle="butt")
        ax.scatter([median], [y], s=55, color=color, edgecolor="black", zorder=5,
                   label=f"{rule}: {median:.3g}")
        # Labels in rows from the top down, smallest rate highest, each with a leader to its
        # point: rows never overlap, and the descending curve stays below them.
        ax.annotate(f"{rule} {median:.3g}", (median, y), xycoords="data",
                    xytext=(median, LABEL_ROW0 - LABEL_ROW * i),
                    textcoords=blended_transform_factory(ax.transData, ax.transAxes),
                    fontsize=8, color=color, ha="left", va="bottom", fontweight="bold",
                    arrowprops=dict(arrowstyle="-", color=color, linewidth=0.8, shrinkA=0,
                                    shrinkB=4))


def _mark_stops(ax: Axes, data: pd.DataFrame, ylim) -> None:
    """Each seed's last point: a triangle at the top edge above the rate where a seed stopped
    (diverged or non-finite) with the loss it reached, a circle where it completed the ramp."""
    last = data.groupby("seed").tail(1)
    stopped = last[last["stop_reason"] != "completed"]
    done = last[last["stop_reason"] == "completed"]
    top = blended_transform_factory(ax.transData, ax.transAxes)
    if len(stopped):
        ax.scatter(stopped["lr"], np.full(len(stopped), TOP), marker="^", s=70,
                   color=DIVERGED_COLOR, transform=top, zorder=5, clip_on=False,
                   label="stopped: " + ", ".join(sorted(set(stopped["stop_reason"]))))
        peak = data.loc[data["seed"].isin(stopped["seed"]), "smoothed"].astype(float)
        peak = peak[np.isfinite(peak)].max()
        if np.isfinite(peak) and peak > ylim[1]:
            ax.annotate(f"loss climbs to {peak:.3g}, off the top", (stopped["lr"].min(), TOP),
                        xycoords=top, textcoords="offset points", xytext=(-6, -4),
                        ha="right", va="top", fontsize=8, color=DIVERGED_COLOR)
    if len(done):
        ys = np.clip(done["smoothed"].astype(float), ylim[0], ylim[1])
        ax.scatter(done["lr"], ys, marker="o", color="black", zorder=4, label="completed")


def plot_range_test(
    df: pd.DataFrame, bands: Mapping[str, Sequence[float | None]], ax: Axes | None = None
) -> Figure:
    """Smoothed loss against rate (log x): the median over seeds with a min..max band, the
    y axis cut to the informative range (start loss to minimum), and each rule's suggestion.

    Args:
        df: ``range_test_seeds`` output: seed, lr, smoothed, stop_reason.
        bands: rule -> (median, lo, hi, ...) (``suggest_band`` output fits): a labelled point
            on the median curve at the median rate, a bar over lo..hi and a dashed drop line;
            a rule with a None median is listed in the legend as such.
    Where a seed stopped on divergence or a non-finite loss a triangle marks its rate at the top
    edge (the climb is off the top, its peak written beside it); a seed that completed the ramp
    ends in a circle.
    """
    fig, ax = _axes(ax)
    band = seed_band(df)
    seeds = df["seed"].nunique()
    ax.fill_between(band["lr"], band["lo"], band["hi"], color="0.6", alpha=0.35, linewidth=0,
                    label=f"min..max over {seeds} seed{'s' if seeds != 1 else ''}")
    ax.plot(band["lr"], band["median"], color="black", linewidth=1.6, label="median")
    ylim = informative_ylim(band)
    _draw_suggestions(ax, band, bands, ylim)
    _mark_stops(ax, df, ylim)
    _log_xlim(ax, df["lr"])
    ax.set_ylim(*ylim)
    ax.set(xlabel="learning rate (log)", ylabel="smoothed training loss",
           title=f"LR range test: median and min..max over {seeds} seed"
                 f"{'s' if seeds != 1 else ''}")
    _legend_outside(ax)
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
    colors = rule_colors(list(dict.fromkeys(regret_df["name"])))
    for row in regret_df.itertuples(index=False):
        color = colors[row.name]
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
    _legend_outside(ax)
    return fig
