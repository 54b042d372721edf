"""Learning-rate sweep figures: pure functions of a long-form History DataFrame.

Input: one row per (run, epoch) with columns ``lr, epoch, train_loss, val_loss, train_error,
val_error, status`` (``status`` is ``ok`` or ``diverged`` for the whole run). Every function
returns a matplotlib Figure; none saves, shows or logs it. X axes are epochs, never iterations.
"""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

METRIC_LABELS = {"loss": "cross-entropy", "error": "classification error"}


def _axes(ax):
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        return fig, ax
    return ax.figure, ax


def lr_palette(lrs) -> dict[float, tuple]:
    """One colour per rate on a log scale: neighbouring rates get neighbouring colours."""
    lrs = sorted(set(float(x) for x in lrs))
    cmap = sns.color_palette("viridis", as_cmap=True)
    if len(lrs) == 1:
        return {lrs[0]: cmap(0.5)}
    norm = LogNorm(min(lrs), max(lrs))
    return {lr: cmap(0.9 * norm(lr)) for lr in lrs}


def plot_learning_curves(df: pd.DataFrame, metric: str = "loss", ax=None):
    """Train (solid) and validation (dashed) ``metric`` against epoch, one colour per rate.

    Diverged runs are drawn up to their last finite epoch, then a dotted line climbs to an x at
    the top of the axes at the epoch where the loss blew up (``diverged_epoch`` if given, else
    the epoch after the last finite one).
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"metric: got {metric!r}; allowed: {', '.join(METRIC_LABELS)}")
    fig, ax = _axes(ax)
    colors = lr_palette(df["lr"])
    diverged = []
    for lr, run in df.sort_values("epoch").groupby("lr"):
        color = colors[float(lr)]
        ax.plot(run["epoch"], run[f"train_{metric}"], "-", color=color, lw=1.6)
        ax.plot(run["epoch"], run[f"val_{metric}"], "--", color=color, lw=1.6)
        if (run["status"] == "diverged").any():
            last = run.iloc[-1]
            at = last.get("diverged_epoch")
            at = last["epoch"] + 1 if at is None or pd.isna(at) else at
            diverged.append((lr, color, last["epoch"], last[f"val_{metric}"], at))
    if metric == "loss":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    top = ax.get_ylim()[1]
    for i, (lr, color, epoch, value, at) in enumerate(diverged):
        ax.plot([epoch, at], [value, top], ":", color=color, lw=1.4)
        ax.plot(at, top, "x", color="crimson", ms=10, mew=2.5, clip_on=False)
        ax.annotate(f"lr={lr:g} diverged (epoch {at:g})", (at, top), textcoords="offset points",
                    xytext=(8, -12 - 11 * i), color="crimson", fontsize=8)
    ax.set_ylim(top=top)
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title(f"{METRIC_LABELS[metric]} against epoch, one colour per learning rate")
    handles = [Line2D([], [], color=c, lw=2, label=f"lr={lr:g}") for lr, c in colors.items()]
    handles += [Line2D([], [], color="grey", ls="-", label="train"),
                Line2D([], [], color="grey", ls="--", label="validation")]
    ax.legend(handles=handles, fontsize=8, ncol=2, loc="best")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def final_by_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Per rate: the last finite epoch's metrics, the best validation error, and the status."""
    last = df.sort_values("epoch").groupby("lr", as_index=False).tail(1)
    best = df.groupby("lr", as_index=False)["val_error"].min()
    best = best.rename(columns={"val_error": "best_val_error"})
    return last.merge(best, on="lr").sort_values("lr").reset_index(drop=True)


def plot_final_vs_lr(df: pd.DataFrame, ax=None):
    """Final validation loss and error against learning rate (log x); diverged rates marked."""
    fig, ax = _axes(ax)
    final = final_by_lr(df)
    ok = final[final["status"] == "ok"]
    ax.plot(ok["lr"], ok["val_loss"], "o-", color="tab:blue", label="validation loss")
    ax.plot(ok["lr"], ok["train_loss"], "o:", color="tab:blue", alpha=0.6, label="train loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final cross-entropy")
    bad = final[final["status"] != "ok"]
    top = ok["val_loss"].max() if len(ok) else 1.0
    for lr in bad["lr"]:
        ax.plot(lr, top, "x", color="crimson", ms=11, mew=2.5)
        ax.annotate("diverged", (lr, top), textcoords="offset points", xytext=(-18, 8),
                    color="crimson", fontsize=8)
    if len(ok):
        best = ok.loc[ok["val_loss"].idxmin()]
        ax.axvline(best["lr"], color="grey", ls=":", lw=1)
        ax.annotate(f"best lr={best['lr']:g}", (best["lr"], best["val_loss"]),
                    textcoords="offset points", xytext=(6, -14), fontsize=8)
    twin = ax.twinx()
    twin.plot(ok["lr"], ok["val_error"], "s--", color="tab:orange", label="validation error")
    twin.set_ylabel("final classification error", color="tab:orange")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="upper left")
    ax.set_title("where each learning rate ends up")
    return fig


def plot_gap(df: pd.DataFrame, ax=None):
    """Validation minus train loss against epoch, one colour per rate: the overfitting gap."""
    fig, ax = _axes(ax)
    colors = lr_palette(df["lr"])
    for lr, run in df.sort_values("epoch").groupby("lr"):
        gap = run["val_loss"] - run["train_loss"]
        ax.plot(run["epoch"], gap, "-", color=colors[float(lr)], label=f"lr={lr:g}")
        ax.fill_between(run["epoch"], 0, gap, color=colors[float(lr)], alpha=0.08)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation - train cross-entropy")
    ax.set_title("train/validation gap")
    ax.legend(fontsize=8, ncol=2)
    return fig


def sweep_figures(df: pd.DataFrame) -> dict[str, object]:
    """Every figure of a sweep by artifact name."""
    return {
        "loss_vs_epoch": plot_learning_curves(df, "loss"),
        "error_vs_epoch": plot_learning_curves(df, "error"),
        "final_vs_lr": plot_final_vs_lr(df),
        "gap_vs_epoch": plot_gap(df),
    }
