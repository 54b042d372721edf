"""Dropout against the train/validation gap: the plan and the analysis, as pure functions.

Two arms, no dropout and dropout ``p`` on the hidden units (Srivastava et al. 2014,
https://jmlr.org/papers/v15/srivastava14a.html, whose MLPs use p = 0.5), each trained at a small
grid of rates around the chosen one (the lr-search's, or a given rate) over several seeds. The
gap is validation minus training loss, both evaluated in eval mode (dropout off) at the end of
each epoch, so it measures overfitting, not dropout's noise. The analysis reads one History row
per (arm, rate, seed, epoch) (``HISTORY_COLUMNS``): per arm and rate the final losses, errors
and gap over seeds (mean and min..max band), the best rate per arm (lowest mean final
validation loss: does dropout need another rate?), the gap curves at the chosen rate, and a
verdict worded from those numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lrpipe.engine.config import ConfigError, DataConfig, TrainConfig, check_number, merge
from lrpipe.experiments.bands import band_text, compare_over_seeds
from lrpipe.experiments.decay import require_columns

DEFAULT_DROPOUT = 0.5  # probability of zeroing a hidden unit; Srivastava et al.'s MLP value
# x the chosen rate: half a decade each side (1/3.16, 1, 3.16), rounded in rates().
DEFAULT_GRID = (10 ** -0.5, 1.0, 10 ** 0.5)
DEFAULT_SEEDS = (0, 1, 2)  # the house minimum for a band over seeds
# Passes over the subset. A 5,000-example subset overfits the 784-256-10 MLP within a few
# epochs, so 20 show the gap open; 18 runs took 100 s in the flow (122 s with Prefect's
# start) on 2 shared CPU cores at --lr 0.1.
DEFAULT_EPOCHS = 20
DEFAULT_SUBSET = 5000  # Fashion-MNIST training examples (seeded draw): small, to overfit
PLAN_FIELDS = ("optim.lr", "model.dropout", "seed", "epochs")
HISTORY_COLUMNS = ("dropout", "lr", "seed", "epoch", "status", "train_loss", "val_loss",
                   "train_error", "val_error")
NO_DROPOUT_MODELS = ("softmax",)  # built-in models with no hidden unit to drop


@dataclass(frozen=True)
class DropoutPlan:
    """What the experiment trains, validated on construction (errors name the field).

    lr: the chosen rate (per update), the grid's centre.
    dropout: the dropout arm's probability, in (0, 1); the other arm has none.
    grid: multiples of ``lr`` trained in each arm, distinct, > 0; must hold 1 (the chosen rate,
        where the gap curves are drawn).
    seeds: seeds per (arm, rate), distinct, >= 0; 3 or more for a band.
    epochs: passes over the training data of every run (epochs, not steps).
    """

    lr: float
    dropout: float = DEFAULT_DROPOUT
    grid: tuple[float, ...] = DEFAULT_GRID
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    epochs: int = DEFAULT_EPOCHS

    def __post_init__(self) -> None:
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("dropout", self.dropout, low=0.0, high=1.0, low_open=True)
        if self.dropout >= 1.0:
            raise ConfigError(f"dropout: got {self.dropout!r}; allowed: a probability in (0, 1)")
        object.__setattr__(self, "grid", _distinct("grid", self.grid, integer=False))
        if not any(math.isclose(g, 1.0) for g in self.grid):
            raise ConfigError(f"grid: got {list(self.grid)}; allowed: multiples of lr that "
                              "include 1 (the chosen rate)")
        object.__setattr__(self, "seeds", _distinct("seeds", self.seeds, integer=True))
        check_number("epochs", self.epochs, low=1, integer=True)

    @property
    def arms(self) -> tuple[float, float]:
        """The dropout probabilities trained: none, then ``dropout``."""
        return (0.0, float(self.dropout))

    def rates(self) -> tuple[float, ...]:
        """``grid`` x ``lr``, ascending, rounded to 6 significant digits (stable hashes)."""
        return tuple(float(f"{self.lr * g:.6g}") for g in self.grid)

    def chosen_rate(self) -> float:
        return float(f"{self.lr:.6g}")


def arm_label(p: float) -> str:
    """An arm's name in tables and legends: ``no dropout`` or ``dropout 0.5``."""
    return "no dropout" if p == 0 else f"dropout {p:g}"


def _distinct(name: str, values, *, integer: bool) -> tuple:
    allowed = "integers >= 0" if integer else "finite numbers > 0"
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or len(values) == 0:
        raise ConfigError(f"{name}: got {values!r}; allowed: a non-empty list of {allowed}")
    for v in values:
        check_number(name, v, low=0, low_open=not integer, integer=integer)
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: got {list(values)}; allowed: distinct {allowed}")
    return tuple(sorted(values))


