"""The lr_search flow's subset tasks: a range test and a halving search per seed, each a
child run of the search's parent, and ``explore_subset``, which puts them all in flight.

The range tests of all seeds run as one batched task when the declared batching policy says so
(``engine.many.trains_batched`` on the seeds' members: the config's ``batching`` field, and for
auto the rule of ``batching_rule``), else one task per seed; each halving search trains windows
of rungs batched by the same policy (``halving_window``). Either way every seed is its own
child run with the same metrics, tagged ``trained`` (batched | alone).
"""

from __future__ import annotations

import contextlib
import math

import pandas as pd
import torch
from prefect import task, unmapped

from flows.common import collect, dataset_for, task_resources
from lrpipe import procs, tracking
from lrpipe.engine.config import TrainConfig, from_dict, to_dict
from lrpipe.engine.many import trains_batched
from lrpipe.search.choose import halving_search
from lrpipe.search.rangetest import range_test_config
from lrpipe.search.seeds import member_cfgs, range_test_batched

RANGE_OPTS = {"min_lr": 1e-5, "max_lr": 10.0}  # reference rates at the ramp's ends
HALVING_OPTS = {"start_lr": 10.0, "factor": 0.5, "min_lr": 1e-5, "budget_epochs": 1}


# --- tasks --------------------------------------------------------------------------------

def _range_run(cfg: TrainConfig, seed: int, parent_run_id: str, experiment: str,
               num_steps: int, uri: str | None):
    """The child run of one seed's range test (a context: FAILED if the body raises)."""
    name = f"range test {cfg.optim.name} {cfg.model.name} seed={seed}"
    return tracking.training_run(cfg.replace(seed=seed), experiment, parent_run_id, name=name,
                                 uri=uri, tags={"role": "range_test",
                                                **procs.process_tags()})


def _log_range_curve(run_id: str, seed: int, curve: pd.DataFrame, num_steps: int,
                     batched: bool, uri: str | None) -> dict:
    """A range test's params, per-step metrics, table and stop reason on its child run."""
    stop_reason = str(curve["stop_reason"].iloc[0]) if len(curve) else "no steps"
    tracking.log_params(run_id, {**{f"range.{k}": v for k, v in RANGE_OPTS.items()},
                                 "range.num_steps": num_steps}, uri=uri)
    for row in curve.itertuples(index=False):
        tracking.log_metrics(run_id, {"range_test_loss": row.loss, "lr": row.lr,
                                      "range_test_smoothed": row.smoothed}, step=row.step,
                             uri=uri)
    tracking.log_table(run_id, curve, "range_test.csv", uri=uri)
    tracking.set_tags(run_id, {"stop_reason": stop_reason,
                               "trained": "batched" if batched else "alone"}, uri=uri)
    return {"run_id": run_id, "seed": seed, "stop_reason": stop_reason,
            "curve": curve.assign(seed=seed)[["seed", *curve.columns]].to_dict("records")}


@task(name="range-test", task_run_name="range test seed={seed}")
def range_test_seed(cfg_dict: dict, seed: int, parent_run_id: str, experiment: str,
                    num_steps: int, threads: int = 1, uri: str | None = None) -> dict:
    """One range test on the subset as a child run: loss, smoothed loss and lr per step.
    ``uri`` names the tracking store for workers on other machines (default: their env)."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    with _range_run(cfg, seed, parent_run_id, experiment, num_steps, uri) as run_id:
        result = range_test_config(cfg.replace(seed=seed), dataset_for(cfg), seed=seed,
                                   num_steps=num_steps, **RANGE_OPTS)
        return _log_range_curve(run_id, seed, result.to_frame(), num_steps, False, uri)


@task(name="range-tests", task_run_name="range tests seeds={seeds} together")
def range_test_seeds_together(cfg_dict: dict, seeds: list[int], parent_run_id: str,
                              experiment: str, num_steps: int, threads: int = 1,
                              uri: str | None = None) -> list[dict]:
    """Every seed's range test as one batched computation (``range_test_batched``), a child
    run per seed as ``range_test_seed`` logs it; one result per seed, in order."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    with contextlib.ExitStack() as stack:  # every seed's run ends FAILED if the test raises
        run_ids = [stack.enter_context(_range_run(cfg, s, parent_run_id, experiment,
                                                  num_steps, uri)) for s in seeds]
        table = range_test_batched(cfg, dataset_for(cfg), seeds, num_steps=num_steps,
                                   **RANGE_OPTS)
        return [_log_range_curve(run_id, s, table[table["seed"] == s].drop(columns="seed")
                                 .reset_index(drop=True), num_steps, True, uri)
                for run_id, s in zip(run_ids, seeds, strict=True)]


