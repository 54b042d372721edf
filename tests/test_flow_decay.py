"""The decay comparison wired into Prefect and MLflow: pure planning helpers by hand, the
schedule preview, and the decay_compare flow end to end on real digits under Prefect's test
harness with a temporary MLflow store."""

from __future__ import annotations

import math
import os
import time

import pandas as pd
import pytest

from flows import decay_compare as dc
from flows import decay_results as dr
from flows import schedule_preview as sp
from flows.commands import COMMANDS
from lrpipe import tracking
from lrpipe.engine.config import ConfigError, TrainConfig
from lrpipe.experiments.bands import check_seed_list
from lrpipe.search.plan import SEARCHED_TAG, describe_searched, searched_identity

OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
             "batch_size": 64, "device": "cpu"}
SCHEDULES = ["constant", "cosine", "step"]
SEEDS = (0, 1)
EPOCHS = 2


def _children(c, parent_id: str) -> list:
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=500)


def _files(c, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in c.list_artifacts(run_id, path):
        out |= _files(c, run_id, f.path) if f.is_dir else {f.path}
    return out


# --- pure planning helpers ------------------------------------------------------------------

def test_bad_names_and_seeds_name_the_field_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"schedules: got \['cosine', 'bogus'\]; allowed: .*"
                       r"constant, step, multistep, exponential, cosine, onecycle, "
                       r"warmup_cosine, inverse_time, plateau"):
        sp.select_schedules(["cosine", "bogus"], 100.0, 8)
    with pytest.raises(ConfigError, match="schedules"):
        sp.select_schedules(["cosine", "cosine"], 100.0, 8)
    with pytest.raises(ConfigError, match="schedules"):
        sp.select_schedules("cosine", 100.0, 8)  # a string is not a list of names
    with pytest.raises(ConfigError, match="final_decay"):
        sp.select_schedules(None, 0.5, 8)
    with pytest.raises(ConfigError, match="epochs"):
        sp.select_schedules(None, 100.0, 1)
    with pytest.raises(ConfigError, match="losses.*cross_entropy, mse"):
        dc.check_names("losses", ["hinge"], ("cross_entropy", "mse"))
    for bad in ([], [0, 0], [-1], [0.5], "0,1"):
        with pytest.raises(ConfigError, match="seeds"):
            check_seed_list("seeds", bad)
    assert check_seed_list("seeds", [2, 0]) == (2, 0)
    from flows.commands import parse_names, parse_seeds

    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_names("a, b,") == ["a", "b"]


def test_base_config_takes_a_fashion_subset_unless_told_otherwise():
    assert sp.base_config(8, None).data.subset == sp.DEFAULT_SUBSET
    assert sp.base_config(8, {"data.subset": None}).data.subset is None
    assert sp.base_config(8, {"data.subset": 5000}).data.subset == 5000
    assert sp.base_config(3, OVERRIDES).data.subset is None  # digits: all 1,200 examples
    assert sp.base_config(3, {"model.dropout": 0.2, "optim.weight_decay": 5e-4}).model.dropout \
        == 0.2


def test_steps_per_epoch_by_hand():
    cfg = TrainConfig().replace(**{"data.subset": 1000, "batch_size": 128})
    assert sp.steps_per_epoch(cfg, load=False) == 8  # ceil(1000 / 128)
    digits = sp.base_config(2, OVERRIDES)
    assert sp.steps_per_epoch(digits) == 19  # 1,500 - 300 validation = 1,200; ceil(1200 / 64)
    with pytest.raises(ConfigError, match="batch_size"):
        sp.steps_per_epoch(digits.replace(batch_size=1201))


