"""The optimizers flow: its pure helpers by hand (rate search, tables, bands, settings), the
figures, and one end-to-end run on the saddle and real digits under Prefect's test harness,
tracked in a temporary MLflow store."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from flows import optimizer_compare as oc
from flows.commands import COMMANDS
from flows.optimizer_surfaces import series_steps
from lrpipe import tracking
from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from lrpipe.engine.train import TrainResult
from lrpipe.experiments import optimizers as real

torch.set_num_threads(1)
DIGITS = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
          "batch_size": 64}
OPTIMIZERS = ["sgd", "adam", "rprop"]


# --- the rate search, with a fake trainer of known losses ---

def fake_train(loss_of_lr, calls):
    """A train_fn whose final val loss is ``loss_of_lr(lr)`` (None = diverged)."""

    def fn(cfg: TrainConfig, data) -> TrainResult:
        calls.append(cfg)
        loss = loss_of_lr(cfg.optim.lr)
        rows = [{"epoch": 0, "val_loss": 2.3, "val_error": 0.9}]
        if loss is not None:
            rows.append({"epoch": 1, "val_loss": loss, "val_error": loss / 10})
        return TrainResult(pd.DataFrame(rows), "ok" if loss is not None else "diverged",
                           None if loss is not None else 1)

    return fn


def bowl(lr):  # minimum 0.1 at lr = 10^-2.5; rates above 0.5 diverge
    return None if lr > 0.5 else (math.log10(lr) + 2.5) ** 2 + 0.1


def test_search_rate_refines_between_decades_with_the_same_budget(digits_cfg):
    calls = []
    found = real.search_rate(digits_cfg, None, train_fn=fake_train(bowl, calls))
    assert found.lr == pytest.approx(10**-2.5)
    t = found.table
    assert list(t["stage"]) == ["coarse"] * 6 + ["refine"] * 2
    np.testing.assert_allclose(t["lr"], [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10**-3.5, 10**-2.5])
    assert list(t["status"]) == ["ok"] * 5 + ["diverged"] + ["ok"] * 2
    assert math.isnan(t["val_loss"].iloc[5])
    # fair: every rung from the same seed, one epoch, the same small train-eval subset
    assert {(c.seed, c.epochs, c.eval_train_size) for c in calls} == {(0, 1, 1000)}
    assert "AT THE EDGE" not in found.reason and "0.1000" in found.reason


def test_search_rate_says_when_the_answer_is_at_the_edge_or_missing(digits_cfg):
    found = real.search_rate(digits_cfg, None, train_fn=fake_train(lambda lr: lr, []))
    assert found.lr == pytest.approx(10**-5.5) and "AT THE EDGE" in found.reason
    never = real.search_rate(digits_cfg, None, train_fn=fake_train(lambda lr: None, []))
    assert never.lr is None and len(never.table) == 6 and "every rate diverged" in never.reason
    with pytest.raises(ValueError, match="decades"):
        real.search_rate(digits_cfg, None, decades=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="epochs"):
        real.search_rate(digits_cfg, None, epochs=0)


def test_search_rate_on_real_digits_finds_a_stable_rate(digits_cfg):
    from lrpipe.engine.data import load_data

    found = real.search_rate(digits_cfg, load_data(digits_cfg.data))
    assert found.lr is not None and 1e-4 <= found.lr <= 1.0
    # the smallest rates barely move in one epoch (no_progress): finite, ranked, not chosen
    assert (found.table["status"] != "diverged").sum() >= 5
    assert set(found.table["status"]) <= {"ok", "no_progress", "diverged"}


# --- tables and bands by hand ---

def runs_frame() -> pd.DataFrame:
    """adam: 2 seeds ending at val_error 0.10 and 0.20; sgd: one run at 0.30 and one that
    diverged after epoch 1 (last finite val_error 0.50)."""
    rows = []
    for opt, seed, errors, status in (("adam", 0, [0.9, 0.3, 0.1], "ok"),
                                      ("adam", 1, [0.9, 0.4, 0.2], "ok"),
                                      ("sgd", 0, [0.9, 0.6, 0.3], "ok"),
                                      ("sgd", 1, [0.9, 0.5], "diverged")):
        for epoch, err in enumerate(errors):
            rows.append({"optimizer": opt, "seed": seed, "epoch": epoch, "lr": 0.01,
                         "val_error": err, "val_loss": 2 * err, "train_loss": 2 * err,
                         "status": status})
    return pd.DataFrame(rows)


def test_final_table_by_hand():
    table = real.final_table(runs_frame())
    assert list(table["optimizer"]) == ["adam", "sgd"]
    adam, sgd = table.iloc[0], table.iloc[1]
    assert adam["val_error_mean"] == pytest.approx(0.15)
    assert adam["val_error_std"] == pytest.approx(math.sqrt(0.005))  # sample std of .1, .2
    assert adam["val_error"] == "0.1500 ± 0.0707" and adam["diverged"] == 0
    assert sgd["val_error_mean"] == pytest.approx(0.4) and sgd["diverged"] == 1
    assert adam["seeds"] == 2 and adam["val_loss_mean"] == pytest.approx(0.3)


def test_metric_bands_count_the_seeds_that_reached_each_epoch():
    bands = real.metric_bands(runs_frame(), "val_error")
    sgd = bands[bands["optimizer"] == "sgd"].set_index("epoch")
    assert list(sgd["n"]) == [2, 2, 1]
    assert sgd.loc[1, "min"] == 0.5 and sgd.loc[1, "max"] == 0.6
    assert list(pd.unique(bands["optimizer"])) == ["adam", "sgd"]
    with pytest.raises(ValueError, match="seed"):
        real.metric_bands(runs_frame().drop(columns="seed"), "val_error")


def test_figures_draw_one_line_per_group():
    fig = real.plot_metric_bands(runs_frame(), "val_loss")
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"
    assert "1 diverged" in ax.get_legend().get_texts()[1].get_text()
    search = pd.DataFrame({"optimizer": ["sgd"] * 3, "lr": [0.01, 0.1, 1.0],
                           "stage": "coarse", "val_loss": [1.0, 0.5, np.nan],
                           "val_error": [0.3, 0.2, np.nan],
                           "status": ["ok", "ok", "diverged"], "chosen": [False, True, False]})
    ax = real.plot_rate_search(search).axes[0]
    assert ax.get_xscale() == "log" and len(ax.lines) == 3  # curve, crosses, star
    assert list(ax.lines[2].get_xdata()) == [0.1]


# --- the flow's own settings and configs ---

def test_settings_are_checked_with_the_field_named():
    with pytest.raises(ConfigError, match="optimizers"):
        oc.check_settings(["sgd", "lbfgs"], ["saddle"], 3, 1, 1, False, False)
    with pytest.raises(ConfigError, match="surfaces"):
        oc.check_settings(["sgd"], ["moon"], 3, 1, 1, False, False)
    with pytest.raises(ConfigError, match="seeds"):
        oc.check_settings(["sgd"], ["saddle"], 1, 1, 1, False, False)
    with pytest.raises(ConfigError, match="skip_surfaces"):
        oc.check_settings(["sgd"], ["saddle"], 3, 1, 1, True, True)
    with pytest.raises(ConfigError, match="optim.lr"):
        oc.base_config(1, {"optim.lr": 0.1})
    with pytest.raises(ConfigError, match="optim.name"):
        oc.base_config(1, {"optim": {"name": "adam"}})
    assert oc.base_config(2, None).data.subset == oc.DEFAULT_SUBSET


def test_series_steps_and_run_configs():
    assert series_steps(100, 5) == [0, 25, 50, 75, 100]
    assert series_steps(3, 21) == [0, 1, 2, 3]
    base = TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                       model=ModelConfig(hidden=(32,)), batch_size=64)
    runs = real.compare_runs(base, {"adam": 0.001}, 2)
    # issue 27: the rates were searched on base.seed (0): the comparison runs other seeds
    assert [r.name for r in runs] == ["adam lr=0.001 mlp seed=1", "adam lr=0.001 mlp seed=2"]
    assert [r.name for r in real.compare_runs(base.replace(seed=5), {"adam": 0.001}, 1)] == [
        "adam lr=0.001 mlp seed=6"]
    assert runs[1].cfg.optim.name == "adam" and runs[1].cfg.seed == 2
    with pytest.raises(ValueError, match="results"):
        real.history_frame(runs, [], "optimizer")


def test_gains_enter_as_plain_and_with_momentum():
    """Issue 27 item 6: ``gains`` was gains plus momentum 0.9; now two entries."""
    base = TrainConfig(data=DataConfig(dataset="digits", val_size=300), batch_size=64)
    runs = real.compare_runs(base, {"gains": 0.01, "gains_momentum": 0.003}, 1)
    assert [(r.cfg.optim.name, r.cfg.optim.momentum, r.tags["optimizer"]) for r in runs] == [
        ("gains", 0.0, "gains"), ("gains", 0.9, "gains_momentum")]
    # same rate, different momentum: different configs, so different search keys
    assert oc.search_key(runs[0].cfg) != oc.search_key(runs[1].cfg.replace(**{"optim.lr": 0.01}))
    assert oc.check_settings(["gains", "gains_momentum"], ["saddle"], 2, 1, 1, False,
                             False)[0] == ["gains", "gains_momentum"]
    assert oc.make_plan()["optimizers"][-2:] == ["gains", "gains_momentum"]


def test_rprop_arms_match_epochs_and_updates():
    """Issue 27 item 5: full batch got 15 updates against mini-batch's 1,185. Now a third arm
    gives full batch as many updates as mini-batch (and U times the passes)."""
    base = TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                       model=ModelConfig(hidden=(32,)), batch_size=64)
    arms = real.rprop_batch_runs(base, 1200, 7, 2)  # 1200 / 64: 19 updates an epoch
    labels = ["mini-batch (64)", "full-batch (1200), equal epochs",
              "full-batch (1200), equal updates"]
    assert [r.tags["batch"] for r in arms] == [b for b in labels for _ in range(2)]
    assert [(r.cfg.batch_size, r.cfg.epochs) for r in arms[::2]] == [
        (64, 7), (1200, 7), (1200, 7 * 19)]
    assert {(r.cfg.optim.name, r.cfg.optim.lr) for r in arms} == {("rprop", real.RPROP_LR)}
    results = [{"history": [{"epoch": e, "seed": r.cfg.seed, "lr": real.RPROP_LR,
                             "val_error": 0.5, "val_loss": 1.0, "status": "ok"}
                            for e in range(r.cfg.epochs + 1)]} for r in arms]
    frame = real.history_frame(arms, results, "batch", n_train=1200)
    table = real.rprop_table(frame).set_index("batch")
    assert table.loc[labels, "updates"].tolist() == [7 * 19, 7, 7 * 19]
    assert table.loc[labels, "epochs"].tolist() == [7, 7, 7 * 19]
    with pytest.raises(ValueError, match="n_train"):
        real.rprop_batch_runs(base, 64, 7, 2)


def test_rprop_arms_train_on_their_own_small_subset():
    """The equal-updates arm costs epochs x U full-batch epochs: on the comparison's 10,000
    examples that was 1,185 epochs a seed (hours). The arms take at most RPROP_SUBSET examples;
    a config already smaller, or a plug-in's whole dataset, is left as it is."""
    base = oc.base_config(5, None)
    assert base.data.subset == oc.DEFAULT_SUBSET > real.RPROP_SUBSET
    small = real.rprop_base(base)
    assert small.data.subset == real.RPROP_SUBSET
    assert small.replace(**{"data.subset": base.data.subset}) == base  # nothing else changes
    assert real.rprop_base(small, subset=5000) == small
    plugin = TrainConfig(data=DataConfig(dataset="digits"))
    assert real.rprop_base(plugin).data.subset == real.RPROP_SUBSET  # torchvision-style: cut
    updates = real.updates_per_epoch(real.RPROP_SUBSET, base.batch_size)
    assert oc.RPROP_EPOCHS * updates <= 200  # the equal-updates arm's epochs stay affordable
    with pytest.raises(ValueError, match="subset"):
        real.rprop_base(base, subset=0)


