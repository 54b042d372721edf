"""Wiring for many rates per pass: which configs train together in one task (batched where the
declared policy says so, lrpipe.engine.many), and ``train_planned``, what flows call: plan,
submit one ``flows.children.train_children`` task per planned group, wait with progress lines,
and return one result per config in order.
"""

from __future__ import annotations

from collections.abc import Callable

from flows.children import keeps_model, member, train_children
from flows.common import collect, dataset_for, describe_result
from lrpipe.engine.config import TrainConfig, from_dict
from lrpipe.engine.many import group_batchable, trains_batched


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
    parallel worker. A chunk becomes one ``train_children`` task if the declared policy
    batches it (``trains_batched``: the configs' ``batching`` field, and for auto the rule of
    ``engine.many.batching_rule`` for their model and device); otherwise each member is a task
    of its own, and the workers run them in parallel. Deterministic: the
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


def _member_tags(tags: dict | list[dict] | None, k: int) -> list[dict]:
    if isinstance(tags, list):
        if len(tags) != k:
            raise ValueError(f"tags: got {len(tags)} dicts for {k} configs; allowed: one dict "
                             "for all, or one per config")
        return [dict(t or {}) for t in tags]
    return [dict(tags or {}) for _ in range(k)]


def describe_task(describe: Callable[[dict], str]) -> Callable[[list[dict]], str]:
    """``describe`` for collect(): a task's result is a list, one line per member."""
    def line(result: list[dict]) -> str:
        if len(result) > 1:
            return f"{len(result)} trained together: " + "; ".join(map(describe, result))
        return describe(result[0])
    return line


def plan_tasks(cfgs: list[TrainConfig], workers: int,
               alone: list[bool] | None = None) -> list[list[int]]:
    """``plan_groups`` per dataset and device: lists of indices into ``cfgs``, one per task;
    a config marked in ``alone`` (a member that keeps its model) is a task of its own.
    Loads each dataset here, once, before the tasks start (``dataset_for`` caches it for the
    tasks of this process, which would otherwise all load it at the same time)."""
    alone = alone or [False] * len(cfgs)
    plan: list[list[int]] = [[i] for i, solo in enumerate(alone) if solo]
    by_data: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        if not alone[i]:
            by_data.setdefault((cfg.data, cfg.device), []).append(i)
    first: dict[tuple, int] = {}
    for i, cfg in enumerate(cfgs):
        first.setdefault((cfg.data, cfg.device), i)
    for i in first.values():
        dataset_for(cfgs[i])
    for idxs in by_data.values():
        sub = plan_groups([cfgs[i] for i in idxs], workers)
        plan.extend([idxs[j] for j in part] for part in sub)
    return sorted(plan, key=lambda t: t[0])


def gather(plan: list[list[int]], futures: list, label: str,
           describe: Callable[[dict], str] = describe_result) -> list[dict]:
    """Wait for the planned tasks (``collect``: progress lines, failures raised after all
    finished); one result per config, in config order."""
    results: list[dict | None] = [None] * sum(map(len, plan))
    for part, out in zip(plan, collect(futures, label, describe_task(describe)), strict=True):
        for i, result in zip(part, out, strict=True):
            results[i] = result
    return results


def train_planned(
    cfgs: list[TrainConfig], parent: str, experiment: str, names: list[str], *,
    threads: int, workers: int, tags: dict | list[dict] | None = None,
    uri: str | None = None, label: str = "train",
    describe: Callable[[dict], str] = describe_result, kinds: list[dict] | None = None,
) -> list[dict]:
    """Train every config as a child run of ``parent``, batched where the policy says so.

    ``kinds``: per config, what its member is besides a config (``flows.children.member``'s
    keywords: key, init, test, register, extras, labels); a member that keeps its model trains
    alone. ``plan_tasks`` (``workers`` parallel tasks of ``threads`` torch threads), then one
    ``train_children`` task per planned group on the flow's task runner, waited for by
    ``gather``.
    Returns:
        One ``train_children`` dict per config, in ``cfgs`` order.
    """
    member_tags = _member_tags(tags, len(cfgs))
    kinds = kinds or [{} for _ in cfgs]
    return train_members([member(c, n, t, **k) for c, n, t, k in zip(
        cfgs, names, member_tags, kinds, strict=True)], parent, experiment, threads=threads,
        workers=workers, uri=uri, label=label, describe=describe)


def train_members(members: list[dict], parent: str, experiment: str, *, threads: int,
                  workers: int, uri: str | None = None, label: str = "train",
                  describe: Callable[[dict], str] = describe_result) -> list[dict]:
    """``train_planned`` for members already built (``flows.children.member``)."""
    cfgs = [from_dict(m["cfg"]) for m in members]
    plan = plan_tasks(cfgs, workers, [keeps_model(m) for m in members])
    futures = [train_children.submit([members[i] for i in part], parent, experiment, threads,
                                     uri) for part in plan]
    return gather(plan, futures, label, describe)