def base_config(overrides: Mapping | None = None) -> TrainConfig:
    """The config every run shares: the default MLP and SGD on a 5,000-example subset
    (``DEFAULT_SUBSET``) unless the overrides set the data. The plan sets ``PLAN_FIELDS``;
    overriding one is a ConfigError naming it, as is a model without hidden units."""
    overrides = dict(overrides or {})
    for key in PLAN_FIELDS:
        section, _, sub = key.partition(".")
        nested = overrides.get(section) if sub else None
        if key in overrides or (isinstance(nested, Mapping) and sub in nested):
            raise ConfigError(f"{key}: set by this experiment (--lr, --dropout, --seeds, "
                              "--epochs); allowed: other fields")
    cfg = merge(TrainConfig(data=DataConfig(subset=DEFAULT_SUBSET)), overrides)
    if cfg.model.name in NO_DROPOUT_MODELS:
        raise ConfigError(f"model.name: got {cfg.model.name!r}; allowed: a model with hidden "
                          "units to drop (mlp, cnn, a plug-in)")
    return cfg


def plan_configs(base: TrainConfig, plan: DropoutPlan) -> list[TrainConfig]:
    """One config per (arm, rate, seed), in that order."""
    return [merge(base, {"optim.lr": lr, "model.dropout": p, "seed": seed,
                         "epochs": plan.epochs})
            for p in plan.arms for lr in plan.rates() for seed in plan.seeds]


def history_table(cfgs: Sequence[TrainConfig], finals: Sequence[Mapping]) -> pd.DataFrame:
    """Every run's History rows (``HISTORY_COLUMNS`` and run_id), from one training result
    per config (a dict with ``history`` records, ``status`` and ``run_id``)."""
    if len(cfgs) != len(finals):
        raise ValueError(f"finals: got {len(finals)} for {len(cfgs)} configs; allowed: one each")
    frames = [pd.DataFrame(f["history"]).assign(
        dropout=c.model.dropout, lr=c.optim.lr, seed=c.seed, status=f["status"],
        run_id=f.get("run_id", "")) for c, f in zip(cfgs, finals, strict=True)]
    return pd.concat(frames, ignore_index=True)[[*HISTORY_COLUMNS, "run_id"]]


def final_rows(history: pd.DataFrame) -> pd.DataFrame:
    """The last epoch of each run, with ``gap`` (val - train loss) and ``gap_error``
    (val - train error); a run that did not end ``ok`` has infinite losses and gaps."""
    require_columns(history, HISTORY_COLUMNS, "history")
    last = history.sort_values("epoch").groupby(["dropout", "lr", "seed"]).tail(1).copy()
    bad = (last["status"] != "ok") | ~np.isfinite(last[["train_loss", "val_loss"]]).all(axis=1)
    for col in ("train_loss", "val_loss", "train_error", "val_error"):
        last[col] = last[col].astype(float).where(~bad, math.inf)
    last["gap"] = (last["val_loss"] - last["train_loss"]).where(~bad, math.inf)
    last["gap_error"] = (last["val_error"] - last["train_error"]).where(~bad, math.inf)
    return last.sort_values(["dropout", "lr", "seed"], ignore_index=True)


SUMMARIZED = ("train_loss", "val_loss", "train_error", "val_error", "gap", "gap_error")


def rate_summary(history: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, rate): n_seeds, n_bad (not ok) and, for each of ``SUMMARIZED``, its mean,
    min and max over seeds of the final epoch (``<metric>_mean``, ``_min``, ``_max``); one bad
    seed makes its rate's values infinite."""
    last = final_rows(history)
    g = last.groupby(["dropout", "lr"])
    out = pd.DataFrame({"n_seeds": g["seed"].nunique(),
                        "n_bad": g["status"].agg(lambda s: int((s != "ok").sum()))})
    for col in SUMMARIZED:
        for stat in ("mean", "min", "max"):
            out[f"{col}_{stat}"] = g[col].agg(stat)
    return out.reset_index().sort_values(["dropout", "lr"], ignore_index=True)


def best_rates(rates: pd.DataFrame) -> pd.DataFrame:
    """Per arm, the rate with the lowest mean final validation loss (NaN when every rate went
    bad), its validation error and gap, and ``at_edge`` (the grid's smallest or largest rate:
    the true best may lie beyond)."""
    rows = []
    for p, group in rates.groupby("dropout", sort=True):
        ok = group[np.isfinite(group["val_loss_mean"])]
        lrs = group["lr"].to_numpy(float)
        if ok.empty:
            rows.append({"dropout": p, "best_lr": math.nan, "val_loss_mean": math.nan,
                         "val_error_mean": math.nan, "gap_mean": math.nan, "at_edge": False})
            continue
        best = ok.loc[ok["val_loss_mean"].idxmin()]
        rows.append({"dropout": p, "best_lr": float(best["lr"]),
                     "val_loss_mean": float(best["val_loss_mean"]),
                     "val_error_mean": float(best["val_error_mean"]),
                     "gap_mean": float(best["gap_mean"]),
                     "at_edge": bool(len(lrs) > 1 and best["lr"] in (lrs.min(), lrs.max()))})
    return pd.DataFrame(rows)