def test_rprop_claim_says_what_each_matched_budget_shows():
    """The issue's numbers: full batch at equal updates has the lower error but the higher
    loss (66.8 vs 9.22), so only the error supports "mini-batches hurt Rprop" there."""
    table = pd.DataFrame({"batch": ["mini-batch (128)", "full-batch (10000), equal epochs",
                                    "full-batch (10000), equal updates"],
                          "val_error_mean": [0.30, 0.25, 0.20],
                          "val_loss_mean": [9.22, 0.8, 66.8],
                          "epochs": [15, 15, 1185], "updates": [1185, 15, 1185]})
    claim = real.rprop_claim(table)
    assert "on validation error and loss at equal epochs" in claim
    assert "on validation error only (the loss favours mini-batches) at equal updates" in claim
    assert "1,185 updates" in claim and "66.8" in claim
    worse = table.assign(val_error_mean=[0.1, 0.25, 0.2], val_loss_mean=[0.5, 0.8, 66.8])
    assert "not at all at equal epochs and equal updates" in real.rprop_claim(worse)
    assert "too few" in real.rprop_claim(table.iloc[:1])
    fig = real.plot_metric_bands(pd.DataFrame({
        "batch": ["a"] * 3, "seed": 0, "epoch": [0, 1, 2], "updates": [0, 19, 38],
        "val_loss": [2.0, 1.0, 0.5], "status": "ok"}), "val_loss", by="batch", x="updates")
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and list(ax.lines[0].get_xdata()) == [0, 19, 38]
    assert len(oc.RPROP_TITLE) <= 80


