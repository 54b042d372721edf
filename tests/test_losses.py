"""Cross-entropy against squared error, each at its own searched rate: the plan, the analysis
on tables whose answer is known by hand, the figure, and one small end-to-end flow on digits
(two small searches, then the comparison)."""

import math

import pandas as pd
import pytest
from flowrun import finished_parent, run_in_store

from lrpipe import tracking
from lrpipe.engine.config import ConfigError
from lrpipe.experiments import losses as lo


def test_plan_refuses_the_search_seeds_and_bad_values():
    plan = lo.LossPlan(seeds=(12, 10, 11))
    assert plan.seeds == (10, 11, 12) and plan.epochs == 5
    with pytest.raises(ConfigError, match=r"^seeds: got \[1, 10\]; allowed: seeds the search "
                                          r"did not use \(it used \[0, 1, 2\]; \[1\] again\)"):
        lo.LossPlan(seeds=(1, 10))
    for bad in ({"seeds": ()}, {"seeds": (10, 10)}, {"seeds": (-3,)}):
        with pytest.raises(ConfigError, match="^seeds: got"):
            lo.LossPlan(**bad)
    with pytest.raises(ConfigError, match="^epochs: got"):
        lo.LossPlan(epochs=0)


def test_comparison_configs_each_loss_at_its_rate():
    plan = lo.LossPlan(seeds=(10, 11, 12), epochs=3)
    cfgs = lo.comparison_configs({"model.name": "softmax"}, plan,
                                 {"cross_entropy": 0.1, "mse": 0.05})
    assert [(c.loss, c.optim.lr, c.seed) for c in cfgs] == [
        ("cross_entropy", 0.1, 10), ("cross_entropy", 0.1, 11), ("cross_entropy", 0.1, 12),
        ("mse", 0.05, 10), ("mse", 0.05, 11), ("mse", 0.05, 12)]
    assert {c.epochs for c in cfgs} == {3} and {c.model.name for c in cfgs} == {"softmax"}
    with pytest.raises(ConfigError, match=r"^rates\[mse\]: the search chose no rate"):
        lo.comparison_configs(None, plan, {"cross_entropy": 0.1, "mse": None})
    with pytest.raises(ConfigError, match="^loss: set by this experiment"):
        lo.search_overrides({"loss": "mse"}, "cross_entropy")
    assert lo.search_overrides({"batch_size": 64}, "mse") == {
        "batch_size": 64, "loss": "mse"}


def history(errors: dict, statuses: dict | None = None) -> pd.DataFrame:
    """{loss: (lr, [final val error per seed])}, two epochs per run; val loss = 2 x error."""
    rows = []
    for loss, (lr, errs) in errors.items():
        for seed, err in zip((10, 11, 12), errs, strict=False):
            for epoch, e in ((1, 0.5), (2, err)):
                rows.append({"loss": loss, "lr": lr, "seed": seed, "epoch": epoch,
                             "status": (statuses or {}).get((loss, seed), "ok"),
                             "train_loss": 0.1, "val_loss": 2 * e, "train_error": 0.0,
                             "val_error": e})
    return pd.DataFrame(rows)


def test_cross_entropy_wins_outside_the_band():
    h = history({"cross_entropy": (0.1, [0.10, 0.11, 0.12]), "mse": (0.03, [0.14, 0.15, 0.16])})
    a = lo.analyze(h, {"cross_entropy": 0.1, "mse": 0.03})
    assert a.error["winner"] == "a" and a.error["margin"] == pytest.approx(0.04)
    assert a.answer == (
        "cross_entropy wins on validation error by 0.0400 over mse, outside the band over "
        "seeds. cross_entropy at lr 0.1: 0.1100 [0.1000..0.1200]; mse at lr 0.03: 0.1500 "
        "[0.1400..0.1600] (final validation error, mean [min..max] over 3 fresh seeds).")
    s = a.summary.set_index("loss")
    assert s.loc["mse", "val_loss_mean"] == pytest.approx(0.30) and s.loc["mse", "lr"] == 0.03
    c = a.curves.set_index(["loss", "epoch"])
    assert c.loc[("mse", 1), "val_error_mean"] == 0.5
    assert c.loc[("cross_entropy", 2), "val_error_max"] == pytest.approx(0.12)


