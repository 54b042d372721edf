"""The best learning rate against the batch size: a pure function of a long-form DataFrame.

Input: ``lrpipe.experiments.batch_size.scaling_table``'s rows, columns ``optimizer, kind,
label, batch_size, lr, lr_low, lr_high, at_edge``; ``kind`` is ``best`` (a measured best rate,
its tied range in lr_low..lr_high), ``fit``, ``linear rule`` or ``square-root rule`` (lines).
Every number drawn comes from the table; nothing here computes one, saves or logs.
"""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

COLUMNS = ("optimizer", "kind", "label", "batch_size", "lr", "lr_low", "lr_high", "at_edge")
# kind -> how its line is drawn; "best" is drawn as points with error bars.
LINE_STYLES = {
    "fit": {"color": "0.45", "ls": "-", "lw": 3.0, "alpha": 0.6},
    "linear rule": {"color": "tab:red", "ls": "--", "lw": 1.6},
    "square-root rule": {"color": "tab:blue", "ls": ":", "lw": 2.0},
}
KINDS = ("best", *LINE_STYLES)


def _check(df: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"df: missing columns {missing}; required: {', '.join(COLUMNS)} "
                         "(experiments.batch_size.scaling_table)")
    unknown = sorted(set(df["kind"]) - set(KINDS))
    if unknown:
        raise ValueError(f"df.kind: got {unknown}; allowed: {', '.join(KINDS)}")
    if df.empty:
        raise ValueError("df: no rows; required: at least one best rate")


def _log_axes(ax, sizes) -> None:
    """Base-2 batch axis labelled with the batch sizes themselves; decade rate axis with the
    2 and 5 in between labelled, as plain numbers (0.001, not 10^-3)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted(sizes)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def _draw_panel(ax, rows: pd.DataFrame) -> None:
    for kind, style in LINE_STYLES.items():
        line = rows[rows["kind"] == kind].sort_values("batch_size")
        if not line.empty:
            ax.plot(line["batch_size"], line["lr"], label=line["label"].iloc[0], **style)
    best = rows[rows["kind"] == "best"].sort_values("batch_size")
    if best.empty:
        return
    err = np.vstack([best["lr"] - best["lr_low"], best["lr_high"] - best["lr"]])
    ax.errorbar(best["batch_size"], best["lr"], yerr=err, fmt="o", color="black", ms=6,
                capsize=4, zorder=3, label=best["label"].iloc[0])
    edge = best[best["at_edge"].astype(bool)]
    if not edge.empty:
        ax.plot(edge["batch_size"], edge["lr"], "o", mfc="none", mec="crimson", ms=12, mew=1.8,
                zorder=4, label="best at the grid's edge")


def plot_best_rate_vs_batch_size(df: pd.DataFrame):
    """Best rate (tied range as error bars) against batch size on log-log axes, the fitted
    line and both scaling rules overlaid; one panel per optimizer, the legends below the
    panels, outside the data.

    Raises:
        ValueError: a column of ``COLUMNS`` is missing, a kind is unknown, or no rows.
    """
    _check(df)
    optimizers = sorted(df["optimizer"].unique())
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5.2 * len(optimizers), 5.2),
                             layout="constrained", squeeze=False)
    for ax, opt in zip(axes[0], optimizers, strict=True):
        rows = df[df["optimizer"] == opt]
        _draw_panel(ax, rows)
        _log_axes(ax, rows["batch_size"].unique())
        ax.set_title(opt)
        ax.set_xlabel("batch size (examples per update)")
        ax.set_ylabel("best learning rate (lowest mean val loss)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=1,
                  frameon=False)
    fig.suptitle("Best learning rate against batch size, log-log (same epochs at every size)")
    return fig