def test_decay_table_by_hand_and_warnings():
    schedules = sp.select_schedules(["constant", "cosine", "step", "plateau"], 100.0, 8)
    table = sp.decay_table(schedules, 8, 10).set_index("schedule")
    assert table.loc["constant", "total_decay"] == 1.0
    assert table.loc["cosine", "total_decay"] == pytest.approx(100.0)
    assert table.loc["step", "total_decay"] == pytest.approx(100.0)
    assert math.isnan(table.loc["plateau", "total_decay"])
    # plateau, patience 1, factor 0.1: first judged epoch 1, reductions (8-1-1)//2 = 3 -> 1000x
    assert table.loc["plateau", "max_decay"] == pytest.approx(1000.0)
    assert "constant decays the rate only 1x" in table.loc["constant", "warning"]
    assert (table.drop(index="constant")["warning"] == "").all()


def test_rank_schedules_adds_gap_columns_by_hand():
    def run(schedule, seed, train, val):
        return pd.DataFrame({"schedule": schedule, "seed": seed, "epoch": range(len(val)),
                             "train_loss": train, "val_loss": val, "train_error": 0.1,
                             "val_error": [v / 10 for v in val], "lr": 1.0})

    history = pd.concat([
        # gap 0.1, 0.1, 0.2, 0.3, 0.4 -> grows for good from epoch 1 (epoch 0 is skipped)
        run("cosine", 0, [2.0, 1.0, 0.8, 0.6, 0.4], [2.1, 1.1, 1.0, 0.9, 0.8]),
        run("cosine", 1, [2.0, 1.0, 0.8, 0.6, 0.4], [2.1, 1.1, 1.0, 0.9, 0.8]),
        run("constant", 0, [2.0, 1.5, 1.2, 1.1, 1.0], [2.1, 1.6, 1.3, 1.2, 1.1]),
        run("constant", 1, [2.0, 1.5, 1.2, 1.1, 1.0], [2.1, 1.6, 1.3, 1.2, 1.3]),
    ], ignore_index=True)
    decays = pd.DataFrame({"schedule": ["cosine", "constant"], "total_decay": [100.0, 1.0]})
    ranking = dr.rank_schedules(history, decays).set_index("schedule")
    assert list(ranking.index) == ["cosine", "constant"]
    assert ranking.loc["cosine", "gap_growth_epoch"] == 1
    assert pd.isna(ranking.loc["constant", "gap_growth_epoch"])  # gap flat, then one blip
    assert ranking.loc["cosine", "final_gap_mean"] == pytest.approx(0.4)
    assert ranking.loc["constant", "final_gap_mean"] == pytest.approx(0.2)
    vs = dr.versus_constant(ranking.reset_index())
    assert vs == {"best_decaying": "cosine", "best_val_loss": pytest.approx(0.8),
                  "constant_val_loss": pytest.approx(1.2), "beats_constant": True}
    assert dr.versus_constant(ranking.reset_index().iloc[:1]) is None
    text = dr.ranking_text(ranking.reset_index())
    assert "0.8000 +- 0.0000 [0.8000, 0.8000]" in text and "100x" in text


def test_loss_rate_by_hand():
    base = TrainConfig().replace(**{"optim.lr": 0.1})
    assert dc.loss_rate(base, "cross_entropy") == 0.1
    assert dc.loss_rate(base, "mse") == pytest.approx(0.025)
    assert dc.loss_rate(base.replace(loss="mse"), "cross_entropy") == pytest.approx(0.4)


def test_loss_table_summarizes_per_training_loss():
    rows = [{"loss": loss, "schedule": "cosine", "seed": seed, "epoch": 1, "train_loss": 0.0,
             "val_loss": v, "train_error": 0.0, "val_error": v / 10, "lr": 0.1}
            for loss, seed, v in [("cross_entropy", 0, 0.4), ("cross_entropy", 1, 0.6),
                                  ("mse", 0, 1.0), ("mse", 1, 1.2)]]
    table = dr.loss_table(pd.DataFrame(rows)).set_index("loss")
    assert table.loc["cross_entropy", "final_val_loss_mean"] == pytest.approx(0.5)
    assert table.loc["mse", "final_val_error_mean"] == pytest.approx(0.11)
    assert table.loc["mse", "n_seeds"] == 2 and table.loc["cross_entropy", "rank"] == 1


