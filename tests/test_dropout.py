"""Dropout against the train/validation gap: the plan, the band comparison and the analysis on
tables whose answer is known by hand, the figure, and one small end-to-end flow on digits."""

import math

import pandas as pd
import pytest
from flowrun import finished_parent, run_in_store

from lrpipe import tracking
from lrpipe.engine.config import ConfigError
from lrpipe.experiments import bands
from lrpipe.experiments import dropout as do

# --- bands ---


def test_compare_over_seeds_by_hand():
    # a: mean 0.2 [0.1..0.3], b: mean 0.5 [0.4..0.6]: separate, a lower by 0.3
    out = bands.compare_over_seeds([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert out["a"] == pytest.approx((0.2, 0.1, 0.3)) and out["margin"] == pytest.approx(0.3)
    assert out["winner"] == "a" and not out["tie"]
    # overlapping bands: a tie, whatever the means say
    tie = bands.compare_over_seeds([0.1, 0.2, 0.45], [0.4, 0.5, 0.6])
    assert tie["tie"] and tie["winner"] == "tie" and tie["margin"] == pytest.approx(0.25)
    # a diverged seed makes its arm infinite: the other wins
    lost = bands.compare_over_seeds([0.1, math.inf, 0.2], [0.4, 0.5, 0.6])
    assert lost["winner"] == "b" and lost["a"][0] == math.inf
    assert bands.band_text((0.2, 0.1, 0.3), 2) == "0.20 [0.10..0.30]"
    assert bands.band_text((math.inf,) * 3) == "diverged"
    with pytest.raises(ValueError, match="^values: got none"):
        bands.band([])


# --- the plan ---


def test_default_plan_and_configs():
    plan = do.DropoutPlan(lr=0.1)
    assert plan.arms == (0.0, 0.5) and plan.seeds == (0, 1, 2) and plan.epochs == 20
    assert plan.rates() == (0.0316228, 0.1, 0.316228)
    cfgs = do.plan_configs(do.base_config(), plan)
    assert len(cfgs) == 2 * 3 * 3 and len({c.hash() for c in cfgs}) == 18
    assert [(c.model.dropout, c.optim.lr, c.seed) for c in cfgs[:4]] == [
        (0.0, 0.0316228, 0), (0.0, 0.0316228, 1), (0.0, 0.0316228, 2), (0.0, 0.1, 0)]
    assert cfgs[-1].model.dropout == 0.5 and cfgs[-1].optim.lr == 0.316228
    assert {c.data.subset for c in cfgs} == {5000} and {c.epochs for c in cfgs} == {20}


@pytest.mark.parametrize("changes, field", [
    ({"lr": 0.0}, "lr"), ({"dropout": 0.0}, "dropout"), ({"dropout": 1.0}, "dropout"),
    ({"grid": (0.5, 2.0)}, "grid"), ({"grid": (1.0, 1.0)}, "grid"), ({"grid": ()}, "grid"),
    ({"seeds": (0, 0)}, "seeds"), ({"seeds": (-1,)}, "seeds"), ({"epochs": 0}, "epochs"),
])
def test_bad_plans_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}: got"):
        do.DropoutPlan(**{"lr": 0.1, **changes})


def test_base_config_refuses_what_the_plan_sets_and_models_without_dropout():
    for overrides in ({"optim.lr": 0.1}, {"model": {"dropout": 0.2}}, {"seed": 3}):
        with pytest.raises(ConfigError, match="set by this experiment"):
            do.base_config(overrides)
    with pytest.raises(ConfigError, match="^model.name: got 'softmax'"):
        do.base_config({"model.name": "softmax"})
    assert do.base_config({"data.subset": 1000}).data.subset == 1000


# --- the analysis ---


def history(spec: dict) -> pd.DataFrame:
    """{(dropout, lr): [(train, val, train_err, val_err) per seed]} at epoch 1, with an
    epoch-0 row (train = val = 2.3) before it; statuses ok."""
    rows = []
    for (p, lr), seeds in spec.items():
        for seed, (tr, va, te, ve) in enumerate(seeds):
            rows.append({"dropout": p, "lr": lr, "seed": seed, "epoch": 0, "status": "ok",
                         "train_loss": 2.3, "val_loss": 2.3, "train_error": 0.9,
                         "val_error": 0.9})
            rows.append({"dropout": p, "lr": lr, "seed": seed, "epoch": 1, "status": "ok",
                         "train_loss": tr, "val_loss": va, "train_error": te,
                         "val_error": ve})
    return pd.DataFrame(rows)


SPEC = {
    (0.0, 0.1): [(0.2, 0.6, 0.05, 0.20), (0.2, 0.7, 0.05, 0.21), (0.2, 0.8, 0.05, 0.22)],
    (0.0, 0.3): [(0.1, 0.9, 0.02, 0.25), (0.1, 0.9, 0.02, 0.25), (0.1, 0.9, 0.02, 0.25)],
    (0.5, 0.1): [(0.3, 0.6, 0.10, 0.20), (0.3, 0.6, 0.10, 0.20), (0.3, 0.6, 0.10, 0.20)],
    (0.5, 0.3): [(0.3, 0.5, 0.10, 0.18), (0.3, 0.5, 0.10, 0.19), (0.3, 0.5, 0.10, 0.20)],
}


def test_rate_summary_and_best_rates_by_hand():
    rates = do.rate_summary(history(SPEC)).set_index(["dropout", "lr"])
    # no dropout at 0.1: gaps 0.4, 0.5, 0.6
    row = rates.loc[(0.0, 0.1)]
    assert (row["gap_mean"], row["gap_min"], row["gap_max"]) == pytest.approx((0.5, 0.4, 0.6))
    assert row["val_error_mean"] == pytest.approx(0.21) and row["n_seeds"] == 3
    assert rates.loc[(0.5, 0.3), "gap_mean"] == pytest.approx(0.2)
    best = do.best_rates(do.rate_summary(history(SPEC))).set_index("dropout")
    assert best.loc[0.0, "best_lr"] == 0.1 and best.loc[0.5, "best_lr"] == 0.3
    assert best.loc[0.5, "at_edge"]


def test_a_diverged_seed_makes_its_rate_infinite():
    h = history(SPEC)
    h.loc[(h["dropout"] == 0.0) & (h["lr"] == 0.1) & (h["seed"] == 1), "status"] = "diverged"
    rates = do.rate_summary(h).set_index(["dropout", "lr"])
    assert rates.loc[(0.0, 0.1), "n_bad"] == 1
    assert math.isinf(rates.loc[(0.0, 0.1), "val_loss_mean"])
    assert do.best_rates(do.rate_summary(h)).set_index("dropout").loc[0.0, "best_lr"] == 0.3


def test_analysis_verdict_gap_curves_and_rate_sentence():
    a = do.analyze(history(SPEC), do.DropoutPlan(lr=0.1, grid=(1.0, 3.0)))
    # at 0.1: gap 0.5 [0.4..0.6] without, 0.3 [0.3..0.3] with: separate bands, dropout closes
    assert a.gap["winner"] == "a" and a.gap["margin"] == pytest.approx(0.2)
    # errors 0.21 [0.20..0.22] without, 0.20 [0.20..0.20] with: the bands touch, a tie
    assert a.error["tie"]
    assert a.answer.startswith("At lr 0.1, dropout 0.5 closes the gap: final val - train loss "
                               "0.5000 [0.4000..0.6000] without, 0.3000 [0.3000..0.3000] with")
    assert "validation error ties (-0.0100 with dropout" in a.answer
    assert a.answer.endswith("Dropout does best at 0.3, 3x the 0.1 without it (one grid step "
                             "is half a decade).")
    curve = a.curves.set_index(["dropout", "epoch"])
    assert curve.loc[(0.0, 1), "gap_mean"] == pytest.approx(0.5)
    assert curve.loc[(0.0, 0), "gap_max"] == pytest.approx(0.0)
    assert set(a.curves["dropout"]) == {0.0, 0.5} and set(a.curves["n_seeds"]) == {3}
    with pytest.raises(ValueError, match="^lr: got 0.2"):
        do.gap_curves(history(SPEC), 0.2)


def test_answer_words_follow_the_numbers():
    gap = {"a": (0.3, 0.2, 0.4), "b": (0.2, 0.1, 0.25), "winner": "b", "margin": -0.1}
    err = {"a": (0.1, 0.1, 0.1), "b": (0.2, 0.2, 0.2), "winner": "a", "margin": 0.1,
           "tie": False}
    text = do.answer_text(gap, err, 0.5, 0.1, "")
    assert "widens the gap" in text and "it lowers validation error by 0.1000" in text
    err_b = {**err, "winner": "b", "margin": -0.05}
    assert "it costs 0.0500 in validation error" in do.answer_text(gap, err_b, 0.5, 0.1, "")
    narrow = {**gap, "winner": "tie", "margin": 0.01}
    assert "narrows the gap only within the seed band" in do.answer_text(narrow, err, 0.5,
                                                                          0.1, "")


# --- the figure ---


def test_figure_two_panels_from_the_tables():
    from lrpipe.plots.dropout import plot_dropout

    a = do.analyze(history(SPEC), do.DropoutPlan(lr=0.1, grid=(1.0, 3.0)))
    fig = plot_dropout(a.curves, a.rates, a.best)
    gap_ax, rate_ax = fig.axes
    assert [t.get_text() for t in gap_ax.get_legend().get_texts()] == ["no dropout",
                                                                       "dropout 0.5"]
    assert rate_ax.get_xscale() == "log"
    assert "best rate, dropout 0.5" in [t.get_text() for t in rate_ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="curves: missing columns"):
        plot_dropout(a.curves.drop(columns=["gap_min"]), a.rates, a.best)


# --- the flow ---

OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}}
SMALL = dict(lr=0.1, seeds=[0, 1, 2], epochs=1, grid=[1.0, 3.0], overrides=OVERRIDES,
             workers=2)


