"""The final training: the pipeline's answers trained once more, on all the data, and tested.

After the search has chosen a rate and the decay comparison has ranked the schedules (on a
20,000-example subset, over a short budget), the final stage trains the winning schedule at
the chosen rate on the full training data for a longer budget, with the constant-rate twin at
the same rate beside it, and evaluates both once on the test split: Fashion-MNIST's and MNIST's
official t10k images, digits' held-out last 297 images, a plug-in loader's held-out split.
The test split is never used for a choice: the rate and the schedule were chosen on the
selection split (the 10,000 images carved from the training set), and each model meets the
test split once, after its training ended. Pure functions; ``flows.final`` runs them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lrpipe.engine.config import ConfigError, TrainConfig, check_number, is_plugin, merge
from lrpipe.engine.data import Dataset, Split
from lrpipe.engine.members import evaluate
from lrpipe.engine.schedules import total_decay
from lrpipe.experiments.bands import band, band_text
from lrpipe.experiments.decay import default_schedules

__all__ = ["CONFIRM_OFF", "EPOCH_FACTOR", "FINAL_DECAY", "FinalPlan", "TEST_HEADING",
           "TEST_KEYS", "final_epochs", "final_plan", "plan_summary", "score_once",
           "test_line", "test_metrics", "test_parent_metrics", "test_set_name",
           "test_summary", "test_table", "without_test"]

# The final budget is this many times the decay comparison's (epochs, not steps): the ranking
# was read after a short budget on a subset; the final model gets the longer one it deserves.
EPOCH_FACTOR = 2
# Peak rate / last rate of the final schedule (x): the usual ~100x target, as the comparison's.
FINAL_DECAY = 100.0
CONSTANT = "constant"
# The figures a test scoring logs on its run (``test_metrics`` adds the split's size).
TEST_KEYS = ("test_loss", "test_accuracy", "test_error")
# How every report labels the test figure of a recommended recipe, and what it says instead
# when the runs that would carry it (the confirmation on fresh seeds) were turned off.
TEST_HEADING = "Test set (never used to choose)"
CONFIRM_OFF = "no test score: confirmation seeds were turned off"


@dataclass(frozen=True)
class FinalPlan:
    """What the final stage trains.

    schedule: the winning schedule's name (``decay.default_schedules``).
    schedule_source: why that schedule (the decay ranking, or the comparison was skipped).
    epochs: the final budget (epochs, not steps).
    winner: the winning schedule's config at the chosen rate, full data.
    constant: the constant-rate twin (same rate, data, budget, seed); equal to ``winner``
        when the winner is the constant rate.
    total_decay: the winner's peak/last rate over the final budget (x); None for plateau,
        whose decay depends on the validation loss.
    steps_per_epoch: updates per epoch on the final training split.
    test_set: where the test split comes from, in words.
    """

    schedule: str
    schedule_source: str
    epochs: int
    winner: TrainConfig
    constant: TrainConfig
    total_decay: float | None
    steps_per_epoch: int
    test_set: str

    def configs(self) -> dict[str, TrainConfig]:
        """{label: config} to train, the twin left out when it is the winner itself."""
        if self.winner.hash() == self.constant.hash():
            return {self.schedule: self.winner}
        return {self.schedule: self.winner, CONSTANT: self.constant}


def final_epochs(decay_epochs: int, epochs: int | None = None) -> int:
    """``epochs`` when given (an integer >= 2), else ``EPOCH_FACTOR`` x ``decay_epochs``."""
    check_number("decay_epochs", decay_epochs, low=1, integer=True)
    if epochs is None:
        return EPOCH_FACTOR * int(decay_epochs)
    check_number("final_epochs", epochs, low=2, integer=True)
    return int(epochs)


def test_set_name(dataset: str) -> str:
    """Where ``dataset``'s test split comes from (``lrpipe.engine.data.load_data``), in words."""
    if dataset in ("fashion_mnist", "mnist"):
        label = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}[dataset]
        return f"the official {label} test set (t10k, 10,000 images)"
    if dataset == "digits":
        return ("digits' held-out last 297 images (scikit-learn's digits have no official "
                "test set)")
    if is_plugin(dataset):
        return "the plug-in loader's held-out split"
    return f"the test split of {dataset}"


