"""Halving search on a case with a known answer and on real digits; cross-check, grid, regret,
choice; the search figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.data import load_data
from lrpipe.engine.train import TrainResult
from lrpipe.plots.search import plot_halving, plot_range_test, plot_regret
from lrpipe.search.choose import (
    budget_data,
    candidate_grid,
    choose_rate,
    cross_check,
    halving_rates,
    halving_search,
    judge_rung,
    regret_table,
)

torch.set_num_threads(1)

STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(dataset="digits", val_size=300))


@pytest.fixture
def cfg() -> TrainConfig:
    return TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                       model=ModelConfig(name="softmax"), optim=OptimConfig(name="sgd"),
                       batch_size=64, device="cpu", seed=3)


def quadratic_train(calls: list):
    """A stand-in for train(): gradient descent on 0.5 w^2 from w = 1, 3 steps per epoch.

    w <- (1 - lr) w, so the loss after k steps is 0.5 (1 - lr)^(2k): a rate above 2 grows the
    loss (diverges), a rate of 1 is exact, and below 1 a smaller rate leaves more loss.
    """
    def fake(cfg, data):
        calls.append(cfg)
        w, rows = 1.0, [dict(epoch=0, train_loss=0.5)]
        for epoch in range(1, cfg.epochs + 1):
            for _ in range(STEPS_PER_EPOCH):
                w -= cfg.optim.lr * w
            rows.append(dict(epoch=epoch, train_loss=0.5 * w * w))
        return TrainResult(history=pd.DataFrame(rows), status="ok")
    return fake


def table_train(outcomes: dict[float, float | None]):
    """train() replaced by a table: lr -> final train loss (None: train() reports diverged)."""
    def fake(cfg, data):
        final = outcomes[cfg.optim.lr]
        if final is None:
            return TrainResult(history=pd.DataFrame([dict(epoch=0, train_loss=2.0)]),
                               status="diverged", diverged_epoch=1)
        return TrainResult(pd.DataFrame([dict(epoch=0, train_loss=2.0),
                                         dict(epoch=1, train_loss=final)]), status="ok")
    return fake


# Halving: known answers.

def test_halving_on_a_quadratic_has_the_known_answer(cfg):
    # 3 steps of 0.5 w^2: lr 10 -> 0.5 * 9^6, 5 -> 0.5 * 4^6, 2.5 -> 0.5 * 1.5^6 (all above 0.5:
    # diverged); 1.25 -> 0.5 * 0.25^6 (stable); 0.625 -> 0.5 * 0.375^6 is higher: stop.
    calls = []
    result = halving_search(cfg, None, train_fn=quadratic_train(calls))
    ladder = result.ladder
    assert list(ladder.columns) == ["lr", "loss", "diverged", "reason"]
    assert ladder["lr"].tolist() == [10.0, 5.0, 2.5, 1.25, 0.625]
    assert ladder["diverged"].tolist() == [True, True, True, False, False]
    assert ladder["loss"].tolist() == pytest.approx(
        [0.5 * 9**6, 0.5 * 4**6, 0.5 * 1.5**6, 0.5 * 0.25**6, 0.5 * 0.375**6], rel=1e-12)
    assert "final train loss" in ladder["reason"][0] and "> initial 0.5" in ladder["reason"][0]
    assert result.chosen_lr == 1.25
    assert "the loss no longer fell" in result.reason and "1.25" in result.reason
    # Every rung: same seed (same initial weights), the budget as epochs, its own rate.
    assert {c.seed for c in calls} == {3} and {c.epochs for c in calls} == {1}
    assert [c.optim.lr for c in calls] == ladder["lr"].tolist()


def test_halving_keeps_going_while_the_loss_falls(cfg):
    outcomes = {8.0: None, 4.0: 1.0, 2.0: 0.5, 1.0: 0.4, 0.5: 0.45}
    result = halving_search(cfg, None, start_lr=8.0, train_fn=table_train(outcomes))
    assert result.ladder["lr"].tolist() == [8.0, 4.0, 2.0, 1.0, 0.5]
    assert result.ladder["reason"][0] == "training diverged in epoch 1"
    assert math.isnan(result.ladder["loss"][0])
    assert result.chosen_lr == 1.0


def test_halving_stops_when_a_rung_after_a_stable_one_diverges(cfg):
    outcomes = {8.0: 1.0, 4.0: None, 2.0: 0.1}
    result = halving_search(cfg, None, start_lr=8.0, train_fn=table_train(outcomes))
    assert result.ladder["lr"].tolist() == [8.0, 4.0]
    assert result.chosen_lr == 8.0 and "it diverged" in result.reason


def test_halving_where_every_rung_diverges(cfg):
    calls = []
    result = halving_search(cfg, None, start_lr=10.0, min_lr=3.0, train_fn=quadratic_train(calls))
    assert result.ladder["lr"].tolist() == [10.0, 5.0]  # 2.5 is below min_lr
    assert result.chosen_lr is None
    assert "every rung diverged" in result.reason and "min_lr 3" in result.reason


def test_halving_stops_at_min_lr_including_it(cfg):
    outcomes = {1.0: 0.9, 0.5: 0.8, 0.25: 0.7}
    result = halving_search(cfg, None, start_lr=1.0, min_lr=0.25,
                            train_fn=table_train(outcomes))
    assert result.chosen_lr == 0.25 and "reached min_lr" in result.reason


def test_budget_data_cuts_the_training_split(data):
    assert budget_data(data, 64, 1, None) is data
    cut = budget_data(data, 64, budget_epochs=2, max_steps=10)
    assert len(cut.train) == 5 * 64 and torch.equal(cut.train.x, data.train.x[:320])
    assert cut.val is data.val
    assert len(budget_data(data, 64, 4, 2).train) == 64  # at least one batch an epoch


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"factor": 1.0}, "factor"), ({"factor": 0.0}, "factor"), ({"start_lr": -1.0}, "start_lr"),
    ({"min_lr": 20.0}, "min_lr"), ({"budget_epochs": 0}, "budget_epochs"),
    ({"max_steps": 0}, "max_steps"),
])
def test_halving_bad_arguments(cfg, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        halving_search(cfg, None, train_fn=quadratic_train([]), **kwargs)


def test_halving_on_real_digits(cfg, data):
    result = halving_search(cfg, data, start_lr=100.0, max_steps=10)
    ladder = result.ladder
    n = len(ladder)
    assert ladder["lr"].tolist() == pytest.approx([100.0 * 0.5**k for k in range(n)])
    assert ladder["diverged"].iloc[0]  # 100 is far too high for softmax regression
    stable = ladder[~ladder["diverged"]]
    assert len(stable) >= 2
    # Diverged rungs come first; then the loss fell rung by rung until the last, which didn't.
    first = stable.index[0]
    assert not ladder["diverged"].iloc[first:].any()
    assert (np.diff(stable["loss"].to_numpy()[:-1]) < 0).all()
    assert stable["loss"].iloc[-1] >= stable["loss"].iloc[-2]
    assert result.chosen_lr == stable.loc[stable["loss"].idxmin(), "lr"]


# Cross-check, grid, regret, choice.

def test_cross_check_hand_values():
    df = cross_check(0.1, {"steepest": 0.01, "valley": 0.1, "min_over_10": None})
    assert df["rule"].tolist() == ["steepest", "valley", "min_over_10"]
    assert df["ratio_to_halving"].tolist()[:2] == pytest.approx([0.1, 1.0])
    assert df["log10_ratio"].tolist()[:2] == pytest.approx([-1.0, 0.0])
    assert df.iloc[2, 1:].isna().all()
    with pytest.raises(ConfigError, match="halving_lr"):
        cross_check(0.0, {})


def test_candidate_grid_hand_values():
    # log10 0.03 = -1.52: one decade either side at 2 points a decade is 10^-2.5 .. 10^-1.
    grid = candidate_grid([0.03])
    assert grid == pytest.approx([10**-2.5, 0.01, 0.03, 10**-1.5, 0.1], rel=1e-12)
    grid = candidate_grid([0.1, 0.01], points_per_decade=1)
    assert grid == pytest.approx([1e-3, 1e-2, 1e-1, 1.0], rel=1e-12)
    assert 0.1 in grid and 0.01 in grid  # the candidates themselves, exactly, once
    assert candidate_grid([0.05], span_decades=0) == [0.05]


def test_candidate_grid_invariants():
    cands = [0.0123, 0.2, 0.07]
    grid = candidate_grid(cands, points_per_decade=3, span_decades=0.5)
    assert all(c in grid for c in cands)
    assert np.all(np.diff(grid) > 0)
    assert min(grid) >= 0.0123 / 10**0.5 * (1 - 1e-9) and max(grid) <= 0.2 * 10**0.5 * 1.000001


@pytest.mark.parametrize(("cands", "kw", "field"), [
    ([], {}, "candidates"), ([0.0], {}, "candidates"), ([math.nan], {}, "candidates"),
    ([0.1], {"points_per_decade": 0}, "points_per_decade"),
    ([0.1], {"span_decades": -1}, "span_decades"),
])
def test_candidate_grid_bad_input(cands, kw, field):
    with pytest.raises(ValueError, match=field):
        candidate_grid(cands, **kw)


@pytest.fixture
def results() -> pd.DataFrame:
    # Two seeds at 0.1 (mean 0.41); 1.0 diverged in one of its two seeds.
    return pd.DataFrame({
        "lr": [0.01, 0.03, 0.1, 0.1, 0.3, 1.0, 1.0],
        "val_loss": [0.60, 0.50, 0.40, 0.42, 0.45, 0.30, math.nan],
        "status": ["ok", "ok", "ok", "ok", "ok", "ok", "diverged"],
    })


def test_regret_table_hand_values(results):
    table = regret_table(results, {"halving": 0.1, "steepest": 0.03, "wild": 1.0})
    assert table.columns.tolist() == ["name", "lr", "val_loss", "best_lr", "best_val_loss",
                                      "regret"]
    assert table["name"].tolist() == ["halving", "steepest", "wild"]
    assert table["val_loss"].tolist() == pytest.approx([0.41, 0.50, math.inf])
    assert table["best_lr"].tolist() == [0.1] * 3
    assert table["best_val_loss"].tolist() == pytest.approx([0.41] * 3)
    assert table["regret"].tolist() == pytest.approx([0.0, 0.50 / 0.41 - 1, math.inf])


def test_regret_table_bad_input(results):
    with pytest.raises(ValueError, match=r"candidates\[valley\]: lr 0.05 has no run"):
        regret_table(results, {"valley": 0.05})
    with pytest.raises(ValueError, match="missing columns"):
        regret_table(results.drop(columns="status"), {"halving": 0.1})
    with pytest.raises(ValueError, match="every run diverged"):
        regret_table(results.assign(status="diverged"), {"halving": 0.1})


def test_choose_rate_names_the_evidence(results):
    table = regret_table(results, {"steepest": 0.03, "halving": 0.1, "valley": 0.1, "wild": 1.0})
    lr, reason = choose_rate(table)
    assert lr == 0.1
    assert reason.startswith("halving = valley (lr 0.1) has the lowest full-training val loss")
    assert "next steepest (lr 0.03) 0.5000 (+22.0%)" in reason
    assert "regret 0.0%" in reason and "diverged: wild" in reason
    lr, reason = choose_rate(regret_table(results, {"wild": 1.0}))
    assert lr is None and "every candidate diverged (wild)" in reason


# Figures: pure functions of their tables.

def _range_df() -> pd.DataFrame:
    lrs = np.logspace(-4, 1, 20)
    frames = []
    for seed, reason in zip((0, 1, 2), ("diverged", "nonfinite", "completed"), strict=True):
        n = 20 if reason == "completed" else 15 + seed
        frames.append(pd.DataFrame({"seed": seed, "step": range(n), "lr": lrs[:n],
                                    "loss": 2 - np.arange(n) / 20,
                                    "smoothed": 2 - np.arange(n) / 20, "stop_reason": reason}))
    return pd.concat(frames, ignore_index=True)


def test_plot_range_test():
    bands = {"steepest": (0.01, 0.005, 0.02, []), "valley": (0.003, 0.002, 0.004),
             "min_over_10": (None, None, None)}
    fig = plot_range_test(_range_df(), bands)
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert {"steepest: 0.01", "valley: 0.003", "min_over_10: no suggestion"} <= set(labels)
    assert "stopped: diverged, nonfinite" in labels and "completed" in labels
    vlines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    assert sorted(ln.get_xdata()[0] for ln in vlines) == pytest.approx([0.003, 0.01])


def test_plot_halving_marks_diverged_rungs():
    ladder = pd.DataFrame({"lr": [4.0, 2.0, 1.0, 0.5], "loss": [math.nan, 3.0, 0.5, 0.6],
                           "diverged": [True, True, False, False],
                           "reason": ["", "", "", ""]})
    fig = plot_halving(ladder)
    ax = fig.axes[0]
    marks = [c for c in ax.collections if c.get_label() == "diverged rung"]
    assert len(marks) == 1 and len(marks[0].get_offsets()) == 2
    assert ax.get_xlim()[0] < 0.5 and ax.get_xlim()[1] > 4.0


def test_plot_regret_marks_candidates(results):
    table = regret_table(results, {"halving": 0.1, "wild": 1.0})
    fig = plot_regret(results, table)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "halving 0.1 (regret +0.0%)" in labels and "wild 1 diverged" in labels
    assert "grid best 0.1" in labels and "diverged" in labels


# The pieces both search paths share.

def test_halving_rates_hand_values():
    assert halving_rates(10.0, 0.5, 1.0) == [10.0, 5.0, 2.5, 1.25]
    assert halving_rates(1.0, 0.1, 1e-3) == pytest.approx([1.0, 0.1, 0.01, 1e-3], rel=1e-12)
    assert len(halving_rates(1.0, 0.1, 1e-3)) == 4  # 0.1^3 is 1.0000000000000002e-3: kept
    assert halving_rates(3.0, 0.5, 3.0) == [3.0]


def test_judge_rung_hand_values():
    def result(losses, status="ok", epoch=None):
        return TrainResult(pd.DataFrame({"epoch": range(len(losses)), "train_loss": losses}),
                           status=status, diverged_epoch=epoch)

    assert judge_rung(0.1, result([2.0, 0.5])) == dict(
        lr=0.1, loss=0.5, diverged=False, reason="train loss 2 -> 0.5")
    assert judge_rung(0.2, result([2.0, 2.5])) == dict(
        lr=0.2, loss=2.5, diverged=True, reason="final train loss 2.5 > initial 2")
    row = judge_rung(0.4, result([2.0], "diverged", 1))
    assert math.isnan(row["loss"]) and row["diverged"]
    assert row["reason"] == "training diverged in epoch 1"
    row = judge_rung(0.8, result([2.0, math.inf]))  # non-finite though train() said ok
    assert row["diverged"] and math.isnan(row["loss"])
    assert judge_rung(0.1, result([2.0, 2.0]))["diverged"] is False  # equal is not above
