"""Update-to-weight ratio heatmaps: is each layer's rate too high, too low, or about right?

Input: History rows (``train()``'s columns) with ``epoch`` and one ``ratio/<layer>`` column per
layer, the mean ||update|| / ||weight|| of that layer over the sampled steps of the epoch
(epoch 0, before any update, has none). Several runs of one group (seeds) are averaged in log
space, since the ratio lives on a log scale. The cs231n rule of thumb
(https://cs231n.github.io/neural-networks-3/#ratio): about 1e-3 is healthy, far above means the
rate is too high, far below too low. The colours diverge around 1e-3 on a log scale: white is
the rule of thumb, red too high, blue too low, grey no data (a run that diverged earlier).

Plots are pure: ``plot_x(df, ax=None) -> Figure``; no savefig, show or logging. Built without
pyplot, so they are safe to make on worker threads.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

RULE_OF_THUMB = 1e-3  # ||update|| / ||weight|| per step (cs231n)
PREFIX = "ratio/"
MAX_ANNOTATED_CELLS = 300  # above this the numbers in the cells are unreadable


def ratio_layers(df: pd.DataFrame) -> list[str]:
    """The layer names of ``df``'s ``ratio/<layer>`` columns, in column order.

    Raises ValueError when there are none or ``epoch`` is missing.
    """
    layers = [c[len(PREFIX):] for c in df.columns if str(c).startswith(PREFIX)]
    if not layers or "epoch" not in df.columns:
        raise ValueError(f"df: got columns {list(df.columns)}; allowed: epoch and ratio/<layer> "
                         "columns (train()'s history rows)")
    return layers


def ratio_matrix(df: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Geometric mean of each layer's ratio over the runs of a group, per epoch.

    Args:
        df: History rows: epoch, ratio/<layer>..., and the column ``by`` if given.
        by: the column whose values form groups (``optimizer``, ``lr``); None = one group.
    Returns:
        DataFrame indexed by (group, layer) (group omitted when ``by`` is None; numeric groups
        ascending, others in order of appearance; layers in column order), one column per epoch
        that has a ratio, NaN where no run of the group reached that epoch. Non-positive or
        non-finite ratios are dropped; none left at all is a ValueError.
    """
    layers = ratio_layers(df)
    if by is not None and by not in df.columns:
        raise ValueError(f"by: got {by!r}; allowed: a column of df ({', '.join(df.columns)})")
    keys = ["epoch"] if by is None else [by, "epoch"]
    long = df.melt(id_vars=keys, value_vars=[PREFIX + n for n in layers], var_name="layer",
                   value_name="ratio")
    long = long[np.isfinite(long["ratio"]) & (long["ratio"] > 0)]
    if long.empty:
        raise ValueError("df: no finite positive ratio/<layer> value; allowed: history rows of "
                         "at least one trained epoch")
    long = long.assign(layer=long["layer"].str[len(PREFIX):], log=np.log10(long["ratio"]))
    rows = ["layer"] if by is None else [by, "layer"]
    table = 10 ** long.pivot_table(index=rows, columns="epoch", values="log", aggfunc="mean")
    groups = [None] if by is None else list(pd.unique(df[by].dropna()))
    if by is not None and pd.api.types.is_numeric_dtype(df[by]):
        groups = sorted(groups)
    order = [n if by is None else (g, n) for g in groups for n in layers]
    index = pd.Index(order, name="layer") if by is None else pd.MultiIndex.from_tuples(
        order, names=rows)
    return table.reindex(index)


def _short(value: float) -> str:
    """3e-03 -> '3e-3': a cell label that fits."""
    return "" if not math.isfinite(value) else f"{value:.0e}".replace("e-0", "e-").replace(
        "e+0", "e")


def _norm(values: np.ndarray) -> LogNorm:
    """A log colour scale symmetric about the rule of thumb, whole decades, at least 1 each way."""
    finite = values[np.isfinite(values) & (values > 0)]
    span = 1 if finite.size == 0 else max(1, math.ceil(
        float(np.abs(np.log10(finite / RULE_OF_THUMB)).max()) - 1e-9))
    return LogNorm(RULE_OF_THUMB / 10**span, RULE_OF_THUMB * 10**span)


def _label(key, by: str | None) -> str:
    if by is None:
        return str(key)
    group, layer = key
    group = f"lr={group:g}" if by == "lr" else str(group)
    return f"{group}  {layer}"


def _heatmap(matrix: pd.DataFrame, by: str | None, ax: Axes | None, what: str) -> Figure:
    if ax is None:
        height = 1.6 + 0.32 * len(matrix)
        fig = Figure(figsize=(max(6.5, 2.5 + 0.7 * matrix.shape[1]), height), layout="constrained")
        ax = fig.add_subplot()
    values = matrix.to_numpy(dtype=float)
    cells = values.size <= MAX_ANNOTATED_CELLS
    sns.heatmap(matrix.set_axis([_label(k, by) for k in matrix.index], axis=0), ax=ax,
                cmap="RdBu_r", norm=_norm(values), linewidths=0.5, linecolor="white",
                annot=np.vectorize(_short)(values) if cells else False, fmt="",
                annot_kws={"fontsize": 7},
                cbar_kws={"label": "||update|| / ||weight||  (black line: 1e-3)"})
    ax.set_facecolor("0.8")  # NaN cells (no run reached that epoch) show grey
    colorbar = ax.collections[0].colorbar
    colorbar.ax.axhline(RULE_OF_THUMB, color="black", lw=2)
    if by is not None:  # a line between groups: each block of layers is one group's panel
        per_group = matrix.index.get_level_values(0)
        for i in range(1, len(per_group)):
            if per_group[i] != per_group[i - 1]:
                ax.axhline(i, color="black", lw=1.5)
    ax.set(xlabel="epoch", ylabel="" if by is None else f"{by}, layer",
           title=f"Update/weight ratio per layer{what}\nwhite = 1e-3 rule of thumb, red = too "
                 "high, blue = too low, grey = no data")
    ax.title.set_fontsize(9)
    return ax.figure


def plot_update_ratio(df: pd.DataFrame, ax: Axes | None = None, by: str | None = None) -> Figure:
    """Heatmap layer x epoch of the update/weight ratio, geometric mean over the runs.

    Args:
        df: History rows with epoch and ratio/<layer> columns (see ``ratio_matrix``).
        by: a column to split the rows by (e.g. ``optimizer``): one block of layer rows per
            value, separated by lines. None: every row of ``df`` is one group.
    """
    suffix = "" if by is None else f", by {by}"
    return _heatmap(ratio_matrix(df, by), by, ax, suffix)


def plot_update_ratio_by_lr(df: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """The ratio heatmap of an LR sweep: one block (panel) of layer rows per rate, ascending.

    Too-high rates show red rows, too-low ones blue, diverged ones grey after their last epoch.
    ``df`` needs a ``lr`` column besides epoch and ratio/<layer>.
    """
    if "lr" not in df.columns:
        raise ValueError(f"df: got columns {list(df.columns)}; allowed: lr, epoch and "
                         "ratio/<layer> columns (an LR sweep's history rows)")
    return _heatmap(ratio_matrix(df, "lr"), "lr", ax, ", one block per learning rate")