@pytest.fixture(scope="module")
def small_run(prefect_harness, _session_store):
    return (run_in_store(_session_store, "dropout", **SMALL, experiment="dropout-test"),
            _session_store)


def test_flow_parent_children_figure_and_report(small_run):
    result, uri = small_run
    c = tracking.client(uri)
    parent, children = finished_parent(c, result["parent_run_id"])
    got = sorted((float(r.data.params["model.dropout"]), float(r.data.params["optim.lr"]),
                  int(r.data.params["seed"])) for r in children)
    assert got == sorted((p, lr, s) for p in (0.0, 0.5) for lr in (0.1, 0.3) for s in (0, 1, 2))
    files = {f.path for f in c.list_artifacts(parent.info.run_id)}
    assert {"rates.csv", "best.csv", "gap_curves.csv", "history.csv", "report.md"} <= files
    figures = {f.path for f in c.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/dropout_gap.png"}
    assert parent.data.tags["mlflow.note.content"] == result["answer"]
    assert parent.data.metrics["gap_dropout"] == pytest.approx(result["gap"]["a"][0])
    report = tracking.read_text(parent.info.run_id, "report.md", uri)
    assert result["answer"] in report and "| arm | lr |" in report


def test_check_refuses_bad_settings_and_preflights_one_config_per_arm():
    from flows.dropout import check

    kwargs, cfgs = check(lr=0.1, seeds=[2, 0, 1], dropout=0.3)
    assert kwargs["seeds"] == [0, 1, 2] and [c.model.dropout for c in cfgs] == [0.0, 0.3]
    with pytest.raises(ConfigError, match="^dropout: got"):
        check(lr=0.1, dropout=1.5)
    with pytest.raises(ConfigError, match="^grid: got"):
        check(lr=0.1, grid=[0.5, 2.0])
