"""Flow ``batch_size``: the best learning rate against the batch size, for SGD and for Adam.

For each optimizer and batch size, a small grid of rates around the square-root rule's
prediction (``lrpipe.experiments.batch_size``) is trained over several seeds, each run an MLflow
child of one parent run (experiment ``batch-size``), batched where the declared policy says so
(``flows.batched.train_planned``). The parent gets the figure (best rate against batch size,
log-log, both rules overlaid), the tables, the slopes and a report saying which rule the data
follows. A crashed run of the same plan resumes into its parent and reuses its finished runs.
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import flow

from flows.batched import train_planned
from flows.common import (
    check_runner,
    parallel_tasks,
    set_torch_threads,
    task_resources,
)
from flows.harness import parent_run
from flows.report import publish_flow_report
from lrpipe import report, runs, tracking
from lrpipe.engine.config import ConfigError, TrainConfig, check_number, to_dict
from lrpipe.experiments import batch_size as exp

EXPERIMENT = "batch-size"
FIGURE = "best_rate_vs_batch_size"
TABLE_NOTE = ("best lr: the lowest mean final validation loss over seeds; tied: the rates "
              "whose mean is within one seed standard deviation of it; edge: the best is the "
              "grid's smallest or largest rate.")


def make_plan(batch_sizes=None, optimizers=None, seeds=None, epochs=exp.DEFAULT_EPOCHS,
              reference_batch=exp.DEFAULT_REFERENCE_BATCH, reference_rates=None, grid=None,
              overrides=None) -> tuple[exp.BatchSizePlan, TrainConfig, list[TrainConfig]]:
    """The validated plan, the shared base config and one config per run; None means the
    default; a bad setting is a ConfigError naming it. Reference rates given for an optimizer
    not in ``optimizers`` are an error, not silently dropped."""
    optimizers = exp.DEFAULT_OPTIMIZERS if optimizers is None else optimizers
    given = dict(reference_rates or {})
    if isinstance(optimizers, (list, tuple)):
        extra = sorted(set(given) - set(optimizers))
        if extra:
            raise ConfigError(f"reference_rates: got rates for {extra}, not in optimizers "
                              f"{list(optimizers)}; allowed: rates for those optimizers only")
    defaults = {o: r for o, r in exp.DEFAULT_REFERENCE_RATES.items() if o in optimizers}
    plan = exp.BatchSizePlan(
        batch_sizes=exp.DEFAULT_BATCH_SIZES if batch_sizes is None else batch_sizes,
        optimizers=optimizers, reference_rates={**defaults, **given},
        reference_batch=reference_batch, grid=exp.DEFAULT_GRID if grid is None else grid,
        seeds=exp.DEFAULT_SEEDS if seeds is None else seeds, epochs=epochs)
    base = exp.base_config(overrides)
    return plan, base, exp.plan_configs(base, plan)


def _params(plan: exp.BatchSizePlan, base: TrainConfig, runner: str) -> dict:
    return {"batch_sizes": list(plan.batch_sizes), "optimizers": list(plan.optimizers),
            "reference_rates": dict(plan.reference_rates),
            "reference_batch": plan.reference_batch, "grid": list(plan.grid),
            "seeds": list(plan.seeds), "epochs": plan.epochs, "runner": runner,
            "base_config": tracking.to_json(to_dict(base))}


def best_table(best: pd.DataFrame) -> pd.DataFrame:
    """The best rates as the report and the terminal show them."""
    return pd.DataFrame({
        "optimizer": best["optimizer"], "batch": best["batch_size"], "best lr": best["best_lr"],
        "tied lr": [f"{lo:.3g}-{hi:.3g}" if n > 1 else "-" for lo, hi, n in
                    zip(best["tied_low"], best["tied_high"], best["n_tied"], strict=True)],
        "val loss": best["val_loss_mean"], "± std": best["val_loss_std"],
        "edge": best["at_edge"].map({True: "yes", False: ""})})


def evidence(analysis: exp.BatchSizeAnalysis, plan: exp.BatchSizePlan) -> list[str]:
    lines = [f"{len(plan.grid)} rates per batch size: "
             f"{', '.join(f'{g:g}' for g in plan.grid)} x the square-root rule's rate from "
             f"{', '.join(f'{o} {r:g}' for o, r in plan.reference_rates)} at batch "
             f"{plan.reference_batch}; {len(plan.seeds)} seeds each; {plan.epochs} epochs at "
             "every batch size (a larger batch takes fewer, larger steps)"]
    for fit in analysis.fits.to_dict("records"):
        lines.append(f"{fit['optimizer']}: log-log slope {fit['slope']:.3f}, standard error "
                     f"{fit['slope_se']:.3f} (scatter {fit['se_scatter']:.3f}, grid and ties "
                     f"{fit['se_grid']:.3f}) over {fit['n']} batch sizes; linear rule 1, "
                     "square-root rule 0.5")
    return lines


def notes(analysis: exp.BatchSizeAnalysis, plan: exp.BatchSizePlan) -> list[str]:
    out = []
    for r in analysis.best[analysis.best["at_edge"]].itertuples():
        out.append(f"{r.optimizer} at batch {r.batch_size}: the best rate {r.best_lr:.3g} is the "
                   "grid's edge; widen --grid to see past it.")
    for r in analysis.best[analysis.best["best_lr"].isna()].itertuples():
        out.append(f"{r.optimizer} at batch {r.batch_size}: every rate diverged.")
    lost = analysis.rates[analysis.rates["n_diverged"] > 0]
    if not lost.empty:
        out.append(f"{int(lost['n_diverged'].sum())} runs diverged; their rates count as "
                   "infinitely bad.")
    if len(plan.seeds) < 3:
        out.append(f"{len(plan.seeds)} seed(s): too few to judge ties (3 or more).")
    return out


def log_results(parent: str, analysis: exp.BatchSizeAnalysis, results: pd.DataFrame) -> None:
    """The figure, the tables, each optimizer's slope and the verdict on the parent run."""
    from lrpipe.plots.batch_size import plot_best_rate_vs_batch_size  # drawing loads here

    tracking.log_figure(parent, plot_best_rate_vs_batch_size(analysis.lines), FIGURE)
    for name, table in (("summary.csv", analysis.best), ("rates.csv", analysis.rates),
                        ("fits.csv", analysis.fits), ("runs.csv", results),
                        ("lines.csv", analysis.lines)):
        tracking.log_table(parent, table, name)
    metrics = {}
    for fit in analysis.fits.to_dict("records"):
        metrics[f"slope_{fit['optimizer']}"] = fit["slope"]
        metrics[f"slope_se_{fit['optimizer']}"] = fit["slope_se"]
    tracking.log_metrics(parent, metrics, step=0)
    tracking.set_tags(parent, {"mlflow.note.content": analysis.answer})


