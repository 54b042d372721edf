"""Decay analyses and figures: hand-built histories, invariants, one small real comparison."""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from lrpipe.engine.schedules import check_budget, total_decay
from lrpipe.engine.train import train
from lrpipe.experiments.decay import (
    default_schedules,
    final_rows,
    gap_growth_epoch,
    metric_bands,
    schedule_previews,
    summarize_runs,
)
from lrpipe.plots.decay import plot_final_errors, plot_gap, plot_metric_band, plot_schedules

matplotlib.use("Agg")
torch.set_num_threads(1)


def _run(schedule: str, seed: int, val_losses, lrs=None, train_losses=None) -> pd.DataFrame:
    n = len(val_losses)
    return pd.DataFrame({
        "schedule": schedule, "seed": seed, "epoch": range(n),
        "train_loss": train_losses or [v - 0.1 for v in val_losses],
        "val_loss": val_losses, "train_error": 0.1, "val_error": [v / 10 for v in val_losses],
        "lr": lrs or [1.0] * n,
    })


@pytest.fixture
def runs() -> pd.DataFrame:
    return pd.concat([
        _run("cosine", 0, [2.0, 1.0, 0.5], lrs=[1.0, 1.0, 0.1]),
        _run("cosine", 1, [2.0, 1.0, 0.7], lrs=[1.0, 1.0, 0.1]),
        _run("constant", 0, [2.0, 1.2, 0.9]),
        _run("constant", 1, [2.0, 1.1, 1.1]),
        _run("step", 0, [2.0, 0.4]),  # diverged at epoch 2: ends early
        _run("step", 1, [2.0, 1.5, 1.8], lrs=[1.0, 0.5, 0.25]),
    ], ignore_index=True).sample(frac=1.0, random_state=0)  # order must not matter


