"""Flow ``lr_search``: find a learning rate on a data subset, then check it on the full data.

Three steps, one parent MLflow run (experiment ``lr-search``):
1. On a seeded subset (default 5,000 Fashion-MNIST examples), the LR range test and the
   halving search run per seed (``flows.search_tasks``: batched where measured to pay); each
   seed's test and search is a child run (the range test's curve as a metric series with
   step = range-test step, the halving ladder as rungs).
2. Each rule's suggestion and the halving answer are summarized over seeds (median in log rate,
   min..max band) and cross-checked against each other.
3. Regret: a short full-data training at every candidate (halving median, each rule's median)
   and at a coarse log grid around them; the candidate with the lowest validation loss wins,
   and the report says how far it is from the grid's best rate.

A re-run of a killed search resumes into its parent (``flows.harness``) and reuses every child
that FINISHED: range tests and halving searches by their task key (``flows.search_tasks``),
regret runs by config hash (``flows.batched``); rebuilt from what they logged, their results
give the answer an uninterrupted run gives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from prefect import flow

from flows.batched import train_planned
from flows.common import check_runner, parallel_tasks, set_torch_threads, task_resources
from flows.harness import flow_parent
from flows.report import log_confirmation, publish_flow_report, where_to_click
from flows.search_tasks import explore_subset
from lrpipe import runs, tracking
from lrpipe.engine.config import TrainConfig, to_dict
from lrpipe.experiments.confirm import check_fresh_seeds, confirm
from lrpipe.report import final_metrics
from lrpipe.search.choose import chosen_band, decide_rate, neighbour_rates, regret_table
from lrpipe.search.plan import (
    DEFAULT_CONFIRM_SEEDS,
    DEFAULT_GRID_SPAN,
    DEFAULT_RANGE_STEPS,
    DEFAULT_REGRET_EPOCHS,
    DEFAULT_SEEDS,
    DEFAULT_SUBSET,
    EXPERIMENT,
    GRID_COLUMNS,
    HALVING_OPTS,
    POINTS_PER_DECADE,
    RANGE_OPTS,
    SEARCHED_FOR_TAG,
    SEARCHED_TAG,
    check_search,
    confirm_plan,
    describe_searched,
    grid_plan,
    rival_rate,
    search_configs,
    search_report,
    searched_identity,
    summarize_evidence,
)
from lrpipe.search.report import regret_display, search_notes, search_tables

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# --- the flow's steps ---------------------------------------------------------------------

def run_grid(base: TrainConfig, candidates: dict[str, float], grid_span: float, parent: str,
             experiment: str, runner: str, threads: int, workers: int | None) -> pd.DataFrame:
    """Full-data training at every candidate and coarse-grid rate, one child run each."""
    cfgs, names, tags = grid_plan(base, candidates, grid_span, runs.training_run_name)
    with task_resources(runner):  # rates batched into one task where measured faster
        results = train_planned(cfgs, parent, experiment, names, threads=threads,
                                workers=parallel_tasks(runner, workers), tags=tags,
                                uri=tracking.tracking_uri(), label="regret")
    return pd.DataFrame(results)[GRID_COLUMNS]


def halving_figure(halvings: list[dict]) -> Figure:
    """One ``plot_halving`` panel per seed, side by side."""
    from matplotlib.figure import Figure  # drawing libraries load here, after training

    from lrpipe.plots.search import plot_halving

    fig = Figure(figsize=(4.0 * len(halvings), 4.0), layout="constrained")
    for ax, h in zip(np.atleast_1d(fig.subplots(1, len(halvings))), halvings, strict=True):
        plot_halving(pd.DataFrame(h["ladder"]), ax=ax)
        lr = h["chosen_lr"]
        ax.set_title(f"halving seed={h['seed']}: " + ("none" if lr is None else f"{lr:.3g}"))
    return fig


def log_parent(parent: str, evidence: dict, curves: pd.DataFrame, halvings: list[dict],
               grid: pd.DataFrame, regret: pd.DataFrame, choice: dict) -> None:
    """Figures, tables, metrics, tags and the report on the parent run."""
    from lrpipe.plots.search import plot_range_test, plot_regret

    tracking.log_figure(parent, plot_range_test(curves, evidence["bands"]), "range_test")
    tracking.log_figure(parent, halving_figure(halvings), "halving")
    tracking.log_figure(parent, plot_regret(grid, regret), "regret")
    ladders = pd.DataFrame([row for h in halvings for row in h["ladder"]])
    for df, path in ((curves, "range_test_curves.csv"), (ladders, "halving_ladders.csv"),
                     (evidence["per_seed"], "suggestions_per_seed.csv"),
                     (evidence["cross_check"], "cross_check.csv"), (grid, "grid.csv"),
                     (regret, "regret.csv")):
        tracking.log_table(parent, df, path)
    metrics = {"chosen_lr": choice["lr"], "chosen_lr_lo": choice["band"][0],
               "chosen_lr_hi": choice["band"][1]}
    for name, (median, lo, hi) in evidence["bands"].items():
        metrics.update({f"{name}_lr": median, f"{name}_lr_lo": lo, f"{name}_lr_hi": hi})
    metrics.update({f"regret/{r.name}": r.regret for r in regret.itertuples()
                    if math.isfinite(r.regret)})
    tracking.log_metrics(parent, metrics, step=0)
    tracking.set_tags(parent, {"chosen_lr": f"{choice['lr']:.4g}", "chosen_by":
                               choice["chosen_by"], "reason": choice["reason"][:5000]})


def confirm_choice(base: TrainConfig, grid: pd.DataFrame, lr: float, seeds: Sequence[int],
                   parent: str, experiment: str, runner: str, threads: int,
                   workers: int | None) -> dict | None:
    """The chosen rate and its closest rival (``rival_rate``) on the fresh ``seeds`` at the
    regret budget; logged as ``confirm.csv``, metrics ``confirmed_val_loss*`` and the tag
    ``confirm_verdict``. None when there are no seeds or no rival."""
    rival = rival_rate(grid, lr)
    if not seeds or rival is None:
        return None
    cfgs, names, tags = confirm_plan(base, lr, rival, seeds, runs.training_run_name)
    with task_resources(runner):
        results = train_planned(cfgs, parent, experiment, names, threads=threads,
                                workers=parallel_tasks(runner, workers), tags=tags,
                                uri=tracking.tracking_uri(), label="confirm")
    table = final_metrics(pd.DataFrame(results))
    table["arm"] = [c.optim.lr for c in cfgs]
    table["seed"] = [c.seed for c in cfgs]
    record = confirm(table, "val_loss", lr, rival, seeds=seeds, metric="validation loss",
                     what=f"The chosen rate against the closest rival ({base.epochs} epochs)",
                     names=[f"lr {lr:.3g}", f"lr {rival:.3g}"])
    tracking.log_metrics(parent, {k: v for k, v in {
        "confirmed_val_loss": record["mean"], "confirmed_val_loss_lo": record["lo"],
        "confirmed_val_loss_hi": record["hi"], "confirm_margin": record["margin"]}.items()
        if math.isfinite(v)}, step=0)
    return {**log_confirmation(parent, record, rival, "chosen", f"{rival:.4g}"),
            "summary": record["summary"]}


@flow(name="lr-search")
def lr_search(
    subset: int = DEFAULT_SUBSET,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    range_steps: int = DEFAULT_RANGE_STEPS,
    regret_epochs: int = DEFAULT_REGRET_EPOCHS,
    grid_span: float = DEFAULT_GRID_SPAN,
    overrides: dict | None = None,
    runner: str = "threads",
    workers: int | None = None,
    experiment: str = EXPERIMENT,
    confirm_seeds: Sequence[int] = DEFAULT_CONFIRM_SEEDS,
) -> dict:
    """Range test + halving search on a subset over seeds, then a regret check on full data,
    then the chosen rate and its closest rival again on fresh seeds (``confirm_seeds``; empty:
    no confirmation).

    Returns:
        parent_run_id, chosen_lr, band (lo, hi), chosen_by, reason, candidates (name -> rate),
        bands (name -> (median, lo, hi)), grid (rates trained), grid_results (records: lr,
        status, val_loss, val_error, ...), regret (records), neighbours (chosen rate, its
        nearest coarse-grid rates and the grid's best: what full training should run).
    """
    check_runner(runner)
    base, sub = search_configs(overrides, subset, regret_epochs)
    seeds = check_search(seeds, range_steps, grid_span)
    confirm_seeds = check_fresh_seeds(confirm_seeds, [*seeds, base.seed])
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    with flow_parent("lr-search", experiment, f"search {base.optim.name} {base.model.name} "
                                f"{base.data.dataset} subset={subset}", params={
                                    "subset": subset, "seeds": seeds, "range_steps": range_steps,
                                    "regret_epochs": regret_epochs, "grid_span": grid_span,
                                    "points_per_decade": POINTS_PER_DECADE, "runner": runner,
                                    "range_opts": RANGE_OPTS, "halving_opts": HALVING_OPTS,
                                    "base_config": tracking.to_json(to_dict(base)),
                                    **({"confirm_seeds": list(confirm_seeds)} if confirm_seeds
                                       else {})},
                     tags={SEARCHED_TAG: searched_identity(base),
                           SEARCHED_FOR_TAG: describe_searched(base)}) as parent:
        curves, halvings = explore_subset(sub, seeds, parent, experiment, range_steps, runner,
                                          threads)
        evidence = summarize_evidence(curves, halvings)
        grid = final_metrics(run_grid(base, evidence["candidates"], grid_span, parent,
                                      experiment, runner, threads, workers))
        regret = regret_table(grid, evidence["candidates"])
        lr, chosen_by, reason = decide_rate(regret)
        choice = {"lr": lr, "chosen_by": chosen_by, "reason": reason,
                  "band": chosen_band(lr, evidence["candidates"], evidence["bands"])}
        log_parent(parent, evidence, curves, halvings, grid, regret, choice)
        confirmation = confirm_choice(base, grid, lr, confirm_seeds, parent, experiment, runner,
                                      threads, workers)
        report = search_report(evidence, halvings, grid, regret, choice, regret_epochs)
        if confirmation is not None:
            report += "\n" + confirmation["line"] + "\n"
        tracking.log_text(parent, report, "report.txt")
        lo, hi = choice["band"]
        publish_flow_report(
            parent, experiment, "Learning-rate search",
            f"Chosen rate: {choice['lr']:.3g} (band {lo:.3g}..{hi:.3g}, chosen by "
            f"{choice['chosen_by']})", regret_display(regret), evidence=[
                f"in-sample (the runs that chose, selection split): {choice['reason']}"] + (
                [] if confirmation is None else [confirmation["line"]]),
            notes=search_notes(regret, grid, choice["lr"]),
            tables=search_tables(evidence["bands"], evidence["cross_check"], regret, grid),
            key="lr-search")
    print(f"\nlr_search: {base.data.dataset} subset of {subset}, seeds "
          f"{','.join(map(str, seeds))}, {len(grid)} full-data runs, "
          f"in {time.perf_counter() - start:.0f} s\n{report}")
    print(where_to_click(parent, experiment), flush=True)
    best = float(regret["best_lr"].iloc[0])
    return {"parent_run_id": parent, "experiment": experiment, "chosen_lr": lr,
            "band": choice["band"], "chosen_by": chosen_by, "reason": reason,
            "candidates": evidence["candidates"], "bands": evidence["bands"],
            "grid": grid["lr"].tolist(), "grid_results": grid.to_dict("records"),
            "regret": regret.to_dict("records"), "best_grid_lr": best,
            "confirmation": None if confirmation is None else {
                k: v for k, v in confirmation.items() if k != "summary"},
            "neighbours": neighbour_rates(grid["lr"].tolist(),
                                          list(evidence["candidates"].values()), lr, best)}
