"""A range test's curves go to MLflow whole (issue 26 item 3): one ``log_batch`` per curve,
not one per step, and the same points as a per-step write."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from flows.search_tasks import range_test_seed, range_test_seeds_together
from lrpipe import tracking
from lrpipe.engine.config import to_dict

STEPS = 40
CURVES = {"lr", "range_test_loss", "range_test_smoothed"}


def _metric_batches(monkeypatch) -> list[tuple[str, set[str], int]]:
    """Every ``log_batch`` that writes metrics: (run id, keys, points)."""
    calls = []
    real = MlflowClient.log_batch

    def counted(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            calls.append((run_id, {m.key for m in metrics}, len(metrics)))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    return calls


def _check_curve(c: MlflowClient, result: dict, calls: list) -> None:
    run_id, steps = result["run_id"], len(result["curve"])
    assert steps >= 5
    mine = [keys for rid, keys, _ in calls if rid == run_id and keys & CURVES]
    assert mine == [{"range_test_loss"}, {"lr"}, {"range_test_smoothed"}]  # a call per curve
    for key, column in (("lr", "lr"), ("range_test_loss", "loss"),
                        ("range_test_smoothed", "smoothed")):
        history = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [row["step"] for row in result["curve"]]
        assert [m.value for m in history] == [float(row[column]) for row in result["curve"]]


def test_one_range_test_logs_each_curve_in_one_call(mlflow_store, digits_cfg, monkeypatch):
    parent = tracking.start_run("range-logging", "parent", uri=mlflow_store)
    calls = _metric_batches(monkeypatch)
    result = range_test_seed.fn(to_dict(digits_cfg), 0, parent, "range-logging", STEPS,
                                uri=mlflow_store)
    _check_curve(tracking.client(mlflow_store), result, calls)


def test_batched_range_tests_log_each_seeds_curves_in_one_call_each(mlflow_store, digits_cfg,
                                                                     monkeypatch):
    parent = tracking.start_run("range-logging", "parent batched", uri=mlflow_store)
    calls = _metric_batches(monkeypatch)
    results = range_test_seeds_together.fn(to_dict(digits_cfg), [0, 1], parent,
                                           "range-logging", STEPS, uri=mlflow_store)
    assert len(results) == 2
    for result in results:
        _check_curve(tracking.client(mlflow_store), result, calls)
