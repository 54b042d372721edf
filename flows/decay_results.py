"""The decay flow's results: schedules ranked over seeds (with the generalization gap), the
loss choice, the best decaying schedule against constant, and the printed summary."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from lrpipe import tracking
from lrpipe.experiments import decay

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def mean_curve(history: pd.DataFrame) -> pd.DataFrame:
    """Train and validation loss per epoch, mean over seeds (one schedule's rows)."""
    return history.groupby("epoch", as_index=False)[["train_loss", "val_loss"]].mean()


def rank_schedules(history: pd.DataFrame, decays: pd.DataFrame) -> pd.DataFrame:
    """``decay.summarize_runs`` plus, per schedule, the gap-growth epoch of the seed-mean
    curves and the mean final gap (val - train loss)."""
    planned = {r.schedule: None if math.isnan(r.total_decay) else r.total_decay
               for r in decays.itertuples()}
    ranking = decay.summarize_runs(history, planned)
    last = decay.final_rows(history)
    gaps = (last["val_loss"] - last["train_loss"]).groupby(last["schedule"]).mean()
    growth = {name: decay.gap_growth_epoch(mean_curve(rows))
              for name, rows in history.groupby("schedule")}
    ranking["gap_growth_epoch"] = pd.array([growth[s] for s in ranking["schedule"]],
                                           dtype="Int64")
    ranking["final_gap_mean"] = ranking["schedule"].map(gaps)
    return ranking


def rate_set_by(plan, name: str) -> str:
    """What moves a schedule's rate: ``selection loss`` for plateau (it steps when the
    validation loss, the selection split that ranks it, stalls), else ``its plan``."""
    return "selection loss" if plan.schedules[name].name == "plateau" else "its plan"


def selection_notes(plan, ranking: pd.DataFrame) -> list[str]:
    """The ranking's labels: every figure is measured on the selection split by the runs that
    rank (in-sample); plateau's rate also looked at that split while training."""
    notes = [f"In-sample: the ranking's figures are the selection (validation) split's, on the "
             f"seeds that rank ({', '.join(map(str, plan.seeds))}); the test set is scored once, "
             "only for the best schedule's runs on the fresh seeds, reported beside the "
             "ranking and never read by it."]
    seen = ranking.loc[ranking["rate_set_by"] == "selection loss", "schedule"].tolist()
    if seen:
        notes.append(f"{', '.join(seen)} cut the rate when the selection loss stalled: it saw "
                     "the split it is ranked on while training, the fixed-plan schedules did "
                     "not; its rank is marked `rate_set_by = selection loss`.")
    return notes


def loss_table(history: pd.DataFrame) -> pd.DataFrame:
    """Final cross-entropy and error per training loss (mean, std, min, max over seeds)."""
    table = decay.summarize_runs(history.assign(schedule=history["loss"]))
    cols = [c for c in table.columns if c.startswith(("final_val_", "n_"))]
    return table[["rank", "schedule", *cols]].rename(columns={"schedule": "loss"})


def loss_figure(history: pd.DataFrame, schedule: str, rates: dict[str, float]) -> Figure:
    """Validation cross-entropy and error against epoch per training loss (at its rate)."""
    from matplotlib.figure import Figure  # drawing libraries load here, after training

    from lrpipe.plots import decay as decay_plots

    fig = Figure(figsize=(12.0, 4.5), layout="constrained")
    by_loss = history.assign(schedule=history["loss"].map(lambda x: f"{x}, lr={rates[x]:g}"))
    for ax, metric in zip(fig.subplots(1, 2), ("val_loss", "val_error"), strict=True):
        decay_plots.plot_metric_band(by_loss, metric, ax=ax)
        ax.legend(title="training loss", fontsize="small")
    fig.suptitle(f"Loss choice for {schedule}: evaluated as cross-entropy and error")
    return fig


def versus_constant(ranking: pd.DataFrame) -> dict | None:
    """The best decaying schedule against constant on mean final val loss (None without
    constant or another schedule)."""
    rows = ranking.set_index("schedule")["final_val_loss_mean"]
    if "constant" not in rows or len(rows) < 2:
        return None
    # The best-ranked decaying schedule: a raced ranking puts the schedules measured on every
    # seed first (lrpipe.experiments.race), whatever a pruned one's single seed says.
    best = next(s for s in ranking["schedule"] if s != "constant")
    return {"best_decaying": best, "best_val_loss": float(rows[best]),
            "constant_val_loss": float(rows["constant"]),
            "beats_constant": bool(rows[best] < rows["constant"])}


def spread(table: pd.DataFrame, metric: str) -> pd.Series:
    """``mean +- std [min, max]`` of ``final_<metric>_*`` per row, as text."""
    cols = [table[f"final_{metric}_{stat}"] for stat in ("mean", "std", "min", "max")]
    return pd.Series([f"{m:.4f} +- {s:.4f} [{lo:.4f}, {hi:.4f}]"
                      for m, s, lo, hi in zip(*cols, strict=True)], index=table.index)


def ranking_text(ranking: pd.DataFrame) -> str:
    """The ranking as a printable table: spread of final val loss and error over seeds."""
    shown = pd.DataFrame({
        "rank": ranking["rank"], "schedule": ranking["schedule"],
        "decay": ranking["total_decay"].map(lambda d: "val-loss" if math.isnan(d) else f"{d:.3g}x"),
        "seen": ranking["epoch_lr_decay"].map("{:.3g}x".format),  # per-epoch lr, max/last
        "val loss mean +- std [min, max]": spread(ranking, "val_loss"),
        "val error mean +- std [min, max]": spread(ranking, "val_error"),
        "gap grows from": ranking["gap_growth_epoch"].map(lambda e: "-" if pd.isna(e) else e),
        "final gap": ranking["final_gap_mean"].map("{:.4f}".format),
        "short": ranking["n_short"]})
    if "race" in ranking:  # raced over seeds: how many each was measured on, and why
        shown["seeds"], shown["race"] = ranking["n_seeds"].to_numpy(), ranking["race"].to_numpy()
    return shown.to_string(index=False)


def loss_text(table: pd.DataFrame) -> str:
    return pd.DataFrame({"loss": table["loss"], "lr": table["lr"], "seeds": table["n_seeds"],
                         "val cross-entropy mean +- std [min, max]": spread(table, "val_loss"),
                         "val error mean +- std [min, max]": spread(table, "val_error"),
                         }).to_string(index=False)


def print_summary(ranking, losses, vs, parent, experiment, seconds) -> None:
    print(f"\ndecay_compare: {ranking['n_seeds'].sum()} schedule runs in {seconds:.0f} s; "
          "final validation loss and error over seeds (mean, std, min, max)")
    print(ranking_text(ranking))
    best = ranking.iloc[0]
    print(f"Best schedule: {best['schedule']}  validation loss {best['final_val_loss_mean']:.4f}"
          f" +- {best['final_val_loss_std']:.4f}, validation error "
          f"{best['final_val_error_mean']:.4f} +- {best['final_val_error_std']:.4f}")
    if vs is not None:
        verdict = "beats" if vs["beats_constant"] else "does NOT beat"
        print(f"Best decaying schedule {vs['best_decaying']} ({vs['best_val_loss']:.4f}) "
              f"{verdict} constant ({vs['constant_val_loss']:.4f}) on mean final val loss")
    if losses is not None:
        print(f"\nLoss choice for {best['schedule']} (evaluated as cross-entropy and error; a "
              "squared-error model's outputs are not log-probabilities, so compare errors):")
        print(loss_text(losses))
    print(f"MLflow: {tracking.run_url(parent, experiment)}  (start the UI with `make ui`)")
