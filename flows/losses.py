"""Flow ``losses``: cross-entropy against squared error, each at its own searched rate.

1. For each loss, the same learning-rate search (``flows.lr_search`` as a subflow, same subset,
   seeds, range steps, regret epochs and grid span), recorded in experiment ``losses-search``
   (kept apart from ``lr-search``, whose newest matching choice other commands read).
2. Both losses train at their searched rates over fresh seeds, each run an MLflow child of one
   parent run (experiment ``losses``), batched where the declared policy says so.
3. The parent gets the figure (validation error and cross-entropy against epoch per loss, mean
   and min..max band, the two rates stated), the tables and the report: which loss wins on
   validation error and by how much, a tie when the margin is inside the band over seeds.

A crashed run resumes into its parent: a finished search is read back from the parent
(``searches/<loss>.json``), the comparison runs are reused by config hash.
"""

from __future__ import annotations

import json
import time

import pandas as pd
from prefect import flow

from flows import lr_search as search_flow
from flows.batched import train_planned
from flows.common import (
    check_runner,
    make_task_runner,
    parallel_tasks,
    set_torch_threads,
    task_resources,
)
from flows.harness import flow_parent
from flows.report import publish_flow_report
from lrpipe import report, runs, tracking
from lrpipe.engine.config import LOSSES, TrainConfig, check_number, merge
from lrpipe.experiments import losses as exp
from lrpipe.experiments.bands import band_text
from lrpipe.search import plan as search_plan

EXPERIMENT = "losses"
SEARCH_EXPERIMENT = "losses-search"
FIGURE = "loss_comparison"


def search_settings(subset, search_seeds, range_steps, regret_epochs, grid_span) -> dict:
    """The one search budget both losses get (``lrpipe.search.plan`` defaults for None)."""
    return {"subset": search_plan.DEFAULT_SUBSET if subset is None else subset,
            "seeds": list(search_plan.DEFAULT_SEEDS if search_seeds is None else search_seeds),
            "range_steps": search_plan.DEFAULT_RANGE_STEPS if range_steps is None
            else range_steps,
            "regret_epochs": search_plan.DEFAULT_REGRET_EPOCHS if regret_epochs is None
            else regret_epochs,
            "grid_span": search_plan.DEFAULT_GRID_SPAN if grid_span is None else grid_span}


def search_loss(parent: str, loss: str, settings: dict, overrides: dict | None, runner: str,
                workers: int | None) -> dict:
    """``loss``'s search result (chosen rate, band, run id): read back from ``parent`` when a
    cut-short run of this flow finished it, else searched now and saved there."""
    path = f"searches/{loss}.json"
    saved = tracking.read_text(parent, path)
    if saved is not None:
        print(f"losses: the {loss} search finished before this run was cut short; reused")
        return json.loads(saved)
    found = search_flow.lr_search.with_options(task_runner=make_task_runner(runner, workers))(
        **settings, overrides=exp.search_overrides(overrides, loss), runner=runner,
        workers=workers, experiment=SEARCH_EXPERIMENT)
    result = {"loss": loss, "chosen_lr": found["chosen_lr"], "band": list(found["band"]),
              "chosen_by": found["chosen_by"], "run_id": found["parent_run_id"]}
    tracking.log_text(parent, tracking.to_json(result), path)
    return result


def searches_table(searches: dict[str, dict]) -> pd.DataFrame:
    return pd.DataFrame([{"loss": s["loss"], "searched lr": s["chosen_lr"],
                          "band": f"{s['band'][0]:.3g}..{s['band'][1]:.3g}",
                          "chosen by": s["chosen_by"],
                          "search run": tracking.run_url(s["run_id"], SEARCH_EXPERIMENT)}
                         for s in searches.values()])


def results_table(summary: pd.DataFrame) -> pd.DataFrame:
    def cell(r, m):
        return band_text((r[f"{m}_mean"], r[f"{m}_min"], r[f"{m}_max"]))

    return pd.DataFrame([{"loss": r["loss"], "lr": f"{r['lr']:.3g}", "seeds": r["n_seeds"],
                          "not ok": r["n_bad"], "val error": cell(r, "val_error"),
                          "val cross-entropy": cell(r, "val_loss")}
                         for r in summary.to_dict("records")])


def evidence(settings: dict, plan: exp.LossPlan, base: TrainConfig) -> list[str]:
    return [f"same search for both losses: subset {settings['subset']}, seeds "
            f"{settings['seeds']}, {settings['range_steps']} range-test steps, "
            f"{settings['regret_epochs']} regret epochs, grid span {settings['grid_span']:g}",
            f"comparison: {base.model.name} {base.optim.name} on {base.data.dataset} (subset "
            f"{base.data.subset or 'all'}), {plan.epochs} epochs, fresh seeds "
            f"{list(plan.seeds)}; a tie when the min..max bands over seeds overlap",
            "the decay comparison (`lrpipe decay`) runs mse at a fixed 0.25x of the "
            "cross-entropy rate instead"]


