"""Every link follows where the MLflow UI lives (tracking.ui_url), and report images with it."""

from __future__ import annotations

import pytest

from lrpipe import report, tracking

SQLITE = "sqlite:////tmp/x/mlflow.db"


@pytest.fixture
def env(monkeypatch):
    """Set the UI variables of one case; none leak in from the shell."""
    for key in ("LRPIPE_UI_URL", "LRPIPE_UI_PORT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)

    def setenv(values: dict) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
    return setenv


@pytest.mark.parametrize(("uri", "values", "want"), [
    (SQLITE, {}, "http://127.0.0.1:5000"),
    (SQLITE, {"LRPIPE_UI_PORT": "5077"}, "http://127.0.0.1:5077"),
    (SQLITE, {"LRPIPE_UI_PORT": ""}, "http://127.0.0.1:5000"),
    ("http://host:5000", {}, "http://host:5000"),
    ("https://mlflow.lab.example/team/", {"LRPIPE_UI_PORT": "5077"},
     "https://mlflow.lab.example/team"),
    ("http://host:5000", {"LRPIPE_UI_URL": "https://proxy.example/mlflow/"},
     "https://proxy.example/mlflow"),
    (SQLITE, {"LRPIPE_UI_URL": "http://box:8080", "LRPIPE_UI_PORT": "5077"}, "http://box:8080"),
])
def test_ui_url_follows_the_setting_then_the_server_then_the_port(env, uri, values, want):
    env(values)
    assert tracking.ui_url(uri) == want


def test_ui_url_defaults_to_the_tracking_uri(env):
    env({"MLFLOW_TRACKING_URI": "http://host:5002/", "LRPIPE_UI_PORT": "5077"})
    assert tracking.ui_url() == "http://host:5002"


@pytest.mark.parametrize(("values", "field"), [
    ({"LRPIPE_UI_PORT": "0"}, "LRPIPE_UI_PORT"),
    ({"LRPIPE_UI_PORT": "65536"}, "LRPIPE_UI_PORT"),
    ({"LRPIPE_UI_PORT": "50a0"}, "LRPIPE_UI_PORT"),
    ({"LRPIPE_UI_PORT": "-1"}, "LRPIPE_UI_PORT"),
    ({"LRPIPE_UI_URL": "127.0.0.1:5000"}, "LRPIPE_UI_URL"),
    ({"LRPIPE_UI_URL": "http://h:1/#/experiments"}, "LRPIPE_UI_URL"),
    ({"LRPIPE_UI_URL": "http://h:1/?a=b"}, "LRPIPE_UI_URL"),
])
def test_a_bad_ui_setting_is_named(env, values, field):
    env(values)
    with pytest.raises(tracking.TrackingError, match=rf"^{field}: got .*; allowed: "):
        tracking.ui_url(SQLITE)


def test_run_url_and_report_images_follow_the_ui_port(mlflow_store, env):
    env({"MLFLOW_TRACKING_URI": mlflow_store, "LRPIPE_UI_PORT": "5077"})  # env cleared it
    run = tracking.start_run("links", "parent")
    exp = tracking.experiment_id("links")
    url = tracking.run_url(run, "links")
    assert url == (f"http://127.0.0.1:5077/#/experiments/{exp}/runs/{run}"
                   "?workflowType=machine_learning")
    assert report.artifact_image_url(url, "figures/a.png").startswith(
        "http://127.0.0.1:5077/get-artifact?")
    env({"LRPIPE_UI_URL": "http://box:8080/"})
    assert tracking.run_url(run, "links").startswith(f"http://box:8080/#/experiments/{exp}/")
    assert tracking.run_url(run, "links", ui="http://given:1/").startswith("http://given:1/#/")
    tracking.end_run(run)


def test_run_url_of_a_tracking_server_is_that_server(env, monkeypatch):
    monkeypatch.setattr(tracking, "experiment_id", lambda name, uri=None: "7")
    env({"LRPIPE_UI_PORT": "5077"})  # the server's own address wins over the local UI's port
    assert tracking.run_url("abc", "e", uri="http://host:5001").startswith(
        "http://host:5001/#/experiments/7/runs/abc?")
