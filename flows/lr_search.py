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
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from prefect import flow

from flows.batched import train_planned
from flows.cli import parse_seeds
from flows.common import (
    check_runner,
    check_workers,
    parallel_tasks,
    preflight,
    set_torch_threads,
    task_resources,
)
from flows.harness import call_flow, flow_parent
from flows.report import publish_flow_report
from flows.search_tasks import HALVING_OPTS, RANGE_OPTS, explore_subset
from lrpipe import runs, tracking
from lrpipe.engine.config import ConfigError, TrainConfig, check_number, merge, to_dict
from lrpipe.plots.search import plot_halving, plot_range_test, plot_regret
from lrpipe.search.choose import (
    RTOL,
    candidate_grid,
    candidate_rates,
    chosen_band,
    cross_check,
    decide_rate,
    log_median_band,
    neighbour_rates,
    regret_table,
)
from lrpipe.search.rangetest import suggest_band
from lrpipe.search.suggest import RULES

HELP = "find a learning rate: range test + halving search on a subset, checked on full data"
EXAMPLES = """examples:
  lrpipe search                                 # MLP, SGD, 5000 Fashion-MNIST examples, 3 seeds
  lrpipe search --subset 2000 --seeds 0,1,2,3 --regret-epochs 2
  lrpipe search --set optim.name=adam           # the same search for another optimizer
  lrpipe search --config search.yaml            # YAML: {subset: 5000, seeds: [0, 1, 2], ...}
"""
EXPERIMENT = "lr-search"
DEFAULT_SUBSET = 5000  # training examples the range test and halving rungs see (seeded draw)
DEFAULT_SEEDS = (0, 1, 2)  # halving answers 0.156 / 0.039 / 0.078 for these: report a band
DEFAULT_RANGE_STEPS = 100  # range-test updates (about 2.5 epochs of 5000 at batch 128)
DEFAULT_REGRET_EPOCHS = 3  # epochs of full-data training per candidate and grid rate
DEFAULT_GRID_SPAN = 1.0  # decades of grid below the lowest and above the highest candidate
POINTS_PER_DECADE = 2  # coarse grid: 0.01, 0.0316, 0.1, 0.316, ...


# --- pure helpers (the choice itself is lrpipe.search.choose's) -----------------------------

def search_configs(overrides: Mapping | None, subset: int,
                   regret_epochs: int) -> tuple[TrainConfig, TrainConfig]:
    """(full-data config for the regret runs, subset config for range test and halving)."""
    check_number("subset", subset, low=1, integer=True)
    check_number("regret_epochs", regret_epochs, low=1, integer=True)
    base = merge(TrainConfig(), {**(overrides or {}), "epochs": regret_epochs})
    return base, base.replace(**{"data.subset": subset})


