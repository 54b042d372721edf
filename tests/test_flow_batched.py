"""flows.children.train_children: a group of rates trained in one task, each member its own
MLflow child run, against one task per config on the same configs; and flows.batched's plan
that says what to group."""

from __future__ import annotations

import pytest

from flows.batched import chunks, plan_groups, plan_tasks
from flows.children import member as spec
from flows.children import train_children
from lrpipe import runs, tracking
from lrpipe.engine.config import DataConfig, ModelConfig, TrainConfig

LRS = (0.05, 0.1, 0.2, 1e4)  # 1e4 diverges: masked in the batch, its run marked
EXPERIMENT = "test-flow-batched"
METRICS = ("train_loss", "val_loss", "train_error", "val_error", "lr")


def digits(**changes) -> TrainConfig:
    """The digits MLP with batching declared on (auto would train an MLP alone on the CPU)."""
    cfg = TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                      model=ModelConfig(name="mlp", hidden=(32,)), epochs=2, batch_size=64,
                      device="cpu", batching="on")
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def flow_run(prefect_harness, _session_store):
    """One flow: the 4 rates as one train_children task (batching declared on) and as 4
    one-member tasks, side by side."""
    import os

    from prefect import flow, unmapped

    cfgs = [digits(**{"optim.lr": lr}) for lr in LRS]
    names = [runs.training_run_name(c) for c in cfgs]

    @flow(name="test-batched")
    def both(parent: str, other: str) -> tuple[list[dict], list[dict]]:
        group = train_children.submit([spec(c, n, {"flow": "test"})
                                       for c, n in zip(cfgs, names, strict=True)],
                                      parent, EXPERIMENT, 1)
        # Another parent: a task would reuse a finished child of the same config.
        singles = train_children.map([[spec(c, n)] for c, n in zip(cfgs, names, strict=True)],
                                     unmapped(other), unmapped(EXPERIMENT))
        return group.result(), [f.result()[0] for f in singles]

    os.environ["MLFLOW_TRACKING_URI"] = _session_store
    try:
        parent = tracking.start_run(EXPERIMENT, "parent")
        other = tracking.start_run(EXPERIMENT, "parent of single runs")
        grouped, singles = both(parent, other)
        tracking.end_run(parent)
        tracking.end_run(other)
        return parent, grouped, singles, _session_store
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_one_child_run_per_member_with_params_and_tags(flow_run):
    parent, grouped, _, uri = flow_run
    c = tracking.client(uri)
    for member, lr in zip(grouped, LRS, strict=True):
        run = c.get_run(member["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.run_name == member["name"] == f"lr={lr:g} sgd mlp seed=0"
        assert float(run.data.params["optim.lr"]) == lr
        tags = run.data.tags
        assert (tags["status"], tags["device"], tags["trained"], tags["flow"]) == (
            "ok" if lr < 1e4 else "diverged", "cpu", "batched k=4", "test")
        assert tags["config_hash"] == member["config_hash"] == digits(**{"optim.lr": lr}).hash()


def test_members_have_per_epoch_metrics(flow_run):
    _, grouped, _, uri = flow_run
    c = tracking.client(uri)
    for member in grouped[:3]:
        for key in (*METRICS, "ratio/fc1", "ratio/head"):
            assert [m.step for m in c.get_metric_history(member["run_id"], key)] == \
                ([0, 1, 2] if not key.startswith("ratio/") else [1, 2])
        history = c.get_metric_history(member["run_id"], "val_loss")
        assert history[-1].value == pytest.approx(member["val_loss"])
    diverged = grouped[3]
    assert (diverged["status"], diverged["diverged_epoch"]) == ("diverged", 1)
    assert [m.step for m in c.get_metric_history(diverged["run_id"], "diverged")] == [1]
    assert [m.step for m in c.get_metric_history(diverged["run_id"], "val_error")] == [0]


def test_results_equal_one_member_tasks_within_tolerance(flow_run):
    _, grouped, singles, _ = flow_run
    for got, want in zip(grouped, singles, strict=True):
        assert set(got) == set(want)
        assert (got["lr"], got["seed"], got["status"], got["epoch"], got["config_hash"],
                got["diverged_epoch"]) == (want["lr"], want["seed"], want["status"],
                                           want["epoch"], want["config_hash"],
                                           want["diverged_epoch"])
        # float32: batched GEMMs sum in another order (FIELD_NOTES), so not bit-equal.
        for key in ("train_loss", "val_loss", "best_val_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-3)
        assert abs(got["val_error"] - want["val_error"]) <= 2 / 300  # two of 300 examples
        assert [r["epoch"] for r in got["history"]] == [r["epoch"] for r in want["history"]]


def test_resumed_group_reuses_finished_members_and_trains_the_rest(flow_run, mlflow_store):
    parent, grouped, _, _ = flow_run
    cfgs = [digits(**{"optim.lr": lr}) for lr in (*LRS, 0.4)]
    names = [m["name"] for m in grouped] + ["new"]
    out = train_children.fn([spec(c, n) for c, n in zip(cfgs, names, strict=True)], parent,
                            EXPERIMENT)
    assert [m["reused"] for m in out] == [True, True, True, True, False]
    assert [m["run_id"] for m in out[:4]] == [m["run_id"] for m in grouped]
    for got, want in zip(out, grouped, strict=False):  # diverged one too: last finite epoch
        assert got["val_loss"] == pytest.approx(want["val_loss"])
    assert (out[3]["status"], out[3]["diverged_epoch"]) == ("diverged", 1)
    run = tracking.client(mlflow_store).get_run(out[4]["run_id"])
    assert (run.data.tags["trained"], run.data.tags["mlflow.parentRunId"]) == ("alone", parent)


def test_a_failing_group_leaves_every_child_failed(mlflow_store, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("flows.children.train_many", boom)
    monkeypatch.setattr("flows.children.plan_many", lambda cfgs: [([0, 1], True)])
    members = [spec(digits(**{"optim.lr": lr}), name) for lr, name in ((0.1, "a"), (0.2, "b"))]
    parent = tracking.start_run("test-flow-batched-fail", "parent")
    with pytest.raises(RuntimeError, match="boom"):
        train_children.fn(members, parent, "test-flow-batched-fail")
    c = tracking.client(mlflow_store)
    exp = c.get_experiment_by_name("test-flow-batched-fail").experiment_id
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["a", "b"]
    assert {r.info.status for r in children} == {"FAILED"}


def test_bad_groups_are_refused_before_any_run():
    with pytest.raises(ValueError, match="members: got none"):
        train_children.fn([], "parent", EXPERIMENT)
    other = digits(**{"data.val_size": 200})
    with pytest.raises(ValueError, match="members: they differ in data"):
        train_children.fn([spec(digits(), "a"), spec(other, "b")], "parent", EXPERIMENT)
    with pytest.raises(ValueError, match=r"member: unknown \['tested'\]; allowed: key, init"):
        spec(digits(), "a", tested=True)


def test_members_that_keep_their_model_are_planned_alone():
    """A tested (or registered, or fine-tuned) member trains alone; the others are dealt as
    they would be without it."""
    cfgs = [digits(**{"optim.lr": lr}) for lr in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert plan_tasks(cfgs, 2) == [[0, 2, 4], [1, 3]]
    assert plan_tasks(cfgs, 2, [False, True, False, False, False]) == [[0, 3], [1], [2, 4]]
    assert plan_tasks(cfgs[:1] + cfgs[2:], 2) == [[0, 2], [1, 3]]  # the same deal of the rest


def test_chunks_by_hand():
    assert chunks(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert chunks([4, 5], 1) == [[4, 5]]
    assert chunks([4, 5], 8) == [[4], [5]]
    with pytest.raises(ValueError, match="workers: got 0"):
        chunks([1], 0)


def test_plan_groups_batches_chunks_only_where_the_policy_says_so():
    cfgs = [digits(**{"optim.lr": lr}) for lr in (0.1, 0.2, 0.3, 0.4, 0.5)]
    cfgs.append(digits(**{"optim.name": "gains"}))  # cannot be batched: a task of its own
    assert plan_groups(cfgs, workers=2) == [[0, 2, 4], [1, 3], [5]]
    # batching off, or auto for an MLP on the CPU: every rate its own parallel task
    for batching in ("off", "auto"):
        alone = [c.replace(batching=batching) for c in cfgs]
        assert plan_groups(alone, workers=2) == [[0], [1], [2], [3], [4], [5]]
    assert plan_groups(cfgs[:3], workers=3) == [[0], [1], [2]]  # chunks of 1
    softmax = [c.replace(batching="auto", **{"model.name": "softmax"}) for c in cfgs[:5]]
    assert plan_groups(softmax, workers=2) == [[0, 2, 4], [1, 3]]  # auto batches it on the CPU


def test_plan_groups_one_worker_keeps_one_group():
    cfgs = [digits(**{"optim.lr": lr}) for lr in (0.1, 0.2, 0.3)]
    assert plan_groups(cfgs) == [[0, 1, 2]]


def test_plan_groups_is_the_same_on_every_call():
    """Declared, not raced: the same configs on the same device plan the same tasks."""
    cfgs = [digits(batching=b, **{"optim.lr": lr}) for b in ("on", "auto") for lr in (0.1, 0.2)]
    assert all(plan_groups(cfgs) == [[0, 1], [2], [3]] for _ in range(5))


@pytest.fixture(scope="module")
def planned_run(prefect_harness, _session_store):
    """train_planned in a flow: 4 rates (batching declared on, 2 workers -> 2 groups of 2)
    and one unbatchable config (rprop: a task of its own), per-config tags."""
    import os

    from prefect import flow

    from flows.batched import train_planned

    cfgs = [digits(**{"optim.lr": lr}) for lr in (0.05, 0.1, 0.2, 1e4)]
    cfgs.append(digits(**{"optim.name": "rprop", "optim.lr": 0.01}))
    names = [f"m{i}" for i in range(len(cfgs))]
    tags = [{"role": f"r{i}"} for i in range(len(cfgs))]

    @flow(name="test-planned")
    def planned(parent: str) -> list[dict]:
        return train_planned(cfgs, parent, EXPERIMENT, names, threads=1, workers=2, tags=tags,
                             label="planned")

    os.environ["MLFLOW_TRACKING_URI"] = _session_store
    try:
        parent = tracking.start_run(EXPERIMENT, "planned parent")
        out = planned(parent)
        tracking.end_run(parent)
        return cfgs, out, _session_store
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_train_planned_returns_one_result_per_config_in_order(planned_run):
    cfgs, out, _ = planned_run
    assert [r["name"] for r in out] == [f"m{i}" for i in range(5)]
    assert [r["config_hash"] for r in out] == [c.hash() for c in cfgs]
    assert [r["status"] for r in out] == ["ok", "ok", "ok", "diverged", "ok"]


def test_train_planned_groups_dealt_rates_and_tags_each_member(planned_run, capsys):
    _, out, uri = planned_run
    c = tracking.client(uri)
    tags = [c.get_run(r["run_id"]).data.tags for r in out]
    assert [t["role"] for t in tags] == [f"r{i}" for i in range(5)]
    # Dealt over 2 workers: (0.05, 0.2) and (0.1, 1e4) train together; rprop alone.
    assert [t.get("trained", "alone") for t in tags] == ["batched k=2"] * 4 + ["alone"]
