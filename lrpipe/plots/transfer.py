"""Transfer-learning figures: pure functions of long-form fine-tuning histories.

Input: one row per (run, epoch) as ``experiments.transfer.run_strategies`` / ``run_grid`` build it:
columns ``strategy, seed, base_lr, head_mult, epoch, val_error`` (and train()'s others). Every
function returns a matplotlib Figure; none saves, shows or logs it. Means and bands are over
seeds; the numbers come from lrpipe.experiments.transfer's pure summaries, never from the plot.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from lrpipe.experiments.transfer import STRATEGIES, final_rows, grid_table  # noqa: E402


def _axes(ax, size=(7, 4.5)):
    if ax is None:
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        return fig, ax
    return ax.figure, ax


def _require(df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing or df.empty:
        raise ValueError(f"df: missing columns {missing} or no rows; allowed: a long-form "
                         f"history with {', '.join(columns)}")


def _seed_note(df: pd.DataFrame) -> str:
    return f"mean and 1 sd band over {df['seed'].nunique()} seed(s)"


def plot_strategy_curves(df: pd.DataFrame, ax=None):
    """Target validation error against epoch, one line per strategy (mean, 1 sd band)."""
    _require(df, ("strategy", "seed", "epoch", "val_error"))
    fig, ax = _axes(ax)
    order = [s for s in STRATEGIES if s in set(df["strategy"])]
    order += sorted(set(df["strategy"]) - set(order))
    sns.lineplot(data=df, x="epoch", y="val_error", hue="strategy", hue_order=order,
                 style="strategy", style_order=order, errorbar="sd", markers=True,
                 dashes=True, ax=ax)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("target validation error")
    ax.set_title(f"Fine-tuning strategies: {_seed_note(df)}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def plot_head_mult(df: pd.DataFrame, ax=None):
    """Final target validation error against the head's multiplier (log x), one line per
    base rate, mean over seeds with a 1 sd band and each seed's final error as a dot."""
    _require(df, ("base_lr", "head_mult", "seed", "epoch", "val_error"))
    fig, ax = _axes(ax)
    last = final_rows(df, ["base_lr", "head_mult"])
    last = last.assign(base_rate=last["base_lr"].map(lambda v: f"{v:g}"))
    # Colours and legend by rate, not by row order (runs that diverged early come first).
    rates = [f"{v:g}" for v in sorted(last["base_lr"].unique())]
    sns.lineplot(data=last, x="head_mult", y="val_error", hue="base_rate", hue_order=rates,
                 errorbar="sd", marker="o", ax=ax)
    sns.scatterplot(data=last, x="head_mult", y="val_error", hue="base_rate", hue_order=rates,
                    alpha=0.4, legend=False, ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("head learning-rate multiplier (x base rate)")
    ax.set_ylabel("final target validation error")
    ax.set_title(f"Head multiplier: {_seed_note(last)}")
    ax.legend(title="base rate", fontsize=8)
    return fig


def plot_grid_heatmap(df: pd.DataFrame, ax=None):
    """Heatmap of the mean final target validation error, base rate x head multiplier,
    each cell annotated; cells never run are blank."""
    _require(df, ("base_lr", "head_mult", "seed", "epoch", "val_error"))
    table = grid_table(df)
    fig, ax = _axes(ax, size=(1.3 * table.shape[1] + 2.5, 0.7 * table.shape[0] + 1.8))
    sns.heatmap(table, annot=True, fmt=".3f", cmap="viridis_r", cbar_kws={"label": "error"},
                xticklabels=[f"{v:g}" for v in table.columns],
                yticklabels=[f"{v:g}" for v in table.index], ax=ax)
    ax.set_xlabel("head multiplier (x base rate)")
    ax.set_ylabel("base learning rate")
    ax.set_title(f"Final target validation error, mean over {df['seed'].nunique()} seed(s)")
    return fig
