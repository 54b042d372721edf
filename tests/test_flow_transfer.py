"""The transfer flow: model registry round trip, the plan and its labels, settings refused
before any run, and one real flow on digits (source 0-4, target 5-9) under Prefect's test
harness with a temporary MLflow store, run twice so the second run reuses the pretrained model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch
from torch import nn

from flows.children import train_children
from flows.commands import COMMANDS
from flows.transfer import (
    confirmation_record,
    finetune_members,
    plan_runs,
    pretrain_hash,
    pretrain_member,
    run_name,
    transfer_config,
)
from flows.transfer_results import compare, print_summary, verdict_line
from lrpipe import tracking
from lrpipe.engine import checkpoint
from lrpipe.engine.config import ConfigError, ModelConfig
from lrpipe.engine.models import layer_names, make_model
from lrpipe.experiments.finetuning import strategy_config
from lrpipe.experiments.transfer import finetune, target_config

torch.set_num_threads(1)

OVERRIDES = {"dataset": "digits", "source_classes": [0, 1, 2, 3, 4],
             "target_classes": [5, 6, 7, 8, 9], "source_val_size": 200, "target_val_size": 200,
             "per_class": 10, "hidden": [32, 16], "pretrain_epochs": 2, "pretrain_batch_size": 32,
             "batch_size": 10, "head_mults": [1, 10], "base_lrs": [0.003, 0.01], "device": "cpu"}
FLOW_MODEL = "test-pretrained-digits"
METRICS = ("train_loss", "val_loss", "train_error", "val_error", "lr")


# --- the model registry ---------------------------------------------------------------------

def registered_pair(uri: str, name: str, model: nn.Module, config_hash: str) -> str:
    run_id = tracking.start_run("registry-test", "pretrain", uri=uri)
    try:
        return tracking.register_model(run_id, model, name, config_hash,
                                       model_cfg=ModelConfig(hidden=(16, 8)),
                                       input_shape=(1, 8, 8), num_classes=5, uri=uri)
    finally:
        tracking.end_run(run_id, uri=uri)


def test_registry_round_trip(mlflow_store):
    model = make_model(ModelConfig(hidden=(16, 8)), (1, 8, 8), 5, seed=3)
    uri = registered_pair(mlflow_store, "test-roundtrip", model, "abc123")
    assert uri == "models:/test-roundtrip/1"
    assert tracking.find_registered("test-roundtrip", "abc123") == uri
    assert tracking.find_registered("test-roundtrip", "fff000") is None
    assert tracking.find_registered("test-no-such-model", "abc123") is None
    rng_before = torch.get_rng_state()
    loaded = tracking.load_registered(uri)
    assert torch.equal(rng_before, torch.get_rng_state())  # no draws from the shared RNG
    assert isinstance(loaded, nn.Sequential)
    assert layer_names(loaded) == layer_names(model) == ["fc1", "fc2", "head"]
    assert list(loaded.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert all(p.requires_grad for p in loaded.parameters())
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    c = tracking.client(mlflow_store)
    version = c.get_model_version("test-roundtrip", "1")
    assert version.tags["config_hash"] == "abc123"
    assert c.get_run(version.run_id).data.tags["registered_model"] == uri
    assert c.get_run(version.run_id).info.status == "FINISHED"


def test_newest_version_wins_and_missing_files_are_skipped(mlflow_store):
    first = make_model(ModelConfig(hidden=(16, 8)), (1, 8, 8), 5, seed=1)
    second = make_model(ModelConfig(hidden=(16, 8)), (1, 8, 8), 5, seed=2)
    v1 = registered_pair(mlflow_store, "test-versions", first, "beef01")
    v2 = registered_pair(mlflow_store, "test-versions", second, "beef01")
    assert (v1, v2) == ("models:/test-versions/1", "models:/test-versions/2")
    assert tracking.find_registered("test-versions", "beef01") == v2
    assert torch.equal(tracking.load_registered(v1).fc1.weight, first.fc1.weight)
    c = tracking.client(mlflow_store)
    c.set_registered_model_alias("test-versions", "champion", "1")
    by_alias = tracking.load_registered("models:/test-versions@champion")
    assert torch.equal(by_alias.head.weight, first.head.weight)
    # A version whose files are gone (store cleaned by hand) is never offered for reuse.
    run_id = c.get_model_version("test-versions", "2").run_id
    folder = Path(urlparse(c.get_run(run_id).info.artifact_uri).path) / tracking.MODEL_DIR
    (folder / "state_dict.pt").unlink()
    assert tracking.find_registered("test-versions", "beef01") == v1


def test_model_uris_and_names_are_checked():
    assert checkpoint.parse_model_uri("models:/m-1/12") == ("m-1", "12", None)
    assert checkpoint.parse_model_uri("models:/m@best") == ("m", None, "best")
    for bad in ("runs:/abc/model", "models:/m", "models:/m/latest", "models:/m/1/x", "m/1"):
        with pytest.raises(ValueError, match="models:/<name>/<version>"):
            checkpoint.parse_model_uri(bad)
    for bad in ("", "a b", "x'; drop", "é", 3):
        with pytest.raises(ConfigError, match="model_name"):
            checkpoint.check_model_name(bad)


def test_bad_name_registers_nothing(mlflow_store):
    run_id = tracking.start_run("registry-test", "bad name", uri=mlflow_store)
    try:
        with pytest.raises(ConfigError, match="model_name: got 'a b'"):
            tracking.register_model(run_id, nn.Linear(2, 2), "a b", "abc",
                                    model_cfg=ModelConfig(), input_shape=(1, 8, 8),
                                    num_classes=2, uri=mlflow_store)
    finally:
        tracking.end_run(run_id, uri=mlflow_store)
    assert tracking.client(mlflow_store).list_artifacts(run_id) == []


# --- settings and the plan (pure) -----------------------------------------------------------

def test_transfer_config_from_flags_and_aliases():
    tc = transfer_config(lr=0.003, epochs=4, seeds=2,
                         overrides={"optim.name": "adam", "per_class": 20, "model.hidden": [8]})
    assert (tc.base_lr, tc.finetune_epochs, tc.seeds) == (0.003, 4, (0, 1))
    assert (tc.optimizer, tc.per_class, tc.hidden) == ("adam", 20, (8,))
    assert transfer_config(seeds=[5, 7]).seeds == (5, 7)
    assert transfer_config().base_lr == 0.01  # no lr: TransferConfig's default
    # The pretrained weights depend on the source side only: a new base rate reuses them.
    assert pretrain_hash(tc) == pretrain_hash(transfer_config(
        lr=0.1, epochs=1, overrides={"optim.name": "adam", "model.hidden": [8]}))
    assert pretrain_hash(tc) != pretrain_hash(transfer_config(
        overrides={"optim.name": "adam", "model.hidden": [8], "pretrain_epochs": 1}))


def test_plan_runs_each_training_once_hand_counted():
    tc = transfer_config(seeds=2, overrides=OVERRIDES)
    plan = plan_runs(tc, ("uniform", "head_mult", "scratch"), grid_seeds=1)
    # 3 strategies x 2 seeds, + 2x2 grid cells on seed 0, of which (0.01, x1) is uniform and
    # (0.01, x10) is head_mult at the base rate: 6 + 4 - 2 runs.
    assert len(plan) == 8
    by_name = {run["name"]: run for run in plan}
    uniform0 = by_name["uniform lr=0.01 momentum mlp seed=0"]
    assert (uniform0["strategies"], uniform0["grid"], uniform0["head_mult"]) == (
        ["uniform"], True, 1.0)
    assert by_name["uniform lr=0.01 momentum mlp seed=1"]["grid"] is False
    grid_only = by_name["head_mult x1 lr=0.003 momentum mlp seed=0"]
    assert (grid_only["strategies"], grid_only["grid"], grid_only["base_lr"]) == ([], True, 0.003)
    scratch = [r for r in plan if r["strategy"] == "scratch"]
    assert [r["grid"] for r in scratch] == [False, False]
    assert scratch[0]["base_lr"] == tc.scratch_lr
    assert len(plan_runs(tc, ("uniform", "head_mult"), grid_seeds=2)) == 4 + 8 - 4
    assert len(plan_runs(tc, ("uniform",), grid_seeds=0)) == 2


def test_custom_strategy_config_and_name():
    tc = transfer_config(overrides=OVERRIDES)
    cfg = strategy_config(tc, "custom", 1, {"fc1": 0.1, "head": 10.0})
    assert dict(cfg.optim.lr_mult) == {"fc1": 0.1, "head": 10.0}
    assert (cfg.optim.lr, cfg.seed) == (0.01, 1)
    assert run_name("custom", cfg) == "custom lr=0.01 momentum mlp seed=1"
    assert run_name("frozen_backbone", target_config(tc, "frozen_backbone", 0)) == (
        "frozen_backbone x10 lr=0.01 momentum mlp seed=0")


def test_compare_hand_computed():
    summary = pd.DataFrame({"strategy": ["head_mult", "uniform", "scratch"],
                            "mean": [0.10, 0.13, 0.105], "std": [0.01, 0.02, 0.01],
                            "seeds": [3, 3, 3]})
    c = compare(summary, "head_mult", "uniform")
    assert c["gap"] == pytest.approx(0.03) and c["beat"] and c["clear"]  # 0.03 > max sd 0.02
    c = compare(summary, "head_mult", "scratch")
    assert c["gap"] == pytest.approx(0.005) and c["beat"] and not c["clear"]
    assert not compare(summary, "uniform", "head_mult")["beat"]
    assert compare(summary, "head_mult", "frozen_backbone") is None
    one = summary.assign(std=math.nan, seeds=1)
    assert not compare(one, "head_mult", "uniform")["clear"]  # one seed: never clear
    tc = transfer_config()
    assert "beat uniform: final val error 0.1000 ± 0.0100 vs 0.1300 ± 0.0200" in verdict_line(
        compare(summary, "head_mult", "uniform"), tc)
    assert "did not beat head_mult" in verdict_line(compare(summary, "uniform", "head_mult"), tc)
    assert "one seed" in verdict_line(compare(one, "head_mult", "uniform"), tc)



def test_printed_link_opens_the_flows_own_experiment(mlflow_store, capsys):
    """The summary's MLflow link points into the experiment the flow logged to (it once named
    the default ``transfer`` experiment whatever ``experiment`` was)."""
    parent = tracking.start_run("my-transfer", "parent")
    tracking.end_run(parent)
    summary = pd.DataFrame({"strategy": ["head_mult"], "mean": [0.1], "std": [0.01],
                            "seeds": [3]})
    pre = {"reused": True, "model_uri": "models:/m/1"}
    print_summary(transfer_config(), summary, pd.DataFrame(), pre, [], parent, "my-transfer",
                  1.0, 1)
    own = tracking.experiment_id("my-transfer")
    assert f"/#/experiments/{own}/runs/{parent}" in capsys.readouterr().out

# --- settings refused before any run ---------------------------------------------------------

@pytest.mark.parametrize("settings, match", [
    ({"lr_mult": {"fc9": 1.0}}, r"unknown layer 'fc9'; allowed: fc1, fc2, head"),
    ({"lr_mult": {"Head": 10.0}}, r"allowed: fc1, fc2, head"),
    ({"lr_mult": {"head": -1.0}}, r"lr_mult\[head\]"),
    ({"lr_mult": {"fc1": 0, "fc2": 0, "head": 0}}, "every layer is frozen"),
    ({"strategies": "uniform,ulmfit"}, "strategies: got"),
    ({"strategies": "custom"}, "'custom' needs lr_mult"),
    ({"overrides": {**OVERRIDES, "learning_rate": 1}}, "unknown field 'learning_rate'"),
    ({"seeds": 2, "grid_seeds": 3}, "grid_seeds"),
    ({"lr": -0.1}, "base_lr"),
    ({"model_name": "my model"}, "model_name"),
    ({"runner": "ray"}, "runner"),
])
def test_bad_settings_are_refused_before_any_run(prefect_harness, mlflow_store, settings, match):
    run = COMMANDS["transfer"].run

    c = tracking.client(mlflow_store)
    before = len(c.search_experiments())
    with pytest.raises(ConfigError, match=match):
        run(**{"overrides": OVERRIDES, **settings})
    assert len(c.search_experiments()) == before


# --- one real flow, twice -------------------------------------------------------------------

@pytest.fixture(scope="module")
def flows_run(prefect_harness, _session_store):
    run = COMMANDS["transfer"].run

    os.environ["MLFLOW_TRACKING_URI"] = _session_store
    try:
        first = run(epochs=2, seeds=2, strategies="uniform,head_mult", overrides=OVERRIDES,
                    model_name=FLOW_MODEL, workers=2, confirm_seeds=[100, 101])
        second = run(epochs=1, seeds=1, strategies="head_mult", grid_seeds=0,
                     overrides=OVERRIDES, model_name=FLOW_MODEL, workers=2)
        return first, second, _session_store
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def children(c, parent_id: str):
    parent = c.get_run(parent_id)
    return c.search_runs([parent.info.experiment_id],
                         f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_pretrained_once_and_registered(flows_run):
    first, _, uri = flows_run
    c = tracking.client(uri)
    assert first["reused"] is False and first["model_uri"] == f"models:/{FLOW_MODEL}/1"
    version = c.get_model_version(FLOW_MODEL, "1")
    assert version.tags["config_hash"] == pretrain_hash(transfer_config(overrides=OVERRIDES))
    pre = c.get_run(first["pretrain_run_id"])
    assert version.run_id == pre.info.run_id
    assert pre.data.tags["mlflow.parentRunId"] == first["parent_run_id"]
    assert pre.info.run_name == "pretrain lr=0.05 momentum mlp seed=0"
    assert pre.info.status == "FINISHED" and pre.data.tags["phase"] == "pretrain"
    steps = [m.step for m in c.get_metric_history(pre.info.run_id, "val_error")]
    assert steps == [0, 1, 2]  # source curves, pretrain_epochs=2


def test_children_per_strategy_seed_and_grid(flows_run):
    first, _, uri = flows_run
    c = tracking.client(uri)
    runs = [r for r in children(c, first["parent_run_id"]) if r.data.tags["phase"] == "finetune"
            and " seed=10" not in r.info.run_name]  # the confirmation's: test below
    assert sorted(r.info.run_name for r in runs) == sorted([
        "uniform lr=0.01 momentum mlp seed=0", "uniform lr=0.01 momentum mlp seed=1",
        "head_mult x10 lr=0.01 momentum mlp seed=0", "head_mult x10 lr=0.01 momentum mlp seed=1",
        "head_mult x1 lr=0.003 momentum mlp seed=0", "head_mult x10 lr=0.003 momentum mlp seed=0",
    ])
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["pretrained_model"] == first["model_uri"]
        assert {"strategy", "head_mult", "base_lr"} <= set(r.data.tags)
        for key in METRICS:
            assert [m.step for m in c.get_metric_history(r.info.run_id, key)] == [0, 1, 2]
    tags = {r.info.run_name: r.data.tags for r in runs}
    x10 = next(r for r in runs if r.info.run_name == "head_mult x10 lr=0.01 momentum mlp seed=0")
    head = [m.value for m in c.get_metric_history(x10.info.run_id, "lr/head")]
    body = [m.value for m in c.get_metric_history(x10.info.run_id, "lr/fc1")]
    assert head == pytest.approx([0.1] * 3) and body == pytest.approx([0.01] * 3)
    assert tags["head_mult x10 lr=0.01 momentum mlp seed=0"]["head_mult"] == "10.0"
    assert tags["head_mult x1 lr=0.003 momentum mlp seed=0"]["base_lr"] == "0.003"
    summary = pd.DataFrame(first["summary"]).set_index("strategy")
    assert set(summary.index) == {"uniform", "head_mult"}
    assert summary["seeds"].tolist() == [2, 2]
    assert [v["rival"] for v in first["verdicts"]] == ["uniform"]


def test_the_best_strategy_is_confirmed_on_fresh_seeds(flows_run):
    """Issue 27: the winning strategy and the runner-up fine-tune again on seeds that did not
    rank them; the report gives the out-of-sample error with its band and a verdict."""
    first, second, uri = flows_run
    c = tracking.client(uri)
    conf = first["confirmation"]
    summary = pd.DataFrame(first["summary"])
    assert conf["rival"] == summary["strategy"].iloc[1] and conf["seeds"] == [100, 101]
    assert conf["verdict"] in ("confirmed", "tie", "not confirmed")
    assert conf["best_lo"] <= conf["best_mean"] <= conf["best_hi"]
    names = sorted(r.info.run_name for r in children(c, first["parent_run_id"])
                   if " seed=10" in r.info.run_name)
    assert names == sorted(f"{s} lr=0.01 momentum mlp seed={seed}" for seed in (100, 101)
                           for s in ("uniform", "head_mult x10"))
    assert c.get_run(first["parent_run_id"]).data.tags["confirm_verdict"] == conf["verdict"]
    with open(c.download_artifacts(first["parent_run_id"], "report.md")) as f:
        assert "out of sample (fresh seeds 100, 101, final target validation error" in f.read()
    assert second["confirmation"] is None  # one strategy: nothing to confirm against


def test_the_best_strategy_gets_a_test_score_that_chooses_nothing(flows_run):
    """Issue 27: the best strategy's fresh-seed fine-tunings trained without the target test
    split and were scored once on it; the figure is on those runs, the parent, the report and
    the result, labelled; the rival's runs carry none; the verdict reads validation only."""
    first, second, uri = flows_run
    c = tracking.client(uri)
    conf, best = first["confirmation"], first["summary"][0]["strategy"]
    kids = [r for r in children(c, first["parent_run_id"]) if " seed=10" in r.info.run_name]
    scored = [r for r in kids if r.data.tags["strategy"] == best]
    assert len(scored) == 2 and not any("test_accuracy" in r.data.metrics
                                        for r in kids if r not in scored)
    accs = sorted(r.data.metrics["test_accuracy"] for r in scored)
    assert all(r.data.tags["test_set"] == "scored once after training" for r in scored)
    test = conf["test"]
    assert (test["recipe"], test["seeds"], test["scored"]) == (best, [100, 101], 2)
    assert (test["test_accuracy_min"], test["test_accuracy_max"]) == tuple(accs)
    parent = c.get_run(first["parent_run_id"])
    assert parent.data.metrics["test_accuracy"] == pytest.approx(sum(accs) / 2)
    with open(c.download_artifacts(first["parent_run_id"], "report.md")) as f:
        md = f.read()
    assert conf["test_line"] in md and "target classes [5, 6, 7, 8, 9]" in conf["test_line"]
    assert "## Test set (never used to choose)" in md
    with open(c.download_artifacts(second["parent_run_id"], "report.md")) as f:
        assert "Test set (never used to choose): no test score: one strategy" in f.read()
    results = [{"history": tracking.run_history(r.info.run_id, uri).to_dict("records"),
                "seed": int(r.data.params["seed"]), "base_lr": float(r.data.tags["base_lr"]),
                "head_mult": float(r.data.tags["head_mult"]), "status": "ok",
                "strategies": r.data.tags["strategies"].split(","), "grid": False,
                "test_accuracy": r.data.metrics.get("test_accuracy", 0.5)} for r in kids]
    flipped = [{**r, "test_accuracy": 1.0 - r["test_accuracy"], "test_loss": 9.0}
               for r in results]
    records = [confirmation_record(x, best, conf["rival"], [100, 101])
               for x in (results, flipped)]
    assert {(r["verdict"], r["line"]) for r in records} == {(conf["verdict"], conf["line"])}