def test_latest_chosen_lr_reads_the_newest_finished_parent(mlflow_store):
    name = f"lr-search-decay-test-{time.time_ns()}"
    assert sp.latest_chosen_lr(name) is None  # no such experiment: nothing created either
    assert tracking.client().get_experiment_by_name(name) is None
    old = tracking.start_run(name, "search old")
    tracking.log_metrics(old, {"chosen_lr": 0.05}, step=0)
    tracking.end_run(old)
    assert sp.latest_chosen_lr(name) == (0.05, old)
    time.sleep(0.01)
    new = tracking.start_run(name, "search new", tags={"chosen_lr": "0.02"})
    tracking.end_run(new)
    time.sleep(0.01)
    child = tracking.start_run(name, "a rung", parent_run_id=new)
    tracking.log_metrics(child, {"chosen_lr": 0.9}, step=0)
    tracking.end_run(child)
    failed = tracking.start_run(name, "search failed")
    tracking.log_metrics(failed, {"chosen_lr": 7.0}, step=0)
    tracking.end_run(failed, "FAILED")
    assert sp.latest_chosen_lr(name) == (0.02, new)


def _search_parent(cfg, lr: float) -> str:
    run = tracking.start_run(sp.SEARCH_EXPERIMENT, "a search", tags={
        SEARCHED_TAG: searched_identity(cfg), "chosen_lr": f"{lr}"})
    tracking.end_run(run)
    time.sleep(0.01)
    return run


def test_a_rate_comes_only_from_a_search_of_the_same_setup(mlflow_store):
    """Issue 27, finding 4: after a softmax search, the MLP must not take the softmax rate."""
    mlp = TrainConfig().replace(batch_size=77)  # a batch size no other test searches
    softmax = mlp.replace(**{"model.name": "softmax"})
    assert sp.resolve_lr(0.3, mlp) == (0.3, "given")
    with pytest.raises(ConfigError, match="lr"):
        sp.resolve_lr(-1.0, mlp)
    with pytest.raises(ConfigError, match=r"^lr: no finished lr-search run searched mlp \[256\] "
                       r"· sgd · cross_entropy · fashion_mnist · batch 77; run `lrpipe search "
                       r"--set batch_size=77` first"):
        sp.resolve_lr(None, mlp, {"batch_size": 77})
    _search_parent(softmax, 0.5)
    with pytest.raises(ConfigError, match="no finished lr-search run searched mlp"):
        sp.resolve_lr(None, mlp)
    rate, source = sp.resolve_lr(None, mlp, required=False)
    assert rate == sp.FALLBACK_LR and source.startswith("fallback, not searched")
    run = _search_parent(mlp, 0.05)
    assert sp.resolve_lr(None, mlp) == (0.05, f"lr-search run {run} ({describe_searched(mlp)})")
    assert sp.resolve_lr(None, softmax)[0] == 0.5
    # what is not searched does not split searches: epochs, seed, schedule, subset, the rate
    other = mlp.replace(epochs=9, seed=4, **{"data.subset": 100, "optim.lr": 3.0,
                                             "schedule.name": "cosine"})
    assert sp.resolve_lr(None, other)[0] == 0.05
    # the decay stage's second loss: its own search when there is one, else the fixed ratio
    rate, source = dc.loss_source(mlp, "mse", given=False)
    assert rate == pytest.approx(0.025) and "not searched" in source and "lrpipe losses" in source
    mse = _search_parent(mlp.replace(loss="mse"), 0.03)
    assert dc.loss_source(mlp, "mse", given=False) == (
        0.03, f"searched for mse: lr-search run {mse}")
    assert dc.loss_source(mlp, "mse", given=True)[0] == pytest.approx(0.025)


