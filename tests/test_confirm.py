"""Out-of-sample confirmation (issue 27, finding 2): the verdict's rule checked by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lrpipe.engine.config import ConfigError, TrainConfig
from lrpipe.experiments.confirm import (
    check_fresh_seeds,
    confirmation_line,
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