def test_figures_and_tables_on_the_parent(flows_run):
    first, _, uri = flows_run
    c = tracking.client(uri)
    parent = c.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pretrained_model"] == first["model_uri"]
    files = {f.path for f in c.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/strategy_curves.png", "figures/head_mult.png",
            "figures/grid_heatmap.png"} <= files
    top = {f.path for f in c.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "grid.csv", "strategy_history.csv"} <= top
    assert set(parent.data.metrics) == {"final_val_error/uniform", "final_val_error/head_mult",
                                        "test_accuracy", "test_accuracy_min",
                                        "test_accuracy_max", "test_loss", "test_error"}


def test_second_run_reuses_the_registered_model(flows_run):
    first, second, uri = flows_run
    c = tracking.client(uri)
    assert second["reused"] is True and second["model_uri"] == first["model_uri"]
    assert second["pretrain_run_id"] is None
    runs = children(c, second["parent_run_id"])
    assert [r.info.run_name for r in runs] == ["head_mult x10 lr=0.01 momentum mlp seed=0"]
    assert len(c.search_model_versions(f"name = '{FLOW_MODEL}'")) == 1
    assert c.get_run(second["parent_run_id"]).data.tags["pretrained_reused"] == "True"


# --- task bodies ----------------------------------------------------------------------------