def test_searched_identity_covers_what_the_rate_depends_on():
    base = TrainConfig()
    same = {searched_identity(base.replace(**c)) for c in (
        {}, {"epochs": 2}, {"seed": 3}, {"data.subset": 1000}, {"data.val_size": 500},
        {"optim.lr": 7.0}, {"schedule.name": "step"})}
    assert same == {searched_identity(base)}
    differ = [{"model.name": "softmax"}, {"model.hidden": (64,)}, {"model.dropout": 0.5},
              {"optim.name": "adam"}, {"optim.momentum": 0.5}, {"optim.weight_decay": 1e-4},
              {"loss": "mse"}, {"batch_size": 64}, {"data.dataset": "digits"}]
    ids = {searched_identity(base.replace(**c)) for c in differ}
    assert len(ids) == len(differ) and searched_identity(base) not in ids


# --- schedule preview -----------------------------------------------------------------------

def test_schedule_preview_writes_a_png_and_logs_a_run(mlflow_store, tmp_path, capsys):
    out = tmp_path / "deep" / "schedules.png"
    result = COMMANDS["schedules"].run(epochs=4, lr=0.2, out=str(out), overrides=OVERRIDES)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c = tracking.client(mlflow_store)
    run = c.get_run(result["run_id"])
    assert run.info.run_name == "schedule preview" and run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).name == "lr-decay"
    assert {"figures/schedules.png", "total_decay.csv"} <= _files(c, result["run_id"])
    assert run.data.metrics["total_decay/cosine"] == pytest.approx(100.0)
    assert run.data.metrics["total_decay/constant"] == 1.0
    assert "total_decay/plateau" not in run.data.metrics
    assert result["steps_per_epoch"] == 19 and len(result["decays"]) == 9
    printed = capsys.readouterr().out
    assert "warning: schedule constant decays the rate only 1x" in printed
    assert str(out) in printed


def test_schedule_preview_refuses_bad_names_before_writing(mlflow_store, tmp_path):
    out = tmp_path / "never.png"
    with pytest.raises(ConfigError, match="schedules.*allowed.*constant"):
        COMMANDS["schedules"].run(schedules=["cosine", "linear"], out=str(out), overrides=OVERRIDES)
    assert not out.exists()


# --- the flow, end to end -------------------------------------------------------------------

@pytest.fixture(scope="module")
def decay(prefect_harness, _session_store):
    """The flow with batching declared on: the 6 schedule x seed runs train as 2 batched
    groups of 3 (one per worker), so every check below also holds for batched members."""
    os.environ["MLFLOW_TRACKING_URI"] = _session_store
    try:
        result = COMMANDS["decay"].run(lr=0.3, epochs=EPOCHS, seeds=SEEDS, schedules=SCHEDULES,
                        overrides={**OVERRIDES, "batching": "on"}, workers=2,
                        confirm_seeds=[100, 101])
        return result, _session_store
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_parent_with_one_child_per_schedule_and_seed(decay):
    result, uri = decay
    c = tracking.client(uri)
    parent = c.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["lr"] == "0.3" and parent.data.params["lr_source"] == "given"
    kids = _children(c, result["parent_run_id"])
    assert all(k.info.status == "FINISHED" for k in kids)
    main = [k for k in kids if k.data.tags["loss"] == "cross_entropy"
            and k.data.tags.get("role") != "confirm"]
    assert {k.data.tags["trained"] for k in main} == {"batched k=3"}
    assert sorted((k.data.tags["schedule"], int(k.data.params["seed"])) for k in main) == \
        sorted((s, seed) for s in SCHEDULES for seed in SEEDS)
    names = {k.info.run_name for k in main}
    assert "cosine lr=0.3 sgd mlp seed=0" in names and "constant lr=0.3 sgd mlp seed=1" in names
    for k in main:
        steps = [m.step for m in c.get_metric_history(k.info.run_id, "val_loss")]
        assert steps == list(range(EPOCHS + 1))


