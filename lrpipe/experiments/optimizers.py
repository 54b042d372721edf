"""Optimizers side by side on real data: a fair rate search, summaries and figures.

Fairness: every optimizer gets the SAME search (``search_rate``): short trainings of the same
model from the same initial weights and batch order (the config's seed) on the same data, at
the decades 1e-5 .. 1, then at the two half-decade neighbours of the best decade: 8 trainings
each, a half-decade resolution over six decades, whatever the optimizer. The rate with the
lowest validation loss after the budget wins. A short budget favours fast starters (the
short-horizon bias); it is the same bias for all, and the final runs then train longer at the
rate each optimizer found.

Inputs of the summaries and figures are History rows (``train()``'s columns plus ``lr``,
``seed``, ``status`` and a grouping column such as ``optimizer``). Figures are pure
``plot_x(df, ..., ax=None) -> Figure`` built without pyplot (safe on worker threads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lrpipe.engine.config import TrainConfig, check_number, is_plugin, merge
from lrpipe.engine.data import Dataset
from lrpipe.engine.train import TrainResult, train
from lrpipe.experiments.bands import band_text, compare_over_seeds
from lrpipe.experiments.entries import entry_config

SEARCH_DECADES: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
REFINE = 10**0.5  # the refinement steps half a decade either side of the best decade
SEARCH_EVAL_TRAIN = 1000  # training examples evaluated per search rung (val loss decides)
SEARCH_COLUMNS = ("lr", "stage", "val_loss", "val_error", "status")
RPROP_LR = 1e-3  # Rprop's lr is only its initial per-weight step size; the steps then adapt
# The Rprop arms' training examples. The equal-updates arm takes epochs x U full-batch epochs
# (U = updates per mini-batch epoch): on the comparison's 10,000 examples (U = 79 at batch 128)
# that is 1,185 epochs a seed, each also evaluated, hours on 2 CPU cores; on 1,000 examples
# (U = 8) it is 120 epochs of a tenth of the data, seconds.
RPROP_SUBSET = 1_000


@dataclass(frozen=True)
class RateSearch:
    """One optimizer's search: the rungs (``SEARCH_COLUMNS``, in the order trained), the chosen
    rate (None when every rung diverged) and why, in words."""

    table: pd.DataFrame
    lr: float | None
    reason: str


def _rung(cfg: TrainConfig, data: Dataset, lr: float, stage: str, epochs: int,
          train_fn: Callable[[TrainConfig, Dataset], TrainResult]) -> dict:
    result = train_fn(cfg.replace(**{"optim.lr": lr, "epochs": epochs,
                                     "eval_train_size": SEARCH_EVAL_TRAIN}), data)
    last = result.history.iloc[-1]
    # a finite run that ends no_progress (too small a rate) still ranks by its loss
    ok = result.status != "diverged" and math.isfinite(float(last["val_loss"]))
    return dict(lr=lr, stage=stage, val_loss=float(last["val_loss"]) if ok else math.nan,
                val_error=float(last["val_error"]) if ok else math.nan,
                status=result.status if ok else "diverged")


def _best(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["status"] != "diverged"]
    return min(ok, key=lambda r: r["val_loss"]) if ok else None


def search_rate(cfg: TrainConfig, data: Dataset, *, decades: Sequence[float] = SEARCH_DECADES,
                epochs: int = 1,
                train_fn: Callable[[TrainConfig, Dataset], TrainResult] = train) -> RateSearch:
    """Train ``cfg`` for ``epochs`` at each rate of ``decades``, then at best / sqrt(10) and
    best x sqrt(10); choose the rate with the lowest final validation loss.

    Every rung keeps ``cfg``'s seed (same initial weights, same batch order) and evaluates a
    fixed 1,000-example training subset (only the validation loss decides). A rung that
    diverged, or ended with a non-finite validation loss, cannot be chosen (status
    ``diverged``); one that ended ``no_progress`` keeps that status and ranks by its loss.
    ``train_fn`` replaces ``lrpipe.engine.train.train`` in tests.
    """
    check_number("epochs", epochs, low=1, integer=True)
    if len(decades) == 0 or len(set(decades)) != len(decades):
        raise ValueError(f"decades: got {list(decades)!r}; allowed: distinct rates > 0")
    for lr in decades:
        check_number("decades", lr, low=0.0, low_open=True)
    rows = [_rung(cfg, data, float(lr), "coarse", epochs, train_fn) for lr in sorted(decades)]
    coarse = _best(rows)
    if coarse is not None:
        rows += [_rung(cfg, data, coarse["lr"] * f, "refine", epochs, train_fn)
                 for f in (1 / REFINE, REFINE)]
    table = pd.DataFrame(rows, columns=list(SEARCH_COLUMNS))
    best = _best(rows)
    if best is None:
        return RateSearch(table, None, f"every rate diverged ({len(rows)} rates tried)")
    edge = best["lr"] <= min(table["lr"]) or best["lr"] >= max(table["lr"])
    return RateSearch(table, float(best["lr"]), (
        f"lowest validation loss {best['val_loss']:.4f} after {epochs} epoch(s) at lr "
        f"{best['lr']:.3g} of {len(rows)} rates" + ("; AT THE EDGE of the rates tried" if edge
                                                     else "")))


class Run(NamedTuple):
    """One training run to do: its config, its name, its tags (``optimizer``, ...)."""

    cfg: TrainConfig
    name: str
    tags: dict


def compare_seeds(base: TrainConfig, seeds: int) -> list[int]:
    """The comparison's seeds: the ``seeds`` after ``base.seed``, the seed ``search_rate``
    tuned every rate on, so each rate is judged on runs that did not choose it."""
    check_number("seeds", seeds, low=1, integer=True)
    return list(range(base.seed + 1, base.seed + 1 + seeds))


def compare_runs(base: TrainConfig, rates: Mapping[str, float], seeds: int) -> list[Run]:
    """Every comparison entry (``entries.ENTRY_NAMES``: ``gains`` is momentum 0,
    ``gains_momentum`` 0.9) at its own rate on ``base``, on ``compare_seeds`` (out of sample:
    not the seed the rates were searched on), named ``adam lr=0.001 mlp seed=1``, tagged
    ``optimizer`` = the entry."""
    runs = []
    for opt, lr in rates.items():
        for seed in compare_seeds(base, seeds):
            cfg = merge(entry_config(base, opt), {"optim.lr": lr, "seed": seed})
            runs.append(Run(cfg, f"{opt} lr={lr:.3g} {cfg.model.name} seed={seed}",
                            {"optimizer": opt, "part": "compare"}))
    return runs


def updates_per_epoch(n_train: int, batch_size: int) -> int:
    """Updates in one pass over ``n_train`` examples in batches of ``batch_size`` (the last
    batch may be short)."""
    return -(-n_train // batch_size)


def rprop_base(base: TrainConfig, subset: int = RPROP_SUBSET) -> TrainConfig:
    """``base`` trained on at most ``subset`` examples (``RPROP_SUBSET``: what keeps the
    equal-updates arm affordable); a config already on fewer, or on all of a plug-in's data
    (``data.subset`` None on a plug-in dataset) is unchanged."""
    check_number("subset", subset, low=1, integer=True)
    if base.data.subset is not None and base.data.subset <= subset:
        return base
    if base.data.subset is None and is_plugin(base.data.dataset):
        return base
    return merge(base, {"data.subset": subset})


def rprop_batch_runs(base: TrainConfig, n_train: int, epochs: int, seeds: int,
                     lr: float = RPROP_LR) -> list[Run]:
    """Rprop, same rate and seeds 0..seeds-1, in three arms (issue 27 item 5: 15 full-batch
    updates against 1,185 mini-batch ones confounds the batch with the number of updates):

    * ``mini-batch``: ``base.batch_size``, ``epochs`` epochs (epochs x U updates, U =
      ``updates_per_epoch``);
    * ``full-batch, equal epochs``: one batch of all ``n_train`` examples, ``epochs`` epochs
      (``epochs`` updates: the same passes over the data);
    * ``full-batch, equal updates``: the same one batch for epochs x U epochs (as many
      updates as the mini-batch arm, U times its passes).

    Tag ``batch`` names the arm: ``mini-batch (64)``, ``full-batch (1200), equal epochs``,
    ``full-batch (1200), equal updates``. ``n_train`` must exceed ``base.batch_size`` (else
    the arms coincide).
    """
    check_number("seeds", seeds, low=1, integer=True)
    check_number("epochs", epochs, low=1, integer=True)
    if not isinstance(n_train, int) or n_train <= base.batch_size:
        raise ValueError(f"n_train: got {n_train!r}; allowed: an integer > batch_size "
                         f"{base.batch_size}")
    per_epoch = updates_per_epoch(n_train, base.batch_size)
    arms = ((f"mini-batch ({base.batch_size})", base.batch_size, epochs),
            (f"full-batch ({n_train}), equal epochs", n_train, epochs),
            (f"full-batch ({n_train}), equal updates", n_train, epochs * per_epoch))
    runs = []
    for label, batch, arm_epochs in arms:
        for seed in range(seeds):
            cfg = merge(base, {"optim.name": "rprop", "optim.lr": lr, "seed": seed,
                               "batch_size": batch, "epochs": arm_epochs})
            runs.append(Run(cfg, f"rprop lr={lr:g} {cfg.model.name} batch={batch} "
                                 f"epochs={arm_epochs} seed={seed}",
                            {"optimizer": "rprop", "part": "rprop-batch", "batch": label}))
    return runs


def _lower(a: float, b: float) -> str:
    return "lower" if a < b else "higher" if a > b else "the same"


def rprop_claim(table: pd.DataFrame) -> str:
    """What the Rprop arms show, in words, from ``final_table(history, by="batch")`` plus
    ``epochs`` and ``updates`` columns: each full-batch arm's final validation error and loss
    against the mini-batch arm's, and at which matched budget (equal epochs, equal updates)
    mini-batches hurt Rprop on both, on error only, on loss only, or not at all."""
    require_columns(table, ("batch", "val_error_mean", "val_loss_mean", "epochs", "updates"),
                    "table")
    rows = {("mini-batch" if b.startswith("mini-batch") else b.split(", ")[-1]): r
            for b, r in zip(table["batch"], table.itertuples(), strict=True)}
    mini = rows.get("mini-batch")
    if mini is None or len(rows) < 2:
        return "Rprop: too few arms finished to compare"
    parts, verdict = [], {"both": [], "error only": [], "loss only": [], "neither": []}
    for key in ("equal epochs", "equal updates"):
        if key not in rows:
            continue
        full = rows[key]
        err, loss = (full.val_error_mean < mini.val_error_mean,
                     full.val_loss_mean < mini.val_loss_mean)
        verdict["both" if err and loss else "error only" if err else "loss only" if loss
                else "neither"].append(key)
        parts.append(f"full-batch at {key} ({int(full.updates):,} updates, {int(full.epochs)} "
                     f"epochs): error {full.val_error_mean:.4f} "
                     f"({_lower(full.val_error_mean, mini.val_error_mean)}), loss "
                     f"{full.val_loss_mean:.4g} "
                     f"({_lower(full.val_loss_mean, mini.val_loss_mean)})")
    said = {"both": "on validation error and loss", "error only": "on validation error only "
            "(the loss favours mini-batches)", "loss only": "on validation loss only (the error "
            "favours mini-batches)", "neither": "not at all"}
    claims = [f"{said[k]} at {' and '.join(v)}" for k, v in verdict.items() if v]
    return (f"Rprop mini-batch ({int(mini.updates):,} updates, {int(mini.epochs)} epochs): "
            f"error {mini.val_error_mean:.4f}, loss {mini.val_loss_mean:.4g}; "
            + "; ".join(parts) + ". Mini-batches hurt Rprop " + "; ".join(claims) + ".")


def history_frame(runs: Sequence[Run], results: Sequence[Mapping], key: str,
                  n_train: int | None = None) -> pd.DataFrame:
    """The ``history`` rows of every result with its run's tag ``key`` (optimizer, batch) as
    a first column; ``results`` are in ``runs``' order. With ``n_train`` (the training
    examples) a column ``updates`` = epoch x ``updates_per_epoch(n_train, batch_size)``."""
    if len(runs) != len(results):
        raise ValueError(f"results: got {len(results)} for {len(runs)} runs; allowed: one "
                         "result per run, in order")
    frame = pd.DataFrame([{key: run.tags[key], **row} for run, result in
                          zip(runs, results, strict=True) for row in result["history"]])
    if n_train is not None:
        per_epoch = [updates_per_epoch(n_train, run.cfg.batch_size) for run, result in
                     zip(runs, results, strict=True) for _ in result["history"]]
        frame["updates"] = frame["epoch"] * pd.Series(per_epoch, index=frame.index)
    return frame


def rprop_table(df: pd.DataFrame) -> pd.DataFrame:
    """``final_table(df, by="batch")`` of the Rprop arms with the ``epochs`` and ``updates``
    each arm's runs reached (their maximum over seeds; ``df`` from ``history_frame`` with
    ``n_train``)."""
    require_columns(df, ("batch", "epoch", "updates"), "df")
    reached = final_rows(df, "batch").groupby("batch", sort=False).agg(
        epochs=("epoch", "max"), updates=("updates", "max")).reset_index()
    return final_table(df, by="batch").merge(reached, on="batch", how="left")


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; allowed: History rows with "
                         f"{', '.join(columns)}")


def final_rows(df: pd.DataFrame, by: str = "optimizer") -> pd.DataFrame:
    """The last recorded epoch of every (``by``, seed) run: its last finite epoch if it
    diverged."""
    require_columns(df, (by, "seed", "epoch"), "df")
    return df.sort_values("epoch").groupby([by, "seed"], sort=False).tail(1)


def final_table(df: pd.DataFrame, by: str = "optimizer") -> pd.DataFrame:
    """Final validation error and loss over seeds, one row per ``by`` value, best first.

    Returns columns: ``by``, lr, seeds, val_error_mean, val_error_std (sample std, 0 for one
    seed), val_loss_mean, diverged (runs that diverged; their last finite epoch counts), and
    val_error ("0.1234 ± 0.0056"). Sorted by diverged runs, then val_error_mean: a diverged
    run's last finite epoch is an earlier one, so its error is not comparable.
    """
    require_columns(df, (by, "seed", "epoch", "lr", "val_error", "val_loss", "status"), "df")
    last = final_rows(df, by)
    table = last.groupby(by, sort=False).agg(
        lr=("lr", "first"), seeds=("seed", "nunique"), val_error_mean=("val_error", "mean"),
        val_error_std=("val_error", "std"), val_loss_mean=("val_loss", "mean"),
        diverged=("status", lambda s: int((s == "diverged").sum())))
    table["val_error_std"] = table["val_error_std"].fillna(0.0)
    table["val_error"] = [f"{m:.4f} ± {s:.4f}" for m, s in
                          zip(table["val_error_mean"], table["val_error_std"], strict=True)]
    return table.sort_values(["diverged", "val_error_mean"], kind="stable").reset_index()


def best_against_runner_up(history: pd.DataFrame, table: pd.DataFrame) -> str | None:
    """The real-data winner (``final_table``'s first row) against the runner-up on final
    validation error per seed (``bands.compare_over_seeds``: a tie when the min..max bands
    overlap), in one sentence; None with fewer than two entries."""
    if len(table) < 2:
        return None
    last = final_rows(history)
    errors = {o: last.loc[last["optimizer"] == o, "val_error"].astype(float).where(
        last.loc[last["optimizer"] == o, "status"] != "diverged", math.inf).tolist()
        for o in table["optimizer"].iloc[:2]}
    (best, a), (second, b) = errors.items()
    result = compare_over_seeds(a, b)
    figures = f"{band_text(result['a'])} against {second}'s {band_text(result['b'])}"
    if result["tie"]:
        return (f"{best} and {second} tie on final validation error (the seed bands overlap): "
                f"{figures}")
    return (f"{best} beats the runner-up {second} on final validation error by "
            f"{result['margin']:.4f}, the seed bands apart: {figures}")


X_AXES = {"epoch": "epoch", "updates": "updates (optimizer steps)"}


def metric_bands(df: pd.DataFrame, metric: str, by: str = "optimizer",
                 x: str = "epoch") -> pd.DataFrame:
    """Mean, min, max and count over seeds of ``metric`` per (``by``, ``x``: epoch or
    updates); ``by`` values in order of appearance. A diverged run stops counting after its
    last finite epoch."""
    if x not in X_AXES:
        raise ValueError(f"x: got {x!r}; allowed: {', '.join(X_AXES)}")
    require_columns(df, (by, "seed", x, metric), "df")
    stats = df.groupby([by, x], sort=False)[metric].agg(["mean", "min", "max", "count"])
    return stats.rename(columns={"count": "n"}).reset_index().sort_values(
        [by, x], key=lambda s: s.map({v: i for i, v in enumerate(pd.unique(df[by]))})
        if s.name == by else s, kind="stable", ignore_index=True)


def _axes(ax: Axes | None, size: tuple[float, float] = (7.0, 4.5)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _palette(names: Sequence, palette: dict | None) -> dict:
    if palette is not None and all(n in palette for n in names):
        return palette
    return dict(zip(names, sns.color_palette("tab10", len(names)), strict=True))


LABELS = {"val_loss": "validation cross-entropy", "val_error": "validation error",
          "train_loss": "training cross-entropy", "train_error": "training error"}


def plot_metric_bands(df: pd.DataFrame, metric: str = "val_loss", by: str = "optimizer",
                      ax: Axes | None = None, palette: dict | None = None,
                      title: str | None = None, x: str = "epoch") -> Figure:
    """``metric`` against ``x`` (epoch, or updates on a symlog axis): the mean over seeds per
    ``by`` value, shaded min..max.

    The legend gives each group's final mean and how many of its runs diverged (they stop at
    their last finite epoch). Loss axes are logarithmic. ``palette``: colour per group value;
    ``title``: a first title line (the second says what the band is).
    """
    stats = metric_bands(df, metric, by, x)
    diverged = final_rows(df, by).groupby(by)["status"].apply(
        lambda s: int((s == "diverged").sum())) if "status" in df else None
    fig, ax = _axes(ax)
    colours = _palette(list(pd.unique(stats[by])), palette)
    for name, rows in stats.groupby(by, sort=False):
        note = f", {diverged[name]} diverged" if diverged is not None and diverged[name] else ""
        ax.plot(rows[x], rows["mean"], "-o", ms=3, color=colours[name],
                label=f"{name}: {rows['mean'].iloc[-1]:.4g}{note}")
        ax.fill_between(rows[x], rows["min"], rows["max"], color=colours[name], alpha=0.2)
    if "loss" in metric:
        ax.set_yscale("log")
    what = f"{LABELS.get(metric, metric)}: mean over seeds, band = min..max"
    ax.set(xlabel=X_AXES[x], ylabel=LABELS.get(metric, metric),
           title=what if title is None else f"{title}\n{what}")
    ax.legend(title=f"{by}: final mean", fontsize=7, ncol=2 if len(colours) > 4 else 1)
    if x == "updates":
        ax.set_xscale("symlog", linthresh=1.0)  # update 0 (the start) stays on the axis
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def plot_rate_search(table: pd.DataFrame, ax: Axes | None = None,
                     palette: dict | None = None) -> Figure:
    """Each optimizer's search: validation loss against rate (log-log), the chosen rate
    starred, diverged rungs as crosses at the top.

    ``table``: the searches' rungs (``SEARCH_COLUMNS``) with columns ``optimizer`` and
    ``chosen`` (True on the chosen rung).
    """
    require_columns(table, ("optimizer", "chosen", *SEARCH_COLUMNS), "table")
    fig, ax = _axes(ax)
    colours = _palette(list(pd.unique(table["optimizer"])), palette)
    top = float(np.nanmax(table["val_loss"])) if table["val_loss"].notna().any() else 1.0
    for name, rows in table.sort_values("lr").groupby("optimizer", sort=False):
        ok = rows[rows["status"] != "diverged"]
        ax.plot(ok["lr"], ok["val_loss"], "-o", ms=3, color=colours[name], label=name)
        bad = rows[rows["status"] == "diverged"]
        ax.plot(bad["lr"], [top * 1.5] * len(bad), "x", color=colours[name], ms=7)
        win = rows[rows["chosen"].astype(bool)]
        ax.plot(win["lr"], win["val_loss"], "*", ms=14, color=colours[name], mec="black")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="validation cross-entropy",
           title="Rate search: same short budget for every optimizer (star = chosen, "
                 "x = diverged)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=2)
    return fig