@flow(name="losses")
def loss_compare(
    subset: int | None = None,
    search_seeds: list[int] | None = None,
    range_steps: int | None = None,
    regret_epochs: int | None = None,
    grid_span: float | None = None,
    seeds: list[int] | None = None,
    epochs: int = exp.DEFAULT_EPOCHS,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
) -> dict:
    """Search each loss's rate with the same budget, compare them over fresh seeds and say
    which wins on validation error. Returns the parent run id, the searches, the summary
    records, the comparison and the answer."""
    check_runner(runner)
    settings, plan = check_plan(subset, search_seeds, range_steps, regret_epochs, grid_span,
                                seeds, epochs, overrides)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    with flow_parent("losses", experiment, "losses cross_entropy vs mse", params={
            **settings, "comparison_seeds": list(plan.seeds), "epochs": plan.epochs,
            "overrides": tracking.to_json(overrides or {}), "runner": runner}) as parent:
        searches = {loss: search_loss(parent, loss, settings, overrides, runner, workers)
                    for loss in LOSSES}
        rates = {loss: s["chosen_lr"] for loss, s in searches.items()}
        cfgs = exp.comparison_configs(overrides, plan, rates)
        with task_resources(runner):
            finals = train_planned(
                cfgs, parent, experiment,
                [runs.training_run_name(c, prefix=f"{c.loss} ") for c in cfgs],
                threads=threads, workers=parallel_tasks(runner, workers),
                tags=[{"loss": c.loss} for c in cfgs], uri=tracking.tracking_uri(),
                label="losses")
        history = exp.history_table(cfgs, finals)
        analysis = exp.analyze(history, rates)
        from lrpipe.plots.losses import plot_loss_comparison  # drawing loads after training

        tracking.log_figure(parent, plot_loss_comparison(analysis.curves), FIGURE)
        for name, table in (("summary.csv", analysis.summary), ("curves.csv", analysis.curves),
                            ("history.csv", history),
                            ("searches.csv", searches_table(searches))):
            tracking.log_table(parent, table, name)
        tracking.log_metrics(parent, {f"lr_{k}": v for k, v in rates.items()}, step=0)
        tracking.set_tags(parent, {"mlflow.note.content": analysis.answer,
                                   "winner": analysis.error["winner"]})
        table = results_table(analysis.summary)
        publish_flow_report(parent, experiment, "Cross-entropy against squared error, each at "
                            "its own searched rate", analysis.answer, table,
                            evidence(settings, plan, cfgs[0]), key=EXPERIMENT,
                            tables={"The two searches (same budget)": searches_table(searches)})
    print(f"\nlosses: 2 searches and {len(cfgs)} runs in {time.perf_counter() - start:.0f} s")
    print(report.terminal_summary(analysis.answer, evidence(settings, plan, cfgs[0]), table,
                                  {"the parent run": tracking.run_url(parent, experiment)}))
    return {"parent_run_id": parent, "searches": searches, "rates": rates,
            "summary": analysis.summary.to_dict("records"), "error": analysis.error,
            "answer": analysis.answer}


def check_plan(subset=None, search_seeds=None, range_steps=None, regret_epochs=None,
               grid_span=None, seeds=None, epochs=exp.DEFAULT_EPOCHS, overrides=None):
    """(search settings, comparison plan), every value checked (ConfigError naming it)."""
    settings = search_settings(subset, search_seeds, range_steps, regret_epochs, grid_span)
    search_plan.search_configs(overrides, settings["subset"], settings["regret_epochs"])
    settings["seeds"] = search_plan.check_search(settings["seeds"], settings["range_steps"],
                                                 settings["grid_span"])
    check_number("epochs", epochs, low=1, integer=True)
    for loss in LOSSES:
        exp.search_overrides(overrides, loss)
    base_seed = merge(TrainConfig(), dict(overrides or {})).seed
    plan = exp.LossPlan(seeds=exp.DEFAULT_SEEDS if seeds is None else seeds, epochs=epochs,
                        used_seeds=(*settings["seeds"], base_seed,
                                    *search_plan.DEFAULT_CONFIRM_SEEDS))
    return settings, plan


def check(subset=None, search_seeds=None, range_steps=None, regret_epochs=None,
          grid_span=None, seeds=None, epochs=exp.DEFAULT_EPOCHS, overrides=None,
          experiment=EXPERIMENT) -> tuple[dict, list[TrainConfig]]:
    """The flow's keyword arguments and the configs to preflight (each loss's search configs),
    or a ConfigError naming the field."""
    settings, plan = check_plan(subset, search_seeds, range_steps, regret_epochs, grid_span,
                                seeds, epochs, overrides)
    cfgs = []
    for loss in LOSSES:
        cfgs += search_plan.search_configs(exp.search_overrides(overrides, loss),
                                           settings["subset"], settings["regret_epochs"])
    kwargs = {"subset": settings["subset"], "search_seeds": settings["seeds"],
              "range_steps": settings["range_steps"],
              "regret_epochs": settings["regret_epochs"], "grid_span": settings["grid_span"],
              "seeds": list(plan.seeds), "epochs": epochs, "overrides": overrides,
              "experiment": experiment}
    return kwargs, list(cfgs)