def test_the_best_schedule_is_confirmed_on_fresh_seeds(decay):
    """Issue 27: the winning schedule and the runner-up train again on seeds that did not rank
    them; the report gives the out-of-sample figure with its band and a verdict."""
    result, uri = decay
    c = tracking.client(uri)
    conf = result["confirmation"]
    ranking = pd.DataFrame(result["ranking"])
    assert conf["rival"] == ranking["schedule"].iloc[1] != result["best_schedule"]
    assert conf["verdict"] in ("confirmed", "tie", "not confirmed") and conf["seeds"] == [100, 101]
    assert conf["best_lo"] <= conf["best_mean"] <= conf["best_hi"]
    kids = [k for k in _children(c, result["parent_run_id"])
            if k.data.tags.get("role") == "confirm"]
    assert sorted((k.data.tags["schedule"], int(k.data.params["seed"])) for k in kids) == sorted(
        (s, seed) for s in (result["best_schedule"], conf["rival"]) for seed in (100, 101))
    for k in kids:
        assert [m.step for m in c.get_metric_history(k.info.run_id, "val_loss")] == \
            list(range(EPOCHS + 1))
    parent = c.get_run(result["parent_run_id"])
    assert parent.data.tags["confirm_verdict"] == conf["verdict"]
    with open(c.download_artifacts(result["parent_run_id"], "report.md")) as f:
        assert "out of sample (fresh seeds 100, 101, final validation loss" in f.read()
    assert {k.data.tags["trained"] for k in kids
            if k.data.tags["schedule"] == result["best_schedule"]} == {"alone"}
    with pytest.raises(ConfigError, match=r"^confirm_seeds: got \[1, 100\]"):
        dc.make_plan(0.3, 2, (0, 1), ["cosine", "step"], overrides=OVERRIDES,
                     confirm_seeds=[1, 100])


def test_the_best_schedule_gets_a_test_score_that_chooses_nothing(decay):
    """Issue 27: the best schedule's fresh-seed runs trained without the test split and were
    scored once on it; the figure is on those runs, the parent and the report, labelled, and
    neither the verdict nor the ranking reads it."""
    result, uri = decay
    c = tracking.client(uri)
    conf, best = result["confirmation"], result["best_schedule"]
    kids = [k for k in _children(c, result["parent_run_id"])
            if k.data.tags.get("role") == "confirm"]
    scored = [k for k in kids if k.data.tags["schedule"] == best]
    assert len(scored) == 2 and all(k.data.tags["test_set"] == "scored once after training"
                                    for k in scored)
    accs = [k.data.metrics["test_accuracy"] for k in scored]
    for k in scored:
        m = k.data.metrics
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["test_error"] == pytest.approx(1.0 - m["test_accuracy"])
        assert [h.step for h in c.get_metric_history(k.info.run_id, "test_loss")] == [EPOCHS]
    assert not any("test_accuracy" in k.data.metrics for k in kids if k not in scored)
    test = conf["test"]
    assert test["recipe"] == best and test["seeds"] == [100, 101] and test["scored"] == 2
    assert test["test_accuracy"] == pytest.approx(sum(accs) / 2)
    assert (test["test_accuracy_min"], test["test_accuracy_max"]) == (min(accs), max(accs))
    parent = c.get_run(result["parent_run_id"])
    assert parent.data.metrics["test_accuracy"] == pytest.approx(test["test_accuracy"])
    assert parent.data.tags["test_recipe"] == best
    with open(c.download_artifacts(result["parent_run_id"], "report.md")) as f:
        md = f.read()
    assert conf["test_line"] in md and "## Test set (never used to choose)" in md
    assert "the best schedule's fresh-seed runs" in md.split("\n")[4]  # the measured-on line
    # the choice reads validation only: the same histories with other test figures decide alike
    history = pd.DataFrame([{"schedule": k.data.tags["schedule"], "epoch": EPOCHS,
                             "seed": int(k.data.params["seed"]),
                             **{m: k.data.metrics[m] for m in ("val_loss", "val_error",
                                                                "train_loss", "train_error")},
                             "lr": float(k.data.params["optim.lr"]),
                             "test_accuracy": k.data.metrics.get("test_accuracy", 0.5)}
                            for k in kids])
    plan = dc.make_plan(0.3, EPOCHS, SEEDS, SCHEDULES, overrides=OVERRIDES,
                        confirm_seeds=[100, 101])
    rival = conf["rival"]
    first = dc.confirmation_record(plan, history, best, rival)
    other = dc.confirmation_record(plan, history.assign(test_accuracy=1.0 - history[
        "test_accuracy"], test_loss=99.0), best, rival)
    assert (first["verdict"], first["line"]) == (other["verdict"], other["line"]) == (
        conf["verdict"], conf["line"])


