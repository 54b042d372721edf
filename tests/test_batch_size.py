"""The rate against the batch size: the plan, the analysis on tables whose answer is known by
hand, the figure, and one small end-to-end flow on real digits."""

import math

import numpy as np
import pandas as pd
import pytest
from flowrun import finished_parent, run_in_store

from lrpipe import tracking
from lrpipe.engine.config import ConfigError
from lrpipe.experiments import batch_size as bs

# --- the plan ---


def test_default_plan_grids_and_configs():
    plan = bs.BatchSizePlan()
    assert plan.batch_sizes == (32, 64, 128, 256, 512, 1024)
    assert plan.seeds == (0, 1, 2) and plan.optimizers == ("sgd", "adam")
    # centred on 0.01 * sqrt(b / 128): 0.005 at 32, 0.01 at 128, 0.0283 at 1024
    assert bs.rate_grid(plan, "sgd", 32) == (0.00125, 0.0025, 0.005, 0.01, 0.02)
    assert bs.rate_grid(plan, "sgd", 128) == (0.0025, 0.005, 0.01, 0.02, 0.04)
    assert bs.rate_grid(plan, "adam", 512) == (0.0005, 0.001, 0.002, 0.004, 0.008)
    assert bs.rate_grid(plan, "sgd", 1024) == pytest.approx(
        [0.0070711, 0.0141421, 0.0282843, 0.0565685, 0.113137], rel=1e-5)
    cfgs = bs.plan_configs(bs.base_config(), plan)
    assert len(cfgs) == 2 * 6 * 5 * 3
    assert len({c.hash() for c in cfgs}) == len(cfgs)
    first, last = cfgs[0], cfgs[-1]
    assert (first.optim.name, first.batch_size, first.optim.lr, first.seed) == \
        ("sgd", 32, 0.00125, 0)
    assert (last.optim.name, last.batch_size, last.optim.lr, last.seed) == \
        ("adam", 1024, 0.0113137, 2)
    assert {c.epochs for c in cfgs} == {3} and {c.model.name for c in cfgs} == {"softmax"}
    assert {c.data.subset for c in cfgs} == {10_000}


def test_rule_rate_by_hand():
    assert bs.rule_rate(0.1, 128, 512, 1.0) == pytest.approx(0.4)
    assert bs.rule_rate(0.1, 128, 512, 0.5) == pytest.approx(0.2)
    assert bs.rule_rate(0.1, 128, 32, 0.5) == pytest.approx(0.05)


@pytest.mark.parametrize("changes, field", [
    ({"reference_batch": 100}, "reference_batch"),
    ({"batch_sizes": (64,), "reference_batch": 64}, "batch_sizes"),
    ({"batch_sizes": (32, 32, 128)}, "batch_sizes"),
    ({"batch_sizes": (0, 128)}, "batch_sizes"),
    ({"grid": (0.5, 1.0, 2.0)}, "grid"),  # the linear rule at 1024 needs 2.83x
    ({"grid": (1.0, -2.0)}, "grid"),
    ({"optimizers": ("sgd", "lion")}, "optimizers"),
    ({"optimizers": ("sgd", "momentum")}, "reference_rates"),
    ({"reference_rates": {"sgd": 0.0, "adam": 1e-3}}, r"reference_rates\[sgd\]"),
    ({"seeds": ()}, "seeds"),
    ({"seeds": (0, -1, 2)}, "seeds"),
    ({"epochs": 0}, "epochs"),
])
def test_bad_plans_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}: got"):
        bs.BatchSizePlan(**changes)


def test_grid_span_is_checked_per_batch_size():
    # at 32..512 around 128 the linear rule needs 0.5x..2x the square-root rate: (0.5, 2) spans
    plan = bs.BatchSizePlan(batch_sizes=(32, 128, 512), grid=(0.5, 2.0))
    assert bs.rate_grid(plan, "sgd", 512) == (0.01, 0.04)
    with pytest.raises(ConfigError, match="linear rule at batch 1024 needs 2.83x"):
        bs.BatchSizePlan(batch_sizes=(32, 128, 1024), grid=(0.5, 2.0))


def test_base_config_refuses_what_the_plan_sets():
    for overrides in ({"optim.lr": 0.1}, {"optim": {"name": "adam"}}, {"batch_size": 64}):
        with pytest.raises(ConfigError, match="set by this experiment"):
            bs.base_config(overrides)
    assert bs.base_config({"model.name": "mlp"}).model.name == "mlp"
    with pytest.raises(ConfigError, match="^batch_size: got 512"):
        bs.plan_configs(bs.base_config({"data.subset": 500}), bs.BatchSizePlan())


