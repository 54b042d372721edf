"""A raced `lrpipe decay` SIGKILLed as its second round starts, then run again: it resumes into
the same parent, reuses round 1's runs (the race's verdict is read again from them, not
retrained), trains round 2, and reaches the uninterrupted run's race, ranking and winner."""

from __future__ import annotations

import io
import signal

import pandas as pd
import pytest
from killing import all_runs, by_status, signal_group, start, tracking_into, wait_for_output

from flows.commands import COMMANDS
from lrpipe import tracking

LR, EPOCHS, SEEDS = 0.1, 3, (0, 1)
SCHEDULES = ("constant", "cosine", "step", "exponential", "inverse_time")  # 2 of 4 go on
SETS = {"data.dataset": "digits", "data.val_size": 300, "model.hidden": [32], "batch_size": 8,
        "device": "cpu", "batching": "off"}
ARGS = ["decay", "--lr", str(LR), "--epochs", str(EPOCHS), "--seeds", ",".join(map(str, SEEDS)),
        "--schedules", ",".join(SCHEDULES), "--losses", "cross_entropy", "--workers", "2",
        "--confirm-seeds", "none",
        *[arg for key, value in SETS.items() for arg in ("--set", f"{key}={value}")]]


def answer(uri: str, parent: str) -> dict:
    run = tracking.client(uri).get_run(parent)

    def csv(path: str) -> pd.DataFrame:
        return pd.read_csv(io.StringIO(tracking.read_text(parent, path, uri)))

    return {"best": run.data.tags["best_schedule"], "race": csv("race.csv"),
            "ranking": csv("ranking.csv")}


@pytest.fixture(scope="module")
def reference(api, tmp_path_factory):
    """The same raced comparison, uninterrupted (in this process)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('race-reference')}/mlflow.db"
    tracking.client(uri).search_experiments()
    with tracking_into(uri):
        result = COMMANDS["decay"].run(lr=LR, epochs=EPOCHS, seeds=SEEDS,
                                       schedules=list(SCHEDULES), losses=["cross_entropy"],
                                       overrides=SETS, workers=2, confirm_seeds=[])
    return answer(uri, result["parent_run_id"])


@pytest.mark.slow
def test_a_race_killed_in_round_two_resumes_to_the_same_answer(api, reference, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.client(uri).search_experiments()
    proc = start(ARGS, uri, tmp_path / "killed.log", api_url=api)
    wait_for_output(tmp_path / "killed.log", r"^\[0/3\] lr-decay-race-2 started", proc)
    signal_group(proc, signal.SIGKILL)
    at_kill = all_runs(uri)
    (parent,) = [r for r in at_kill if tracking.PARENT_TAG not in r.data.tags]
    round_one = {r.info.run_id for r in at_kill if r.info.status == "FINISHED"
                 and r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id}
    assert len(round_one) == len(SCHEDULES)  # the kill landed after round 1

    again = start(ARGS, uri, tmp_path / "again.log", api_url=api)
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log.err").read_text()[-3000:]
    assert f"into parent run {parent.info.run_id}" in (tmp_path / "again.log").read_text()
    runs = all_runs(uri)
    assert "RUNNING" not in by_status(runs)
    kids = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id
            and r.info.status == "FINISHED"]
    assert round_one <= {k.info.run_id for k in kids}  # reused, not trained again
    assert len(kids) == len(SCHEDULES) + 3  # round 2: 2 kept + constant, on seed 1
    got = answer(uri, parent.info.run_id)
    assert got["best"] == reference["best"]
    pd.testing.assert_frame_equal(got["race"], reference["race"])
    pd.testing.assert_frame_equal(got["ranking"], reference["ranking"])