def print_summary(analysis, plan, parent: str, experiment: str, seconds: float) -> None:
    url = tracking.run_url(parent, experiment)
    print(f"\nbatch_size: {len(analysis.rates)} (optimizer, batch, rate) cells x "
          f"{len(plan.seeds)} seeds in {seconds:.0f} s")
    print(report.terminal_summary(
        analysis.answer, evidence(analysis, plan), best_table(analysis.best),
        {"the parent run (figure, tables)": url,
         "its report": f"{url.split('?')[0]}/artifacts/report.md"}, notes(analysis, plan)))


@flow(name="batch-size")
def batch_size(
    batch_sizes: list[int] | None = None,
    optimizers: list[str] | None = None,
    seeds: list[int] | None = None,
    epochs: int = exp.DEFAULT_EPOCHS,
    reference_batch: int = exp.DEFAULT_REFERENCE_BATCH,
    reference_rates: dict[str, float] | None = None,
    grid: list[float] | None = None,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
) -> dict:
    """Train the plan, find the best rate per (optimizer, batch size), fit the slope and say
    which rule it follows. Returns the parent run id, the best rates and fits (records) and the
    verdicts."""
    check_runner(runner)
    plan, base, cfgs = make_plan(batch_sizes, optimizers, seeds, epochs, reference_batch,
                                 reference_rates, grid, overrides)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    with parent_run(experiment, "batch-size", [c.hash() for c in cfgs],
                    f"batch size {','.join(plan.optimizers)} {base.model.name} "
                    f"{plan.batch_sizes[0]}-{plan.batch_sizes[-1]}",
                    params=_params(plan, base, runner)) as parent:
        with task_resources(runner):
            finals = train_planned(
                cfgs, parent, experiment,
                [runs.training_run_name(c, prefix=f"batch={c.batch_size} ") for c in cfgs],
                threads=threads, workers=parallel_tasks(runner, workers),
                tags={"sweep": parent}, uri=tracking.tracking_uri(), label="batch-size")
        results = exp.results_table(cfgs, finals)
        analysis = exp.analyze(results, plan.reference_batch)
        log_results(parent, analysis, results)
        publish_flow_report(parent, experiment, "The learning rate against the batch size",
                            analysis.answer, best_table(analysis.best),
                            evidence(analysis, plan), notes(analysis, plan), key=EXPERIMENT)
    print_summary(analysis, plan, parent, experiment, time.perf_counter() - start)
    return {"parent_run_id": parent, "best": analysis.best.to_dict("records"),
            "fits": analysis.fits.to_dict("records"), "verdicts": analysis.verdicts,
            "answer": analysis.answer}


def check(batch_sizes=None, optimizers=None, seeds=None, epochs=exp.DEFAULT_EPOCHS,
          reference_batch=exp.DEFAULT_REFERENCE_BATCH, reference_rates=None, grid=None,
          overrides=None, experiment=EXPERIMENT) -> tuple[dict, list[TrainConfig]]:
    """The flow's keyword arguments and the configs to preflight, or a ConfigError naming the
    field. One config per (optimizer, batch size): rates and seeds change nothing the
    preflight checks (data, batch size against the data, optimizer)."""
    check_number("epochs", epochs, low=1, integer=True)
    plan, _, cfgs = make_plan(batch_sizes, optimizers, seeds, epochs, reference_batch,
                              reference_rates, grid, overrides)
    kwargs = {"batch_sizes": list(plan.batch_sizes), "optimizers": list(plan.optimizers),
              "seeds": list(plan.seeds), "epochs": epochs, "reference_batch": reference_batch,
              "reference_rates": dict(plan.reference_rates), "grid": list(plan.grid),
              "overrides": overrides, "experiment": experiment}
    return kwargs, list({(c.optim.name, c.batch_size): c for c in cfgs}.values())