# --- the analysis, on tables whose answer is known by hand ---


def synthetic(plan: bs.BatchSizePlan, best_of, noise=0.001, seeds=(0, 1, 2)) -> pd.DataFrame:
    """Loss (log(lr / best(opt, b)))^2 + 0.5, plus noise x seed: the best rate of the grid is
    the one nearest ``best_of`` in log."""
    cfgs = bs.plan_configs(bs.base_config(), plan)
    finals = [{"status": "ok", "val_loss": 0.5 + math.log(c.optim.lr / best_of(
        c.optim.name, c.batch_size)) ** 2 + noise * c.seed} for c in cfgs]
    return bs.results_table(cfgs, finals)


def test_square_root_and_linear_data_give_slopes_half_and_one():
    plan = bs.BatchSizePlan(batch_sizes=(32, 128, 512), grid=(0.25, 0.5, 1, 2, 4))

    def truth(opt, b):  # sgd exactly on the square-root rule, adam exactly on the linear one
        return 0.01 * math.sqrt(b / 128) if opt == "sgd" else 0.001 * b / 128

    a = bs.analyze(synthetic(plan, truth), 128)
    fits = a.fits.set_index("optimizer")
    assert fits.loc["sgd", "slope"] == pytest.approx(0.5, abs=1e-9)
    assert fits.loc["adam", "slope"] == pytest.approx(1.0, abs=1e-9)
    assert fits.loc["sgd", "se_scatter"] == pytest.approx(0.0, abs=1e-9)
    # no ties (seed noise 0.001 << the loss gap of a grid step), only the grid's rounding:
    # ln 2 / sqrt(12) / sqrt(Sxx), Sxx = 2 (ln 4)^2
    grid_se = math.log(2) / math.sqrt(12) / math.sqrt(2 * math.log(4) ** 2)
    assert fits.loc["sgd", "slope_se"] == pytest.approx(grid_se)
    best = a.best.set_index(["optimizer", "batch_size"])
    assert best.loc[("adam", 32), "best_lr"] == pytest.approx(0.00025)
    assert best.loc[("adam", 512), "best_lr"] == pytest.approx(0.004)
    assert a.verdicts["sgd"].startswith("sgd follows the square-root rule (slope 0.50 ± 0.10)")
    assert a.verdicts["adam"].startswith("adam follows the linear rule (slope 1.00 ± 0.10)")


def test_a_constant_best_rate_follows_neither_rule():
    plan = bs.BatchSizePlan(optimizers=("sgd",), reference_rates={"sgd": 0.01},
                            grid=(0.25, 0.5, 1, 2, 4))
    a = bs.analyze(synthetic(plan, lambda o, b: 0.01), 128)
    fit = a.fits.iloc[0]
    assert abs(fit["slope"]) < 0.15  # grid rounding of a flat line
    assert "follows neither rule: its best rate grows more slowly" in a.verdicts["sgd"]


def cell(losses_by_lr: dict, status=None) -> pd.DataFrame:
    """Runs of one (optimizer, batch size): {lr: [loss per seed]}."""
    rows = [{"optimizer": "sgd", "batch_size": 64, "lr": lr, "seed": s,
             "status": (status or {}).get((lr, s), "ok"), "val_loss": loss}
            for lr, losses in losses_by_lr.items() for s, loss in enumerate(losses)]
    return pd.DataFrame(rows)


def test_ties_use_the_larger_seed_spread():
    best = bs.best_rates(bs.rate_summary(cell({
        0.1: [0.60, 0.60, 0.60],
        0.2: [0.48, 0.50, 0.52],      # best: mean 0.50, std 0.02
        0.4: [0.505, 0.515, 0.525],   # +0.015 <= 0.02: tied
        0.8: [0.49, 0.54, 0.59],      # +0.04 <= its own std 0.05: tied
        1.6: [0.53, 0.531, 0.532],    # +0.031 > max(0.02, 0.001): not tied
    }))).iloc[0]
    assert best["best_lr"] == 0.2 and best["val_loss_mean"] == pytest.approx(0.5)
    assert best["val_loss_std"] == pytest.approx(0.02)
    assert (best["tied_low"], best["tied_high"], best["n_tied"]) == (0.2, 0.8, 3)
    assert not best["at_edge"] and best["grid_step"] == pytest.approx(2.0)