# --- end to end ---

@pytest.fixture(scope="module")
def flow_run(prefect_harness, _session_store):
    """The flow with batching declared on and one worker: each batchable optimizer's seeds
    train as one batched group (see the tag test)."""
    os.environ["MLFLOW_TRACKING_URI"] = _session_store
    try:
        result = COMMANDS["optimizers"].run(
            optimizers=OPTIMIZERS, surfaces=["saddle"], seeds=2, epochs=2, rprop_epochs=2,
            cost_scale="small", lbfgs_iterations=4, overrides={**DIGITS, "batching": "on"},
            workers=1)
        return result, _session_store
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def children(result, uri):
    c = tracking.client(uri)
    parent = c.get_run(result["parent_run_id"])
    runs = c.search_runs([parent.info.experiment_id],
                         f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, runs


def test_one_child_per_surface_optimizer_search_and_training(flow_run):
    result, uri = flow_run
    parent, runs = children(result, uri)
    assert parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in runs)
    parts = pd.Series([r.data.tags["part"] for r in runs]).value_counts().to_dict()
    assert parts == {"surface": 3, "search": 3, "compare": 6, "rprop-batch": 6, "test": 2}
    compare = [r for r in runs if r.data.tags["part"] == "compare"]
    assert sorted((r.data.tags["optimizer"], r.data.params["seed"]) for r in compare) == sorted(
        (o, s) for o in OPTIMIZERS for s in ("1", "2"))  # not seed 0, which searched the rates
    searched = {s["optimizer"]: s["lr"] for s in result["searches"]}
    for r in compare:  # each optimizer trains at its own searched rate, named for it
        opt = r.data.tags["optimizer"]
        assert float(r.data.params["optim.lr"]) == pytest.approx(searched[opt])
        assert r.info.run_name.startswith(f"{opt} lr=")