def final_plan(lr: float, best_schedule: str | None, decay_epochs: int, train_size: int,
               overrides: Mapping | None = None, epochs: int | None = None) -> FinalPlan:
    """The final training of the pipeline's answer.

    Args:
        lr: the chosen rate (the search's, else the sweep's best).
        best_schedule: the decay ranking's first schedule; None when the comparison was
            skipped (then the constant rate, and ``schedule_source`` says so).
        decay_epochs: the comparison's budget; the final one is ``final_epochs``' of it.
        train_size: examples in the final training split (sizes the per-batch schedule).
        overrides: the user's dotted config overrides (``data.subset`` only if they set it).
        epochs: the final budget; default ``EPOCH_FACTOR`` x ``decay_epochs``.
    Raises:
        ConfigError: a bad rate, budget or schedule name (the message names it).
    """
    check_number("lr", lr, low=0.0, low_open=True)
    n_epochs = final_epochs(decay_epochs, epochs)
    schedules = default_schedules(final_decay=FINAL_DECAY, epochs=n_epochs)
    name = CONSTANT if best_schedule is None else best_schedule
    if name not in schedules:
        raise ConfigError(f"best_schedule: got {name!r}; allowed: {', '.join(schedules)}")
    base = merge(TrainConfig(), {**(overrides or {}), "epochs": n_epochs, "optim.lr": lr})
    winner = base.replace(schedule=dataclasses.asdict(schedules[name]))
    constant = base.replace(schedule=dataclasses.asdict(schedules[CONSTANT]))
    spe = -(-int(train_size) // winner.batch_size)
    source = ("the default, as the decay comparison was skipped" if best_schedule is None
              else "the decay ranking's first (mean final selection-split loss)")
    return FinalPlan(name, source, n_epochs, winner, constant,
                     total_decay(winner.schedule, n_epochs, spe), spe,
                     test_set_name(winner.data.dataset))


def plan_summary(plan: FinalPlan) -> str:
    """One line: rate, schedule, its total decay, budget, data, test set."""
    decay = ("decay depends on the selection loss" if plan.total_decay is None
             else f"total decay {plan.total_decay:.0f}x")
    data = ("full training split" if plan.winner.data.subset is None
            else f"{plan.winner.data.subset} training examples")
    return (f"lr {plan.winner.optim.lr:.3g}, {plan.schedule} ({decay}; from "
            f"{plan.schedule_source}), {plan.epochs} epochs, {data}; tested once on "
            f"{plan.test_set}")


def without_test(data: Dataset) -> Dataset:
    """``data`` with an empty test split: what training gets, so that nothing it does can
    read the test images (an evaluation on the empty split fails: it divides by zero)."""
    empty = Split(data.test.x[:0], data.test.y[:0])
    return dataclasses.replace(data, test=empty)


@torch.no_grad()
def test_metrics(model: torch.nn.Module, data: Dataset) -> dict[str, float]:
    """{test_loss, test_accuracy, test_error, test_size} of a trained ``model`` on
    ``data.test``: cross-entropy and classification error as the loop measures the selection
    split (``members.evaluate``), on the model's device, in eval mode.

    Raises:
        ValueError: the test split is empty (no test set to evaluate).
    """
    if len(data.test) == 0:
        raise ValueError("data.test: got 0 examples; allowed: a non-empty test split")
    device = next(model.parameters()).device
    loss, error = evaluate(model, data.test.to(device))
    return {"test_loss": float(loss), "test_accuracy": 1.0 - float(error),
            "test_error": float(error), "test_size": float(len(data.test))}


def score_once(model: torch.nn.Module | None, data: Dataset, status: str) -> dict[str, float]:
    """``TEST_KEYS`` of a model trained on ``without_test(data)``, scored once on
    ``data.test`` after its training ended; NaN for each when the run diverged (a diverged
    model is not tested) or kept no model."""
    if status == "diverged" or model is None:
        return {k: math.nan for k in TEST_KEYS}
    scored = test_metrics(model, data)
    return {k: scored[k] for k in TEST_KEYS}


def test_summary(runs: pd.DataFrame, recipe: str, seeds: Sequence[int]) -> dict:
    """A recommended recipe's test figures over its seeds: one row per run in ``runs``
    (columns test_loss, test_accuracy; NaN for a diverged run, which was not tested).

    Returns {recipe, seeds, n, scored, test_accuracy, test_accuracy_min, test_accuracy_max,
    test_loss, test_loss_min, test_loss_max, test_error}: mean, min and max over the scored
    runs (``bands.band``), all NaN when none was scored. Reported beside a choice, never
    read by one.
    Raises:
        ValueError: ``runs`` lacks a test column or holds no run.
    """
    missing = {"test_loss", "test_accuracy"} - set(runs.columns)
    if missing or runs.empty:
        raise ValueError(f"runs: got columns {sorted(runs.columns)} and {len(runs)} rows; "
                         "allowed: at least one run with test_loss and test_accuracy")
    out = {"recipe": recipe, "seeds": [int(s) for s in seeds], "n": len(runs)}
    acc = runs["test_accuracy"].astype(float).to_numpy()
    scored = np.isfinite(acc) & np.isfinite(runs["test_loss"].astype(float).to_numpy())
    out["scored"] = int(scored.sum())
    for key in ("test_accuracy", "test_loss"):
        vals = runs.loc[scored, key].astype(float)
        stats = band(vals) if len(vals) else (math.nan,) * 3
        out.update({key: stats[0], f"{key}_min": stats[1], f"{key}_max": stats[2]})
    out["test_error"] = 1.0 - out["test_accuracy"]
    return out


def untested_line(confirm_seeds: Sequence[int], what: str) -> str:
    """The report's test line when no run was scored: the confirmation was off (``--confirm-
    seeds none``, ``CONFIRM_OFF``) or there was no runner-up ``what`` to confirm against."""
    why = CONFIRM_OFF if not confirm_seeds else f"no test score: one {what}, no runner-up"
    return f"{TEST_HEADING}: {why}"


def test_line(summary: dict, test_set: str, trained: str = "trained without the test split"
              ) -> str:
    """One sentence for a report or a terminal, headed ``TEST_HEADING``: the recipe's test
    accuracy and loss, mean [min..max] over its seeds, on ``test_set``."""
    seeds = ", ".join(map(str, summary["seeds"]))
    head = f"{TEST_HEADING}: {summary['recipe']}, seeds {seeds} ({trained}, scored once after"
    if not summary["scored"]:
        return f"{head} training): not scored, every run diverged"
    acc = band_text((summary["test_accuracy"], summary["test_accuracy_min"],
                     summary["test_accuracy_max"]))
    loss = band_text((summary["test_loss"], summary["test_loss_min"], summary["test_loss_max"]))
    skipped = summary["n"] - summary["scored"]
    note = f"; {skipped} diverged run(s) not tested" if skipped else ""
    return (f"{head} training): test accuracy {acc}, test loss {loss} (mean [min..max] over "
            f"{summary['scored']} seeds{note}) on {test_set}")


def test_parent_metrics(summary: dict) -> dict[str, float]:
    """The parent run's metrics of a ``test_summary``: test_accuracy (mean), its min and max,
    test_loss and test_error (means); empty when nothing was scored."""
    if not summary["scored"]:
        return {}
    keys = ("test_accuracy", "test_accuracy_min", "test_accuracy_max", "test_loss",
            "test_error")
    return {k: float(summary[k]) for k in keys}


def test_table(summary: dict) -> pd.DataFrame:
    """A ``test_summary`` as the report's one-row table."""
    return pd.DataFrame([{"recipe": summary["recipe"],
                          "seeds": ", ".join(map(str, summary["seeds"])),
                          "scored": f"{summary['scored']} of {summary['n']}",
                          **{k: summary[k] for k in ("test_accuracy", "test_accuracy_min",
                                                     "test_accuracy_max", "test_loss")}}])