def test_summarize_runs_by_hand(runs):
    s = summarize_runs(runs, planned_decay={"cosine": 100.0, "constant": 1.0, "step": None})
    assert list(s["schedule"]) == ["cosine", "constant", "step"]
    assert list(s["rank"]) == [1, 2, 3]
    cos = s.iloc[0]
    assert cos["final_val_loss_mean"] == pytest.approx(0.6)
    assert cos["final_val_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert (cos["final_val_loss_min"], cos["final_val_loss_max"]) == (0.5, 0.7)
    assert cos["final_val_error_mean"] == pytest.approx(0.06)
    assert cos["epoch_lr_decay"] == pytest.approx(10.0) and cos["total_decay"] == 100.0
    step = s.iloc[2]
    assert step["final_val_loss_mean"] == pytest.approx(1.1)  # (0.4 + 1.8) / 2
    assert step["n_short"] == 1 and step["n_seeds"] == 2
    assert math.isnan(step["total_decay"]) and step["epoch_lr_decay"] == pytest.approx(2.5)


def test_final_rows_and_bands(runs):
    last = final_rows(runs)
    assert len(last) == 6 and set(last.groupby("schedule")["epoch"].max()) == {2}
    bands = metric_bands(runs, "val_loss")
    row = bands[(bands["schedule"] == "step") & (bands["epoch"] == 2)].iloc[0]
    assert row["n"] == 1 and row["mean"] == 1.8
    row = bands[(bands["schedule"] == "cosine") & (bands["epoch"] == 2)].iloc[0]
    assert (row["min"], row["max"], row["n"]) == (0.5, 0.7, 2)


def test_missing_columns_are_named(runs):
    with pytest.raises(ValueError, match="val_error"):
        summarize_runs(runs.drop(columns="val_error"))
    with pytest.raises(ValueError, match="band"):
        plot_metric_band(runs, band="iqr")


@pytest.mark.parametrize("gaps,expected", [
    ([0.0, 0.1, 0.05, 0.04, 0.06, 0.09, 0.12], 3),  # dips to 0.04 at epoch 3, then grows
    ([0.0, 0.1, 0.2, 0.3, 0.4], 1),                  # grows from the first trained epoch
    ([0.0, 0.3, 0.2, 0.1, 0.05], None),              # shrinks: never grows for good
    ([0.0, 0.1, 0.2, 0.05, 0.06, 0.07], 3),          # a rise that falls back does not count
    ([0.0, 0.1, 0.15], None),                        # too short for two rises after a trained epoch
])
def test_gap_growth_epoch_by_hand(gaps, expected):
    history = pd.DataFrame({"epoch": range(len(gaps)), "train_loss": 1.0,
                            "val_loss": [1.0 + g for g in gaps]})
    assert gap_growth_epoch(history) == expected
    assert gap_growth_epoch(history.iloc[::-1]) == expected


def test_gap_growth_tolerance_ignores_small_growth():
    history = pd.DataFrame({"epoch": range(5), "train_loss": 1.0,
                            "val_loss": [1.0, 1.1, 1.101, 1.102, 1.103]})
    assert gap_growth_epoch(history) == 1
    assert gap_growth_epoch(history, tol=0.01) is None


def test_default_schedules_fit_their_budget_and_decay_100x():
    for epochs in (2, 5, 10, 30):
        for name, cfg in default_schedules(epochs=epochs).items():
            check_budget(cfg, epochs, 20)
            if name not in ("constant", "plateau"):
                assert total_decay(cfg, epochs, 20) == pytest.approx(100.0, rel=1e-2), name
    names = set(default_schedules(epochs=10))
    assert names == {"constant", "step", "multistep", "exponential", "cosine", "onecycle",
                     "warmup_cosine", "inverse_time", "plateau"}
    assert default_schedules(final_decay=10.0, epochs=10)["cosine"].final_decay == 10.0
    with pytest.raises(ValueError, match="epochs"):
        default_schedules(epochs=1)


def test_schedule_previews_and_all_figures(runs):
    previews = schedule_previews(default_schedules(epochs=4), 4, 10, base_lr=0.1)
    assert len(previews) == 9 * 40
    assert previews.groupby("schedule")["total_decay"].nunique(dropna=False).eq(1).all()
    assert math.isnan(previews.loc[previews["schedule"] == "plateau", "total_decay"].iloc[0])
    fig = plot_schedules(previews)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "cosine (100x)" in labels and "plateau (val-loss driven)" in labels
    summary = summarize_runs(runs)
    figures = [plot_metric_band(runs), plot_metric_band(runs, "val_error", band="std"),
               plot_final_errors(summary), plot_gap(runs[runs["schedule"] == "cosine"]
                                                    .query("seed == 0"))]
    assert all(isinstance(f, Figure) for f in figures)
    assert "min..max" in figures[0].axes[0].get_title()
    assert "std" in figures[1].axes[0].get_title()
    assert len(figures[0].axes[0].get_lines()) == 3  # one mean line per schedule


def test_plot_gap_marks_the_growth_epoch():
    history = pd.DataFrame({"epoch": range(6), "train_loss": [2, 1, 0.8, 0.6, 0.4, 0.2],
                            "val_loss": [2.0, 1.1, 0.85, 0.7, 0.6, 0.55]})
    fig = plot_gap(history)
    growth = gap_growth_epoch(history)
    assert growth == 2
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert f"gap grows from epoch {growth}" in labels


def test_small_real_comparison_end_to_end(digits_cfg):
    schedules = {k: v for k, v in default_schedules(epochs=3).items()
                 if k in ("constant", "cosine", "plateau")}
    frames = []
    for name, sched in schedules.items():
        for seed in (0, 1):
            cfg = digits_cfg.replace(epochs=3, seed=seed, schedule=sched)
            frames.append(train(cfg).history.assign(schedule=name, seed=seed))
    runs = pd.concat(frames, ignore_index=True)
    summary = summarize_runs(runs)
    assert set(summary["schedule"]) == set(schedules)
    assert summary["n_seeds"].eq(2).all() and summary["n_short"].eq(0).all()
    assert summary.set_index("schedule").loc["constant", "epoch_lr_decay"] == 1.0
    assert summary.set_index("schedule").loc["cosine", "epoch_lr_decay"] > 2.0
    assert isinstance(plot_metric_band(runs), Figure)
