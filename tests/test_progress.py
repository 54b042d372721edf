"""The terminal's progress: the time-left arithmetic by hand, the meter on a fake clock, the
start, plan and wall lines, and that the start line comes before anything slow."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from lrpipe.engine import progress
from lrpipe.engine.progress import Meter, eta_s, left_text, stage_work

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("done", "planned", "elapsed", "left"), [
    (1, 10, 6.0, 54.0),  # 6 s an epoch, 9 to go
    (5, 10, 30.0, 30.0), (10, 10, 60.0, 0.0),
    (12, 10, 60.0, 0.0),  # past the plan (a grown batch): nothing left, never negative
    (0, 10, 5.0, None),  # nothing timed yet
    (3, 0, 5.0, None)])  # no plan
def test_eta_by_hand(done, planned, elapsed, left):
    assert eta_s(done, planned, elapsed) == (None if left is None else pytest.approx(left))


def test_stage_work_counts_tasks_not_started_at_the_mean_length():
    assert stage_work({}, 4) == (0, 0)
    # 2 runs of 5 epochs seen (3 and 1 done) of 4 tasks: 2 more runs of 5 planned
    assert stage_work({"a": (3, 5), "b": (1, 5)}, 4) == (4, 20)
    # a batched task shows 3 runs for 1 task: the plan is what was seen
    assert stage_work({"a": (1, 4), "b": (1, 4), "c": (0, 4)}, 1) == (2, 12)
    assert stage_work({"a": (2, 2), "b": (0, 6)}, 3) == (2, 12)  # mean 4 for the third


@pytest.mark.parametrize(("seconds", "text"), [
    (None, ""), (float("nan"), ""), (0.0, "<1 min left"), (59.4, "<1 min left"),
    (60.0, "~1 min left"), (61.0, "~2 min left"), (600.0, "~10 min left")])
def test_left_text(seconds, text):
    assert left_text(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0.4, "0 s"), (48.2, "48 s"), (60, "1 min"), (190, "3 min 10 s"), (3600, "1 h 0 min"),
    (7530, "2 h 5 min"), (-3, "0 s")])
def test_duration_text(seconds, text):
    assert progress.duration_text(seconds) == text


def test_meter_on_a_fake_clock():
    now = [100.0]
    meter = Meter(clock=lambda: now[0])
    meter.start_stage("lr-sweep", 4)
    assert meter.epoch("a", 0, 5) == ""  # epoch 0 is the evaluation before training
    assert meter.epoch("b", 0, 5) == ""
    now[0] = 110.0  # 4 tasks of 5 epochs: 20 planned
    assert meter.epoch("a", 1, 5) == "~4 min left in lr-sweep"  # 1 done in 10 s: 190 s
    assert meter.epoch("b", 1, 5) == "~2 min left in lr-sweep"  # 2 done in 10 s: 90 s
    now[0] = 150.0
    meter.epoch("a", 5, 5)
    meter.epoch("b", 3, 5)  # 8 done in 50 s: 75 s
    assert meter.task_done() == "~2 min left in lr-sweep"
    now[0] = 400.0  # c diverged in its first epoch: its 5 epochs are over; 13 of 20 in 300 s
    assert meter.epoch("c", 1, 5, ended=True) == "~3 min left in lr-sweep"  # 161.5 s
    assert meter.task_done() and meter.task_done()
    assert meter.task_done() == ""  # the last task: nothing left to say
    meter.start_stage("confirm", 2)  # the runs seen are forgotten: b's 3 of 5 epochs too
    now[0] = 460.0
    assert meter.task_done() == "~1 min left in confirm"  # 1 of 2 tasks in 60 s
    assert meter.epoch("b", 4, 5) == "<1 min left in confirm"  # b again: 4 done, 1 + 5 left


def test_meter_times_tasks_without_epoch_lines():
    now = [400.0]
    meter = Meter(clock=lambda: now[0])
    meter.start_stage("range-test", 3)
    now[0] = 430.0
    assert meter.task_done() == "~1 min left in range-test"  # 1 of 3 in 30 s: 60 s
    now[0] = 700.0
    assert meter.task_done() == "~3 min left in range-test"  # 2 of 3 in 300 s: 150 s


def test_start_and_plan_lines():
    line = progress.start_line("sweep", "lr_sweep", {
        "lrs": [0.1, 1.0], "epochs": 1, "overrides": {"model.name": "softmax"}, "seeds": None})
    assert line == ("lrpipe sweep: starting flow lr_sweep (lrs 0.1,1, epochs 1, --set "
                    "model.name=softmax); checking the settings, then the store and the "
                    "Prefect API")
    assert "(defaults)" in progress.start_line("search", "lr_search", {"overrides": {}})
    plan = progress.plan_line("sweep", 3, 1, "sqlite:////x/mlflow.db", "lr-sweep",
                              "http://127.0.0.1:5000")
    assert plan == ("lrpipe sweep: 3 training configs checked, 1 epoch each; recording to "
                    "experiment 'lr-sweep' in sqlite:////x/mlflow.db; MLflow UI "
                    "http://127.0.0.1:5000 (`make ui`)")
    assert "recording to http://h:5000;" in progress.plan_line("pipeline", 1, None,
                                                                 "http://h:5000", None, "u")


def test_stage_line_opens_the_count():
    assert progress.stage_line("lr-sweep", 8) == "[0/8] lr-sweep started: 8 tasks"
    assert progress.stage_line("final", 1) == "[0/1] final started: 1 task"


def test_wall_line_counts_from_the_command_start():
    assert progress.wall_line("sweep", 48.3, 5.2) == (
        "lrpipe sweep: done in 48 s wall (start-up and checks 43 s, the work 5 s)")


def test_command_start_is_the_process_start_for_the_command_line():
    age = progress.process_age_s()
    assert age is not None and age > 0  # this pytest process started before this test
    assert progress.command_start("/usr/bin/pytest", clock=lambda: 1e6) == 1e6
    for argv0 in ("/w/.venv/bin/lrpipe", "/w/lrpipe/__main__.py", "/w/flows/cli.py"):
        start = progress.command_start(argv0, clock=lambda: 1e6)
        assert 1e6 - start == pytest.approx(progress.process_age_s(), abs=1.0)


def test_the_harness_loads_neither_prefect_nor_mlflow_before_its_first_line():
    code = ("import sys, flows.harness; "
            "print(sorted(m for m in ('prefect', 'mlflow', 'flows.common') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_start_line_comes_before_the_checks(capsys):
    from flows.commands import COMMANDS
    from lrpipe.engine.config import ConfigError

    with pytest.raises(ConfigError, match="^lrs"):
        COMMANDS["sweep"].run(lrs=[-1.0], epochs=1, overrides={})
    out = capsys.readouterr().out
    assert out == ("lrpipe sweep: starting flow lr_sweep (lrs -1, epochs 1); checking the "
                   "settings, then the store and the Prefect API\n")


def test_a_task_line_says_when_its_run_was_scored_on_the_test_split():
    from flows.common import describe_result
    done = {"name": "plateau seed=100", "status": "ok", "val_loss": 0.37519, "val_error": 0.1312}
    assert describe_result(done) == "plateau seed=100 done: val loss 0.3752, val error 0.1312"
    assert describe_result({**done, "test_loss": 0.39, "reused": True}) == (
        "plateau seed=100 done: val loss 0.3752, val error 0.1312; test set scored once "
        "(finished before, reused)")
    diverged = {"name": "lr=3.16", "status": "diverged", "diverged_epoch": 1}
    assert describe_result(diverged) == "lr=3.16 diverged in epoch 1"
    assert describe_result({**diverged, "test_loss": math.nan}) == (
        "lr=3.16 diverged in epoch 1: not tested")
