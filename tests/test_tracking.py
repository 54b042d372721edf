import threading

import pytest

from lrpipe import runs, tracking
from lrpipe.engine.train import train


def test_training_run_logs_params_metrics_per_epoch_and_ends(mlflow_store, digits_cfg):
    parent = tracking.start_run("t", "parent")
    with runs.training_run(digits_cfg, "t", parent) as run_id:
        result = train(digits_cfg, on_epoch=tracking.epoch_logger(run_id))
    tracking.end_run(parent)
    c = tracking.client(mlflow_store)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.PARENT_TAG] == parent
    assert run.data.tags["config_hash"] == digits_cfg.hash()
    assert run.data.params["optim.lr"] == "0.1"
    steps = [m.step for m in c.get_metric_history(run_id, "val_loss")]
    assert steps == [0, 1, 2]
    assert len(result.history) == 3


def test_epoch_metrics_wait_at_most_every_seconds_and_end_run_writes_them(mlflow_store):
    c = tracking.client(mlflow_store)
    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 2.0, "ratio/fc1": 1e-3}
            for e in range(3)]
    held, live = tracking.start_run("t", "held"), tracking.start_run("t", "live")
    log_held = tracking.epoch_logger(held, every=3600.0)
    log_live = tracking.epoch_logger(live, every=0.0)
    for row in rows:
        log_held(row)
        log_live(row)
    assert c.get_metric_history(held, "train_loss") == []  # waiting in memory
    assert [m.step for m in c.get_metric_history(live, "ratio/fc1")] == [0, 1, 2]
    tracking.end_run(held, "FAILED")  # any status: what waited is written first
    assert [m.value for m in c.get_metric_history(held, "train_loss")] == [1.0, 0.5, 1 / 3]
    assert c.get_run(held).info.status == "FAILED"
    tracking.end_run(live)


def test_an_error_in_the_body_marks_the_run_failed(mlflow_store, digits_cfg):
    with pytest.raises(RuntimeError):
        with runs.training_run(digits_cfg, "t", None) as run_id:
            raise RuntimeError("boom")
    assert tracking.client(mlflow_store).get_run(run_id).info.status == "FAILED"


def test_retry_locked_retries_only_lock_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Exception("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry_locked(flaky) == "ok" and len(calls) == 3
    with pytest.raises(KeyError):
        tracking.retry_locked(lambda: {}["x"])


def test_concurrent_writers_lose_no_metric_point(mlflow_store):
    parent = tracking.start_run("c", "parent")
    runs = [tracking.start_run("c", f"child {i}", parent_run_id=parent) for i in range(8)]

    def write(run_id):
        for step in range(25):
            tracking.log_metrics(run_id, {"a": step, "b": -step}, step=step)

    threads = [threading.Thread(target=write, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = tracking.client(mlflow_store)
    assert all(len(c.get_metric_history(r, "a")) == 25 for r in runs)
    assert all(len(c.get_metric_history(r, "b")) == 25 for r in runs)


@pytest.mark.parametrize("uri", ["mlruns", "sqlite:/x.db", "ftp://host", ""])
def test_malformed_tracking_uri_is_refused(uri):
    with pytest.raises(tracking.TrackingError, match="tracking_uri"):
        tracking.check_tracking_uri(uri)


def test_unwritable_store_is_refused(tmp_path):
    # A file where the mlruns folder's parent should be: unwritable even for root.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    uri = f"sqlite:///{blocker / 'mlruns' / 'mlflow.db'}"
    with pytest.raises(tracking.TrackingError, match="cannot create"):
        tracking.check_tracking_uri(uri)


def test_sqlite_store_is_written_through_a_write_ahead_log(tmp_path):
    import sqlite3

    uri = tracking.tracking_uri(tmp_path / "store")
    run_id = tracking.start_run("wal-test", "r", uri=uri)
    tracking.log_metrics(run_id, {"loss": 1.0}, step=0, uri=uri)
    tracking.end_run(run_id, uri=uri)
    with sqlite3.connect(tmp_path / "store" / "mlflow.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert tracking.client(uri).get_run(run_id).data.metrics == {"loss": 1.0}


def test_experiment_ids_are_looked_up_once_per_store(mlflow_store, monkeypatch):
    first = tracking.experiment_id("looked-up-once")
    lookups = []
    monkeypatch.setattr(tracking, "_get_or_create_experiment",
                        lambda *a: lookups.append(a) or "other")
    assert tracking.experiment_id("looked-up-once") == first and not lookups
    assert tracking.experiment_id("looked-up-once", "sqlite:///elsewhere.db") == "other"


def test_a_run_that_fails_says_why(mlflow_store):
    """Issue 25: a parent or child ended FAILED carries the error that ended it."""
    from lrpipe import runs

    run_id = tracking.start_run("failure-reason", "fails")
    with pytest.raises(ValueError), runs.ending(run_id):
        raise ValueError("the store went away")
    run = tracking.client(mlflow_store).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[runs.FAILURE_TAG] == "ValueError: the store went away"
    ok = tracking.start_run("failure-reason", "fine")
    with runs.ending(ok):
        pass
    assert runs.FAILURE_TAG not in tracking.client(mlflow_store).get_run(ok).data.tags
