"""Regenerate the README's pictures from finished lr_sweeps in the project's MLflow store:
the MLflow UI's runs table and its val_loss chart, each rate in its figure colour (headless
Chromium, 1200x700), and the sweep's own figures, from the newest MLP sweep of 6 rates or
more (`make sweep`'s sweep stage, or `make grid`); the article's figures from the newest
softmax sweep (`make article`). All palette-compressed.

    .venv/bin/python docs/screenshots.py [--parent RUN_ID] [--article-parent RUN_ID]

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


ARTICLE_FIGURES = {"loss_vs_epoch": "article-softmax-loss.png",
                   "error_vs_epoch": "article-softmax-error.png"}
# (model.name, fewest rates, the make target that records such a sweep)
README_SWEEP = ("mlp", 6, "make sweep (or make grid)")
ARTICLE_SWEEP = ("softmax", 7, "make article")


def sweep_model(run) -> str | None:
    """The model name of a sweep parent's base config (its ``base_config`` param)."""
    import json

    try:
        return json.loads(run.data.params.get("base_config", "{}"))["model"]["name"]
    except (KeyError, TypeError, ValueError):
        return None


def newest_sweep(uri: str, model: str, min_rates: int, target: str) -> str:
    """The newest FINISHED sweep parent of ``model`` with at least ``min_rates`` child runs."""
    c = tracking.client(uri)
    exp = tracking.experiment_id(EXPERIMENT, uri)
    parents = c.search_runs([exp], "attributes.status = 'FINISHED'",
                            order_by=["attributes.start_time DESC"], max_results=200)
    for run in parents:
        if "mlflow.parentRunId" in run.data.tags or sweep_model(run) != model:
            continue
        children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        if len(children) >= min_rates:
            return run.info.run_id
    raise SystemExit(f"no finished {model} sweep with >= {min_rates} rates in {uri}: run "
                     f"`{target}`")


def copy_figures(uri: str, parent: str, figures: dict[str, str], width: int = 1000) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        for name, target in figures.items():
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
        # The runs page's chart view, at the size MLflow previews a chart: it colours each
        # run by its mlflow.runColor tag (the sweep's figure colours, flows.lr_sweep); the
        # compare page (report.metric_chart_url) ignores the tag and repeats three colours.
        page.locator("input[value=CHART]").dispatch_event("click")  # the radio is hidden
        page.get_by_placeholder("Search metric charts").fill("val_loss")
        expect(page.get_by_text("val_loss", exact=True).first).to_be_visible(timeout=WAIT_MS)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(DOCS / "mlflow-chart.png"))
    for name in ("mlflow-runs.png", "mlflow-chart.png"):
        keep_run_colors(DOCS / name)


def keep_run_colors(path: Path) -> None:
    """Palette-compress a UI screenshot without merging the runs' colours: median cut to 128
    colours gives the white page most of them and maps thin lines of different rates to one
    green; an octree of 256 keeps each run's colour (checked by eye in docs/mlflow-chart.png)."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", help="the sweep's parent run id (default: the newest "
                        "MLP sweep of 6 rates or more)")
    parser.add_argument("--article-parent", help="the article sweep's parent run id (default: "
                        "the newest softmax sweep of 7 rates or more)")
    parser.add_argument("--store", default=str(ROOT / "mlruns"), help="MLflow store folder")
    args = parser.parse_args()
    if reason := missing_browser():
        raise SystemExit(reason)
    uri = tracking.tracking_uri(args.store)
    parent = args.parent or newest_sweep(uri, *README_SWEEP)
    article = args.article_parent or newest_sweep(uri, *ARTICLE_SWEEP)
    copy_figures(uri, parent, FIGURES)
    copy_figures(uri, article, ARTICLE_FIGURES)
    screenshots(uri, parent)
    for path in sorted(DOCS.glob("*.png")):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
