"""`make sweep`'s pipeline killed with SIGKILL during the search and during the full training,
then run again: it resumes into the same pipeline parent, skips the stages that finished,
resumes the one cut short (reusing its finished runs), leaves nothing RUNNING, and ends with
the answer an uninterrupted run gives."""

import math
import signal

import pytest
import yaml
from killing import all_runs, by_status, signal_group, start, wait_for_output

from lrpipe import tracking

SETTINGS = {"search": {"subset": 400, "seeds": [0, 1], "range_steps": 20, "regret_epochs": 1},
            "skip": ["decay", "final", "transfer"]}
SETS = ["data.dataset=digits", "data.val_size=300", "batching=off", "model.hidden=[32]"]
# Kill points: a line of the search stage, and the first finished full-training run.
KILL_AT = {"search": r"\[1/\d+\] halving",
           "sweep": r"\[1/\d+\] lr-sweep"}


def _args(config) -> list[str]:
    args = ["pipeline", "--epochs", "2", "--workers", "2", "--config", str(config)]
    for item in SETS:
        args += ["--set", item]
    return args


def _experiment_runs(runs, name_prefix):
    return [r for r in runs if r.info.run_name.startswith(name_prefix)]


def _loss(value: float) -> float | str:
    """A run's final validation loss, comparable: NaN (a diverged rate) as the word."""
    return round(value, 6) if math.isfinite(value) else "nan"


def _answer(runs) -> dict:
    """The pipeline's answer as MLflow holds it: chosen rate and the full-training summary."""
    (parent,) = [r for r in runs if r.info.run_name.startswith("pipeline ")]
    sweep = [r for r in runs if r.data.tags.get("sweep") and r.info.status == "FINISHED"]
    finals = sorted((float(r.data.params["optim.lr"]), _loss(r.data.metrics["val_loss"]))
                    for r in sweep)
    return {"chosen_lr": parent.data.metrics.get("chosen_lr"), "sweep": finals}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(SETTINGS))
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracking.client(uri)
    proc = start(_args(config), uri, tmp / "run.log")
    assert proc.wait(timeout=900) == 0, (tmp / "run.log.err").read_text()[-3000:]
    answer = _answer(all_runs(uri))
    assert answer["chosen_lr"] and len(answer["sweep"]) >= 2  # something to compare
    return answer


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(KILL_AT))
def test_killed_pipeline_resumes_to_the_same_answer(stage, config, reference, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.client(uri)
    log = tmp_path / "killed.log"
    proc = start(_args(config), uri, log)
    wait_for_output(log, KILL_AT[stage], proc, timeout=600)
    signal_group(proc, signal.SIGKILL)
    killed = all_runs(uri)
    assert "RUNNING" in by_status(killed)  # SIGKILL ended nothing: the next run must
    again = start(_args(config), uri, tmp_path / "again.log")
    assert again.wait(timeout=900) == 0, (tmp_path / "again.log.err").read_text()[-3000:]
    runs = all_runs(uri)
    assert "RUNNING" not in by_status(runs)
    pipelines = _experiment_runs(runs, "pipeline ")
    assert len(pipelines) == 1 and pipelines[0].info.status == "FINISHED"
    assert pipelines[0].data.tags["resumes"] == "1"
    searches = _experiment_runs(runs, "search ")
    assert len([s for s in searches if s.data.tags.get("sweep_id")]) == 1  # one search parent
    out = (tmp_path / "again.log").read_text()
    if stage == "sweep":  # the search had finished: its result is reused, nothing re-searched
        assert "search finished before this run was cut short; reused" in out
    sweep_kids = [r for r in runs if r.data.tags.get("sweep")]
    finished = [float(r.data.params["optim.lr"]) for r in sweep_kids
                if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished))  # one finished run per full-training rate
    for run in sweep_kids:
        if run.info.status == "FINISHED" and run.data.tags.get("status") == "ok":
            steps = [m.step for m in tracking.client(uri).get_metric_history(
                run.info.run_id, "val_loss")]
            assert steps == [0, 1, 2]  # every epoch of reused runs too
    assert _answer(runs) == reference
