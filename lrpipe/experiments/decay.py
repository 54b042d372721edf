"""Comparing learning-rate decay schedules: the set to compare and pure analyses of histories.

Histories are long-form DataFrames, one row per (schedule, seed, epoch), with the columns of
train()'s history (train_loss, val_loss, train_error, val_error, lr) plus ``schedule`` and
``seed``. Every function here is pure: DataFrames and configs in, DataFrames and numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from lrpipe.engine.config import ScheduleConfig
from lrpipe.engine.schedules import preview, total_decay

RUN_COLUMNS = ("schedule", "seed", "epoch", "train_loss", "val_loss", "train_error",
               "val_error", "lr")


def require_columns(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; required: {', '.join(columns)}")
    if df.empty:
        raise ValueError(f"{what}: no rows; required: at least one row")


def default_schedules(*, final_decay: float = 100.0, epochs: int) -> dict[str, ScheduleConfig]:
    """The schedules the decay comparison runs, all decaying ``final_decay`` x (peak/last).

    constant (the baseline), step (every epochs//3 epochs), multistep (at 50% and 75% of the
    budget, the ResNet recipe), exponential, cosine, onecycle (torch's 30% rise), warmup_cosine
    (linear warmup over 10% of the budget, then cosine), inverse_time, and plateau (patience 1,
    factor 0.1; its decay depends on validation loss). All step smoothly per batch.

    Raises:
        ValueError: epochs < 2 (no room for a decay and a milestone inside the budget).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
        raise ValueError(f"epochs: got {epochs!r}; allowed: an integer >= 2")
    milestones = tuple(sorted({max(1, int(epochs * f)) for f in (0.5, 0.75)}))
    common = dict(final_decay=float(final_decay), per_batch=True)
    return {
        "constant": ScheduleConfig(name="constant", **common),
        "step": ScheduleConfig(name="step", step_size=max(1, epochs // 3), **common),
        "multistep": ScheduleConfig(name="multistep", milestones=milestones, **common),
        "exponential": ScheduleConfig(name="exponential", **common),
        "cosine": ScheduleConfig(name="cosine", **common),
        "onecycle": ScheduleConfig(name="onecycle", **common),
        "warmup_cosine": ScheduleConfig(name="cosine", warmup_epochs=epochs / 10, **common),
        "inverse_time": ScheduleConfig(name="inverse_time", **common),
        "plateau": ScheduleConfig(name="plateau", patience=1, plateau_factor=0.1, **common),
    }


def schedule_previews(schedules: Mapping[str, ScheduleConfig], epochs: int,
                      steps_per_epoch: int, base_lr: float = 1.0) -> pd.DataFrame:
    """Every schedule's per-update rate, stacked, for ``decay_plots.plot_schedules``.

    Returns:
        DataFrame(schedule, step, epoch, lr, total_decay): ``total_decay`` (peak/last, see
        ``schedules.total_decay``) repeats on each row of its schedule; NaN for plateau.
    """
    frames = []
    for name, cfg in schedules.items():
        df = preview(cfg, epochs, steps_per_epoch, base_lr)
        decay = total_decay(cfg, epochs, steps_per_epoch)
        df.insert(0, "schedule", name)
        df["total_decay"] = math.nan if decay is None else decay
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last recorded epoch of each (schedule, seed) run (a diverged run ends early)."""
    require_columns(df, RUN_COLUMNS, "runs")
    last = df.sort_values("epoch").groupby(["schedule", "seed"], sort=False).tail(1)
    return last.sort_values(["schedule", "seed"]).reset_index(drop=True)


def _epoch_lr_decay(df: pd.DataFrame) -> pd.Series:
    """Per run: largest lr of the lr column over the lr of its last epoch."""
    ordered = df.sort_values("epoch").groupby(["schedule", "seed"])["lr"]
    return ordered.max() / ordered.last()


def summarize_runs(df: pd.DataFrame,
                   planned_decay: Mapping[str, float | None] | None = None) -> pd.DataFrame:
    """One row per schedule, ranked by mean final validation loss (rank 1 = lowest).

    Args:
        df: long-form histories with ``RUN_COLUMNS``.
        planned_decay: ``schedules.total_decay`` per schedule name (None/absent -> NaN).
    Returns:
        DataFrame(schedule, rank, n_seeds, n_short, final_val_loss_{mean,std,min,max},
        final_val_error_{mean,std,min,max}, epoch_lr_decay, total_decay), sorted by rank
        (ties share the lower rank, then by name).
        "final" is each run's last recorded epoch; ``n_short`` counts runs that stopped before
        the longest one (diverged). std is over seeds (NaN for one seed). ``epoch_lr_decay`` is
        the realized max/last of the per-epoch lr column, mean over seeds: coarser than the
        per-update ``total_decay`` (the last epoch starts above the final rate), but it is the
        only measure of plateau's decay.
    """
    last = final_rows(df)
    longest = df["epoch"].max()
    grouped = last.groupby("schedule")
    out = pd.DataFrame({"n_seeds": grouped["seed"].nunique(),
                        "n_short": grouped["epoch"].apply(lambda e: int((e < longest).sum()))})
    for metric in ("val_loss", "val_error"):
        stats = grouped[metric].agg(["mean", "std", "min", "max"])
        for stat in stats.columns:
            out[f"final_{metric}_{stat}"] = stats[stat]
    out["epoch_lr_decay"] = _epoch_lr_decay(df).groupby(level="schedule").mean()
    planned = planned_decay or {}
    out["total_decay"] = [math.nan if planned.get(s) is None else float(planned[s])
                          for s in out.index]
    out.insert(0, "rank", out["final_val_loss_mean"].rank(method="min").astype(int))
    return out.sort_values(["rank", "schedule"]).rename_axis("schedule").reset_index()


def metric_bands(df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Mean, std, min and max of ``metric`` over seeds, per schedule and epoch.

    Returns:
        DataFrame(schedule, epoch, mean, std, min, max, n): n = seeds that reached the epoch.
    """
    require_columns(df, ("schedule", "seed", "epoch", metric), "runs")
    stats = df.groupby(["schedule", "epoch"])[metric].agg(["mean", "std", "min", "max", "count"])
    return stats.rename(columns={"count": "n"}).reset_index()


def gap_growth_epoch(history: pd.DataFrame, *, run: int = 2, tol: float = 0.0,
                     start: int = 1) -> int | None:
    """The epoch after which the generalization gap (val_loss - train_loss) grows for good.

    Rule: the first epoch e >= ``start`` such that the gap rises at each of the next ``run``
    epochs and never afterwards comes back to within ``tol`` (loss units) of its value at e.
    Epoch 0 is skipped by default: before training the gap is only the sampling difference of
    two splits. Returns None when no epoch qualifies (or the history is too short).

    Args:
        history: one run's rows with columns epoch, train_loss, val_loss (any order).
    """
    require_columns(history, ("epoch", "train_loss", "val_loss"), "history")
    if run < 1 or tol < 0:
        raise ValueError(f"run, tol: got {run!r}, {tol!r}; allowed: run >= 1 and tol >= 0")
    rows = history.sort_values("epoch")
    rows = rows[rows["epoch"] >= start]
    epochs = rows["epoch"].tolist()
    gap = (rows["val_loss"] - rows["train_loss"]).tolist()
    for i in range(len(gap) - run):
        rising = all(gap[j + 1] > gap[j] for j in range(i, i + run))
        if rising and min(gap[i + 1:]) > gap[i] + tol:
            return int(epochs[i])
    return None
