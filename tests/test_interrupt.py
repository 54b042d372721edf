"""Ctrl-C and SIGTERM stop a real ``lrpipe`` command cleanly: one line, no traceback, exit
130 / 143, its runs KILLED (none left RUNNING); the same command run again resumes into the
same parent. And Prefect flow runs whose process died are marked CRASHED by the next one."""

import signal

import pytest
from killing import all_runs, by_status, signal_group, start, wait_for_output

from lrpipe import procs, tracking

RATES = "0.05,0.1,0.2"
# Digits, one task per rate (batching off), 2 workers: long enough (~4 s a rate) to be
# interrupted mid-training, short enough to run to the end on resume.
ARGS = ["sweep", "--lrs", RATES, "--epochs", "60", "--workers", "2",
        "--set", "data.dataset=digits", "--set", "data.val_size=300", "--set", "batching=off",
        "--set", "batch_size=32"]
EPOCH_LINE = r"epoch +[1-9]\d*/60"


def _parent(runs):
    (parent,) = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    return parent


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The sweep stopped by SIGINT to its process group after its first trained epochs, then
    the same command again."""
    tmp = tmp_path_factory.mktemp("sigint")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracking.client(uri)  # create the store first (never two processes on a new store)
    log = tmp / "first.log"
    proc = start(ARGS, uri, log)
    wait_for_output(log, EPOCH_LINE, proc, count=2)
    code = signal_group(proc, signal.SIGINT)
    after_stop = all_runs(uri)
    again = start(ARGS, uri, tmp / "second.log")
    second = again.wait(timeout=600)
    return {"code": code, "stderr": (tmp / "first.log.err").read_text(), "stopped": after_stop,
            "second": second, "resumed": all_runs(uri), "uri": uri,
            "second_out": (tmp / "second.log").read_text()}


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_no_traceback(interrupted):
    assert interrupted["code"] == 130
    err = interrupted["stderr"]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lrpipe")]
    assert lines == [lines[0]] and "stopped by SIGINT" in lines[0] and "again" in lines[0]


@pytest.mark.slow
def test_ctrl_c_marks_the_parent_and_the_running_children_killed(interrupted):
    runs = interrupted["stopped"]
    assert _parent(runs).info.status == "KILLED"
    counts = by_status(runs)
    assert "RUNNING" not in counts and counts.get("KILLED", 0) >= 2  # the parent and a child
    assert set(counts) <= {"KILLED", "FINISHED"}


@pytest.mark.slow
def test_the_same_command_resumes_into_the_same_parent(interrupted):
    assert interrupted["second"] == 0, interrupted["second_out"][-2000:]
    runs = interrupted["resumed"]
    parent = _parent(runs)
    assert parent.info.run_id == _parent(interrupted["stopped"]).info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["resumes"] == "1"
    kids = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
    finished = sorted(float(r.data.params["optim.lr"]) for r in kids
                      if r.info.status == "FINISHED")
    assert finished == [0.05, 0.1, 0.2]  # exactly one finished run per rate
    assert "RUNNING" not in by_status(runs)
    assert "resuming" in interrupted["second_out"]


@pytest.mark.slow
def test_sigterm_exits_143_and_kills_the_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.client(uri)
    proc = start(ARGS, uri, tmp_path / "term.log")
    wait_for_output(tmp_path / "term.log", EPOCH_LINE, proc)
    assert signal_group(proc, signal.SIGTERM) == 143
    assert "Traceback" not in (tmp_path / "term.log.err").read_text()
    counts = by_status(all_runs(uri))
    assert "RUNNING" not in counts and counts.get("KILLED", 0) >= 1


def test_flow_runs_of_a_dead_process_are_marked_crashed(prefect_harness):
    import socket

    from prefect import flow, tags
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.harness import mark_dead_flow_runs

    @flow(name="left-running")
    def left_running() -> None:
        return None

    dead = [f"{procs.HOST_TAG}:{socket.gethostname()}", f"{procs.PID_TAG}:999999999",
            f"{procs.PID_STARTED_TAG}:1"]
    alive = [f"{k}:{v}" for k, v in procs.process_tags().items()]
    ids = {}
    for name, writer in (("dead", dead), ("alive", alive)):
        with tags(*writer):
            state = left_running(return_state=True)
        ids[name] = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        for run_id in ids.values():  # as a SIGKILL leaves them
            client.set_flow_run_state(run_id, Running(), force=True)
        marked = mark_dead_flow_runs()
        assert str(ids["dead"]) in marked and str(ids["alive"]) not in marked
        assert client.read_flow_run(ids["dead"]).state.type.value == "CRASHED"
        assert client.read_flow_run(ids["alive"]).state.type.value == "RUNNING"
        client.set_flow_run_state(ids["alive"], Running().copy(), force=True)
