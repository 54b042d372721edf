"""Dropout against the train/validation gap: pure functions of the analysis's tables.

Inputs are ``lrpipe.experiments.dropout``'s tables: ``gap_curves`` (dropout, epoch, gap_mean,
gap_min, gap_max), ``rate_summary`` (dropout, lr, val_loss_mean/min/max, ...) and
``best_rates`` (dropout, best_lr, val_loss_mean). Every number drawn comes from them; nothing
here computes one, saves or logs.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lrpipe.experiments.dropout import arm_label  # noqa: E402

CURVE_COLUMNS = ("dropout", "epoch", "gap_mean", "gap_min", "gap_max")
RATE_COLUMNS = ("dropout", "lr", "val_loss_mean", "val_loss_min", "val_loss_max")
BEST_COLUMNS = ("dropout", "best_lr", "val_loss_mean")
COLORS = ("tab:red", "tab:blue")  # no dropout, dropout


def _check(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; required: {', '.join(columns)} "
                         "(experiments.dropout)")
    if df.empty:
        raise ValueError(f"{what}: no rows; required: at least one")


def arm_color(p: float) -> str:
    return COLORS[0] if p == 0 else COLORS[1]


def plot_gap(curves: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Validation minus training loss against epoch, one line per arm (mean over seeds) with
    its min..max band."""
    _check(curves, CURVE_COLUMNS, "curves")
    fig = ax.figure if ax is not None else Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = ax if ax is not None else fig.subplots()
    for p, rows in curves.groupby("dropout", sort=True):
        color = arm_color(p)
        rows = rows.sort_values("epoch")
        ax.plot(rows["epoch"], rows["gap_mean"], color=color, label=arm_label(p))
        ax.fill_between(rows["epoch"], rows["gap_min"], rows["gap_max"], color=color, alpha=0.2)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set(xlabel="epoch", ylabel="val loss - train loss (eval mode)",
           title="Gap at the chosen rate: mean, band = min..max over seeds")
    ax.legend(fontsize="small")
    return fig


def plot_rate_choice(rates: pd.DataFrame, best: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Final validation loss against rate per arm (mean, min..max bars), each arm's best rate
    ringed."""
    _check(rates, RATE_COLUMNS, "rates")
    _check(best, BEST_COLUMNS, "best")
    fig = ax.figure if ax is not None else Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = ax if ax is not None else fig.subplots()
    for p, rows in rates.groupby("dropout", sort=True):
        color = arm_color(p)
        rows = rows.sort_values("lr")
        err = [rows["val_loss_mean"] - rows["val_loss_min"],
               rows["val_loss_max"] - rows["val_loss_mean"]]
        ax.errorbar(rows["lr"], rows["val_loss_mean"], yerr=err, color=color, marker="o",
                    capsize=4, label=arm_label(p))
        mark = best[best["dropout"] == p]
        ax.plot(mark["best_lr"], mark["val_loss_mean"], "o", mfc="none", mec=color, ms=14,
                mew=2.0, label=f"best rate, {arm_label(p)}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set(xlabel="learning rate", ylabel="final validation loss",
           title="Best rate per arm: mean, bars = min..max over seeds")
    ax.legend(fontsize="small")
    return fig


def plot_dropout(curves: pd.DataFrame, rates: pd.DataFrame, best: pd.DataFrame) -> Figure:
    """The gap panel and the best-rate panel side by side."""
    fig = Figure(figsize=(12.0, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_gap(curves, ax=left)
    plot_rate_choice(rates, best, ax=right)
    fig.suptitle("Dropout against the train/validation gap")
    return fig
