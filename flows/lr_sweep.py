"""Flow ``lr_sweep``: one training run per learning rate, fanned out as Prefect tasks.

Each rate becomes an MLflow child run of one parent run (experiment ``lr-sweep``) that holds
the overlaid figures. Rates share one task, trained as one batched computation, only where
the declared batching policy says so (``lrpipe.engine.many``, ``flows.batched.train_planned``).
Every config is built and validated before anything is recorded.
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import flow

from flows.batched import train_planned
from flows.common import check_runner, parallel_tasks, set_torch_threads, task_resources
from flows.harness import parent_run
from flows.report import publish_report, where_to_click
from lrpipe import report, runs, tracking
from lrpipe.engine.config import to_dict
from lrpipe.experiments.sweep import (
    DEFAULT_EPOCHS,
    EXPERIMENT,
    base_config,
    best_rate,
    summarize,
    summary_text,
    sweep_configs,
)
from lrpipe.report import final_metrics

# The tag MLflow's UI reads a run's colour from (its charts and runs table; the UI's own
# choice repeats three colours across eight rates): each child gets its rate's colour in the
# sweep's figures, so the UI's val_loss chart and the figures tell the rates apart alike.
RUN_COLOR_TAG = "mlflow.runColor"


def run_colors(summary: pd.DataFrame) -> dict[str, str]:
    """Child run id -> its rate's colour in the sweep's figures (``lr_palette``), as #rrggbb."""
    from matplotlib.colors import to_hex

    from lrpipe.plots.sweep import lr_palette

    palette = lr_palette(summary["lr"])
    return {row.run_id: to_hex(palette[float(row.lr)]) for row in summary.itertuples()}


def sweep_figures(history: pd.DataFrame, steps: pd.DataFrame,
                  chosen: float | None) -> dict:
    """The sweep's figures by name (``plots.sweep.sweep_figures``, and the update ratios when
    the runs logged them)."""
    from lrpipe.plots import sweep as plots  # drawing libraries load here, after training
    from lrpipe.plots.ratios import plot_update_ratio_by_lr

    figures = plots.sweep_figures(history, chosen_lr=chosen, steps=steps if len(steps) else None)
    if any(c.startswith("ratio/") for c in history.columns):
        figures["update_ratio"] = plot_update_ratio_by_lr(history)
    return figures


@flow(name="lr-sweep")
def lr_sweep(
    lrs: list[float],
    epochs: int = DEFAULT_EPOCHS,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
    highlight: float | None = None,
) -> dict:
    """Train ``overrides``' config (default: MLP, SGD, Fashion-MNIST) at every rate in ``lrs``.

    ``highlight``: the rate drawn thick in the figures (the pipeline's chosen one); default
    the best rate of the sweep. Resumable: a crashed sweep of the same configs is resumed into
    its parent run, reusing the rates that finished. Returns the parent run id, the per-rate
    summary records and the best rate.
    """
    check_runner(runner)
    base = base_config(epochs, overrides)
    cfgs = sweep_configs(base, lrs)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    uri = tracking.tracking_uri()
    with parent_run(experiment, "lr-sweep", [c.hash() for c in cfgs],
                    f"sweep {base.optim.name} {base.model.name} {len(cfgs)} rates",
                    params={"lrs": list(lrs), "epochs": epochs, "runner": runner,
                            "base_config": tracking.to_json(to_dict(base))}) as parent:
        with task_resources(runner):  # rates batched into one task where the policy says so
            results = train_planned(cfgs, parent, experiment,
                                    [runs.training_run_name(c) for c in cfgs],
                                    threads=threads, workers=parallel_tasks(runner, workers),
                                    tags={"sweep": parent}, uri=uri, label="lr-sweep")
        history = pd.DataFrame([row for r in results for row in r["history"]])
        steps = pd.DataFrame([row for r in results for row in r.get("steps", [])])
        summary = summarize(results)
        best = best_rate(summary)
        chosen = highlight if highlight is not None else (
            None if best is None else float(best["lr"]))
        figures = sweep_figures(history, steps, chosen)
        for name, fig in figures.items():
            tracking.log_figure(parent, fig, name)
        for run_id, color in run_colors(summary).items():
            tracking.set_tags(run_id, {RUN_COLOR_TAG: color}, uri)
        tracking.log_table(parent, final_metrics(summary), "summary.csv")
        if best is not None:
            tracking.log_metrics(parent, {"best_lr": best["lr"], "best_val_loss":
                                          best["val_loss"], "best_val_error": best["val_error"]},
                                 step=0)
        publish_report(parent, experiment, report.sweep_report(
            summary, tracking.run_url(parent, experiment),
            lambda r: tracking.run_url(r, experiment),
            [f"figures/{n}.png" for n in figures]), key="lr-sweep")
    print(summary_text(final_metrics(summary), time.perf_counter() - start))
    print(where_to_click(parent, experiment), flush=True)
    return {"parent_run_id": parent, "summary": summary.to_dict("records"),
            "best_lr": None if best is None else float(best["lr"])}
