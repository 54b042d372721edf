"""The lr_search flow's subset tasks: a range test and a halving search per seed, each a
child run of the search's parent, and ``explore_subset``, which puts them all in flight.

The range tests of all seeds run as one batched task when the declared batching policy says so
(``engine.many.trains_batched`` on the seeds' members: the config's ``batching`` field, and for
auto the rule of ``batching_rule``), else one task per seed; each halving search trains windows
of rungs batched by the same policy (``halving_window``). Either way every seed is its own
child run with the same metrics, tagged ``trained`` (batched | alone).

Resume: each child carries ``lrpipe.resume.TASK_TAG``, a hash of the seed's config and the
task's options (``range_key``, ``halving_key``); under a resumed parent, a task whose child
FINISHED is not run again: its result is rebuilt from what the child logged (the curve or
ladder table, the chosen rate, the reason), the same result an uninterrupted run returns.
"""

from __future__ import annotations

import contextlib
import math

import pandas as pd
import torch
from prefect import task, unmapped

from flows.common import collect, dataset_for, task_resources
from lrpipe import procs, resume, runs, tracking
from lrpipe.engine.config import TrainConfig, from_dict, to_dict
from lrpipe.engine.many import trains_batched
from lrpipe.search.choose import halving_search
from lrpipe.search.plan import HALVING_OPTS, RANGE_OPTS
from lrpipe.search.rangetest import range_test_config
from lrpipe.search.seeds import member_cfgs, range_test_batched

# --- what identifies a task, and its result rebuilt from a finished child -----------------

def range_key(cfg: TrainConfig, seed: int, num_steps: int) -> str:
    """The task key of seed ``seed``'s range test of ``cfg`` over ``num_steps`` updates."""
    return resume.task_key("range_test", {"config": cfg.replace(seed=seed).hash(),
                                          "num_steps": num_steps, **RANGE_OPTS})


def halving_key(cfg: TrainConfig) -> str:
    """The task key of the halving search of ``cfg`` (its seed set)."""
    return resume.task_key("halving", {"config": cfg.hash(), **HALVING_OPTS})


def _finished(parent_run_id: str, key: str, uri: str | None):
    return resume.finished_task(parent_run_id, key, uri) if parent_run_id else None


def _range_result(run_id: str, seed: int, curve: pd.DataFrame, reused: bool = False) -> dict:
    stop_reason = str(curve["stop_reason"].iloc[0]) if len(curve) else "no steps"
    return {"run_id": run_id, "seed": seed, "stop_reason": stop_reason, "reused": reused,
            "curve": curve.assign(seed=seed)[["seed", *curve.columns]].to_dict("records")}


def reused_range_test(cfg: TrainConfig, seed: int, parent_run_id: str, num_steps: int,
                      uri: str | None = None) -> dict | None:
    """The result of seed ``seed``'s range test rebuilt from its FINISHED child under
    ``parent_run_id`` (its ``range_test.csv``), or None when there is none to reuse."""
    run = _finished(parent_run_id, range_key(cfg, seed, num_steps), uri)
    curve = None if run is None else resume.logged_table(run.info.run_id, "range_test.csv", uri)
    return None if curve is None else _range_result(run.info.run_id, seed, curve, reused=True)


def reused_halving(cfg: TrainConfig, parent_run_id: str, uri: str | None = None) -> dict | None:
    """The result of ``cfg``'s halving search rebuilt from its FINISHED child under
    ``parent_run_id`` (``ladder.csv``, metric ``halving_lr``, tag ``reason``), or None."""
    run = _finished(parent_run_id, halving_key(cfg), uri)
    ladder = None if run is None else resume.logged_table(run.info.run_id, "ladder.csv", uri)
    if ladder is None:
        return None
    return {"run_id": run.info.run_id, "seed": cfg.seed, "reused": True,
            "chosen_lr": run.data.metrics.get("halving_lr"), "reason": run.data.tags["reason"],
            "ladder": ladder.assign(seed=cfg.seed).to_dict("records")}


# --- tasks --------------------------------------------------------------------------------

def _range_run(cfg: TrainConfig, seed: int, parent_run_id: str, experiment: str,
               num_steps: int, uri: str | None):
    """The child run of one seed's range test (a context: FAILED if the body raises)."""
    name = f"range test {cfg.optim.name} {cfg.model.name} seed={seed}"
    return runs.training_run(cfg.replace(seed=seed), experiment, parent_run_id, name=name,
                                 uri=uri, tags={"role": "range_test",
                                                resume.TASK_TAG: range_key(cfg, seed, num_steps),
                                                **procs.process_tags()})


# A range test's curves as MLflow metrics (at step = the test's step): metric key -> column.
RANGE_METRICS = {"range_test_loss": "loss", "lr": "lr", "range_test_smoothed": "smoothed"}


def _log_range_curve(run_id: str, seed: int, curve: pd.DataFrame, num_steps: int,
                     batched: bool, uri: str | None) -> dict:
    """A range test's params, per-step metrics, table and stop reason on its child run."""
    result = _range_result(run_id, seed, curve)
    stop_reason = result["stop_reason"]
    tracking.log_params(run_id, {**{f"range.{k}": v for k, v in RANGE_OPTS.items()},
                                 "range.num_steps": num_steps}, uri=uri)
    for key, column in RANGE_METRICS.items():  # a whole curve per call, not a call per step
        tracking.log_step_losses(run_id, curve, uri=uri, key=key, column=column)
    tracking.log_table(run_id, curve, "range_test.csv", uri=uri)
    tracking.set_tags(run_id, {"stop_reason": stop_reason,
                               "trained": "batched" if batched else "alone"}, uri=uri)
    return result