def test_a_margin_inside_the_band_is_a_tie_and_a_diverged_run_loses():
    h = history({"cross_entropy": (0.1, [0.10, 0.12, 0.14]), "mse": (0.03, [0.13, 0.15, 0.17])})
    a = lo.analyze(h, {"cross_entropy": 0.1, "mse": 0.03})
    assert a.error["tie"] and a.answer.startswith("Tie on validation error: the margin 0.0300 "
                                                  "is inside the band over seeds.")
    h = history({"cross_entropy": (0.1, [0.10, 0.11, 0.12]), "mse": (0.03, [0.01, 0.01, 0.01])},
                statuses={("mse", 11): "diverged"})
    a = lo.analyze(h, {"cross_entropy": 0.1, "mse": 0.03})
    assert a.error["winner"] == "a" and math.isinf(a.summary.set_index("loss").loc[
        "mse", "val_error_mean"])
    assert a.summary.set_index("loss").loc["mse", "n_bad"] == 1


def test_figure_states_both_rates():
    from lrpipe.plots.losses import plot_loss_comparison

    h = history({"cross_entropy": (0.1, [0.10, 0.11, 0.12]), "mse": (0.03, [0.14, 0.15, 0.16])})
    fig = plot_loss_comparison(lo.curves(h))
    assert fig._suptitle.get_text().endswith("(cross_entropy 0.1, mse 0.03)")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["cross_entropy, lr=0.1", "mse, lr=0.03"]
    with pytest.raises(ValueError, match="curves: missing columns"):
        plot_loss_comparison(lo.curves(h).drop(columns=["val_loss_min"]))


# --- the flow ---

OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}}
SMALL = dict(subset=300, search_seeds=[0], range_steps=5, regret_epochs=1, grid_span=0.5,
             seeds=[10, 11, 12], epochs=1, overrides=OVERRIDES, workers=2)


@pytest.fixture(scope="module")
def small_run(prefect_harness, _session_store):
    return run_in_store(_session_store, "losses", **SMALL, experiment="losses-test"), _session_store


def test_flow_two_searches_then_children_figure_and_report(small_run):
    result, uri = small_run
    c = tracking.client(uri)
    parent, children = finished_parent(c, result["parent_run_id"])
    got = sorted((r.data.params["loss"], float(r.data.params["optim.lr"]),
                  int(r.data.params["seed"])) for r in children)
    rates = result["rates"]
    assert got == sorted((loss, rates[loss], s) for loss in ("cross_entropy", "mse")
                         for s in (10, 11, 12))
    for loss, search in result["searches"].items():  # each loss searched, same settings
        run = c.get_run(search["run_id"])
        assert search["chosen_lr"] == rates[loss] and run.info.status == "FINISHED"
        assert run.data.params["subset"] == "300" and run.data.params["range_steps"] == "5"
        assert f'"loss": "{loss}"' in run.data.params["base_config"]
    files = {f.path for f in c.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "curves.csv", "history.csv", "searches.csv", "report.md",
            "searches"} <= files
    saved = tracking.read_text(parent.info.run_id, "searches/mse.json", uri)
    assert f'"chosen_lr": {rates["mse"]}' in saved  # what a resumed run reads back
    figures = {f.path for f in c.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/loss_comparison.png"}
    report = tracking.read_text(parent.info.run_id, "report.md", uri)
    assert result["answer"] in report and "## The two searches (same budget)" in report


def test_check_refuses_reused_seeds_before_any_run():
    from flows.losses import check

    with pytest.raises(ConfigError, match="^seeds: got"):
        check(seeds=[0, 10, 11], overrides=OVERRIDES, subset=300)
    with pytest.raises(ConfigError, match=r"^seeds: got .*100"):  # the searches' confirmation
        check(seeds=[100, 10, 11], overrides=OVERRIDES, subset=300)
    with pytest.raises(ConfigError, match="^loss: set by this experiment"):
        check(overrides={"loss": "mse", **OVERRIDES}, subset=300)
    kwargs, cfgs = check(overrides=OVERRIDES, subset=300, search_seeds=[3])
    assert kwargs["search_seeds"] == [3] and [c.loss for c in cfgs][::2] == ["cross_entropy",
                                                                             "mse"]
