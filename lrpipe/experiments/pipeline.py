"""The pipeline's design: its stages, which of them run, and what the full training trains.

``make sweep`` runs the pipeline: the learning-rate search, full training at the chosen rate and
its neighbours, the decay comparison, the final training (the chosen rate and the winning
schedule on all the training data, tested once on the test set) and the transfer experiment.
Pure functions; the flow ``flows.pipeline`` runs the stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lrpipe.engine.config import ConfigError
from lrpipe.experiments.confirm import check_fresh_seeds
from lrpipe.experiments.sweep import DEFAULT_EPOCHS, DEFAULT_LRS, landscape_rates
from lrpipe.search import plan as search_plan

__all__ = ["DEFAULT_EPOCHS", "EXPERIMENT", "SEARCH_KEYS", "STAGES", "check_search_settings",
           "check_skip", "final_answer", "full_training_rates", "sweep_regret"]

EXPERIMENT = "pipeline"
STAGES = ("search", "sweep", "decay", "final", "transfer")
SEARCH_KEYS = ("subset", "seeds", "range_steps", "regret_epochs", "grid_span", "confirm_seeds")


def check_skip(skip) -> list[str]:
    """``skip`` as a list of stage names; an unknown name is a ConfigError listing STAGES."""
    if isinstance(skip, str):
        skip = [s for s in skip.split(",") if s.strip()]
    for stage in skip or ():
        if stage not in STAGES:
            raise ConfigError(f"skip: got {stage!r}; allowed: {', '.join(STAGES)}")
    return list(skip or ())


def check_search_settings(search: Mapping | None, overrides: Mapping | None) -> dict:
    """lr_search's settings (subset, seeds, ...) checked as lr_search.validate would, short
    of loading data."""
    search = dict(search or {})
    for key in search:
        if key not in SEARCH_KEYS:
            raise ConfigError(f"search.{key}: unknown setting; allowed: {', '.join(SEARCH_KEYS)}")
    defaults = {"subset": search_plan.DEFAULT_SUBSET, "seeds": search_plan.DEFAULT_SEEDS,
                "range_steps": search_plan.DEFAULT_RANGE_STEPS,
                "regret_epochs": search_plan.DEFAULT_REGRET_EPOCHS,
                "grid_span": search_plan.DEFAULT_GRID_SPAN}
    full = {**defaults, **search}
    seeds = search_plan.check_search(full["seeds"], full["range_steps"], full["grid_span"])
    base, _ = search_plan.search_configs(overrides, full["subset"], full["regret_epochs"])
    check_fresh_seeds(full.get("confirm_seeds", search_plan.DEFAULT_CONFIRM_SEEDS),
                      [*seeds, base.seed])
    return search


def full_training_rates(lrs: Sequence[float] | None, search: dict | None) -> list[float]:
    """``lrs`` when given, else the landscape around the search's chosen rate
    (``sweep.landscape_rates``: 2 decades below to 1.5 above, with the search's neighbours),
    else lr_sweep's default grid."""
    if lrs:
        return [float(x) for x in lrs]
    if search is not None and search.get("chosen_lr"):
        return landscape_rates(search["chosen_lr"], search.get("neighbours", ()))
    if search is not None:
        return list(search["neighbours"])
    return list(DEFAULT_LRS)


def sweep_regret(summary: list[dict], lr: float | None) -> dict | None:
    """The chosen rate's full-training val loss against the best of the rates trained:
    {lr, val_loss, best_lr, best_val_loss, regret}; None when ``lr`` was not trained."""
    ok = [r for r in summary if r["status"] == "ok"]
    mine = [r for r in ok if lr is not None and abs(r["lr"] / lr - 1) < 1e-9]
    if not ok or not mine:
        return None
    best = min(ok, key=lambda r: r["val_loss"])
    return {"lr": lr, "val_loss": mine[0]["val_loss"], "best_lr": best["lr"],
            "best_val_loss": best["val_loss"],
            "regret": mine[0]["val_loss"] / best["val_loss"] - 1.0}


def final_answer(final: dict | None, chosen: float | None) -> str:
    """The line the pipeline's report opens with: the final model's rate, schedule (with its
    total decay), epochs, test accuracy and loss, and the constant-rate run's beside it; or
    why there is none."""
    if final is None:
        return ("no final model (final stage skipped)" if chosen is not None
                else "no rate chosen, no final model")
    decay = ("decay set by the selection loss" if final["total_decay"] is None
             else f"total decay {final['total_decay']:.0f}x")
    win, const = final["winner"], final["constant"]
    if win["status"] == "diverged":
        return (f"Final model: lr {final['lr']:.3g}, {final['schedule']}: DIVERGED in its "
                f"{final['epochs']}-epoch training; not tested")
    line = (f"Final model: lr {final['lr']:.3g}, {final['schedule']} schedule ({decay}), "
            f"{final['epochs']} epochs, full training data: test accuracy "
            f"{win['test_accuracy']:.4f} (test loss {win['test_loss']:.4f})")
    if const is not None and const["run_id"] != win["run_id"]:
        line += ("; constant rate at the same lr: " + (
            "DIVERGED" if const["status"] == "diverged" else
            f"test accuracy {const['test_accuracy']:.4f} (test loss {const['test_loss']:.4f})"))
    return line