def test_surface_children_log_rate_distance_and_series(flow_run):
    result, uri = flow_run
    c = tracking.client(uri)
    _, runs = children(result, uri)
    for r in (r for r in runs if r.data.tags["part"] == "surface"):
        assert r.data.params["surface"] == "saddle"
        assert {"lr", "final_loss", "final_distance"} <= set(r.data.metrics)
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        assert steps == series_steps(100)
    assert {row["optimizer"] for row in result["surfaces"]} == set(OPTIMIZERS)


def test_training_children_log_epochs_and_update_ratios(flow_run):
    result, uri = flow_run
    c = tracking.client(uri)
    _, runs = children(result, uri)
    for r in (r for r in runs if r.data.tags["part"] == "compare"
              and r.data.tags["status"] == "ok"):
        for key in ("train_loss", "val_loss", "val_error"):
            assert [m.step for m in c.get_metric_history(r.info.run_id, key)] == [0, 1, 2]
        for key in ("ratio/fc1", "ratio/head"):
            assert [m.step for m in c.get_metric_history(r.info.run_id, key)] == [1, 2]
        for key in ("lr/fc1", "lr/head"):
            assert [m.step for m in c.get_metric_history(r.info.run_id, key)] == [0, 1, 2]


def test_parent_holds_figures_gif_and_tables(flow_run):
    result, uri = flow_run
    c = tracking.client(uri)
    pid = result["parent_run_id"]
    files = {f.path for f in c.list_artifacts(pid, "figures")}
    assert {"figures/saddle_paths.png", "figures/saddle_loss.png", "figures/saddle.gif",
            "figures/rate_search.png", "figures/real_val_loss.png",
            "figures/real_val_error.png", "figures/update_ratio.png",
            "figures/rprop_batch_val_loss.png", "figures/rprop_batch_val_loss_by_updates.png",
            "figures/saddle_race_paths.png", "figures/saddle_race_loss.png",
            "figures/full_batch_train_loss.png", "figures/step_cost_seconds_per_step.png",
            "figures/step_cost_bytes_per_step.png"} <= files
    top = {f.path for f in c.list_artifacts(pid)}
    assert {"search.csv", "real_summary.csv", "rprop_batches.csv", "rprop_claim.txt"} <= top
    assert {f.path for f in c.list_artifacts(pid, "surfaces")} == {
        "surfaces/saddle.csv", "surfaces/saddle_race.csv"}
    saddle = pd.read_csv(c.download_artifacts(pid, "surfaces/saddle.csv"))
    # issue 27: each tuned rate also run from 6 start points it was not tuned on
    assert {"fresh_median_distance", "fresh_success", "fresh_diverged"} <= set(saddle.columns)
    assert saddle["fresh_success"].str.fullmatch(r"[0-6]/6").all()
    assert {f.path for f in c.list_artifacts(pid, "second_order")} == {
        "second_order/full_batch.csv", "second_order/step_cost.csv"}
    local = c.download_artifacts(pid, "figures/saddle.gif")
    with open(local, "rb") as gif:
        assert gif.read(6) == b"GIF89a"
    assert {row["optimizer"] for row in result["real"]} == set(OPTIMIZERS)
    assert all(row["seeds"] == 2 for row in result["real"])
    rprop = {row["batch"]: row for row in result["rprop"]}
    # The Rprop arms train on their own 1,000-example subset (experiments.optimizers.rprop_base)
    assert {b: (r["epochs"], r["updates"]) for b, r in rprop.items()} == {
        "mini-batch (64)": (2, 32), "full-batch (1000), equal epochs": (2, 2),
        "full-batch (1000), equal updates": (32, 32)}


