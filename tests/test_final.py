"""The final stage: its plan by hand, the test metrics against a hand computation, then one
real final training on digits (the test split reaches the models only after training, the
registry holds the winner with its test numbers, a resume trains nothing and answers the
same) and one pipeline whose report opens with the final model."""

import math

import pytest
import torch
import torch.nn.functional as F

from flows import children
from flows import final as final_flow
from flows.commands import COMMANDS
from lrpipe import tracking
from lrpipe.engine.config import ConfigError
from lrpipe.experiments import final as fx
from lrpipe.experiments.pipeline import final_answer

OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
             "batch_size": 64, "device": "cpu"}


# --- the plan (pure) ----------------------------------------------------------------------

def test_plan_trains_the_winner_and_its_constant_twin_longer_on_full_data():
    plan = fx.final_plan(0.1, "cosine", decay_epochs=8, train_size=50_000)
    assert plan.epochs == 16 and plan.schedule == "cosine"
    assert set(plan.configs()) == {"cosine", "constant"}
    win, const = plan.winner, plan.constant
    assert win.schedule.name == "cosine" and const.schedule.name == "constant"
    assert win.optim.lr == const.optim.lr == 0.1 and win.epochs == const.epochs == 16
    assert win.data.subset is None and win.data == const.data and win.seed == const.seed
    assert plan.steps_per_epoch == math.ceil(50_000 / 128)
    assert plan.total_decay == pytest.approx(100.0, rel=1e-6)
    assert "t10k" in plan.test_set and "100x" in fx.plan_summary(plan)


def test_plan_follows_the_settings_and_says_why():
    plan = fx.final_plan(0.3, "multistep", 8, 1200, {"data.subset": 600}, epochs=5)
    assert plan.epochs == 5 and plan.winner.data.subset == 600
    assert plan.winner.schedule.milestones == (2, 3)  # rebuilt for 5 epochs, not 8
    assert fx.final_plan(0.3, "plateau", 8, 1200).total_decay is None
    skipped = fx.final_plan(0.3, None, 8, 1200, {"data.dataset": "digits"})
    assert skipped.schedule == "constant" and list(skipped.configs()) == ["constant"]
    assert "skipped" in skipped.schedule_source and "no official test set" in skipped.test_set
    with pytest.raises(ConfigError, match="best_schedule: got 'linear'; allowed: constant"):
        fx.final_plan(0.1, "linear", 8, 1200)
    with pytest.raises(ConfigError, match="final_epochs"):
        fx.final_plan(0.1, "cosine", 8, 1200, epochs=1)
    with pytest.raises(ConfigError, match="lr"):
        fx.final_plan(0.0, "cosine", 8, 1200)


