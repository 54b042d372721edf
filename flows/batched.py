"""Wiring for many rates per pass: a group of configs trained in one task (batched where the
declared policy says so, lrpipe.engine.many), each member logged as its own MLflow child run.

``train_group_and_log`` returns what ``flows.common.train_and_log`` returns, one dict per
member, so a flow can swap one for the other. ``plan_groups`` says which configs to put in one
task, by the declared rule (``lrpipe.engine.many.trains_batched``); ``train_planned`` is what flows
call: plan, submit (one ``train_and_log`` per lone config, one ``train_group_and_log`` per
group), wait with progress lines, and return one result per config in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from prefect import task

from flows.common import (
    RESULTS,
    ResumeCache,
    both,
    collect,
    dataset_for,
    describe_result,
    epoch_printer,
    result_from_run,
    task_result,
    train_and_log,
)
from lrpipe import procs, resume, runs, tracking
from lrpipe.engine.config import TrainConfig, from_dict, to_dict
from lrpipe.engine.loop import Stopped, stop_requested
from lrpipe.engine.many import group_batchable, plan_many, train_many, trains_batched


def chunks(idxs: list[int], parts: int) -> list[list[int]]:
    """``idxs`` dealt into ``min(parts, len(idxs))`` chunks, every ``parts``-th one each:
    [0..6] in 3 -> [[0, 3, 6], [1, 4], [2, 5]]. Dealt, not cut: a sweep's configs come sorted
    by rate and the largest rates diverge early, so each chunk gets its share of the cheap ones
    and the parallel workers finish together."""
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"workers: got {parts!r}; allowed: an integer >= 1")
    parts = min(parts, len(idxs))
    return [idxs[p::parts] for p in range(parts)]


def plan_groups(cfgs: list[TrainConfig], workers: int = 1) -> list[list[int]]:
    """Which configs to train together: lists of indices into ``cfgs``, one list per task.

    Each batchable set (``engine.many.group_batchable``) is dealt into ``workers`` chunks, one per
    parallel worker. A chunk becomes one ``train_group_and_log`` task if the declared policy
    batches it (``trains_batched``: the configs' ``batching`` field, and for auto the rule of
    ``engine.many.batching_rule`` for their model and device); otherwise each member is a task
    of its own (``train_and_log``), and the workers run them in parallel. Deterministic: the
    same configs on the same device always give the same tasks.
    Raises:
        ValueError: workers < 1.
    """
    tasks: list[list[int]] = []
    for idxs in group_batchable(cfgs):
        for part in chunks(idxs, workers):
            if trains_batched([cfgs[i] for i in part]):
                tasks.append(part)
            else:
                tasks.extend([i] for i in part)
    return sorted(tasks, key=lambda t: t[0])  # lone configs in the order they were given


def group_run_name(parameters: dict) -> str:
    """A group task's run name from its ``names`` parameter."""
    names = parameters["names"]
    return f"train {names[0]}" if len(names) == 1 else \
        f"train {len(names)} together: {names[0]} .. {names[-1]}"


def _check_group(cfgs: list[TrainConfig], names: list[str]) -> None:
    if not cfgs or len(names) != len(cfgs):
        raise ValueError(f"names: got {len(names)} for {len(cfgs)} configs; allowed: one name "
                         "per config, at least one")
    for cfg in cfgs:
        if (cfg.data, cfg.device) != (cfgs[0].data, cfgs[0].device):
            raise ValueError("cfg_dicts: members differ in data or device; allowed: one "
                             "dataset and device per group (they train on one loaded copy)")


@task(name="train-group", task_run_name=group_run_name, cache_policy=ResumeCache(),
      persist_result=True, result_storage=RESULTS)
def train_group_and_log(
    cfg_dicts: list[dict], parent_run_id: str, experiment: str, names: list[str],
    threads: int = 1, tags: dict | list[dict] | None = None, uri: str | None = None,
) -> list[dict]:
    """Train a group of configs in one task, each member its own MLflow child run.

    ``lrpipe.engine.many.train_many`` trains them batched where ``plan_many`` says so. Each child
    gets params (the flattened config), per-epoch metrics (step=epoch, train()'s names) and
    tags status, config_hash, device, diverged_epoch and ``trained`` (batched k=N | alone), plus
    ``tags``: one dict for every member, or a list with one dict per member.
    As in ``train_and_log``, a member whose config already has a FINISHED child under the
    parent (a resumed sweep) is reused, not trained; ``uri`` names the tracking store.
    Returns:
        One dict per member, in order, as ``train_and_log`` returns it.
    Raises:
        ValueError: names do not match the configs, or members differ in data or device.
    """
    torch.set_num_threads(threads)  # per OS thread under OpenMP: set it in the task's thread
    if stop_requested():  # a task that starts after Ctrl-C records nothing
        raise Stopped(f"{names[0]} ..: not started")
    cfgs = [from_dict(d) for d in cfg_dicts]
    _check_group(cfgs, names)
    member_tags = _member_tags(tags, len(cfgs))
    results: list[dict | None] = [None] * len(cfgs)
    for i, cfg in enumerate(cfgs):
        if parent_run_id and (done := resume.finished_child(parent_run_id, cfg.hash(), uri)):
            results[i] = result_from_run(done, cfg, names[i], uri)
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        process = procs.process_tags()
        trained = _train_members([cfgs[i] for i in todo], [names[i] for i in todo],
                                 parent_run_id, experiment,
                                 [{**process, **member_tags[i]} for i in todo], uri)
        for i, result in zip(todo, trained, strict=True):
            results[i] = result
    return results