@task(name="halving", task_run_name="halving seed={seed}")
def halving_seed(cfg_dict: dict, seed: int, parent_run_id: str, experiment: str,
                 threads: int = 1, uri: str | None = None) -> dict:
    """One halving search on the subset as a child run: each rung's rate and loss by rung."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict).replace(seed=seed)
    name = f"halving {cfg.optim.name} {cfg.model.name} seed={seed}"
    with tracking.training_run(cfg, experiment, parent_run_id, name=name, uri=uri,
                               tags={"role": "halving", **procs.process_tags()}) as run_id:
        tracking.log_params(run_id, {f"halving.{k}": v for k, v in HALVING_OPTS.items()},
                            uri=uri)
        result = halving_search(cfg, dataset_for(cfg), window="auto", **HALVING_OPTS)
        tracking.log_params(run_id, {"halving.window": result.window}, uri=uri)
        tracking.log_metrics(run_id, {"rungs_trained": result.rungs_trained}, step=0, uri=uri)
        for i, row in enumerate(result.ladder.itertuples(index=False)):
            loss = None if math.isnan(row.loss) else row.loss  # a diverged rung has no loss
            tracking.log_metrics(run_id, {"lr": row.lr, "rung_loss": loss,
                                          "rung_diverged": float(row.diverged)}, step=i,
                                 uri=uri)
        tracking.log_table(run_id, result.ladder, "ladder.csv", uri=uri)
        tracking.log_metrics(run_id, {"halving_lr": result.chosen_lr}, step=0, uri=uri)
        tracking.set_tags(run_id, {"reason": result.reason}, uri=uri)
    return {"run_id": run_id, "seed": seed, "chosen_lr": result.chosen_lr,
            "reason": result.reason,
            "ladder": result.ladder.assign(seed=seed).to_dict("records")}


def _describe(result: dict | list[dict]) -> str:
    if isinstance(result, list):
        return "; ".join(map(_describe, result))
    if "curve" in result:
        last = result["curve"][-1] if result["curve"] else {"lr": math.nan}
        return (f"range test seed={result['seed']}: {len(result['curve'])} steps, "
                f"{result['stop_reason']} at lr {last['lr']:.3g}")
    lr = result["chosen_lr"]
    return f"halving seed={result['seed']}: " + ("every rung diverged" if lr is None
                                                  else f"lr {lr:.3g}")


def explore_subset(sub: TrainConfig, seeds: list[int], parent: str, experiment: str,
                   range_steps: int, runner: str, threads: int) -> tuple[pd.DataFrame, list]:
    """Range tests and halving searches, all in flight together: the range tests as one
    batched task when the declared policy batches the seeds' members (``trains_batched``),
    else one task per seed; one halving task per seed (each batches windows of rungs by the
    same policy)."""
    cfg_dict, uri = to_dict(sub), tracking.tracking_uri()
    together = len(seeds) > 1 and trains_batched(member_cfgs(sub, dataset_for(sub), seeds))
    with task_resources(runner):
        if together:
            tests = [range_test_seeds_together.submit(cfg_dict, list(seeds), parent,
                                                      experiment, range_steps, threads, uri)]
        else:
            tests = range_test_seed.map(unmapped(cfg_dict), seeds, unmapped(parent),
                                        unmapped(experiment), unmapped(range_steps),
                                        unmapped(threads), unmapped(uri))
        halvings = halving_seed.map(unmapped(cfg_dict), seeds, unmapped(parent),
                                    unmapped(experiment), unmapped(threads), unmapped(uri))
    curves = collect(tests, "range-test", _describe)
    if together:
        curves = curves[0]
    ladders = collect(halvings, "halving", _describe)
    return pd.DataFrame([row for r in curves for row in r["curve"]]), ladders
