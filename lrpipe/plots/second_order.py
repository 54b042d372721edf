"""Figures of the second-order methods: Newton and L-BFGS beside the first-order race, full-batch
L-BFGS against SGD on real data, and the cost of one step against the number of parameters.

Inputs are the long-form tables of ``lrpipe.experiments.second_order`` (PATH_COLUMNS,
HISTORY_COLUMNS) and ``lrpipe.experiments.step_cost`` (COST_COLUMNS). Every function returns a
Figure built without pyplot (safe on worker threads) and never saves, shows or logs.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lrpipe.experiments.surfaces import Surface
from lrpipe.plots.surfaces import FLOOR, optimizer_palette, plot_contour_paths

# Second-order methods stand out from the eight tab10 colours of the first-order optimizers.
METHOD_STYLE = {"newton": dict(color="black", marker="s"),
                "lbfgs": dict(color="magenta", marker="D")}
COST_STYLE = {"sgd": dict(color="tab:blue", marker="o"),
              "lbfgs": METHOD_STYLE["lbfgs"], "newton": METHOD_STYLE["newton"]}
EVAL_AXES = {"evals": "(loss, gradient) evaluations (Newton: + one Hessian each)",
             "step": "iterations (updates)"}


def _axes(ax: Axes | None, figsize=(6.4, 4.6)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _require(df: pd.DataFrame, columns: set[str], name: str, source: str) -> None:
    missing = columns - set(df.columns)
    if missing:
        raise ValueError(f"{name}: missing columns {sorted(missing)}; allowed: the output of "
                         f"{source}")


def _colour(name: str) -> dict:
    return METHOD_STYLE.get(name, dict(color=optimizer_palette().get(name), marker=None))


def plot_race_paths(surface: Surface, paths: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """The first-order paths (``plot_contour_paths``) with Newton and L-BFGS drawn over them,
    thick, a marker at every iterate (they take few), labelled with iterations and evaluations.

    ``paths``: first-order rows (``with_evaluations``) and second-order rows
    (``compare_second_order``) of one surface, concatenated.
    """
    _require(paths, {"optimizer", "lr", "step", "x", "y", "loss", "evals"}, "paths",
             "second_order.compare_second_order (+ with_evaluations)")
    fig, ax = _axes(ax, figsize=(7.2, 5.6))
    second = paths["optimizer"].isin(list(METHOD_STYLE))
    plot_contour_paths(surface, paths[~second], ax=ax)
    for name, run in paths[second].groupby("optimizer", sort=False):
        run = run.sort_values("step")
        style = METHOD_STYLE[name]
        ax.plot(run["x"], run["y"], "-", lw=2.4, ms=5, color=style["color"],
                marker=style["marker"], zorder=6,
                label=f"{name} (no rate): {int(run['step'].max())} iterations, "
                      f"{int(run['evals'].max())} evals")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def plot_race_losses(paths: pd.DataFrame, x: str = "evals", ax: Axes | None = None) -> Figure:
    """Loss (the gap to the minimum's value 0) against evaluations (or iterations), log-log,
    one line per method: the fair axis for methods that spend several evaluations a step.
    The y axis stops at 1e-16 x the largest loss (float64's precision); exact zeros are not
    drawn."""
    if x not in EVAL_AXES:
        raise ValueError(f"x: got {x!r}; allowed: {', '.join(EVAL_AXES)}")
    _require(paths, {"optimizer", "lr", "step", "loss", "evals"}, "paths",
             "second_order.compare_second_order (+ with_evaluations)")
    fig, ax = _axes(ax)
    for (name, lr), run in paths.groupby(["optimizer", "lr"], sort=False):
        run = run[run["loss"] > 0].sort_values("step")
        second = name in METHOD_STYLE
        label = f"{name} (no rate)" if second else f"{name} (lr {lr:.2g})"
        ax.plot(run[x] + 1, run["loss"], "-", lw=2.2 if second else 1.2, ms=4,
                label=label, **_colour(name))
    ax.set(xscale="log", yscale="log", xlabel=EVAL_AXES[x] + " + 1", ylabel="loss - minimum")
    positive = paths.loc[paths["loss"] > 0, "loss"]
    if len(positive):
        ax.set_ylim(bottom=max(float(positive.min()), FLOOR * float(positive.max())) / 2)
    names = sorted(paths["surface"].unique()) if "surface" in paths else []
    ax.set_title(", ".join(names) or None)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


FULL_BATCH_X = {"passes": "passes over the training set (L-BFGS: one per evaluation)",
                "seconds": "optimizer wall seconds"}


def plot_full_batch(history: pd.DataFrame, metric: str = "train_loss", x: str = "passes",
                    ax: Axes | None = None) -> Figure:
    """``metric`` (train_loss, val_loss or val_error) against passes or seconds, one line per
    method of ``second_order.lbfgs_against_sgd``'s history, L-BFGS marked at every
    iteration."""
    if metric not in ("train_loss", "val_loss", "val_error"):
        raise ValueError(f"metric: got {metric!r}; allowed: train_loss, val_loss, val_error")
    if x not in FULL_BATCH_X:
        raise ValueError(f"x: got {x!r}; allowed: {', '.join(FULL_BATCH_X)}")
    _require(history, {"method", "lr", "iteration", metric, x}, "history",
             "second_order.lbfgs_against_sgd")
    fig, ax = _axes(ax)
    for (name, lr), run in history.groupby(["method", "lr"], sort=False):
        run = run.sort_values("iteration")
        label = "L-BFGS full batch (no rate)" if name == "lbfgs" else f"{name} (lr {lr:.3g})"
        ax.plot(run[x], run[metric], "-", lw=1.8, ms=3, label=label,
                **COST_STYLE.get(name, dict(color=optimizer_palette().get(name))))
    ax.set(xlabel=FULL_BATCH_X[x], ylabel=metric.replace("_", " "))
    if metric != "val_error":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return fig


COST_LABELS = {"seconds_per_step": "seconds per step", "bytes_per_step": "bytes per step"}


def plot_step_cost(costs: pd.DataFrame, metric: str = "seconds_per_step",
                   ax: Axes | None = None) -> Figure:
    """``metric`` against the number of parameters, log-log, one line per (method, source):
    measured solid with filled markers, extrapolated dashed with open ones. With
    ``bytes_per_step`` the dense Hessian of the largest model is written beside it (its
    ``dense_hessian_bytes``), with the model's name."""
    if metric not in COST_LABELS:
        raise ValueError(f"metric: got {metric!r}; allowed: {', '.join(COST_LABELS)}")
    _require(costs, {"method", "model", "n_params", "source", metric, "dense_hessian_bytes"},
             "costs", "step_cost.measure_step_costs")
    fig, ax = _axes(ax)
    for (name, source), rows in costs.groupby(["method", "source"], sort=False):
        rows = rows.sort_values("n_params")
        style = COST_STYLE.get(name, dict(color=None, marker="o"))
        measured = source == "measured"
        ax.plot(rows["n_params"], rows[metric], "-" if measured else "--", ms=6,
                color=style["color"], marker=style["marker"],
                markerfacecolor=style["color"] if measured else "none",
                label=f"{name} ({source})")
    if metric == "bytes_per_step":
        big = costs.loc[costs["n_params"].idxmax()]
        ax.scatter([big["n_params"]], [big["dense_hessian_bytes"]], marker="*", s=160,
                   color="gold", edgecolors="black", zorder=5)
        ax.annotate(f"dense Hessian of {big['model']}:\n{big['n_params']:,}^2 x 4 B = "
                    f"{big['dense_hessian_bytes'] / 1e9:,.1f} GB",
                    (big["n_params"], big["dense_hessian_bytes"]), xytext=(-12, -30),
                    textcoords="offset points", ha="right", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="parameters (n)", ylabel=COST_LABELS[metric])
    ax.legend(fontsize=8, loc="upper left")
    return fig
