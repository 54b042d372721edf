"""Links and ports follow the setup, checked in headless Chromium: every flow's report.md, opened
through an MLflow UI on a non-default port that the flows were told of (``LRPIPE_UI_PORT``),
shows every embedded image (loaded from that UI) and every table as a table; and a Prefect
server that ``flows.server`` starts on a non-default port, with a stale ``PREFECT_API_URL``
naming 4200 in the environment, serves a UI whose deployments page reaches its own API.
The sweep's report is checked in tests/test_browser.py."""

from __future__ import annotations

import pytest
from mlflow_browser import (
    assert_rendered,
    browser_page,
    free_port,
    missing_browser,
    mlflow_ui,
    tidy,
)

from flows import server
from flows.commands import COMMANDS
from lrpipe import report, tracking

pytestmark = [pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser())),
              pytest.mark.slow]

DIGITS = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
          "batch_size": 64, "device": "cpu"}
TRANSFER = {"dataset": "digits", "source_classes": [0, 1, 2, 3, 4],
            "target_classes": [5, 6, 7, 8, 9], "source_val_size": 200, "target_val_size": 200,
            "per_class": 10, "hidden": [32, 16], "pretrain_epochs": 1, "pretrain_batch_size": 32,
            "batch_size": 10, "head_mults": [1, 10], "base_lrs": [0.003, 0.01], "device": "cpu"}
WAIT_MS = 120_000  # the first page compiles MLflow's JavaScript: over 45 s seen at load 16
SEARCH = {"subset": 600, "seeds": [0, 1, 2], "range_steps": 30, "regret_epochs": 1}
# The smallest real run of each flow (the settings its own flow test uses, or fewer).
FLOWS = {
    "search": lambda: COMMANDS["search"].run(overrides=DIGITS, workers=2, **SEARCH),
    "decay": lambda: COMMANDS["decay"].run(lr=0.3, epochs=2, seeds=(0, 1),
                                           schedules=["constant", "cosine"], overrides=DIGITS,
                                           workers=2),
    "transfer": lambda: COMMANDS["transfer"].run(epochs=1, seeds=2, strategies="uniform",
                                                 grid_seeds=0, overrides=TRANSFER,
                                                 model_name="browser-pretrained", workers=2),
    "optimizers": lambda: COMMANDS["optimizers"].run(
        optimizers=["sgd", "adam"], surfaces=["saddle"], seeds=2, epochs=2, rprop_epochs=2,
        skip_second_order=True, skip_cost=True, overrides=DIGITS, workers=2),
    "pipeline": lambda: COMMANDS["pipeline"].run(epochs=2, skip=["decay", "final", "transfer"],
                                                 overrides=DIGITS, search=SEARCH, workers=2),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlruns-ports') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def reports(store, prefect_harness, tmp_path_factory):
    """{flow: (parent run URL on the UI, report.md)} with every flow run while LRPIPE_UI_PORT
    names a free (never 5000) port, then an MLflow UI on that port and a Chromium page."""
    port = free_port()
    assert port != 5000
    parents = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.setenv("LRPIPE_UI_PORT", str(port))
        mp.delenv("LRPIPE_UI_URL", raising=False)
        for name, run in FLOWS.items():
            parents[name] = run()["parent_run_id"]
        urls = {name: _run_url(store, run_id) for name, run_id in parents.items()}
    docs = {name: tracking.read_text(parents[name], "report.md", uri=store) for name in FLOWS}
    with mlflow_ui(store, tmp_path_factory.mktemp("ui"), port) as base, \
            browser_page(tmp_path_factory.mktemp("chromium")) as page:
        assert base == f"http://127.0.0.1:{port}"
        yield page, urls, docs


def _run_url(store: str, run_id: str) -> str:
    """The parent's page URL as the flow's own settings give it (LRPIPE_UI_PORT)."""
    c = tracking.client(store)
    name = c.get_experiment(c.get_run(run_id).info.experiment_id).name
    return tracking.run_url(run_id, name, uri=store)


@pytest.mark.parametrize("flow", list(FLOWS))
def test_each_flow_report_shows_its_images_and_tables_on_a_moved_ui(reports, flow):
    page, urls, docs = reports
    assert docs[flow], f"{flow}: no report.md on its parent run"
    assert "127.0.0.1:5000" not in docs[flow]  # every link follows LRPIPE_UI_PORT
    page.goto(report.artifact_page_url(urls[flow], "report.md"))
    page.get_by_role("heading").first.wait_for(timeout=WAIT_MS)
    tidy(page)
    assert_rendered(page, urls[flow], docs[flow], WAIT_MS)


def test_prefect_ui_on_a_moved_port_reaches_its_own_api(reports, tmp_path, monkeypatch):
    page = reports[0]  # one sync Playwright per process: the module's page
    port = free_port()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # stale, as in issue 24
    api = server.start(port=port)
    calls: list[str] = []
    try:
        assert api == f"http://127.0.0.1:{port}/api"
        page.on("request", lambda r: calls.append(r.url) if "/api/" in r.url else None)
        page.goto(f"http://127.0.0.1:{port}/deployments")
        page.get_by_text("Deployments").first.wait_for(timeout=WAIT_MS)
        page.wait_for_load_state("networkidle", timeout=WAIT_MS)
        assert page.get_by_text("Can't connect").count() == 0
        assert any(u.startswith(f"{api}/deployments") for u in calls), calls
        assert not [u for u in calls if ":4200/" in u]
    finally:
        server.stop(port)