def test_one_seed_ties_only_exact_equals_and_edges_are_flagged():
    best = bs.best_rates(bs.rate_summary(cell({0.1: [0.4], 0.2: [0.4000001], 0.4: [0.6]})))
    row = best.iloc[0]
    assert row["best_lr"] == 0.1 and row["n_tied"] == 1 and row["at_edge"]


def test_a_diverged_seed_rules_its_rate_out():
    runs = cell({0.1: [0.6, 0.6, 0.6], 0.2: [0.3, 0.3, 0.3], 0.4: [0.7, 0.7, 0.7]},
                status={(0.2, 1): "diverged"})
    rates = bs.rate_summary(runs).set_index("lr")
    assert rates.loc[0.2, "n_diverged"] == 1 and math.isinf(rates.loc[0.2, "val_loss_mean"])
    assert math.isnan(rates.loc[0.2, "val_loss_std"])
    assert bs.best_rates(bs.rate_summary(runs)).iloc[0]["best_lr"] == 0.1
    every = cell({0.1: [0.6]}, status={(0.1, 0): "diverged"})
    row = bs.best_rates(bs.rate_summary(every)).iloc[0]
    assert math.isnan(row["best_lr"]) and row["n_tied"] == 0


def test_fit_slope_by_hand():
    # three points off a line: y = ln lr = (0, 1, 1) at x = ln b = (0, 1, 2) / ln-scale
    b = np.exp([0.0, 1.0, 2.0])
    lr = np.exp([0.0, 1.0, 1.0])
    fit = bs.fit_slope(b, lr, lr, lr, [math.e] * 3)
    assert fit["slope"] == pytest.approx(0.5)
    assert fit["intercept"] == pytest.approx(1 / 6)
    # residuals (-1/6, 1/3, -1/6): SSR 1/6, n - 2 = 1, Sxx = 2
    assert fit["se_scatter"] == pytest.approx(math.sqrt(1 / 6 / 2))
    assert fit["se_grid"] == pytest.approx(1 / math.sqrt(12) / math.sqrt(2))
    assert fit["slope_se"] == pytest.approx(max(fit["se_scatter"], fit["se_grid"]))
    # a tied range widens a point's error: half its log width
    wide = bs.fit_slope(b, lr, lr / math.e, lr * math.e, [math.e] * 3)
    assert wide["se_grid"] == pytest.approx(math.sqrt(2 * (1 + 1 / 12)) / 2)
    assert math.isnan(bs.fit_slope([64], [0.1], [0.1], [0.1], [2])["slope"])


def test_verdicts():
    def v(slope, se, edge=0):
        return bs.verdict("adam", {"slope": slope, "slope_se": se, "n_edge": edge})

    assert v(0.75, 0.2) == ("adam cannot tell the linear and square-root rules apart "
                            "(slope 0.75 ± 0.20).")
    assert "between the square-root and linear" in v(0.75, 0.05)
    assert "grows faster than the batch size" in v(1.5, 0.1)
    assert v(0.55, 0.1, edge=2).endswith("2 best rate(s) at the grid's edge, so the slope may "
                                         "be steeper or flatter.")
    assert "too few batch sizes" in v(math.nan, math.nan)


def test_rules_are_anchored_at_the_reference_batch():
    plan = bs.BatchSizePlan(optimizers=("sgd",), reference_rates={"sgd": 0.01},
                            batch_sizes=(32, 128, 512), grid=(0.5, 1, 2))
    a = bs.analyze(synthetic(plan, lambda o, b: 0.02), 128)  # best 0.02 at 128
    lines = a.lines.set_index(["kind", "batch_size"])["lr"]
    assert lines[("linear rule", 128)] == pytest.approx(0.02)
    assert lines[("linear rule", 512)] == pytest.approx(0.08)
    assert lines[("square-root rule", 32)] == pytest.approx(0.01)
    assert set(a.lines["kind"]) == {"best", "fit", "linear rule", "square-root rule"}


# --- the figure ---


