"""End to end: the lr_sweep flow on real digits under Prefect's test harness, tracked in a
temporary MLflow store."""

import re

import pytest

from flows.commands import COMMANDS
from lrpipe import tracking
from lrpipe.engine.config import ConfigError

OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
             "batch_size": 64}


@pytest.fixture(scope="module")
def sweep(prefect_harness, _session_store):
    import os

    os.environ["MLFLOW_TRACKING_URI"] = _session_store
    run = COMMANDS["sweep"].run

    try:
        return run(lrs=[0.01, 0.3, 1e4], epochs=3, overrides=OVERRIDES, workers=2), _session_store
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_parent_with_one_child_per_rate(sweep):
    result, uri = sweep
    c = tracking.client(uri)
    parent = c.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = c.search_runs([parent.info.experiment_id],
                             f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(float(r.data.params["optim.lr"]) for r in children) == [0.01, 0.3, 1e4]
    assert all(r.info.status == "FINISHED" for r in children)
    status = {float(r.data.params["optim.lr"]): r.data.tags["status"] for r in children}
    # 0.01 ends near chance on this small digits set in 3 epochs: trained to the end, but
    # marked no_progress (lrpipe.engine.loop), not ok
    assert status == {0.01: "no_progress", 0.3: "ok", 1e4: "diverged"}
    assert all(r.info.run_name.startswith("lr=") for r in children)


def test_children_have_per_epoch_metrics(sweep):
    result, uri = sweep
    c = tracking.client(uri)
    for row in result["summary"]:
        for key in ("train_loss", "val_loss", "train_error", "val_error", "lr"):
            steps = [m.step for m in c.get_metric_history(row["run_id"], key)]
            if row["status"] in ("ok", "no_progress"):  # trained to the last epoch
                assert steps == [0, 1, 2, 3]
            else:  # losses also get a NaN point where the run blew up
                blew_up = [row["diverged_epoch"]] if key.endswith("_loss") else []
                assert steps == [0, *blew_up]
        if row["status"] in ("ok", "no_progress"):  # the rate each group applied, every epoch
            for group in ("fc1", "head"):
                history = c.get_metric_history(row["run_id"], f"lr/{group}")
                assert [m.step for m in history] == [0, 1, 2, 3]
                assert [m.value for m in history] == pytest.approx([row["lr"]] * 4)
        if row["status"] == "diverged":
            marks = c.get_metric_history(row["run_id"], "diverged")
            assert [(m.step, m.value) for m in marks] == [(row["diverged_epoch"], 1.0)]


def test_figures_on_the_parent_and_best_rate(sweep):
    result, uri = sweep
    c = tracking.client(uri)
    files = {f.path for f in c.list_artifacts(result["parent_run_id"], "figures")}
    assert {"figures/loss_vs_epoch.png", "figures/error_vs_epoch.png",
            "figures/final_vs_lr.png"} <= files
    assert result["best_lr"] in (0.01, 0.3)


def test_bad_rates_are_refused_before_any_run(prefect_harness, mlflow_store):
    run = COMMANDS["sweep"].run

    before = len(tracking.client(mlflow_store).search_experiments())
    with pytest.raises(ConfigError, match="lrs"):
        run(lrs=[0.1, -1.0], epochs=1, overrides=OVERRIDES)
    with pytest.raises(ConfigError, match="runner"):
        run(lrs=[0.1], epochs=1, overrides=OVERRIDES, runner="ray")
    assert len(tracking.client(mlflow_store).search_experiments()) == before


def test_printed_links_open_the_flows_own_experiment(mlflow_store, capsys):
    """The summary's MLflow and report links point into the experiment the sweep logged to
    (they once named the default ``lr-sweep`` experiment whatever ``experiment`` was)."""
    import pandas as pd

    from flows.report import where_to_click
    from lrpipe.experiments.sweep import summary_text

    parent = tracking.start_run("my-sweep", "parent")
    tracking.end_run(parent)
    summary = pd.DataFrame({"lr": [0.1], "status": ["ok"], "val_loss": [0.4],
                            "val_error": [0.1], "best_val_error": [0.1],
                            "diverged_epoch": [None], "run_id": ["x"]})
    print(summary_text(summary, 1.0))
    print(where_to_click(parent, "my-sweep"))
    out = capsys.readouterr().out
    own = tracking.experiment_id("my-sweep")
    assert f"MLflow: http://127.0.0.1:5000/#/experiments/{own}/runs/{parent}?" in out
    assert f"Report: http://127.0.0.1:5000/#/experiments/{own}/runs/{parent}/artifacts/" in out


def test_step_log_on_request_is_logged_drawn_and_reused(prefect_harness, _session_store,
                                                          monkeypatch):
    """--set log_every=N: each child gets train_loss_step every N updates (step = update), the
    sweep's figures draw it, and a re-run (resume) rebuilds it from MLflow."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _session_store)
    settings = {"lrs": [0.3], "epochs": 2, "overrides": {**OVERRIDES, "log_every": 5},
                "workers": 1, "experiment": "step-log"}
    result = COMMANDS["sweep"].run(**settings)
    run_id = result["summary"][0]["run_id"]
    points = tracking.client(_session_store).get_metric_history(run_id, "train_loss_step")
    steps = [m.step for m in points]
    assert len(steps) >= 6 and steps == list(range(5, 5 * len(steps) + 1, 5))
    assert all(m.value > 0 for m in points)
    history = tracking.run_history(run_id, _session_store)
    assert list(history["epoch"]) == [0, 1, 2]  # the step metric is not an epoch row
    from flows.children import result_from_run
    from lrpipe.engine.config import TrainConfig, merge

    cfg = merge(TrainConfig(), {"epochs": 2, **settings["overrides"], "optim.lr": 0.3})
    again = result_from_run(tracking.client(_session_store).get_run(run_id), cfg, "x",
                            _session_store)
    assert [r["step"] for r in again["steps"]] == [m.step for m in points]
    epochs = [r["epoch"] for r in again["steps"]]
    assert 0 < epochs[0] < 1 and epochs[-1] <= 2 and epochs == sorted(epochs)


def test_the_terminal_says_what_runs_first_then_time_left_then_wall_time(
        prefect_harness, _session_store, monkeypatch, capsys):
    """Issue 24: a start line before anything else, then the plan and where it records, then
    '~N min left' once an epoch is timed, and the whole command's wall time at the end."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _session_store)
    COMMANDS["sweep"].run(lrs=[0.05, 0.3], epochs=3, overrides=OVERRIDES, workers=1,
                          experiment="terminal")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lrpipe sweep: starting flow lr_sweep (lrs 0.05,0.3, epochs 3, "
                               "workers 1, experiment terminal, --set ")
    assert lines[1].startswith("lrpipe sweep: 2 training configs checked, 3 epochs each; "
                               f"recording to experiment 'terminal' in {_session_store}; "
                               "MLflow UI http://")
    epochs = [i for i, line in enumerate(lines) if " epoch " in line and "/3  train" in line]
    started = lines.index("[0/2] lr-sweep started: 2 tasks")
    assert len(epochs) == 8 and 1 < started < epochs[0]
    # one task at a time: the first run's epoch 0 has nothing timed; every later line has
    # time left in the stage ("<1 min": digits train in milliseconds)
    assert "left" not in lines[epochs[0]]
    assert all(lines[i].endswith("<1 min left in lr-sweep") for i in epochs[1:])
    assert [ln for ln in lines if ln.startswith("[1/2] lr-sweep: ")][0].endswith(
        "(<1 min left in lr-sweep)")
    assert re.fullmatch(r"lrpipe sweep: done in \d+ s wall \(start-up and checks \d+ s, "
                        r"the work \d+ s\)", lines[-1])


def test_each_child_has_its_figure_colour_for_the_mlflow_ui(sweep):
    """MLflow's UI colours a run by its mlflow.runColor tag: each rate's, as in the figures
    (without it the UI repeats three colours over eight rates)."""
    from matplotlib.colors import to_hex

    from lrpipe.plots.sweep import lr_palette

    result, uri = sweep
    c = tracking.client(uri)
    palette = lr_palette([0.01, 0.3, 1e4])
    tags = {row["lr"]: c.get_run(row["run_id"]).data.tags.get("mlflow.runColor")
            for row in result["summary"]}
    assert tags == {lr: to_hex(palette[lr]) for lr in (0.01, 0.3, 1e4)}
    assert len(set(tags.values())) == 3