def test_custom_task_equals_frozen_backbone_oracle(flows_run, monkeypatch):
    """custom {fc1: 0, fc2: 0, head: 10} is frozen_backbone written by hand: same history."""
    first, _, uri = flows_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tc = transfer_config(epochs=2, overrides=OVERRIDES)
    mult = {"fc1": 0.0, "fc2": 0.0, "head": 10.0}
    run = next(r for r in plan_runs(tc, ("custom",), 0, mult) if r["seed"] == 1)
    (out,) = train_children.fn(finetune_members([run], first["model_uri"]),
                               first["parent_run_id"], "transfer")
    assert tracking.client(uri).get_run(out["run_id"]).data.tags["strategy"] == "custom"
    from flows.common import dataset_for

    data = dataset_for(target_config(tc, "frozen_backbone", 1))
    pretrained = tracking.load_registered(first["model_uri"], "cpu")
    oracle = finetune(tc, "frozen_backbone", 1, pretrained, data)
    got = pd.DataFrame(out["history"])
    for key in METRICS:
        assert got[key].tolist() == oracle.history[key].tolist(), key


def test_failed_registration_leaves_no_running_run(flows_run, monkeypatch):
    first, _, uri = flows_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def broken(*args, **kwargs):
        raise RuntimeError("registry down")

    monkeypatch.setattr(tracking, "register_model", broken)
    tc = transfer_config(overrides={**OVERRIDES, "pretrain_epochs": 1})
    with pytest.raises(RuntimeError, match="registry down"):
        train_children.fn([pretrain_member(tc, "pretrain x", "test-broken")],
                          first["parent_run_id"], "transfer")
    c = tracking.client(uri)
    runs = [r for r in children(c, first["parent_run_id"]) if r.info.run_name == "pretrain x"]
    assert [r.info.status for r in runs] == ["FAILED"]
