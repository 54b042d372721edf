"""Out-of-sample confirmation (issue 27, finding 2): the verdict's rule checked by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lrpipe.engine.config import ConfigError, TrainConfig
from lrpipe.engine.data import Dataset, Split
from lrpipe.experiments import final as fx
from lrpipe.experiments.confirm import (
    check_fresh_seeds,
    confirm,
    confirmation_line,
    fresh_seeds,
    summarize_arms,
    verdict,
)
from lrpipe.search.plan import DEFAULT_CONFIRM_SEEDS, DEFAULT_SEEDS, confirm_plan, rival_rate


def runs(chosen: list[float], rival: list[float], status=None) -> pd.DataFrame:
    rows = [{"arm": "a", "val_loss": v} for v in chosen] + [{"arm": "b", "val_loss": v}
                                                              for v in rival]
    df = pd.DataFrame(rows)
    df["status"] = status or ["ok"] * len(df)
    return df


def test_a_margin_beyond_the_seed_band_confirms():
    # chosen 0.40, 0.41, 0.42: mean 0.41, spread 0.02/0.41 = 4.9%; rival mean 0.45, spread 2.2%
    s = summarize_arms(runs([0.40, 0.41, 0.42], [0.445, 0.45, 0.455]), "val_loss", "a", "b")
    assert s["mean"].tolist() == pytest.approx([0.41, 0.45])
    assert s["spread"].tolist() == pytest.approx([0.02 / 0.41, 0.01 / 0.45])
    v = verdict(s)
    assert v["verdict"] == "confirmed"
    assert v["margin"] == pytest.approx(0.45 / 0.41 - 1)  # 9.8% > band 4.9%
    assert v["band"] == pytest.approx(0.02 / 0.41)


def test_a_margin_inside_the_band_is_a_tie_either_way():
    # the in-sample case of the issue: +0.5% against a seed spread of several percent
    v = verdict(summarize_arms(runs([0.40, 0.43, 0.41], [0.412, 0.42, 0.405]), "val_loss",
                               "a", "b"))
    assert v["verdict"] == "tie" and "the seed bands overlap" in v["text"]
    v = verdict(summarize_arms(runs([0.41, 0.43, 0.42], [0.40, 0.43, 0.41]), "val_loss", "a",
                               "b"))
    assert v["verdict"] == "tie" and v["margin"] < 0


def test_a_rival_better_beyond_the_band_is_not_confirmed():
    v = verdict(summarize_arms(runs([0.50, 0.51], [0.40, 0.41]), "val_loss", "a", "b"))
    assert v["verdict"] == "not confirmed" and "b is better" in v["text"]


def test_a_diverged_run_makes_its_arm_infinitely_bad():
    df = runs([0.4, 0.41], [0.3, math.nan], status=["ok", "ok", "ok", "diverged"])
    s = summarize_arms(df, "val_loss", "a", "b")
    assert s["diverged"].tolist() == [0, 1] and math.isinf(s["mean"].iloc[1])
    assert verdict(s)["verdict"] == "confirmed"
    s = summarize_arms(runs([math.inf, 0.4], [0.5, 0.5]), "val_loss", "a", "b")
    assert verdict(s)["verdict"] == "not confirmed"
    line = confirmation_line(s, verdict(s), "The rate", (100, 101), "validation loss")
    assert "a: diverged" in line and "fresh seeds 100, 101" in line and "out of sample" in line


def test_fresh_seeds_must_not_be_those_that_chose():
    assert check_fresh_seeds((100, 101), (0, 1, 2)) == (100, 101)
    assert check_fresh_seeds((), (0,)) == ()
    with pytest.raises(ConfigError, match=r"^confirm_seeds: got \[1, 100\]; allowed: .*none of "
                                          r"\[0, 1, 2\]"):
        check_fresh_seeds([1, 100], (0, 1, 2))
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        check_fresh_seeds([100], (0,))
    with pytest.raises(ConfigError, match="confirm_seeds"):
        check_fresh_seeds("100", (0,))
    assert not set(DEFAULT_CONFIRM_SEEDS) & {*DEFAULT_SEEDS, TrainConfig().seed}


def test_the_rival_is_the_best_other_finished_rate():
    grid = pd.DataFrame({"lr": [0.01, 0.0316, 0.1, 0.316, 1.0],
                         "val_loss": [0.6, 0.45, 0.41, 0.40, math.nan],
                         "status": ["ok", "ok", "ok", "no_progress", "diverged"]})
    assert rival_rate(grid, 0.1) == 0.316  # no_progress still ranks by its real loss
    assert rival_rate(grid, 0.316) == 0.1
    assert rival_rate(grid.iloc[[2]], 0.1) is None
    cfgs, names, tags = confirm_plan(TrainConfig(), 0.1, 0.316, (100, 101), lambda c: "r")
    assert [(c.optim.lr, c.seed) for c in cfgs] == [(0.1, 100), (0.1, 101), (0.316, 100),
                                                    (0.316, 101)]
    assert names[0] == "r (confirm chosen)" and tags[-1] == {"role": "confirm_rival"}


# --- the test set's figure of a recommended recipe (issue 27: reported beside, never chosen on)

def test_fresh_seeds_for_a_flow_without_confirmation_seeds():
    assert fresh_seeds([0, 1, 2], 3, DEFAULT_CONFIRM_SEEDS[0]) == (100, 101, 102)
    assert fresh_seeds([0, *range(1, 121)], 2, 100) == (121, 122)  # past every used seed
    with pytest.raises(ConfigError, match=r"^n: got 0; allowed: an integer >= 1"):
        fresh_seeds([0], 0, 100)
    with pytest.raises(ConfigError, match=r"^used: got \[0, 0\]"):
        fresh_seeds([0, 0], 2, 100)


def test_test_summary_by_hand_skips_the_diverged_run():
    runs_ = pd.DataFrame({"test_accuracy": [0.80, 0.90, math.nan],
                          "test_loss": [0.50, 0.30, math.nan]})
    s = fx.test_summary(runs_, "cosine", (100, 101, 102))
    assert (s["n"], s["scored"], s["seeds"]) == (3, 2, [100, 101, 102])
    assert s["test_accuracy"] == pytest.approx(0.85) and s["test_error"] == pytest.approx(0.15)
    assert (s["test_accuracy_min"], s["test_accuracy_max"]) == (0.80, 0.90)
    assert (s["test_loss"], s["test_loss_min"], s["test_loss_max"]) == pytest.approx(
        (0.40, 0.30, 0.50))
    line = fx.test_line(s, "the official MNIST test set")
    assert line == ("Test set (never used to choose): cosine, seeds 100, 101, 102 (trained "
                    "without the test split, scored once after training): test accuracy "
                    "0.8500 [0.8000..0.9000], test loss 0.4000 [0.3000..0.5000] (mean "
                    "[min..max] over 2 seeds; 1 diverged run(s) not tested) on the official "
                    "MNIST test set")
    assert fx.test_parent_metrics(s) == pytest.approx({
        "test_accuracy": 0.85, "test_accuracy_min": 0.8, "test_accuracy_max": 0.9,
        "test_loss": 0.4, "test_error": 0.15})
    assert fx.test_table(s).iloc[0]["scored"] == "2 of 3"
    none = fx.test_summary(runs_.iloc[[2]], "step", (100,))
    assert none["scored"] == 0 and math.isnan(none["test_accuracy"])
    assert fx.test_parent_metrics(none) == {}
    assert fx.test_line(none, "x").endswith("not scored, every run diverged")
    with pytest.raises(ValueError, match=r"^runs: got columns \['val_loss'\]"):
        fx.test_summary(pd.DataFrame({"val_loss": [0.1]}), "a", (1,))


def test_score_once_tests_a_trained_model_and_not_a_diverged_one():
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randn(12, 1, 2, 2, generator=gen), torch.arange(12) % 3)
    data = Dataset(split, split, split, 3, (1, 2, 2), ("a", "b", "c"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    got = fx.score_once(model, data, "ok")
    assert set(got) == set(fx.TEST_KEYS)
    with torch.no_grad():
        logits = model(split.x)
    assert got["test_loss"] == pytest.approx(float(F.cross_entropy(logits, split.y)), rel=1e-5)
    assert got["test_error"] == pytest.approx(float((logits.argmax(1) != split.y).float().mean()))
    assert all(math.isnan(v) for v in fx.score_once(model, data, "diverged").values())
    assert all(math.isnan(v) for v in fx.score_once(None, data, "ok").values())
    with pytest.raises(ValueError, match="data.test: got 0 examples"):
        fx.score_once(model, fx.without_test(data), "ok")


def test_test_figures_beside_the_runs_never_change_the_verdict():
    """The verdict reads its value column only: the same runs with test figures that favour
    the other arm, or none at all, confirm alike."""
    base = runs([0.40, 0.41, 0.42], [0.445, 0.45, 0.455])
    with_test = base.assign(test_accuracy=[0.1, 0.1, 0.1, 0.9, 0.9, 0.9], test_loss=5.0)
    records = [confirm(r, "val_loss", "a", "b", what="The rate", seeds=(100, 101, 102),
                       metric="validation loss") for r in (base, with_test)]
    assert records[0]["verdict"] == records[1]["verdict"] == "confirmed"
    assert records[0]["line"] == records[1]["line"]
    pd.testing.assert_frame_equal(records[0]["summary"], records[1]["summary"])
