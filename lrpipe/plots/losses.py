"""Cross-entropy against squared error at their own searched rates: a pure function of
``lrpipe.experiments.losses.curves``'s table (loss, lr, epoch, val_error_mean/min/max,
val_loss_mean/min/max). Every number drawn comes from it; nothing here computes, saves or logs.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLUMNS = ("loss", "lr", "epoch", *(f"{m}_{s}" for m in ("val_error", "val_loss")
                                    for s in ("mean", "min", "max")))
COLORS = {"cross_entropy": "tab:blue", "mse": "tab:orange"}
LABELS = {"val_error": "validation error", "val_loss": "validation cross-entropy"}


def plot_loss_comparison(curves: pd.DataFrame) -> Figure:
    """Validation error and validation cross-entropy against epoch, one line per training loss
    (mean over seeds, band = min..max), each labelled with its searched rate.

    Raises:
        ValueError: a column of ``COLUMNS`` is missing, or no rows.
    """
    missing = [c for c in COLUMNS if c not in curves.columns]
    if missing:
        raise ValueError(f"curves: missing columns {missing}; required: {', '.join(COLUMNS)} "
                         "(experiments.losses.curves)")
    if curves.empty:
        raise ValueError("curves: no rows; required: at least one epoch of one loss")
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    rates = []
    for ax, metric in zip(fig.subplots(1, 2), LABELS, strict=True):
        for (loss, lr), rows in curves.groupby(["loss", "lr"], sort=True):
            rows = rows.sort_values("epoch")
            color = COLORS.get(loss, "0.3")
            ax.plot(rows["epoch"], rows[f"{metric}_mean"], color=color,
                    label=f"{loss}, lr={lr:.3g}")
            ax.fill_between(rows["epoch"], rows[f"{metric}_min"], rows[f"{metric}_max"],
                            color=color, alpha=0.2)
            if metric == "val_error":
                rates.append(f"{loss} {lr:.3g}")
        ax.set(xlabel="epoch", ylabel=LABELS[metric],
               title=f"{LABELS[metric]}: mean, band = min..max over seeds")
        ax.legend(title="training loss, searched rate", fontsize="small")
    fig.suptitle("Training loss compared, each at its own searched rate (" + ", ".join(rates)
                 + ")")
    return fig