def gap_curves(history: pd.DataFrame, lr: float) -> pd.DataFrame:
    """The gap (val - train loss) against epoch at rate ``lr``, per arm: mean, min and max
    over seeds (the figure's lines and bands). Epochs after a run stopped are left out.

    Returns:
        DataFrame(dropout, epoch, gap_mean, gap_min, gap_max, n_seeds).
    Raises:
        ValueError: no run at ``lr``.
    """
    require_columns(history, HISTORY_COLUMNS, "history")
    rows = history[np.isclose(history["lr"].astype(float), lr, rtol=1e-6)]
    if rows.empty:
        raise ValueError(f"lr: got {lr:g}; allowed: a trained rate, one of "
                         f"{sorted(history['lr'].unique())}")
    rows = rows.assign(gap=rows["val_loss"] - rows["train_loss"])
    rows = rows[np.isfinite(rows["gap"])]
    g = rows.groupby(["dropout", "epoch"])["gap"]
    out = pd.DataFrame({"gap_mean": g.mean(), "gap_min": g.min(), "gap_max": g.max(),
                        "n_seeds": g.size()})
    return out.reset_index()


@dataclass(frozen=True)
class DropoutAnalysis:
    """Everything the flow logs: the per-rate table, the best rates, the gap curves at the
    chosen rate, the arm-against-arm comparisons there and the answer sentence."""

    rates: pd.DataFrame
    best: pd.DataFrame
    curves: pd.DataFrame
    gap: dict
    error: dict
    answer: str


def _arm_values(history: pd.DataFrame, lr: float, p: float, metric: str) -> list[float]:
    last = final_rows(history)
    rows = last[np.isclose(last["lr"], lr, rtol=1e-6) & (last["dropout"] == p)]
    return rows[metric].astype(float).tolist()


def rate_sentence(best: pd.DataFrame, p: float) -> str:
    """Whether dropout's best rate differs from no dropout's, as one sentence."""
    by = best.set_index("dropout")["best_lr"]
    b0, bp = float(by.get(0.0, math.nan)), float(by.get(p, math.nan))
    if not (math.isfinite(b0) and math.isfinite(bp)):
        return "An arm diverged at every rate, so its best rate is unknown."
    if math.isclose(b0, bp, rel_tol=1e-6):
        return f"Both arms do best at the same rate of the grid ({b0:.3g})."
    return (f"Dropout does best at {bp:.3g}, {bp / b0:.3g}x the {b0:.3g} without it "
            "(one grid step is half a decade).")


def answer_text(gap: dict, error: dict, p: float, lr: float, rate_line: str) -> str:
    """The verdict: does dropout ``p`` close the gap at ``lr``, at what cost in validation
    error, and its best rate; worded from the comparisons (``compare_over_seeds`` with arm a =
    dropout, arm b = no dropout: a positive margin says dropout's value is lower)."""
    with_p, without = band_text(gap["a"]), band_text(gap["b"])
    verb = {"a": "closes the gap", "b": "widens the gap"}.get(gap["winner"]) or (
        "narrows the gap only within the seed band" if gap["margin"] > 0
        else "does not narrow the gap")
    diff = error["margin"]
    cost = {"a": f"it lowers validation error by {diff:.4f}",
            "b": f"it costs {-diff:.4f} in validation error",
            "tie": f"validation error ties ({-diff:+.4f} with dropout, inside the seed band)"
            }[error["winner"]]
    return (f"At lr {lr:.3g}, dropout {p:g} {verb}: final val - train loss {without} without, "
            f"{with_p} with (mean [min..max] over seeds); {cost} ({band_text(error['b'])} "
            f"without, {band_text(error['a'])} with). {rate_line}")


def analyze(history: pd.DataFrame, plan: DropoutPlan) -> DropoutAnalysis:
    """The per-rate table, best rates, gap curves at the chosen rate and the verdict."""
    rates = rate_summary(history)
    best = best_rates(rates)
    lr, p = plan.chosen_rate(), float(plan.dropout)
    gap, error = (compare_over_seeds(_arm_values(history, lr, p, m),
                                     _arm_values(history, lr, 0.0, m))
                  for m in ("gap", "val_error"))
    answer = answer_text(gap, error, p, lr, rate_sentence(best, p))
    return DropoutAnalysis(rates, best, gap_curves(history, lr), gap, error, answer)
