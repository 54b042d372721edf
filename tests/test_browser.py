"""The MLflow UI as a user sees it, in a real headless Chromium: a finished digits sweep's runs
table, a val_loss chart across its rates, and its report.md rendered with its figures.
The UI runs on a free port, never 5000, and the flows run with ``LRPIPE_UI_PORT`` naming it:
each report's links and images must follow that setting (tests/test_browser_reports.py opens
every other flow's report the same way). Screenshots go to test-output/ (git-ignored).
Needs tests/browser_setup.sh (the Makefile's test target runs it); skips, saying why, where
Chromium cannot be installed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow_browser import (
    assert_rendered,
    browser_page,
    free_port,
    missing_browser,
    show_columns,
    start_server,
    stop_server,
    tidy,
    wait_healthy,
)

from flows.commands import COMMANDS
from lrpipe import report, tracking

pytestmark = [pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser())),
              pytest.mark.slow]

OUT = Path(__file__).resolve().parent.parent / "test-output"
OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
             "batch_size": 64}
LRS = [0.03, 0.3, 1e4]  # 1e4 diverges at once
# The first page load fetches and compiles MLflow's 30 MB of JavaScript: over 45 s was seen on
# this 2-core machine at load 16. Later pages take seconds.
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server(_session_store, tmp_path_factory):
    """``mlflow server`` on the session's store, started first: its ~20 s start-up overlaps the
    sweep. Yields (process, port, log); stopped by process group afterwards."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port, log = free_port(), folder / "server.log"
    proc = start_server(_session_store, port, log)
    try:
        yield proc, port, log
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def finished_sweep(server, prefect_harness, _session_store):
    """A finished 3-rate, 2-epoch digits sweep in the session's store, run while
    ``LRPIPE_UI_PORT`` names the test server's (non-default) port."""
    run = COMMANDS["sweep"].run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", _session_store)
        mp.setenv("LRPIPE_UI_PORT", str(server[1]))
        mp.delenv("LRPIPE_UI_URL", raising=False)
        return run(lrs=LRS, epochs=2, overrides=OVERRIDES, workers=2), _session_store


@pytest.fixture(scope="module")
def ui(server, finished_sweep, tmp_path_factory):
    """(page, sweep result, parent run URL, child run ids in rate order). The report.md is the
    flow's own: nothing is republished for this port."""
    proc, port, log = server
    result, uri = finished_sweep
    wait_healthy(proc, port, log)
    assert port != 5000
    parent = result["parent_run_id"]
    parent_url = tracking.run_url(parent, "lr-sweep", uri=uri, ui=f"http://127.0.0.1:{port}")
    summary = pd.DataFrame(result["summary"])
    result = {**result, "report_md": tracking.read_text(parent, "report.md", uri=uri)}
    with browser_page(tmp_path_factory.mktemp("chromium")) as page:
        yield page, result, parent_url, list(summary.sort_values("lr")["run_id"])


def shot(page, name: str) -> None:
    OUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUT / name))


def test_runs_table_names_every_run(ui):
    from playwright.sync_api import expect

    page, result, parent_url, _ = ui
    page.goto(report.child_runs_url(parent_url))
    for lr in LRS:
        expect(page.get_by_text(f"lr={lr:g} sgd mlp seed=0", exact=True).first).to_be_visible(
            timeout=WAIT_MS)
    tidy(page)
    show_columns(page, ["Dataset", "Source", "Models", "val_loss", "optim.lr", "status"])
    expect(page.get_by_text("diverged", exact=True).first).to_be_visible(timeout=10_000)
    expect(page.get_by_text(f"{len(LRS)} matching runs")).to_be_visible()
    shot(page, "browser-runs.png")


def test_val_loss_chart_draws_a_line_per_rate(ui):
    from playwright.sync_api import expect

    page, result, parent_url, ids = ui
    page.goto(report.metric_chart_url(parent_url, ids, "val_loss"))
    plot = page.locator(".js-plotly-plot").first
    expect(plot).to_be_visible(timeout=WAIT_MS)
    for lr in LRS:  # MLflow's legend (beside the plot) names each run's line
        expect(page.get_by_text(f"lr={lr:g} sgd mlp seed=0 (val_loss)")).to_have_count(
            1, timeout=WAIT_MS)
    assert plot.locator(".scatterlayer .trace").count() >= len(LRS)
    assert page.get_by_text("invalid URL").count() == 0
    shot(page, "browser-val-loss.png")


def test_report_renders_with_its_figures(ui):
    from playwright.sync_api import expect

    page, result, parent_url, _ = ui
    page.goto(report.artifact_page_url(parent_url, "report.md"))
    expect(page.get_by_role("heading", name="Learning-rate sweep: 3 rates")).to_be_visible(
        timeout=WAIT_MS)
    expect(page.get_by_text(f"Use lr={result['best_lr']:g}:").first).to_be_visible()
    expect(page.get_by_role("link", name="lr=10000")).to_be_visible()  # the table, linked
    tidy(page)
    shot(page, "browser-report.png")
    images = page.locator("img[alt='loss vs epoch']")  # embedded from the tracking server
    expect(images).to_have_count(1)
    assert_rendered(page, parent_url, result["report_md"], WAIT_MS)