def test_total_decay_on_children_and_parent(decay):
    result, uri = decay
    c = tracking.client(uri)
    parent = c.get_run(result["parent_run_id"])
    assert parent.data.metrics["total_decay/constant"] == 1.0
    assert parent.data.metrics["total_decay/cosine"] == pytest.approx(100.0)
    assert parent.data.metrics["total_decay/step"] == pytest.approx(100.0)
    for k in _children(c, result["parent_run_id"]):
        expected = 1.0 if k.data.tags["schedule"] == "constant" else 100.0
        assert k.data.metrics["total_decay"] == pytest.approx(expected)
        assert ("decay_warning" in k.data.tags) == (k.data.tags["schedule"] == "constant")
        assert "schedule/lr_per_step.csv" in _files(c, k.info.run_id)
    warnings = c.download_artifacts(result["parent_run_id"], "decay_warnings.txt")
    assert "constant" in open(warnings).read()


def test_rate_curve_artifact_matches_the_schedule(decay):
    result, uri = decay
    c = tracking.client(uri)
    kid = next(k for k in _children(c, result["parent_run_id"])
               if k.info.run_name == "cosine lr=0.3 sgd mlp seed=0")
    curve = pd.read_csv(c.download_artifacts(kid.info.run_id, "schedule/lr_per_step.csv"))
    assert len(curve) == EPOCHS * 19 and curve["lr"].iloc[0] == pytest.approx(0.3)
    assert curve["lr"].iloc[-1] == pytest.approx(0.003)
    # train()'s per-epoch lr is the rate at the first update of each epoch
    logged = [m.value for m in c.get_metric_history(kid.info.run_id, "lr")]
    assert logged[1:] == pytest.approx(list(curve["lr"].iloc[[0, 19]]))
    for group in ("fc1", "head"):  # no multipliers here: every group applies the base rate
        by_group = [m.value for m in c.get_metric_history(kid.info.run_id, f"lr/{group}")]
        assert by_group == pytest.approx(logged)


def test_figures_and_ranking_on_the_parent(decay):
    result, uri = decay
    c = tracking.client(uri)
    files = _files(c, result["parent_run_id"])
    assert {f"figures/{n}.png" for n in ("schedules", "val_loss_band", "val_error_band",
                                         "final_val_error", "gap_best", "loss_choice")} <= files
    assert {"ranking.csv", "total_decay.csv", "loss_choice.csv"} <= files
    ranking = pd.read_csv(c.download_artifacts(result["parent_run_id"], "ranking.csv"))
    assert sorted(ranking["schedule"]) == sorted(SCHEDULES)
    assert list(ranking["rank"]) == sorted(ranking["rank"])
    assert (ranking["n_seeds"] == len(SEEDS)).all() and "gap_growth_epoch" in ranking
    assert ranking["final_val_loss_mean"].is_monotonic_increasing
    assert result["best_schedule"] == ranking["schedule"].iloc[0]
    assert c.get_run(result["parent_run_id"]).data.tags["best_schedule"] == \
        result["best_schedule"]
    assert set(ranking["rate_set_by"]) == {"its plan"}  # no plateau among SCHEDULES
    with open(c.download_artifacts(result["parent_run_id"], "report.md")) as f:
        assert "In-sample: the ranking's figures are the selection (validation) split's" \
            in f.read()


