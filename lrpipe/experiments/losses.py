"""Cross-entropy against squared error, fairly: each loss at its own searched rate.

The decay comparison trains squared error (MSE against one-hot targets) at a fixed 0.25x of the
cross-entropy rate (``flows.decay_compare.LOSS_LR_SCALE``), a rule of thumb from the curvature
of the two losses. Here each loss gets the same learning-rate search (``lrpipe.search``, same
subset, seeds, range steps, regret epochs and grid span: the same budget), then both train at
their searched rates over fresh seeds (none the search used), and the analysis says which loss
ends with the lower validation error, by how much, and whether that margin is inside the band
over seeds (``lrpipe.experiments.bands``). Validation loss is cross-entropy for both (a squared-
error model's outputs are not log-probabilities, so its cross-entropy is shown, not judged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lrpipe.engine.config import LOSSES, ConfigError, TrainConfig, check_number, merge
from lrpipe.experiments.bands import band_text, check_seed_list, compare_over_seeds
from lrpipe.experiments.decay import require_columns

DEFAULT_SEEDS = (10, 11, 12)  # comparison seeds: fresh, none of the search's (0, 1, 2)
DEFAULT_EPOCHS = 5  # passes over the full training split per comparison run (epochs)
PLAN_FIELDS = ("loss", "optim.lr", "seed", "epochs")  # set per run by this experiment
HISTORY_COLUMNS = ("loss", "lr", "seed", "epoch", "status", "train_loss", "val_loss",
                   "train_error", "val_error")


@dataclass(frozen=True)
class LossPlan:
    """The comparison after the searches, validated on construction (errors name the field).

    seeds: comparison seeds, distinct, >= 0, none in ``used_seeds``; 3 or more for a band.
    epochs: passes over the training data of every comparison run.
    used_seeds: the seeds the searches used (their range tests and halving searches, and the
        base config's seed, which their regret runs train with).
    """

    seeds: tuple[int, ...] = DEFAULT_SEEDS
    epochs: int = DEFAULT_EPOCHS
    used_seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        seeds = check_seed_list("seeds", self.seeds)
        reused = sorted(set(seeds) & set(self.used_seeds))
        if reused:
            raise ConfigError(f"seeds: got {list(seeds)}; allowed: seeds the search did not use "
                              f"(it used {sorted(set(self.used_seeds))}; {reused} again)")
        object.__setattr__(self, "seeds", tuple(sorted(seeds)))
        check_number("epochs", self.epochs, low=1, integer=True)


def search_overrides(overrides: Mapping | None, loss: str) -> dict:
    """The overrides of ``loss``'s search: ``overrides`` plus the loss. Overriding a field of
    ``PLAN_FIELDS`` is a ConfigError naming it."""
    overrides = dict(overrides or {})
    for key in PLAN_FIELDS:
        section, _, sub = key.partition(".")
        nested = overrides.get(section) if sub else None
        if key in overrides or (isinstance(nested, Mapping) and sub in nested):
            raise ConfigError(f"{key}: set by this experiment (each loss, its searched rate, "
                              "--seeds, --epochs); allowed: other fields")
    if loss not in LOSSES:
        raise ConfigError(f"loss: got {loss!r}; allowed: {', '.join(LOSSES)}")
    return {**overrides, "loss": loss}


def comparison_configs(overrides: Mapping | None, plan: LossPlan,
                       rates: Mapping[str, float]) -> list[TrainConfig]:
    """One config per (loss, seed), losses in ``LOSSES`` order: the default config with
    ``overrides`` (the search's full-data config), the loss at its searched rate.

    Raises:
        ConfigError: a loss has no searched rate (named ``rates[<loss>]``).
    """
    cfgs = []
    for loss in LOSSES:
        lr = rates.get(loss)
        if lr is None:
            raise ConfigError(f"rates[{loss}]: the search chose no rate; allowed: a rate > 0 "
                              "(every rate diverged? see its search run)")
        check_number(f"rates[{loss}]", lr, low=0.0, low_open=True)
        base = merge(TrainConfig(), search_overrides(overrides, loss))
        cfgs += [merge(base, {"optim.lr": float(lr), "seed": s, "epochs": plan.epochs})
                 for s in plan.seeds]
    return cfgs


def history_table(cfgs: Sequence[TrainConfig], finals: Sequence[Mapping]) -> pd.DataFrame:
    """Every run's History rows (``HISTORY_COLUMNS`` and run_id), one result per config."""
    if len(cfgs) != len(finals):
        raise ValueError(f"finals: got {len(finals)} for {len(cfgs)} configs; allowed: one each")
    frames = [pd.DataFrame(f["history"]).assign(
        loss=c.loss, lr=c.optim.lr, seed=c.seed, status=f["status"],
        run_id=f.get("run_id", "")) for c, f in zip(cfgs, finals, strict=True)]
    return pd.concat(frames, ignore_index=True)[[*HISTORY_COLUMNS, "run_id"]]


def curves(history: pd.DataFrame) -> pd.DataFrame:
    """Validation error and loss against epoch per loss: mean, min and max over seeds.

    Returns:
        DataFrame(loss, lr, epoch, n_seeds, val_error_mean/min/max, val_loss_mean/min/max).
    """
    require_columns(history, HISTORY_COLUMNS, "history")
    g = history.groupby(["loss", "lr", "epoch"])
    out = pd.DataFrame({"n_seeds": g.size()})
    for col in ("val_error", "val_loss"):
        for stat in ("mean", "min", "max"):
            out[f"{col}_{stat}"] = g[col].agg(stat)
    return out.reset_index()


def final_values(history: pd.DataFrame, loss: str, metric: str) -> list[float]:
    """``metric`` at each seed's last epoch for ``loss``; a run not ``ok`` gives inf."""
    require_columns(history, HISTORY_COLUMNS, "history")
    rows = history[history["loss"] == loss].sort_values("epoch").groupby("seed").tail(1)
    bad = (rows["status"] != "ok").to_numpy()
    return np.where(bad, np.inf, rows[metric].astype(float).to_numpy()).tolist()


@dataclass(frozen=True)
class LossAnalysis:
    """The summary table (one row per loss), the curves, the error comparison (arm a =
    cross-entropy, arm b = squared error) and the answer sentence."""

    summary: pd.DataFrame
    curves: pd.DataFrame
    error: dict
    answer: str


def summary_table(history: pd.DataFrame) -> pd.DataFrame:
    """Per loss: its rate, seeds, runs not ok, final validation error and loss, mean
    [min..max] over seeds, as numbers."""
    rows = []
    for loss in LOSSES:
        sub = history[history["loss"] == loss]
        if sub.empty:
            continue
        row = {"loss": loss, "lr": float(sub["lr"].iloc[0]), "n_seeds": sub["seed"].nunique(),
               "n_bad": int((sub.groupby("seed")["status"].last() != "ok").sum())}
        for metric in ("val_error", "val_loss"):
            values = np.asarray(final_values(history, loss, metric))
            row.update({f"{metric}_mean": values.mean(), f"{metric}_min": values.min(),
                        f"{metric}_max": values.max()})
        rows.append(row)
    return pd.DataFrame(rows)


def answer_text(error: dict, rates: Mapping[str, float], n_seeds: int) -> str:
    """Which loss wins on final validation error and by how much, or a tie when the margin is
    inside the band over seeds (the min..max bands overlap)."""
    a, b = LOSSES  # cross_entropy, mse
    bands = (f"{a} at lr {rates[a]:.3g}: {band_text(error['a'])}; {b} at lr {rates[b]:.3g}: "
             f"{band_text(error['b'])} (final validation error, mean [min..max] over "
             f"{n_seeds} fresh seeds)")
    if error["tie"]:
        return (f"Tie on validation error: the margin {abs(error['margin']):.4f} is inside the "
                f"band over seeds. {bands}.")
    win, lose = (a, b) if error["winner"] == "a" else (b, a)
    return (f"{win} wins on validation error by {abs(error['margin']):.4f} over {lose}, "
            f"outside the band over seeds. {bands}.")


def analyze(history: pd.DataFrame, rates: Mapping[str, float]) -> LossAnalysis:
    a, b = LOSSES
    error = compare_over_seeds(final_values(history, a, "val_error"),
                               final_values(history, b, "val_error"))
    n = int(history["seed"].nunique())
    return LossAnalysis(summary_table(history), curves(history), error,
                        answer_text(error, rates, n))