def test_second_order_beside_the_race_and_in_the_report(flow_run):
    result, uri = flow_run
    race = pd.DataFrame(result["race"])
    assert set(race["optimizer"]) == {*OPTIMIZERS, "newton", "lbfgs"}
    assert (race.loc[~race["optimizer"].isin(["newton", "lbfgs"]), "evals"] == 100).all()
    assert race.set_index("optimizer").loc["newton", "hessians"] >= 1
    full = pd.DataFrame(result["full_batch"])
    assert set(full["method"]) == {"lbfgs", "sgd"}
    sgd_lr = {s["optimizer"]: s["lr"] for s in result["searches"]}["sgd"]
    assert full.loc[full["method"] == "sgd", "lr"].eq(sgd_lr).all()
    lbfgs = full[full["method"] == "lbfgs"]
    assert lbfgs["iteration"].max() <= 4 and lbfgs["passes"].max() >= 4  # >= 1 pass each
    # SGD gets as many passes as L-BFGS used
    assert full.loc[full["method"] == "sgd", "passes"].max() == math.ceil(lbfgs["passes"].max())
    assert set(pd.DataFrame(result["cost"])["method"]) == {"sgd", "lbfgs", "newton"}
    report = tracking.client(uri).download_artifacts(result["parent_run_id"], "report.md")
    with open(report, encoding="utf-8") as fh:
        text = fh.read()
    for words in ("Evaluations to reach", "Full-batch L-BFGS (softmax", "dense Hessian alone",
                  "Mini-batches hurt Rprop"):
        assert words in text


def test_bad_settings_are_refused_before_any_run(prefect_harness, mlflow_store):
    before = len(tracking.client(mlflow_store).search_experiments())
    with pytest.raises(ConfigError, match="optimizers"):
        COMMANDS["optimizers"].run(optimizers=["sgd", "lbfgs"], overrides=DIGITS)
    with pytest.raises(ConfigError, match="seeds"):
        COMMANDS["optimizers"].run(seeds=1, overrides=DIGITS)
    with pytest.raises(ConfigError, match="runner"):
        COMMANDS["optimizers"].run(runner="ray", overrides=DIGITS)
    assert len(tracking.client(mlflow_store).search_experiments()) == before


def test_seed_repeats_of_an_optimizer_train_as_one_batched_group(flow_run):
    result, uri = flow_run
    _, runs = children(result, uri)
    trained = {}
    for run in runs:
        tags = run.data.tags
        if (tags.get("role") == "real" or "trained" in tags) and tags.get("part") != "test":
            trained.setdefault(run.data.params.get("optim.name"), set()).add(
                tags.get("trained", "alone"))
    assert trained["sgd"] == {"batched k=2"} and trained["adam"] == {"batched k=2"}
    assert "batched k=2" not in trained.get("rprop", {"alone"})  # rprop cannot be batched