@task(name="range-test", task_run_name="range test seed={seed}")
def range_test_seed(cfg_dict: dict, seed: int, parent_run_id: str, experiment: str,
                    num_steps: int, threads: int = 1, uri: str | None = None) -> dict:
    """One range test on the subset as a child run: loss, smoothed loss and lr per step.
    Under a resumed parent, a FINISHED child of the same test is reused (``reused`` True).
    ``uri`` names the tracking store for workers on other machines (default: their env)."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    if (done := reused_range_test(cfg, seed, parent_run_id, num_steps, uri)) is not None:
        return done
    with _range_run(cfg, seed, parent_run_id, experiment, num_steps, uri) as run_id:
        result = range_test_config(cfg.replace(seed=seed), dataset_for(cfg), seed=seed,
                                   num_steps=num_steps, **RANGE_OPTS)
        return _log_range_curve(run_id, seed, result.to_frame(), num_steps, False, uri)


@task(name="range-tests", task_run_name="range tests seeds={seeds} together")
def range_test_seeds_together(cfg_dict: dict, seeds: list[int], parent_run_id: str,
                              experiment: str, num_steps: int, threads: int = 1,
                              uri: str | None = None) -> list[dict]:
    """Every seed's range test as one batched computation (``range_test_batched``), a child
    run per seed as ``range_test_seed`` logs it; one result per seed, in order. Under a
    resumed parent the seeds whose child FINISHED are reused and only the others run."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    done = {s: reused_range_test(cfg, s, parent_run_id, num_steps, uri) for s in seeds}
    todo = [s for s in seeds if done[s] is None]
    if todo:
        done.update(zip(todo, _range_tests_batched(cfg, todo, parent_run_id, experiment,
                                                   num_steps, uri), strict=True))
    return [done[s] for s in seeds]


def _range_tests_batched(cfg: TrainConfig, seeds: list[int], parent_run_id: str,
                         experiment: str, num_steps: int, uri: str | None) -> list[dict]:
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
    """One halving search on the subset as a child run: each rung's rate and loss by rung.
    Under a resumed parent, a FINISHED child of the same search is reused (``reused`` True)."""
    torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict).replace(seed=seed)
    if (done := reused_halving(cfg, parent_run_id, uri)) is not None:
        return done
    name = f"halving {cfg.optim.name} {cfg.model.name} seed={seed}"
    with runs.training_run(cfg, experiment, parent_run_id, name=name, uri=uri,
                               tags={"role": "halving", resume.TASK_TAG: halving_key(cfg),
                                     **procs.process_tags()}) as run_id:
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
            "reason": result.reason, "reused": False,
            "ladder": result.ladder.assign(seed=seed).to_dict("records")}


def _describe(result: dict | list[dict]) -> str:
    if isinstance(result, list):
        return "; ".join(map(_describe, result))
    reused = " (finished before, reused)" if result.get("reused") else ""
    if "curve" in result:
        last = result["curve"][-1] if result["curve"] else {"lr": math.nan}
        return (f"range test seed={result['seed']}: {len(result['curve'])} steps, "
                f"{result['stop_reason']} at lr {last['lr']:.3g}{reused}")
    lr = result["chosen_lr"]
    return f"halving seed={result['seed']}: " + ("every rung diverged" if lr is None
                                                  else f"lr {lr:.3g}") + reused


def explore_subset(sub: TrainConfig, seeds: list[int], parent: str, experiment: str,
                   range_steps: int, runner: str, threads: int) -> tuple[pd.DataFrame, list]:
    """Halving searches and range tests, all in flight together: the range tests as one
    batched task when the declared policy batches the seeds' members (``trains_batched``),
    else one task per seed; one halving task per seed (each batches windows of rungs by the
    same policy)."""
    cfg_dict, uri = to_dict(sub), tracking.tracking_uri()
    together = len(seeds) > 1 and trains_batched(member_cfgs(sub, dataset_for(sub), seeds))
    with task_resources(runner):
        # Longest first, so that no long task starts last and runs alone: a halving search
        # trains a rung of budget_epochs per halving of the rate from start_lr to min_lr
        # (up to 20 epochs of the subset by HALVING_OPTS), a range test at most range_steps steps.
        halvings = halving_seed.map(unmapped(cfg_dict), seeds, unmapped(parent),
                                    unmapped(experiment), unmapped(threads), unmapped(uri))
        if together:
            tests = [range_test_seeds_together.submit(cfg_dict, list(seeds), parent,
                                                      experiment, range_steps, threads, uri)]
        else:
            tests = range_test_seed.map(unmapped(cfg_dict), seeds, unmapped(parent),
                                        unmapped(experiment), unmapped(range_steps),
                                        unmapped(threads), unmapped(uri))
    curves = collect(tests, "range-test", _describe)
    if together:
        curves = curves[0]
    ladders = collect(halvings, "halving", _describe)
    return pd.DataFrame([row for r in curves for row in r["curve"]]), ladders
