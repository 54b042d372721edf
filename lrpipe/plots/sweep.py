"""Learning-rate sweep figures: pure functions of a long-form History DataFrame.

Input: one row per (run, epoch) with columns ``lr, epoch, train_loss, val_loss, train_error,
val_error, status`` (``status`` is ``ok``, ``diverged`` or ``no_progress`` for the whole run;
``diverged_epoch`` optional). Every function returns a matplotlib Figure, built without pyplot
(safe on worker threads); none saves, shows or logs it. X axes are epochs, never iterations,
with integer ticks. Optional inputs: ``chosen_lr`` (the rate the search or sweep chose, drawn
thick and named in the legend) and ``steps`` (a long-form step table: lr, step, epoch
(fractional), train_loss_smooth), drawn faintly behind the per-epoch train curve.
"""

from __future__ import annotations

import math

import matplotlib
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

METRIC_LABELS = {"loss": "cross-entropy", "error": "classification error"}
STATUSES = ("ok", "diverged", "no_progress")
DIVERGED = dict(marker="x", color="black", ms=10, mew=2.5)  # at the top, where it blew up
NO_PROGRESS = dict(marker="s", mfc="white", mec="black", ms=8, mew=1.8)  # where it stopped
STOPPED_AT = dict(marker="o", ms=6, mec="black", mew=0.8)  # a stopped run's last finite epoch
TOP = 0.97  # axes fraction where a divergence is marked
STEP_ALPHA = 0.25  # the step-level curve: faint, behind the per-epoch one
CHOSEN_LW, LW = 3.2, 1.5


def _axes(ax, size=(7.0, 4.5)):
    if ax is None:
        fig = Figure(figsize=size, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure, ax


def lr_palette(lrs) -> dict[float, tuple]:
    """One colour per rate, in rate order along matplotlib's turbo map (blue -> green ->
    orange -> red). Spaced by rank, not by value, so neighbouring rates stay apart (RGB
    distance >= 0.25 up to 8 rates, 0.18 at 12;
    viridis gave 0.13 and 0.08); a single rate is blue."""
    lrs = sorted(set(float(x) for x in lrs))
    cmap = matplotlib.colormaps["turbo"]
    if len(lrs) == 1:
        return {lrs[0]: cmap(0.15)}
    return {lr: cmap(x) for lr, x in zip(lrs, np.linspace(0.08, 0.92, len(lrs)), strict=True)}


def _is_chosen(lr: float, chosen_lr: float | None) -> bool:
    return chosen_lr is not None and math.isclose(float(lr), float(chosen_lr), rel_tol=1e-9)


def _lr_label(lr: float, chosen_lr: float | None) -> str:
    return f"lr={lr:.3g}" + (" (chosen)" if _is_chosen(lr, chosen_lr) else "")


def _check(df: pd.DataFrame, chosen_lr: float | None) -> None:
    bad = sorted(set(df["status"]) - set(STATUSES))
    if bad:
        raise ValueError(f"df.status: got {bad}; allowed: {', '.join(STATUSES)}")
    if chosen_lr is not None and not any(_is_chosen(lr, chosen_lr) for lr in df["lr"]):
        raise ValueError(f"chosen_lr: got {chosen_lr!r}; allowed: None or one of the swept "
                         f"rates ({', '.join(f'{x:g}' for x in sorted(set(df['lr'])))})")


def _check_steps(steps: pd.DataFrame, column: str) -> None:
    missing = [c for c in ("lr", "epoch", column) if c not in steps.columns]
    if missing:
        raise ValueError(f"steps: missing columns {missing}; allowed: a step table with lr, "
                         f"step, epoch (fractional) and {column}")


def _integer_epochs(ax) -> None:
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))


def readable_log_ticks(ax) -> None:
    """Log y ticks a reader can read: 1-2-5 per decade, labelled as plain numbers; every digit
    (1..9) when the axis spans under a decade, so at least two labelled ticks show."""
    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if high / low >= 10 else tuple(range(1, 10))
    ax.yaxis.set_major_locator(mticker.LogLocator(base=10, subs=subs, numticks=30))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(mticker.NullLocator())


def _legend_outside(ax, handles=None) -> None:
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)


def _stopped_at(run: pd.DataFrame, column: str) -> tuple[float, float] | None:
    """(epoch, value) of a run's last finite ``column``; None if it has none."""
    finite = run[np.isfinite(run[column].astype(float))]
    return None if finite.empty else (finite["epoch"].iloc[-1], finite[column].iloc[-1])


def _draw_steps(ax, steps: pd.DataFrame, column: str, colors: dict) -> None:
    for lr, rows in steps.sort_values("epoch").groupby("lr"):
        if float(lr) in colors:
            ax.plot(rows["epoch"], rows[column], "-", color=colors[float(lr)], lw=0.8,
                    alpha=STEP_ALPHA, zorder=1)