def _member_tags(tags: dict | list[dict] | None, k: int) -> list[dict]:
    if isinstance(tags, list):
        if len(tags) != k:
            raise ValueError(f"tags: got {len(tags)} dicts for {k} configs; allowed: one dict "
                             "for all, or one per config")
        return [dict(t or {}) for t in tags]
    return [dict(tags or {}) for _ in range(k)]


def _train_members(cfgs: list[TrainConfig], names: list[str], parent_run_id: str,
                   experiment: str, tags: list[dict], uri: str | None) -> list[dict]:
    """Open every member's child run, train them all with train_many, log, close the runs."""
    data = dataset_for(cfgs[0])
    plan = plan_many(cfgs)
    trained = {i: f"batched k={len(idxs)}" if batched else "alone"
               for idxs, batched in plan for i in idxs}
    with contextlib.ExitStack() as stack:  # every child ends FAILED if training raises
        run_ids = [stack.enter_context(runs.training_run(
            cfg, experiment, parent_run_id, name=name, tags={**tags[i], "trained": trained[i]},
            uri=uri)) for i, (cfg, name) in enumerate(zip(cfgs, names, strict=True))]
        hooks = [both(tracking.epoch_logger(run_id, uri), epoch_printer(name, cfg.epochs))
                 for run_id, name, cfg in zip(run_ids, names, cfgs, strict=True)]
        results = train_many(cfgs, data, on_epoch=lambda i, row: hooks[i](row), plan=plan)
        for run_id, result in zip(run_ids, results, strict=True):
            runs.record_result(run_id, result, uri)
    return [task_result(run_id, name, cfg, result)
            for run_id, name, cfg, result in zip(run_ids, names, cfgs, results, strict=True)]


def describe_task(describe: Callable[[dict], str]) -> Callable[[dict | list[dict]], str]:
    """``describe`` for collect(): a group task's result is a list, one line per member."""
    def line(result: dict | list[dict]) -> str:
        if isinstance(result, list):
            return f"{len(result)} trained together: " + "; ".join(map(describe, result))
        return describe(result)
    return line


def plan_tasks(cfgs: list[TrainConfig], workers: int) -> list[list[int]]:
    """``plan_groups`` per dataset and device: lists of indices into ``cfgs``, one per task.
    Loads each dataset here, once, before the tasks start (``dataset_for`` caches it for the
    tasks of this process, which would otherwise all load it at the same time)."""
    plan: list[list[int]] = []
    by_data: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_data.setdefault((cfg.data, cfg.device), []).append(i)
    for idxs in by_data.values():
        dataset_for(cfgs[idxs[0]])
        sub = plan_groups([cfgs[i] for i in idxs], workers)
        plan.extend([idxs[j] for j in part] for part in sub)
    return sorted(plan, key=lambda t: t[0])


def gather(plan: list[list[int]], futures: list, label: str,
           describe: Callable[[dict], str] = describe_result) -> list[dict]:
    """Wait for the planned tasks (``collect``: progress lines, failures raised after all
    finished); one result per config, in config order."""
    results: list[dict | None] = [None] * sum(map(len, plan))
    for part, out in zip(plan, collect(futures, label, describe_task(describe)), strict=True):
        for i, result in zip(part, out if isinstance(out, list) else [out], strict=True):
            results[i] = result
    return results


def train_planned(
    cfgs: list[TrainConfig], parent: str, experiment: str, names: list[str], *,
    threads: int, workers: int, tags: dict | list[dict] | None = None,
    uri: str | None = None, label: str = "train",
    describe: Callable[[dict], str] = describe_result,
) -> list[dict]:
    """Train every config as a child run of ``parent``, batched where the policy says so.

    ``plan_tasks`` (``workers`` parallel tasks of ``threads`` torch threads), then one
    ``train_and_log`` per lone config and one ``train_group_and_log`` per group on the flow's
    task runner, waited for by ``gather``.
    Returns:
        One ``train_and_log``-style dict per config, in ``cfgs`` order.
    """
    member_tags = _member_tags(tags, len(cfgs))
    dicts = [to_dict(c) for c in cfgs]
    plan = plan_tasks(cfgs, workers)
    futures = []
    for part in plan:
        if len(part) == 1:
            i = part[0]
            futures.append(train_and_log.submit(dicts[i], parent, experiment, names[i],
                                                threads, member_tags[i], uri))
        else:
            futures.append(train_group_and_log.submit(
                [dicts[i] for i in part], parent, experiment, [names[i] for i in part],
                threads, [member_tags[i] for i in part], uri))
    return gather(plan, futures, label, describe)
