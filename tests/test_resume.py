"""Resume after a crash: stale-run marking, sweep identity, reuse of finished runs, Prefect's
cache key, and one real digits sweep SIGKILLed mid-way, re-run and compared with an
uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from flows.commands import COMMANDS
from lrpipe import procs, resume, tracking
from lrpipe.engine.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
             "batch_size": 64, "device": "cpu"}
# Batching declared off: one task per rate, whatever the model and device (see the uses).
NO_BATCHING = {**OVERRIDES, "batching": "off"}
LRS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
EPOCHS = 15  # a few tenths of a second per rate: the kill lands with most rates to come
EXPERIMENT = "resume-test"
DEAD_PID = "999999999"  # above pid_max (4194304): never a live process


def runs_of(experiment: str, uri: str, where: str = "") -> list:
    exp = tracking.client(uri).get_experiment_by_name(experiment)
    return [] if exp is None else tracking.client(uri).search_runs([exp.experiment_id], where)


def children(parent: str, uri: str, experiment: str = EXPERIMENT) -> list:
    return runs_of(experiment, uri, f"tags.`{tracking.PARENT_TAG}` = '{parent}'")


# --- stale runs, sweep identity, reuse: small and fast -----------------------------------

def test_process_tags_name_this_live_process_and_a_dead_pid_is_dead():
    tags = procs.process_tags()
    assert tags[procs.PID_TAG] == str(os.getpid()) and tags[procs.PID_STARTED_TAG]
    assert procs.process_alive(os.getpid(), tags[procs.PID_STARTED_TAG])
    assert not procs.process_alive(int(DEAD_PID))
    # Same pid, another start time: the pid was reused by a new process, the writer is gone.
    assert not procs.process_alive(os.getpid(), "1")


def test_a_writer_is_dead_only_if_it_was_on_this_host_and_its_process_is_gone():
    mine = procs.process_tags()
    assert not procs.writer_is_dead(mine)
    assert procs.writer_is_dead({**mine, procs.PID_TAG: DEAD_PID})
    assert not procs.writer_is_dead({**mine, procs.HOST_TAG: "elsewhere", procs.PID_TAG: DEAD_PID})
    assert not procs.writer_is_dead({})  # untagged: never judged


def test_stale_runs_are_marked_killed_live_and_foreign_ones_are_not(mlflow_store):
    host = procs.process_tags()[procs.HOST_TAG]
    dead = tracking.start_run("stale", "dead", tags={"host": host, "pid": DEAD_PID})
    live = tracking.start_run("stale", "live", tags=procs.process_tags())
    foreign = tracking.start_run("stale", "other host", tags={"host": "elsewhere",
                                                             "pid": DEAD_PID})
    untagged = tracking.start_run("stale", "no tags")
    assert resume.mark_stale_runs("stale") == [dead]
    status = {r: tracking.client().get_run(r).info.status for r in (dead, live, foreign, untagged)}
    assert status == {dead: "KILLED", live: "RUNNING", foreign: "RUNNING", untagged: "RUNNING"}
    for run_id in (live, foreign, untagged):
        tracking.end_run(run_id)


def test_sweep_identity_ignores_order_and_names_the_flow():
    assert resume.sweep_identity("a", ["x", "y"]) == resume.sweep_identity("a", ["y", "x"])
    assert resume.sweep_identity("a", ["x"]) != resume.sweep_identity("b", ["x"])
    assert resume.sweep_identity("a", ["x"]) != resume.sweep_identity("a", ["x", "y"])


def test_open_sweep_resumes_only_a_crashed_parent(mlflow_store):
    first, resumed = resume.open_sweep("sweeps", "s", "id1")
    assert not resumed
    again, resumed = resume.open_sweep("sweeps", "s", "id1")  # first is RUNNING and alive
    assert again != first and not resumed
    tracking.end_run(again, "FAILED")
    back, resumed = resume.open_sweep("sweeps", "s", "id1")  # latest crashed: resume it
    assert (back, resumed) == (again, True)
    run = tracking.client().get_run(back)
    assert run.info.status == "RUNNING" and run.data.tags["resumes"] == "1"
    tracking.end_run(back)
    fresh, resumed = resume.open_sweep("sweeps", "s", "id1")  # latest finished: a new sweep
    assert fresh not in (first, again) and not resumed
    for run_id in (first, fresh):
        tracking.end_run(run_id)


def test_train_task_reuses_a_finished_child_with_the_same_numbers(mlflow_store, digits_cfg):
    from flows.children import member, train_children

    parent = tracking.start_run("reuse", "parent")
    args = ([member(digits_cfg, "lr=0.1")], parent, "reuse")
    (fresh,) = train_children.fn(*args)
    (again,) = train_children.fn(*args)  # .fn: no Prefect cache, so MLflow alone says "done"
    assert again["reused"] and not fresh["reused"] and again["run_id"] == fresh["run_id"]
    assert len(children(parent, mlflow_store, "reuse")) == 1
    drop = {"reused", "history"}
    assert {k: v for k, v in again.items() if k not in drop} == \
        {k: v for k, v in fresh.items() if k not in drop}
    assert table(again["history"]).equals(table(fresh["history"]))
    tracking.end_run(parent)


def test_a_sweep_started_here_finds_its_finished_children_without_a_search(
        mlflow_store, digits_cfg, monkeypatch):
    from flows.children import member, train_children

    searches = []
    search = resume._search_all
    monkeypatch.setattr(resume, "_search_all",
                        lambda *a, **k: searches.append(a) or search(*a, **k))
    parent, _ = resume.open_sweep("reuse-here", "parent", "id-here")
    searches.clear()  # open_sweep looked for stale runs in every experiment; reuse must not
    args = ([member(digits_cfg, "lr=0.1")], parent, "reuse-here")
    (fresh,) = train_children.fn(*args)
    (again,) = train_children.fn(*args)  # found in this process's memory of the sweep
    assert again["reused"] and again["run_id"] == fresh["run_id"] and not searches
    assert len(children(parent, mlflow_store, "reuse-here")) == 1
    # Crashed and resumed: other processes may have finished children meanwhile, so search.
    tracking.end_run(parent, "FAILED")
    assert resume.open_sweep("reuse-here", "parent", "id-here") == (parent, True)
    other = tracking.start_run("reuse-here", "lr=0.2 from elsewhere", parent_run_id=parent,
                               tags={"config_hash": "elsewhere"})
    tracking.end_run(other)
    assert resume.finished_child(parent, "elsewhere").info.run_id == other and searches
    tracking.end_run(parent)


def table(rows: list[dict]) -> pd.DataFrame:
    """History rows as a frame, columns sorted, time dropped (NaNs compare equal in .equals)."""
    df = pd.DataFrame(rows).drop(columns="time_s")
    return df[sorted(df.columns)]


def test_cache_key_is_inputs_and_source_not_threads_and_needs_a_parent():
    from flows.children import ResumeCache, train_children

    ctx = SimpleNamespace(task=train_children)
    policy = ResumeCache()

    def key(**inputs):
        base = {"members": [{"cfg": {"lr": 0.1}, "name": "a", "labels": {"x": 1}}],
                "parent_run_id": "p1", "threads": 1}
        return policy.compute_key(ctx, {**base, **inputs}, {})

    assert key() == key(threads=2)  # threads change no number
    assert key() != key(parent_run_id="p2")  # a new sweep (new parent) trains again
    assert key() != key(members=[{"cfg": {"lr": 0.2}, "name": "a"}])
    assert key(parent_run_id=None) is None  # no parent: never served from a cache
    # More than a config (a test figure, a registered model, extras): MLflow alone resumes it.
    for kind in ({"test": True}, {"register": {"name": "m"}}, {"extras": {"x": 1}},
                 {"key": "k"}, {"init": {"model_uri": "models:/m/1"}}):
        assert key(members=[{"cfg": {"lr": 0.1}, "name": "a", **kind}]) is None
    assert key(members=[{"cfg": {"lr": 0.1}, "name": "a", "test": False}]) is not None


def test_a_failed_task_loses_nothing_and_the_rerun_trains_only_it(prefect_harness, mlflow_store,
                                                                  monkeypatch):
    import lrpipe.engine.many
    run = COMMANDS["sweep"].run

    real, calls, faults = lrpipe.engine.many.train, [], []

    def flaky(cfg, *args, **kwargs):
        calls.append(cfg.optim.lr)
        if cfg.optim.lr == 0.2 and not faults:  # fails once, like a lost worker
            faults.append(1)
            raise RuntimeError("injected fault")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(lrpipe.engine.many, "train", flaky)
    # one train() per rate: batching declared off
    settings = dict(lrs=[0.05, 0.2, 0.5], epochs=2, overrides=NO_BATCHING, workers=2,
                    experiment="fault-test")
    with pytest.raises(RuntimeError, match="injected fault"):
        run(**settings)
    assert sorted(calls) == [0.05, 0.2, 0.5]  # the others ran to the end despite the fault
    (parent,) = runs_of("fault-test", mlflow_store, f"tags.{resume.SWEEP_TAG} != ''")
    kids = children(parent.info.run_id, mlflow_store, "fault-test")
    assert parent.info.status == "FAILED"
    assert sorted(k.info.status for k in kids) == ["FAILED", "FINISHED", "FINISHED"]
    calls.clear()
    result = run(**settings)
    assert calls == [0.2]  # resumed: only the failed rate trained again
    assert result["parent_run_id"] == parent.info.run_id
    assert tracking.client(mlflow_store).get_run(parent.info.run_id).info.status == "FINISHED"


def test_check_layer_names_builds_nothing_real():
    from lrpipe.engine.config import ModelConfig
    from lrpipe.engine.optim import check_layer_names

    check_layer_names(ModelConfig(name="cnn"), (1, 28, 28), ["conv1", "conv2", "fc1", "head"])
    check_layer_names(ModelConfig(name="softmax"), (1, 8, 8), ["head"])
    with pytest.raises(ConfigError, match=r"optim\.lr_mult: unknown layer 'fc2'; allowed: fc1, "
                       "head"):
        check_layer_names(ModelConfig(hidden=(16,)), (1, 8, 8), ["fc2"])


# --- a real sweep, killed and resumed ----------------------------------------------------

# One task per rate (batching declared off), so that rates finish one by one and the kill
# lands between them; a batched group would finish its members all at once.
SCRIPT = (
    "import flows; from flows.commands import COMMANDS; "
    f"COMMANDS['sweep'].run(lrs={LRS!r}, epochs={EPOCHS}, overrides={NO_BATCHING!r}, workers=2, "
    f"experiment={EXPERIMENT!r})"
)


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited early with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.1)


def finished_children(uri: str) -> list:
    return [r for r in runs_of(EXPERIMENT, uri, "attributes.status = 'FINISHED'")
            if tracking.PARENT_TAG in r.data.tags]


@pytest.fixture(scope="module")
def killed_and_resumed(prefect_harness, _session_store, tmp_path_factory):
    """Kill a sweep after its first finished rate; resume it; then run it again in full."""
    from prefect.settings import PREFECT_API_URL


    run = COMMANDS["sweep"].run

    uri = _session_store
    log = tmp_path_factory.mktemp("resume") / "killed.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": PREFECT_API_URL.value()}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(finished_children(uri)) >= 1, timeout=300, proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    parents = runs_of(EXPERIMENT, uri, f"tags.{resume.SWEEP_TAG} != ''")
    killed = {"parents": parents, "parent": parents[0], "finished": finished_children(uri),
              "pid": proc.pid, "all": runs_of(EXPERIMENT, uri)}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:  # as in the killed process: one task per rate, the same configs (and hashes)
        start = time.perf_counter()
        resumed = run(lrs=LRS, epochs=EPOCHS, overrides=NO_BATCHING, workers=2,
                      experiment=EXPERIMENT)
        resume_s = time.perf_counter() - start
        start = time.perf_counter()
        full = run(lrs=LRS, epochs=EPOCHS, overrides=NO_BATCHING, workers=2,
                   experiment=EXPERIMENT)
        full_s = time.perf_counter() - start
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    print(f"\nresume: {resume_s:.1f} s training {len(LRS) - len(killed['finished'])} of "
          f"{len(LRS)} rates; full re-run: {full_s:.1f} s")
    return SimpleNamespace(uri=uri, killed=killed, resumed=resumed, full=full,
                           resume_s=resume_s, full_s=full_s)


@pytest.mark.slow
def test_the_kill_landed_mid_sweep(killed_and_resumed):
    k = killed_and_resumed.killed
    assert len(k["parents"]) == 1
    assert 1 <= len(k["finished"]) < len(LRS)  # so the resume trains fewer than a full run
    assert k["parent"].info.status == "RUNNING"  # SIGKILL left it so: nothing ended it
    assert k["parent"].data.tags[procs.PID_TAG] == str(k["pid"])


@pytest.mark.slow
def test_resume_goes_into_the_crashed_parent_and_reuses_finished_runs(killed_and_resumed):
    r = killed_and_resumed
    parent = r.killed["parent"].info.run_id
    assert r.resumed["parent_run_id"] == parent
    run = tracking.client(r.uri).get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    reused = {c.info.run_id for c in r.killed["finished"]}
    used = {row["run_id"] for row in r.resumed["summary"]}
    assert reused <= used and len(used) == len(LRS)
    files = {f.path for f in tracking.client(r.uri).list_artifacts(parent, "figures")}
    assert "figures/final_vs_lr.png" in files  # figures drawn from all rates, reused ones too


@pytest.mark.slow
def test_no_duplicate_finished_run_per_config_and_nothing_left_running(killed_and_resumed):
    r = killed_and_resumed
    kids = children(r.killed["parent"].info.run_id, r.uri)
    finished = [c.data.tags["config_hash"] for c in kids if c.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == len(LRS)
    assert runs_of(EXPERIMENT, r.uri, "attributes.status = 'RUNNING'") == []
    # The rates running at the kill were marked KILLED (their process is dead), then re-run.
    was_running = {x.info.run_id for x in r.killed["all"] if x.info.status == "RUNNING"}
    killed = {c.info.run_id for c in kids if c.info.status == "KILLED"}
    # (The kill can land between two tasks, when no child is RUNNING: then none is KILLED.)
    assert killed == was_running - {r.killed["parent"].info.run_id}


@pytest.mark.slow
def test_same_numbers_as_an_uninterrupted_sweep(killed_and_resumed):
    r = killed_and_resumed
    assert r.full["parent_run_id"] != r.resumed["parent_run_id"]  # finished: a new sweep
    keys = ("lr", "status", "val_loss", "val_error", "best_val_error", "diverged_epoch")
    resumed = [{k: row[k] for k in keys} for row in r.resumed["summary"]]
    full = [{k: row[k] for k in keys} for row in r.full["summary"]]
    assert resumed == full
    for a, b in zip(r.resumed["summary"], r.full["summary"], strict=True):
        ha = tracking.run_history(a["run_id"], r.uri).drop(columns="time_s")
        hb = tracking.run_history(b["run_id"], r.uri).drop(columns="time_s")
        assert ha.equals(hb)