def _mark_end(ax, run: pd.DataFrame, metric: str, color, ends: list) -> None:
    """Mark where a stopped run ends: its last finite epoch, and for a divergence a dotted climb
    to an x at the top at the epoch it blew up (``diverged_epoch``, else the next epoch)."""
    status = run["status"].iloc[0]
    end = _stopped_at(run, f"val_{metric}")
    if status == "ok" or end is None:
        return
    epoch, value = end
    if status == "no_progress":
        ax.plot([epoch], [value], ls="none", zorder=4, **NO_PROGRESS)
        return
    ax.plot([epoch], [value], ls="none", color=color, zorder=4, **STOPPED_AT)
    at = run["diverged_epoch"].iloc[-1] if "diverged_epoch" in run else None
    at = epoch + 1 if at is None or pd.isna(at) else float(at)
    ends.append((float(run["lr"].iloc[0]), color, epoch, value, at))


def _draw_divergences(ax, ends: list) -> None:
    ax.set_ylim(ax.get_ylim())  # freeze: the climbs end at the top of these limits
    top = blended_transform_factory(ax.transData, ax.transAxes)
    y_top = ax.transData.inverted().transform(ax.transAxes.transform((0, TOP)))[1]
    for i, (lr, color, epoch, value, at) in enumerate(ends):
        ax.plot([epoch, at], [value, y_top], ":", color=color, lw=1.4)
        ax.plot([at], [TOP], ls="none", transform=top, clip_on=False, zorder=5, **DIVERGED)
        ax.annotate(f"lr={lr:.3g} diverged (epoch {at:g})", (at, TOP), xycoords=top,
                    textcoords="offset points", xytext=(9, -4 - 11 * i), ha="left",
                    va="top", fontsize=8)


def _status_handles(statuses: set) -> list:
    handles = [Line2D([], [], color="grey", ls="-", label="train"),
               Line2D([], [], color="grey", ls="--", label="validation")]
    if "diverged" in statuses:
        handles.append(Line2D([], [], ls="none", label="diverged (at the top)", **DIVERGED))
    if "no_progress" in statuses:
        handles.append(Line2D([], [], ls="none", label="stopped: no progress", **NO_PROGRESS))
    return handles


def plot_learning_curves(df: pd.DataFrame, metric: str = "loss", ax=None, *,
                         chosen_lr: float | None = None, steps: pd.DataFrame | None = None):
    """Train (solid) and validation (dashed) ``metric`` against epoch, one colour per rate.

    Args:
        metric: "loss" (log y, 1-2-5 ticks) or "error".
        chosen_lr: a swept rate to draw thick and name "(chosen)" in the legend.
        steps: a step table (lr, step, epoch, train_<metric>_smooth): each rate's smoothed
            step curve, faint, behind its per-epoch train curve.
    A run that stopped is drawn to its last finite epoch, marked there; a divergence climbs
    (dotted) to an x at the top at the epoch it blew up; a run stopped for no progress ends
    in a hollow square. The legend sits outside the axes.
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"metric: got {metric!r}; allowed: {', '.join(METRIC_LABELS)}")
    _check(df, chosen_lr)
    fig, ax = _axes(ax)
    colors = lr_palette(df["lr"])
    if steps is not None:
        _check_steps(steps, f"train_{metric}_smooth")
        _draw_steps(ax, steps, f"train_{metric}_smooth", colors)
    ends: list = []
    for lr, run in df.sort_values("epoch").groupby("lr"):
        color, lw = colors[float(lr)], CHOSEN_LW if _is_chosen(lr, chosen_lr) else LW
        for split, style in (("train", "-"), ("val", "--")):
            rows = run[np.isfinite(run[f"{split}_{metric}"].astype(float))]
            ax.plot(rows["epoch"], rows[f"{split}_{metric}"], style, color=color, lw=lw,
                    zorder=3 if lw == CHOSEN_LW else 2)
        _mark_end(ax, run, metric, color, ends)
    if metric == "loss":
        ax.set_yscale("log")
        readable_log_ticks(ax)
    _draw_divergences(ax, ends)
    _integer_epochs(ax)
    ax.set(xlabel="epoch", ylabel=METRIC_LABELS[metric],
           title=f"{METRIC_LABELS[metric]} against epoch, one colour per learning rate")
    handles = [Line2D([], [], color=c, lw=CHOSEN_LW if _is_chosen(lr, chosen_lr) else 2,
                      label=_lr_label(lr, chosen_lr)) for lr, c in colors.items()]
    _legend_outside(ax, handles + _status_handles(set(df["status"])))
    return fig


def final_by_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Per rate: the last epoch with a finite validation loss (a diverged run's last finite
    epoch), the best validation error of any epoch, and the status."""
    finite = df[np.isfinite(df["val_loss"].astype(float))]
    last = finite.sort_values("epoch").groupby("lr", as_index=False).tail(1)
    best = df.groupby("lr", as_index=False)["val_error"].min()
    best = best.rename(columns={"val_error": "best_val_error"})
    never = df[~df["lr"].isin(last["lr"])].sort_values("epoch").groupby("lr").head(1)
    return (pd.concat([last, never]).merge(best, on="lr").sort_values("lr")
            .reset_index(drop=True))