def check_search(seeds, range_steps, grid_span) -> list[int]:
    """The seeds as a list; bad values are a ConfigError naming the setting."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__") or len(seeds) == 0:
        raise ConfigError(f"seeds: got {seeds!r}; allowed: a non-empty list of integers >= 0 "
                          "(3 or more for a band)")
    for s in seeds:
        check_number("seeds", s, low=0, integer=True)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: got {list(seeds)}; allowed: distinct seeds")
    check_number("range_steps", range_steps, low=5, integer=True)
    check_number("grid_span", grid_span, low=0.0)
    return list(seeds)


# --- the flow's steps ---------------------------------------------------------------------

def summarize_evidence(curves: pd.DataFrame, halvings: list[dict]) -> dict:
    """Bands (halving first, then each rule), candidates and the cross-check table."""
    rules = {rule: suggest_band(curves, rule) for rule in RULES}
    bands = {"halving": log_median_band([h["chosen_lr"] for h in halvings]),
             **{rule: tuple(band[:3]) for rule, band in rules.items()}}
    candidates = candidate_rates(bands)
    halving_lr = bands["halving"][0]
    check = (cross_check(halving_lr, {r: bands[r][0] for r in RULES}) if halving_lr is not None
             else pd.DataFrame(columns=["rule", "lr", "ratio_to_halving", "log10_ratio"]))
    per_seed = pd.DataFrame(
        [{"method": "halving", "seed": h["seed"], "lr": h["chosen_lr"], "reason": h["reason"]}
         for h in halvings]
        + [{"method": rule, "seed": seed, "lr": s.lr, "reason": s.reason}
           for rule, band in rules.items()
           for seed, s in zip(sorted(curves["seed"].unique()), band.per_seed, strict=True)])
    return {"bands": bands, "candidates": candidates, "cross_check": check,
            "per_seed": per_seed}


def run_grid(base: TrainConfig, candidates: dict[str, float], grid_span: float, parent: str,
             experiment: str, runner: str, threads: int, workers: int | None) -> pd.DataFrame:
    """Full-data training at every candidate and coarse-grid rate, one child run each."""
    grid = candidate_grid(list(candidates.values()), POINTS_PER_DECADE, grid_span)
    cfgs = [base.replace(**{"optim.lr": lr}) for lr in grid]
    roles = [[n for n, r in candidates.items() if math.isclose(r, lr, rel_tol=RTOL)]
             for lr in grid]
    names = [runs.training_run_name(c) + (f" ({', '.join(r)})" if r else "")
             for c, r in zip(cfgs, roles, strict=True)]
    tags = [{"role": "candidate" if r else "grid", "candidates": ",".join(r)} for r in roles]
    with task_resources(runner):  # rates batched into one task where measured faster
        results = train_planned(cfgs, parent, experiment, names, threads=threads,
                                workers=parallel_tasks(runner, workers), tags=tags,
                                uri=tracking.tracking_uri(), label="regret")
    cols = ["lr", "status", "val_loss", "val_error", "diverged_epoch", "name", "run_id"]
    return pd.DataFrame(results)[cols]


def halving_figure(halvings: list[dict]) -> Figure:
    """One ``plot_halving`` panel per seed, side by side."""
    fig = Figure(figsize=(4.0 * len(halvings), 4.0), layout="constrained")
    for ax, h in zip(np.atleast_1d(fig.subplots(1, len(halvings))), halvings, strict=True):
        plot_halving(pd.DataFrame(h["ladder"]), ax=ax)
        lr = h["chosen_lr"]
        ax.set_title(f"halving seed={h['seed']}: " + ("none" if lr is None else f"{lr:.3g}"))
    return fig


def log_parent(parent: str, evidence: dict, curves: pd.DataFrame, halvings: list[dict],
               grid: pd.DataFrame, regret: pd.DataFrame, choice: dict) -> None:
    """Figures, tables, metrics, tags and the report on the parent run."""
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


def _rate(x: float | None) -> str:
    return "none" if x is None or not math.isfinite(x) else f"{x:.3g}"


def search_report(evidence: dict, halvings: list[dict], grid: pd.DataFrame,
                  regret: pd.DataFrame, choice: dict, regret_epochs: int) -> str:
    """The answer and its evidence, as plain text (printed and logged as report.txt)."""
    lo, hi = choice["band"]
    median, h_lo, h_hi = evidence["bands"]["halving"]
    lines = [f"Chosen rate: {_rate(choice['lr'])}  (band {_rate(lo)}..{_rate(hi)}, "
             f"chosen by {choice['chosen_by']})", f"  why: {choice['reason']}", "",
             "Halving search ({budget_epochs}-epoch rungs from {start_lr:g}, x{factor:g}): "
             .format(**HALVING_OPTS)
             + ", ".join(f"seed {h['seed']} -> {_rate(h['chosen_lr'])}" for h in halvings),
             f"  median {_rate(median)}, spread {_rate(h_lo)}..{_rate(h_hi)}"
             + (f" ({h_hi / h_lo:.1f}x)" if h_lo else ""), "",
             "Range-test suggestions (median and min..max over seeds):"]
    for rule in RULES:
        m, r_lo, r_hi = evidence["bands"][rule]
        lines.append(f"  {rule:<12} {_rate(m):>8}   {_rate(r_lo)}..{_rate(r_hi)}")
    table = evidence["cross_check"]
    if len(table):
        lines += ["", "Cross-check against the halving median:",
                  table.to_string(index=False, float_format="%.3g")]
    lines += ["", f"Regret ({regret_epochs} epochs of full-data training; regret = val loss / "
              "grid best - 1):", regret.to_string(index=False, float_format="%.4g"), "",
              "Grid:", grid.drop(columns=["run_id", "name"]).to_string(
                  index=False, float_format="%.4g")]
    return "\n".join(lines)


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
) -> dict:
    """Range test + halving search on a subset over seeds, then a regret check on full data.

    Returns:
        parent_run_id, chosen_lr, band (lo, hi), chosen_by, reason, candidates (name -> rate),
        bands (name -> (median, lo, hi)), grid (rates trained), grid_results (records: lr,
        status, val_loss, val_error, ...), regret (records), neighbours (chosen rate, its
        nearest coarse-grid rates and the grid's best: what full training should run).
    """
    check_runner(runner)
    base, sub = search_configs(overrides, subset, regret_epochs)
    seeds = check_search(seeds, range_steps, grid_span)
    start = time.perf_counter()
    threads = set_torch_threads(runner, workers)
    with flow_parent("lr-search", experiment, f"search {base.optim.name} {base.model.name} "
                                f"{base.data.dataset} subset={subset}", params={
                                    "subset": subset, "seeds": seeds, "range_steps": range_steps,
                                    "regret_epochs": regret_epochs, "grid_span": grid_span,
                                    "points_per_decade": POINTS_PER_DECADE, "runner": runner,
                                    "range_opts": RANGE_OPTS, "halving_opts": HALVING_OPTS,
                                    "base_config": tracking.to_json(to_dict(base))}) as parent:
        curves, halvings = explore_subset(sub, seeds, parent, experiment, range_steps, runner,
                                          threads)
        evidence = summarize_evidence(curves, halvings)
        grid = run_grid(base, evidence["candidates"], grid_span, parent, experiment, runner,
                        threads, workers)
        regret = regret_table(grid, evidence["candidates"])
        lr, chosen_by, reason = decide_rate(regret)
        choice = {"lr": lr, "chosen_by": chosen_by, "reason": reason,
                  "band": chosen_band(lr, evidence["candidates"], evidence["bands"])}
        log_parent(parent, evidence, curves, halvings, grid, regret, choice)
        report = search_report(evidence, halvings, grid, regret, choice, regret_epochs)
        tracking.log_text(parent, report, "report.txt")
        lo, hi = choice["band"]
        publish_flow_report(
            parent, experiment, "Learning-rate search",
            f"Chosen rate: {choice['lr']:.3g} (band {lo:.3g}..{hi:.3g}, chosen by "
            f"{choice['chosen_by']})", regret,
            evidence=[choice["reason"], *[line.strip() for line in report.splitlines()
                                          if line.strip()][2:]])
    print(f"\nlr_search: {base.data.dataset} subset of {subset}, seeds "
          f"{','.join(map(str, seeds))}, {len(grid)} full-data runs, "
          f"in {time.perf_counter() - start:.0f} s\n{report}")
    print(f"MLflow: {tracking.run_url(parent, experiment)}  (start the UI with `make ui`)")
    best = float(regret["best_lr"].iloc[0])
    return {"parent_run_id": parent, "experiment": experiment, "chosen_lr": lr,
            "band": choice["band"], "chosen_by": chosen_by, "reason": reason,
            "candidates": evidence["candidates"], "bands": evidence["bands"],
            "grid": grid["lr"].tolist(), "grid_results": grid.to_dict("records"),
            "regret": regret.to_dict("records"), "best_grid_lr": best,
            "neighbours": neighbour_rates(grid["lr"].tolist(),
                                          list(evidence["candidates"].values()), lr, best)}


def add_arguments(parser) -> None:
    parser.add_argument("--subset", type=int, help="training examples for the range test and "
                        f"halving rungs (default {DEFAULT_SUBSET})")
    parser.add_argument("--seeds", type=parse_seeds, help="comma-separated seeds (default "
                        f"{','.join(map(str, DEFAULT_SEEDS))}; 3 or more for a band)")
    parser.add_argument("--range-steps", type=int, help="range-test updates per seed "
                        f"(default {DEFAULT_RANGE_STEPS})")
    parser.add_argument("--regret-epochs", type=int, help="epochs of full-data training per "
                        f"candidate and grid rate (default {DEFAULT_REGRET_EPOCHS})")
    parser.add_argument("--grid-span", type=float, help="decades of grid around the candidates "
                        f"(default {DEFAULT_GRID_SPAN:g})")


def validate(subset=DEFAULT_SUBSET, seeds=DEFAULT_SEEDS, range_steps=DEFAULT_RANGE_STEPS,
             regret_epochs=DEFAULT_REGRET_EPOCHS, grid_span=DEFAULT_GRID_SPAN, overrides=None,
             runner="threads", workers=None) -> None:
    """Every check that can fail, before anything is recorded: settings, configs, runner,
    workers, tracking store, then data, subset and batch sizes and optimizer (``preflight``)."""
    check_runner(runner)
    check_workers(workers)
    base, sub = search_configs(overrides, subset, regret_epochs)
    check_search(seeds, range_steps, grid_span)
    tracking.check_tracking_uri(tracking.tracking_uri())
    preflight([base, sub])


def run(subset=DEFAULT_SUBSET, seeds=DEFAULT_SEEDS, range_steps=DEFAULT_RANGE_STEPS,
        regret_epochs=DEFAULT_REGRET_EPOCHS, grid_span=DEFAULT_GRID_SPAN, overrides=None,
        runner="threads", workers=None) -> dict:
    """Validate every input, then run the flow with the chosen task runner (process runners
    share one Prefect API, started here if none is configured)."""
    validate(subset, seeds, range_steps, regret_epochs, grid_span, overrides, runner, workers)
    return call_flow(lr_search,
                     subset=subset, seeds=list(seeds), range_steps=range_steps,
                     regret_epochs=regret_epochs, grid_span=grid_span, overrides=overrides,
                     runner=runner, workers=workers)


if __name__ == "__main__":
    run()