def test_the_winner_gets_a_test_score_that_chooses_nothing(flow_run):
    """Issue 27: the real-data winner at its rate is trained again on fresh seeds without the
    test split and scored once on it; the figure is on those runs, the parent, the report and
    the result, labelled, and the ranking (built from the comparison runs only) ignores it."""
    result, uri = flow_run
    c = tracking.client(uri)
    parent, runs = children(result, uri)
    winner, lr = result["real"][0]["optimizer"], result["real"][0]["lr"]
    tested = [r for r in runs if r.data.tags["part"] == "test"]
    assert sorted(int(r.data.params["seed"]) for r in tested) == [100, 101]
    for r in tested:
        assert r.data.tags["optimizer"] == winner and r.data.tags["trained"] == "alone"
        assert float(r.data.params["optim.lr"]) == pytest.approx(lr)
        assert r.data.tags["test_set"] == "scored once after training"
        assert [m.step for m in c.get_metric_history(r.info.run_id, "test_accuracy")] == [2]
    assert not any("test_accuracy" in r.data.metrics for r in runs if r not in tested)
    accs = sorted(r.data.metrics["test_accuracy"] for r in tested)
    test = result["test"]
    assert test["recipe"] == f"{winner} at lr {lr:.3g}" and test["seeds"] == [100, 101]
    assert (test["test_accuracy_min"], test["test_accuracy_max"]) == tuple(accs)
    assert parent.data.metrics["test_accuracy"] == pytest.approx(sum(accs) / 2)
    with open(c.download_artifacts(parent.info.run_id, "report.md")) as f:
        md = f.read()
    assert result["test_line"] in md and "## Test set (never used to choose)" in md
    assert result["test_line"].startswith("Test set (never used to choose): ")
    compare = [r for r in runs if r.data.tags["part"] == "compare"]
    last = pd.DataFrame([{"optimizer": r.data.tags["optimizer"], "seed": int(r.data.params[
        "seed"]), "epoch": 2, "lr": float(r.data.params["optim.lr"]), "status": r.data.tags[
        "status"], "val_error": r.data.metrics["val_error"], "val_loss": r.data.metrics[
        "val_loss"], "test_accuracy": 0.5} for r in compare])
    last = last.sort_values(["optimizer", "seed"], key=lambda col: col.map(
        OPTIMIZERS.index) if col.name == "optimizer" else col, ignore_index=True)  # flow order
    ranked = real.final_table(last)
    assert ranked["optimizer"].tolist() == [row["optimizer"] for row in result["real"]]
    flipped = real.final_table(last.assign(test_accuracy=np.linspace(0, 1, len(last))))
    assert flipped.equals(ranked)
    assert oc.test_seeds({"base": TrainConfig(seed=0), "seeds": 2}) == (100, 101)
    assert oc.test_seeds({"base": TrainConfig(seed=0), "seeds": 120}) == tuple(range(121, 241))


def test_the_real_data_winner_is_called_a_tie_when_the_seed_bands_overlap():
    """Issue 27: the best optimizer is stated against the runner-up with both seed bands."""
    def history(errors: dict) -> pd.DataFrame:
        return pd.DataFrame([{"optimizer": o, "seed": s, "epoch": 2, "lr": 0.1,
                              "val_error": e, "val_loss": e, "status": "ok"}
                             for o, es in errors.items() for s, e in enumerate(es)])

    apart = history({"adam": [0.10, 0.11, 0.12], "sgd": [0.15, 0.16, 0.17]})
    line = real.best_against_runner_up(apart, real.final_table(apart))
    assert line == ("adam beats the runner-up sgd on final validation error by 0.0500, the seed "
                    "bands apart: 0.1100 [0.1000..0.1200] against sgd's 0.1600 [0.1500..0.1700]")
    close = history({"adam": [0.10, 0.13, 0.12], "sgd": [0.125, 0.14, 0.13]})
    assert real.best_against_runner_up(close, real.final_table(close)).startswith(
        "adam and sgd tie on final validation error (the seed bands overlap)")
    one = history({"adam": [0.1, 0.2]})
    assert real.best_against_runner_up(one, real.final_table(one)) is None
