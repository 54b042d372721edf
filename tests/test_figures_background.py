"""Figures written off the flow's thread (flows.figures, issue 26 item 3): every figure is in
the store when the block ends, the same bytes as a direct write, failures are raised after
the others finished, and every flow call (flows.common.shared_api) writes this way."""

from __future__ import annotations

import threading

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from flows import common, figures  # noqa: E402
from lrpipe import tracking  # noqa: E402


def _figure(k: int):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(range(k + 2), [i * i for i in range(k + 2)])
    ax.set_title(f"figure {k}")
    return fig


def _names(uri: str, run_id: str) -> set[str]:
    return {f.path for f in tracking.client(uri).list_artifacts(run_id, "figures")}


def test_every_figure_is_written_by_the_end_of_the_block_off_the_callers_thread(
        mlflow_store, monkeypatch):
    run = tracking.start_run("figures-bg", "bg", uri=mlflow_store)
    threads = []
    real = tracking.retry_locked

    def seen(fn, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(tracking, "retry_locked", seen)
    before = plt.get_fignums()  # figures an earlier test left open in this process
    with figures.in_background() as handed:
        for k in range(5):
            tracking.log_figure(run, _figure(k), f"f{k}", uri=mlflow_store)
        assert len(handed) == 5
    assert all(f.done() for f in handed)
    assert _names(mlflow_store, run) == {f"figures/f{k}.png" for k in range(5)}
    assert threads and all(name.startswith("lrpipe-figures") for name in threads)
    assert tracking.FIGURE_WRITER == []
    assert plt.get_fignums() == before  # ours closed in pyplot's registry when handed over


def test_the_bytes_are_those_of_a_direct_write(mlflow_store, tmp_path):
    run = tracking.start_run("figures-bg", "bytes", uri=mlflow_store)
    tracking.log_figure(run, _figure(3), "direct", uri=mlflow_store)
    with figures.in_background():
        tracking.log_figure(run, _figure(3), "background", uri=mlflow_store)
    c = tracking.client(mlflow_store)
    direct = c.download_artifacts(run, "figures/direct.png", str(tmp_path))
    background = c.download_artifacts(run, "figures/background.png", str(tmp_path))
    assert open(direct, "rb").read() == open(background, "rb").read()


def test_a_failed_figure_is_raised_after_the_others_are_written(mlflow_store, monkeypatch):
    run = tracking.start_run("figures-bg", "fails", uri=mlflow_store)
    real = tracking.MlflowClient.log_figure

    def log_figure(self, run_id, figure, path, *args, **kwargs):
        if path.endswith("bad.png"):
            raise OSError("disk full")
        return real(self, run_id, figure, path, *args, **kwargs)

    monkeypatch.setattr(tracking.MlflowClient, "log_figure", log_figure)
    with pytest.raises(OSError, match="disk full"):
        with figures.in_background():
            tracking.log_figure(run, _figure(0), "bad", uri=mlflow_store)
            tracking.log_figure(run, _figure(1), "good", uri=mlflow_store)
    assert _names(mlflow_store, run) == {"figures/good.png"}
    assert tracking.FIGURE_WRITER == []


def test_the_blocks_own_error_wins_and_nested_blocks_share_the_outer_writer(mlflow_store):
    run = tracking.start_run("figures-bg", "nested", uri=mlflow_store)
    with pytest.raises(KeyError):
        with figures.in_background() as outer:
            with figures.in_background() as inner:
                tracking.log_figure(run, _figure(0), "inner", uri=mlflow_store)
            assert inner == [] and len(outer) == 1
            raise KeyError("the flow failed")
    assert _names(mlflow_store, run) == {"figures/inner.png"}  # still waited for
    assert tracking.FIGURE_WRITER == []


def test_without_a_block_a_figure_is_written_at_once(mlflow_store):
    run = tracking.start_run("figures-bg", "direct", uri=mlflow_store)
    tracking.log_figure(run, _figure(0), "now", uri=mlflow_store)
    assert _names(mlflow_store, run) == {"figures/now.png"}


def test_every_flow_call_writes_figures_in_the_background(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        for runner in ("threads", "dask"):
            with common.shared_api(runner):
                assert len(tracking.FIGURE_WRITER) == 1
            assert tracking.FIGURE_WRITER == []
