"""Scale-out: the task runner chosen by config. Unit checks of the runner wiring, then one
real run: a Dask scheduler with two single-threaded worker processes and an ``mlflow server``
on 127.0.0.1, a digits sweep through both from the ``lrpipe`` CLI, every run and metric
checked, everything stopped by PID / process group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import common, server
from lrpipe import procs, resume, tracking
from lrpipe.engine.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LRS = [0.05, 0.1, 0.2, 0.5]
EPOCHS = 3
METRICS = ("train_loss", "val_loss", "train_error", "val_error", "lr")


# --- the wiring, without starting anything -----------------------------------------------

def test_dask_runners_bind_localhost_and_use_one_thread_per_worker():
    local = common.make_task_runner("dask", 2)
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                    "host": "127.0.0.1", "dashboard_address": None}
    remote = common.make_task_runner("tcp://127.0.0.1:8786")
    assert remote.address == "tcp://127.0.0.1:8786" and not remote.cluster_kwargs
    assert common.set_torch_threads("tcp://127.0.0.1:8786", None) == 1
    assert common.set_torch_threads("dask", 1) == 1
    assert common.set_torch_threads("serial", None) == common.cores()


def test_task_resources_annotate_dask_tasks_only(monkeypatch):
    import dask

    assert common.parse_resources("GPU=1, MEM=4e9") == {"GPU": 1.0, "MEM": 4e9}
    assert common.parse_resources(None) == {}
    for bad in ("GPU", "GPU=x", "=1", "GPU=0"):
        with pytest.raises(ConfigError, match=common.RESOURCES_ENV):
            common.parse_resources(bad)
    monkeypatch.setenv(common.RESOURCES_ENV, "GPU=1")
    with common.task_resources("tcp://127.0.0.1:8786"):
        assert dask.get_annotations() == {"resources": {"GPU": 1.0}}
    with common.task_resources("threads"):
        assert dask.get_annotations() == {}


def test_shared_api_exports_the_url_to_workers_and_restores(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with common.shared_api("threads") as url:
        assert url is None and "PREFECT_API_URL" not in os.environ
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with common.shared_api("dask") as url:
            assert url == os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    assert "PREFECT_API_URL" not in os.environ


def test_shared_api_drops_heartbeats_only_for_this_process_own_api(monkeypatch):
    """No configured API: the flow's server dies with this process, heartbeats are off (each
    costs ~1 s of wall per flow call). A configured API keeps them."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    with temporary_settings(updates={PREFECT_API_URL: None}):
        with common.shared_api("threads"):
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == default
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        for runner in ("threads", "dask"):
            with common.shared_api(runner):
                assert get_current_settings().flows.heartbeat_frequency == default


def test_collect_updates_progress_at_most_every_few_seconds_and_at_the_end(
        prefect_harness, monkeypatch, capsys):
    from prefect import flow, task
    from prefect.artifacts import Artifact

    @task
    def square(x: int) -> int:
        return x * x

    @flow
    def squares(n: int) -> list:
        return common.collect([square.submit(i) for i in range(n)], "squares-test")

    sent = []
    real = common.update_progress_artifact
    monkeypatch.setattr(common, "update_progress_artifact",
                        lambda artifact, progress: sent.append(progress) or real(artifact,
                                                                                progress))
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 3600.0)
    assert squares(4) == [0, 1, 4, 9] and sent == [100.0]  # the end only
    assert Artifact.get("squares-test-progress").data == 100.0
    assert capsys.readouterr().out.count("squares-test: ") == 4  # a printed line per task
    sent.clear()
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)
    squares(4)
    assert sent == [25.0, 50.0, 75.0, 100.0]


# --- a real scale-out run ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{url}: the server exited with code {proc.returncode}"
        assert time.monotonic() < deadline, f"{url}: not healthy within {timeout} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
           "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"]
    with open(tmp / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop_group(proc.pid)
        proc.wait(timeout=30)
    assert not server.group_alive(proc.pid)


@pytest.fixture(scope="module")
def dask_cluster():
    from distributed import Client, LocalCluster

    # Workers hold a GPU=1 resource (a label on CPU): each task asks for it, as on a GPU box.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, resources={"GPU": 1}) as cluster:
        with Client(cluster) as client:
            pids = set(client.run(os.getpid).values())
        yield cluster.scheduler_address, pids
    for pid in pids:
        assert not procs.process_alive(pid)


def server_children(pids: set[int]) -> list[str]:
    """Command lines of API servers (uvicorn) whose parent is one of ``pids``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid in pids and "uvicorn" in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def scaled_out(mlflow_server, dask_cluster, tmp_path_factory):
    address, worker_pids = dask_cluster
    tmp = tmp_path_factory.mktemp("scaleout")
    argv = [sys.executable, "-m", "flows.cli", "sweep", "--runner", address, "--workers", "2",
            "--lrs", ",".join(map(str, LRS)), "--epochs", str(EPOCHS),
            "--set", "data.dataset=digits", "--set", "data.val_size=300",
            "--set", "model.hidden=[32]", "--set", "batch_size=64", "--set", "device=cpu"]
    # No PREFECT_API_URL: the flow process starts the one API its workers share.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, PREFECT_HOME=str(tmp / "prefect"),
               **{common.RESOURCES_ENV: "GPU=1"})
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"uri": mlflow_server, "worker_pids": worker_pids, "stdout": done.stdout,
            "servers": server_children(worker_pids)}


@pytest.mark.slow
def test_every_run_and_metric_landed_on_the_tracking_server(scaled_out):
    c = tracking.client(scaled_out["uri"])
    exp = c.get_experiment_by_name("lr-sweep")
    parents = c.search_runs([exp.experiment_id], f"tags.{resume.SWEEP_TAG} != ''")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["runner"].startswith("tcp://127.0.0.1:")
    kids = c.search_runs([exp.experiment_id],
                         f"tags.`{tracking.PARENT_TAG}` = '{parents[0].info.run_id}'")
    assert sorted(float(k.data.params["optim.lr"]) for k in kids) == LRS
    for kid in kids:
        assert kid.info.status == "FINISHED"
        for key in METRICS:
            assert [m.step for m in c.get_metric_history(kid.info.run_id, key)] == \
                list(range(EPOCHS + 1))
    files = {f.path for f in c.list_artifacts(parents[0].info.run_id, "figures")}
    assert "figures/loss_vs_epoch.png" in files
    assert "Best rate: lr=" in scaled_out["stdout"]


@pytest.mark.slow
def test_tasks_ran_in_the_dask_workers_which_started_no_api_server(scaled_out):
    c = tracking.client(scaled_out["uri"])
    exp = c.get_experiment_by_name("lr-sweep")
    kids = c.search_runs([exp.experiment_id], f"tags.`{tracking.PARENT_TAG}` != ''")
    pids = {int(k.data.tags[procs.PID_TAG]) for k in kids}
    assert pids <= scaled_out["worker_pids"]
    assert scaled_out["servers"] == []