def _final_panel(ax, final: pd.DataFrame, metric: str, chosen_lr: float | None) -> None:
    ok = final[final["status"] == "ok"]
    ax.plot(ok["lr"], ok[f"val_{metric}"], "o-", color="tab:blue", label=f"validation {metric}")
    ax.plot(ok["lr"], ok[f"train_{metric}"], "o:", color="tab:blue", alpha=0.6,
            label=f"train {metric}")
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for status, style in (("diverged", DIVERGED), ("no_progress", NO_PROGRESS)):
        lrs = final.loc[final["status"] == status, "lr"]
        if len(lrs):
            ax.plot(lrs, np.full(len(lrs), TOP), ls="none", transform=top, clip_on=False,
                    label=status.replace("_", " ") + " (at the top)", **style)
    if chosen_lr is not None:
        ax.axvline(chosen_lr, color="tab:green", lw=2, alpha=0.6,
                   label=f"chosen lr={chosen_lr:.3g}")
    ax.set_ylabel(f"final {METRIC_LABELS[metric]}")


def plot_final_vs_lr(df: pd.DataFrame, ax=None, *, chosen_lr: float | None = None):
    """Final validation (and train) loss, and below it error, against rate (log x): two panels
    sharing the rate axis, no twin y axes. Diverged and no-progress rates are marked at the
    top of each panel; the lowest final validation loss is annotated "best lr=..."; a
    ``chosen_lr`` is a green line. With ``ax`` only the loss panel is drawn there."""
    _check(df, chosen_lr)
    if ax is None:
        fig = Figure(figsize=(7.0, 5.2), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
    else:
        fig, axes = ax.figure, [ax]
    final = final_by_lr(df)
    for panel, metric in zip(axes, ("loss", "error"), strict=False):
        _final_panel(panel, final, metric, chosen_lr)
        panel.set_xscale("log")
    ok = final[final["status"] == "ok"]
    if len(ok):
        best = ok.loc[ok["val_loss"].idxmin()]
        axes[0].annotate(f"best lr={best['lr']:g}", (best["lr"], best["val_loss"]),
                         textcoords="offset points", xytext=(6, 8), fontsize=8)
    axes[-1].set_xlabel("learning rate")
    axes[0].set_title("where each learning rate ends up (last finite epoch)")
    for panel in axes:
        _legend_outside(panel)
    return fig


def plot_gap(df: pd.DataFrame, ax=None, *, chosen_lr: float | None = None):
    """Validation minus train loss against epoch, one colour per rate: the overfitting gap.
    Runs are drawn over their finite epochs; the chosen rate thick; legend outside."""
    _check(df, chosen_lr)
    fig, ax = _axes(ax)
    colors = lr_palette(df["lr"])
    for lr, run in df.sort_values("epoch").groupby("lr"):
        gap = run["val_loss"] - run["train_loss"]
        keep = np.isfinite(gap.astype(float))
        lw = CHOSEN_LW if _is_chosen(lr, chosen_lr) else LW
        ax.plot(run["epoch"][keep], gap[keep], "-", color=colors[float(lr)], lw=lw,
                label=_lr_label(lr, chosen_lr))
        ax.fill_between(run["epoch"][keep], 0, gap[keep], color=colors[float(lr)], alpha=0.06)
    ax.axhline(0, color="black", lw=0.8)
    _integer_epochs(ax)
    ax.set(xlabel="epoch", ylabel="validation - train cross-entropy",
           title="train/validation gap")
    _legend_outside(ax)
    return fig


def sweep_figures(df: pd.DataFrame, *, chosen_lr: float | None = None,
                  steps: pd.DataFrame | None = None) -> dict[str, Figure]:
    """Every figure of a sweep by artifact name. ``steps`` goes behind the loss curves (and
    the error curves where it has ``train_error_smooth``); ``chosen_lr`` is highlighted."""
    error_steps = steps if steps is not None and "train_error_smooth" in steps else None
    return {
        "loss_vs_epoch": plot_learning_curves(df, "loss", chosen_lr=chosen_lr, steps=steps),
        "error_vs_epoch": plot_learning_curves(df, "error", chosen_lr=chosen_lr,
                                               steps=error_steps),
        "final_vs_lr": plot_final_vs_lr(df, chosen_lr=chosen_lr),
        "gap_vs_epoch": plot_gap(df, chosen_lr=chosen_lr),
    }
