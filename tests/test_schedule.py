"""Scheduled re-runs, for real: a Prefect server on a free port, ``lrpipe schedule --interval``
serving a tiny digits sweep in a subprocess; two scheduled runs complete as two new sweeps
(new parent runs, nothing reused); then every process started here is stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import server
from lrpipe import resume, tracking

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["schedule", "--flow", "sweep", "--interval", "10", "--lrs", "0.1,0.3", "--epochs", "2",
        "--workers", "1", "--set", "data.dataset=digits", "--set", "data.val_size=300",
        "--set", "model.hidden=[32]", "--set", "batch_size=64", "--set", "device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completed_flow_runs(api: str) -> list[dict]:
    """Flow runs of any deployment that COMPLETED, from the Prefect API."""
    body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}},
                          "deployment_id": {"is_null_": False}}}
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def sweep_parents(uri: str) -> list:
    exp = tracking.client(uri).get_experiment_by_name("lr-sweep")
    if exp is None:
        return []
    return tracking.client(uri).search_runs(
        [exp.experiment_id], f"tags.{resume.SWEEP_TAG} != '' and attributes.status = 'FINISHED'")


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose environment mentions ``marker`` (our temporary folder)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                if server.group_alive(int(environ.parent.name)) or _alive(environ.parent):
                    found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _alive(proc_dir: Path) -> bool:
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedule")
    home, uri = tmp / "prefect", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    port = free_port()
    env = {"PREFECT_HOME": str(home)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))  # the server's pid file and log go there too
        api = server.start(port=port, env=env)
        serve_env = {**os.environ, **env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": uri,
                     "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        with open(tmp / "serve.log", "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *ARGS], cwd=ROOT,
                                    env=serve_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while len(sweep_parents(uri)) < 2 or len(completed_flow_runs(api)) < 2:
                assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no two scheduled runs within 400 s"
                time.sleep(1)
            yield {"api": api, "uri": uri, "runs": completed_flow_runs(api),
                   "parents": sweep_parents(uri), "log": (tmp / "serve.log").read_text()}
        finally:
            server.stop_group(proc.pid)
            proc.wait(timeout=30)
            server.stop(port)
    assert not server.group_alive(proc.pid)
    assert processes_mentioning(str(tmp)) == []  # server, serve, flow-run processes: all gone


@pytest.mark.slow
def test_two_scheduled_runs_completed_in_prefect(scheduled):
    runs = scheduled["runs"]
    assert len(runs) >= 2
    assert len({r["deployment_id"] for r in runs}) == 1
    assert all(r["state_type"] == "COMPLETED" for r in runs)


@pytest.mark.slow
def test_each_scheduled_run_is_a_new_sweep_not_a_cache_hit(scheduled):
    uri = scheduled["uri"]
    parents = scheduled["parents"][:2]
    assert len({p.info.run_id for p in parents}) == 2
    assert len({p.data.tags[resume.SWEEP_TAG] for p in parents}) == 1  # same sweep, re-run
    kids = []
    for p in parents:
        found = tracking.client(uri).search_runs(
            [p.info.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{p.info.run_id}'")
        assert sorted(float(r.data.params["optim.lr"]) for r in found) == [0.1, 0.3]
        assert all(r.info.status == "FINISHED" for r in found)
        kids += [r.info.run_id for r in found]
    assert len(set(kids)) == 4  # trained again: no child shared between the two sweeps


@pytest.mark.slow
def test_serve_prints_where_to_watch(scheduled):
    assert "/deployments" in scheduled["log"] and scheduled["api"].removesuffix("/api") in \
        scheduled["log"]


def test_server_status_and_stop_without_a_server(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    port = free_port()
    assert server.status(port=port) == "stopped"
    assert server.stop(port) is False