def test_figure_one_log_log_panel_per_optimizer():
    from lrpipe.plots.batch_size import plot_best_rate_vs_batch_size

    plan = bs.BatchSizePlan(batch_sizes=(32, 128, 512), grid=(0.5, 1, 2))
    a = bs.analyze(synthetic(plan, lambda o, b: 0.01 if o == "sgd" else 0.004), 128)
    fig = plot_best_rate_vs_batch_size(a.lines)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["adam", "sgd"]
    assert all(ax.get_xscale() == ax.get_yscale() == "log" for ax in axes)
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert any(t.startswith("linear rule") for t in labels)
    assert any(t.startswith("square-root rule") for t in labels)
    assert "best at the grid's edge" in labels  # sgd's 0.01 is 128's and 512's edge
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["32", "128", "512"]
    with pytest.raises(ValueError, match="missing columns"):
        plot_best_rate_vs_batch_size(a.lines.drop(columns=["lr_low"]))


# --- the flow ---

OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}}
SMALL = dict(batch_sizes=[32, 64], optimizers=["sgd"], seeds=[0], epochs=1,
             reference_batch=32, reference_rates={"sgd": 0.05}, grid=[0.5, 2.0],
             overrides=OVERRIDES, workers=2)


@pytest.fixture(scope="module")
def small_run(prefect_harness, _session_store):
    return (run_in_store(_session_store, "batch-size", **SMALL, experiment="batch-size-test"),
            _session_store)


def test_flow_parent_children_figure_and_summary(small_run):
    result, uri = small_run
    c = tracking.client(uri)
    parent, children = finished_parent(c, result["parent_run_id"])
    got = sorted((int(r.data.params["batch_size"]), float(r.data.params["optim.lr"]))
                 for r in children)
    assert got == [(32, 0.025), (32, 0.1), (64, 0.0353553), (64, 0.141421)]
    assert all(r.info.status == "FINISHED" for r in children)
    files = {f.path for f in c.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "rates.csv", "fits.csv", "runs.csv", "report.md"} <= files
    figures = {f.path for f in c.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/best_rate_vs_batch_size.png"}
    assert [b["batch_size"] for b in result["best"]] == [32, 64]
    assert parent.data.metrics["slope_sgd"] == pytest.approx(result["fits"][0]["slope"])
    assert result["answer"] == result["verdicts"]["sgd"]
    assert parent.data.tags["mlflow.note.content"] == result["answer"]
    report = tracking.read_text(parent.info.run_id, "report.md", uri)
    assert result["answer"] in report and "1 seed(s): too few to judge ties" in report


def test_bad_settings_are_refused_before_any_run(prefect_harness, mlflow_store):
    from flows.commands import COMMANDS
    run = COMMANDS["batch-size"].run

    before = len(tracking.client(mlflow_store).search_runs(
        [e.experiment_id for e in tracking.client(mlflow_store).search_experiments()]))
    for bad, field in (({"reference_batch": 128}, "reference_batch"),
                       ({"reference_rates": {"adam": 1e-3}}, "reference_rates"),
                       ({"overrides": {"optim.lr": 0.1, **OVERRIDES}}, "optim.lr"),
                       ({"runner": "ray"}, "runner")):
        with pytest.raises(ConfigError, match=f"^{field}"):
            run(**{**SMALL, **bad})
    after = len(tracking.client(mlflow_store).search_runs(
        [e.experiment_id for e in tracking.client(mlflow_store).search_experiments()]))
    assert after == before


def test_check_normalizes_and_preflights_one_config_per_cell():
    from flows.batch_size import check

    kwargs, cfgs = check(batch_sizes=[256, 64, 128], optimizers=["adam"], seeds=[2, 0, 1])
    assert kwargs["batch_sizes"] == [64, 128, 256] and kwargs["seeds"] == [0, 1, 2]
    assert kwargs["reference_rates"] == {"adam": 0.001}
    assert [(c.optim.name, c.batch_size) for c in cfgs] == [("adam", 64), ("adam", 128),
                                                            ("adam", 256)]
    with pytest.raises(ConfigError, match="^reference_rates: got rates for"):
        check(optimizers=["sgd"], reference_rates={"adam": 1e-3})


def test_command_line_flags():
    from flows.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["batch-size", "--batch-sizes", "64,256", "--optimizers", "sgd",
                              "--reference-rates", "sgd=0.02", "--grid", "0.5,2",
                              "--seeds", "0,1,2", "--reference-batch", "64"])
    assert args.batch_sizes == [64, 256] and args.reference_rates == {"sgd": 0.02}
    assert args.grid == [0.5, 2.0] and args.seeds == [0, 1, 2] and args.reference_batch == 64
    for flag, text in (("--reference-rates", "sgd:0.1"), ("--grid", "a,b"),
                       ("--batch-sizes", "1.5")):
        with pytest.raises(SystemExit):
            parser.parse_args(["batch-size", flag, text])