def test_test_metrics_by_hand_and_no_test_split_while_training(digits32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    got = fx.test_metrics(model, digits32)
    with torch.no_grad():
        logits = model(digits32.test.x)
    assert got["test_loss"] == pytest.approx(float(F.cross_entropy(logits, digits32.test.y)),
                                             rel=1e-5)
    hand = float((logits.argmax(1) == digits32.test.y).float().mean())
    assert got["test_accuracy"] == pytest.approx(hand) and got["test_size"] == 297
    hidden = fx.without_test(digits32)
    assert len(hidden.test) == 0 and hidden.train is digits32.train
    with pytest.raises(ValueError, match="data.test: got 0"):
        fx.test_metrics(model, hidden)


def test_final_answer_opens_with_the_result():
    win = {"run_id": "a", "status": "ok", "test_accuracy": 0.8812, "test_loss": 0.3301}
    const = {"run_id": "b", "status": "ok", "test_accuracy": 0.8705, "test_loss": 0.3599}
    line = final_answer({"lr": 0.1, "schedule": "cosine", "epochs": 16, "total_decay": 100.0,
                         "winner": win, "constant": const}, 0.1)
    assert line == ("Final model: lr 0.1, cosine schedule (total decay 100x), 16 epochs, full "
                    "training data: test accuracy 0.8812 (test loss 0.3301); constant rate at "
                    "the same lr: test accuracy 0.8705 (test loss 0.3599)")
    assert final_answer(None, None) == "no rate chosen, no final model"


# --- one real final training --------------------------------------------------------------

@pytest.fixture
def spied(monkeypatch):
    """Every train() and test_metrics() call of the final flow's training task
    (flows.children), in order: (event, config hash, test examples the call could see)."""
    events = []
    train, test = children.train, fx.test_metrics

    def spy_train(cfg, data, **kw):
        events.append(("train start", cfg.hash(), len(data.test)))
        result = train(cfg, data, **kw)
        events.append(("train end", cfg.hash(), len(data.test)))
        return result

    def spy_test(model, data):
        events.append(("test", None, len(data.test)))
        return test(model, data)

    monkeypatch.setattr(children, "train", spy_train)
    monkeypatch.setattr(fx, "test_metrics", spy_test)
    return events


def test_final_stage_tests_after_training_registers_and_resumes(prefect_harness, mlflow_store,
                                                                spied):
    args = dict(lr=0.5, best_schedule="cosine", decay_epochs=1, epochs=2,
                overrides=OVERRIDES, experiment="final-test")
    first = final_flow.final_training(**args)
    kinds = [e[0] for e in spied]
    assert sorted(kinds) == ["test", "test", "train end", "train end", "train start",
                             "train start"]
    assert all(n == 0 for kind, _, n in spied if kind.startswith("train"))  # never seen
    assert all(n == 297 for kind, _, n in spied if kind == "test")
    # Tests run one per finished training: at each test, more trainings ended than tests ran.
    for i, kind in enumerate(kinds):
        if kind == "test":
            assert kinds[:i].count("train end") > kinds[:i].count("test")
    win, const = first["winner"], first["constant"]
    assert first["total_decay"] == pytest.approx(100.0, rel=1e-6) and first["epochs"] == 2
    assert 0.1 < win["test_accuracy"] <= 1 and const["model_uri"] is None
    c = tracking.client(mlflow_store)
    (version,) = [v for v in c.search_model_versions("name = 'lrpipe-final-mlp'")
                  if v.run_id == win["run_id"]]
    assert first["model_uri"] == f"models:/lrpipe-final-mlp/{version.version}"
    assert float(version.tags["test_accuracy"]) == pytest.approx(win["test_accuracy"], abs=1e-4)
    assert version.tags["schedule"] == "cosine" and version.tags["total_decay"] == "100.0"
    files = {f.path for f in c.list_artifacts(win["run_id"], "final")}
    assert files == {"final/config.json", "final/rate_plan.csv"}
    parent = c.get_run(first["parent_run_id"])
    assert parent.data.metrics["test_accuracy"] == pytest.approx(win["test_accuracy"])
    assert parent.data.metrics["constant_test_accuracy"] == pytest.approx(
        const["test_accuracy"])
    # A stage cut short after its trainings: the same call resumes the parent, trains and
    # tests nothing again, and answers the same.
    tracking.end_run(first["parent_run_id"], "KILLED", uri=mlflow_store)
    spied.clear()
    again = final_flow.final_training(**args)
    assert spied == [] and again["parent_run_id"] == first["parent_run_id"]
    assert again["winner"]["reused"] and again["constant"]["reused"]
    assert again["winner"]["test_accuracy"] == pytest.approx(win["test_accuracy"])
    assert again["model_uri"] == first["model_uri"]


def test_pipeline_report_opens_with_the_final_model(prefect_harness, mlflow_store):
    result = COMMANDS["pipeline"].run(lrs=[0.5], epochs=1, skip=["search", "decay", "transfer"],
                                      overrides=OVERRIDES, final_epochs=2)
    final = result["final"]
    assert final["schedule"] == "constant" and "skipped" in final["schedule_source"]
    assert [r["status"] for r in result["stages"]] == ["skipped", "done", "skipped", "done",
                                                      "skipped"]
    report = tracking.read_text(result["parent_run_id"], "report.md")
    assert report.splitlines()[2] == f"**{final_answer(final, 0.5)}**"
    assert report.splitlines()[2].startswith("**Final model: lr 0.5, constant schedule")
    pipe = tracking.client(mlflow_store).get_run(result["parent_run_id"])
    assert pipe.data.metrics["final_test_accuracy"] == pytest.approx(
        final["winner"]["test_accuracy"])
    assert pipe.data.tags["final_model"] == final["model_uri"]


def test_a_tested_run_is_reused_with_its_logged_test_figures(mlflow_store, monkeypatch):
    """A ``test`` member of flows.children.train_children (a recommended recipe's run, issue
    27): it trains without the test split and scores once; run again under the same parent (a
    resumed flow), it trains and tests nothing and returns the figures it logged."""
    from lrpipe.engine.config import TrainConfig, merge

    cfg = merge(TrainConfig(), {**OVERRIDES, "epochs": 1, "seed": 100})
    parent = tracking.start_run("tested-reuse", "parent")
    seen = []
    real_train = children.train
    monkeypatch.setattr(children, "train", lambda c, data, **kw: (
        seen.append(len(data.test)), real_train(c, data, **kw))[1])
    members = [children.member(cfg, "cosine seed=100", test=True)]
    (fresh,) = children.train_children.fn(members, parent, "tested-reuse")
    (again,) = children.train_children.fn(members, parent, "tested-reuse")
    assert seen == [0]  # trained once, and never saw a test image
    assert not fresh["reused"] and again["reused"] and again["run_id"] == fresh["run_id"]
    assert 0.0 < fresh["test_accuracy"] <= 1.0
    assert {k: again[k] for k in fx.TEST_KEYS} == pytest.approx(
        {k: fresh[k] for k in fx.TEST_KEYS})
    run = tracking.client().get_run(fresh["run_id"])
    assert run.data.tags["test_set"] == "scored once after training"
    assert run.data.metrics["test_error"] == pytest.approx(1.0 - fresh["test_accuracy"])
