"""Regenerate the README's pictures from a finished lr_sweep in the project's MLflow store:
the MLflow UI's runs table and val_loss chart (headless Chromium, 1200x700) and the sweep's own
figures, palette-compressed.

    .venv/bin/python docs/screenshots.py [--parent RUN_ID]

Needs tests/browser_setup.sh (Chromium + playwright). Reads the store; writes only docs/*.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mlflow_browser import (  # noqa: E402
    browser_page,
    missing_browser,
    mlflow_ui,
    show_columns,
    shrink_png,
    tidy,
)

import flows  # noqa: E402,F401  (quiet, offline MLflow defaults)
from lrpipe import report, tracking  # noqa: E402

DOCS = ROOT / "docs"
EXPERIMENT = "lr-sweep"
FIGURES = {"loss_vs_epoch": "sweep-loss.png", "error_vs_epoch": "sweep-error.png",
           "final_vs_lr": "sweep-final.png"}
COLUMNS = ["Dataset", "Source", "Models", "train_loss", "val_loss", "val_error", "optim.lr",
           "status", "diverged_epoch"]
WAIT_MS = 120_000


def newest_sweep(uri: str, min_rates: int = 6) -> str:
    """The newest FINISHED sweep parent with at least ``min_rates`` child runs."""
    c = tracking.client(uri)
    exp = tracking.experiment_id(EXPERIMENT, uri)
    parents = c.search_runs([exp], "attributes.status = 'FINISHED'",
                            order_by=["attributes.start_time DESC"], max_results=200)
    for run in parents:
        if "mlflow.parentRunId" in run.data.tags:
            continue
        children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        if len(children) >= min_rates:
            return run.info.run_id
    raise SystemExit(f"no finished sweep with >= {min_rates} rates in {uri}: run `make grid`")


def copy_figures(uri: str, parent: str, width: int = 1000) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        for name, target in FIGURES.items():
            local = tracking.client(uri).download_artifacts(parent, f"figures/{name}.png", tmp)
            out = DOCS / target
            with Image.open(local) as img:
                if img.width > width:
                    img = img.resize((width, round(img.height * width / img.width)),
                                     Image.Resampling.LANCZOS)
                img.save(out)
            shrink_png(out, colors=192)


def screenshots(uri: str, parent: str) -> None:
    from playwright.sync_api import expect

    c = tracking.client(uri)
    exp = tracking.experiment_id(EXPERIMENT, uri)
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    children.sort(key=lambda r: float(r.data.params["optim.lr"]))
    with tempfile.TemporaryDirectory() as tmp, mlflow_ui(uri, Path(tmp)) as base, \
            browser_page(Path(tmp)) as page:
        parent_url = tracking.run_url(parent, EXPERIMENT, uri=uri, ui=base)
        page.goto(report.child_runs_url(parent_url))
        expect(page.get_by_text(children[0].info.run_name, exact=True)).to_be_visible(
            timeout=WAIT_MS)
        tidy(page)
        show_columns(page, COLUMNS)
        page.get_by_role("button", name="Toggle sidebar").click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(DOCS / "mlflow-runs.png"))
        page.goto(report.metric_chart_url(parent_url, [r.info.run_id for r in children]))
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=WAIT_MS)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(DOCS / "mlflow-chart.png"))
    for name in ("mlflow-runs.png", "mlflow-chart.png"):
        shrink_png(DOCS / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", help="the sweep's parent run id (default: the newest)")
    parser.add_argument("--store", default=str(ROOT / "mlruns"), help="MLflow store folder")
    args = parser.parse_args()
    if reason := missing_browser():
        raise SystemExit(reason)
    uri = tracking.tracking_uri(args.store)
    parent = args.parent or newest_sweep(uri)
    copy_figures(uri, parent)
    screenshots(uri, parent)
    for path in sorted(DOCS.glob("*.png")):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