def test_plateau_is_marked_as_stepping_on_the_split_that_ranks_it():
    """Issue 27, finding 8: plateau decays on the selection split, and the ranking says so."""
    plan = dc.make_plan(0.3, 4, (0, 1), ["cosine", "plateau"], overrides=OVERRIDES)
    assert dc.rate_set_by(plan, "plateau") == "selection loss"
    assert dc.rate_set_by(plan, "cosine") == "its plan"
    ranking = pd.DataFrame({"schedule": ["plateau", "cosine"],
                            "rate_set_by": ["selection loss", "its plan"]})
    notes = dc.selection_notes(plan, ranking)
    assert notes[0].startswith("In-sample") and "seeds that rank (0, 1)" in notes[0]
    assert notes[1].startswith("plateau cut the rate when the selection loss stalled")
    assert len(dc.selection_notes(plan, ranking.iloc[[1]])) == 1


def test_without_confirmation_the_report_says_there_is_no_test_score():
    off = dc.make_plan(0.3, EPOCHS, SEEDS, SCHEDULES, overrides=OVERRIDES, confirm_seeds=[])
    assert dc.untested_line(off) == ("Test set (never used to choose): no test score: "
                                     "confirmation seeds were turned off")
    on = dc.make_plan(0.3, EPOCHS, SEEDS, ["cosine"], overrides=OVERRIDES,
                      confirm_seeds=[100, 101])
    assert dc.untested_line(on).endswith("no test score: one schedule, no runner-up")


def test_loss_choice_trains_the_best_schedule_with_mse(decay):
    result, uri = decay
    c = tracking.client(uri)
    mse = [k for k in _children(c, result["parent_run_id"]) if k.data.tags["loss"] == "mse"]
    assert sorted(int(k.data.params["seed"]) for k in mse) == list(SEEDS)
    assert {k.data.tags["schedule"] for k in mse} == {result["best_schedule"]}
    # squared error trains at a quarter of the rate (its output curvature is 4x larger)
    assert all(k.data.params["loss"] == "mse" and k.data.params["optim.lr"] == "0.075"
               and " mse lr=0.075 " in k.info.run_name for k in mse)
    table = pd.DataFrame(result["loss_choice"]).set_index("loss")
    assert table["lr"].to_dict() == {"cross_entropy": 0.3, "mse": pytest.approx(0.075)}
    assert set(table.index) == {"cross_entropy", "mse"}
    assert (table["n_seeds"] == len(SEEDS)).all()
    assert table["final_val_error_mean"].between(0, 1).all()


def test_bad_schedule_names_refused_before_any_run(prefect_harness, mlflow_store):
    c = tracking.client(mlflow_store)

    def count() -> int:
        exp = c.get_experiment_by_name("lr-decay")
        return 0 if exp is None else len(c.search_runs([exp.experiment_id], max_results=1000))

    before = count()
    with pytest.raises(ConfigError, match=r"schedules: got \['cosine', 'bogus'\]; allowed: .*"
                       "constant, step"):
        COMMANDS["decay"].run(lr=0.3, epochs=2, schedules=["cosine", "bogus"], overrides=OVERRIDES)
    with pytest.raises(ConfigError, match="seeds"):
        COMMANDS["decay"].run(lr=0.3, epochs=2, seeds=[0, 0], overrides=OVERRIDES)
    with pytest.raises(ConfigError, match="losses"):
        COMMANDS["decay"].run(lr=0.3, epochs=2, losses=["hinge"], overrides=OVERRIDES)
    with pytest.raises(ConfigError, match="runner"):
        COMMANDS["decay"].run(lr=0.3, epochs=2, overrides=OVERRIDES, runner="ray")
    assert count() == before
