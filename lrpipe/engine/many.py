"""Whether to batch, and the entry point that follows it: many configs trained the declared way.

Whether K compatible configs train as one batched computation (``lrpipe.engine.batched``) or one
after another is declared, never timed at run time: the config's ``batching`` field (auto | on
| off) and, for auto, ``batching_rule``, which writes down what ``make bench`` measured. So the
same command on the same device always plans the same work. ``train_many`` groups compatible
configs (``group_batchable``) and trains each group batched or one by one as ``plan_many``
says; results are train()'s either way (to float tolerance when batched in float32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lrpipe.engine.batched import check_batchable, train_batched
from lrpipe.engine.config import TrainConfig
from lrpipe.engine.data import Dataset
from lrpipe.engine.train import TrainResult, resolve_device, train

# Models that auto batches on the CPU: those whose step is not compute-bound, so that K of them
# cost little more than one (one wide GEMM instead of K thin ones, and one step's overhead
# instead of K). Measured on this project's 2-core CPU, one torch thread (README "Speed" row c,
# FIELD_NOTES): 16 softmax regressions trained batched were 4.4-5x faster than 16 sequential
# runs (8 of them: 5x with SGD, 5.5x with Adam). K MLPs batched were 0.7-1.3x (1.06x and 1.18x
# in the last two benches; 0.7-1.1x on a busy box): no reliable gain, and a batched group also
# trains members that a lone run would have stopped at divergence (the default sweep, MLP, 4
# rates per worker, took 27 s batched against 20 s one run per rate). The CNN was not measured
# batched: its step is heavier still (27 s per epoch alone against the MLP's 1.2 s), so it is
# off too. On a GPU one small model leaves the device mostly idle and K members fill it
# (FIELD_NOTES: batching pays on GPUs), so auto batches every model there.
CPU_BATCHED_MODELS = ("softmax",)


def batching_rule(cfg: TrainConfig, device: torch.device | str | None = None) -> bool:
    """Whether configs like ``cfg`` train batched: the declared policy, one pure function.

    ``cfg.batching`` on: yes; off: no; auto: yes on a CUDA device, and on the CPU only for the
    models in ``CPU_BATCHED_MODELS`` (softmax regression: 4.4-5x faster batched; the MLP and
    CNN 0.7-1.3x, no reliable gain on a 2-core CPU; figures above). Whether the engine can
    batch the config at all (``unbatchable_reason``) is the caller's question
    (``trains_batched``): ``on`` does not make rprop batchable.
    Args:
        device: the device the configs train on; None = ``cfg.device`` (``auto`` resolved as
            train() resolves it: cuda when available).
    """
    if cfg.batching != "auto":
        return cfg.batching == "on"
    name = cfg.device if device is None else device
    kind = resolve_device("auto").type if name == "auto" else torch.device(name).type
    return kind == "cuda" or cfg.model.name in CPU_BATCHED_MODELS


def _fits(first: TrainConfig, cfg: TrainConfig) -> bool:
    try:
        check_batchable([first, cfg])
    except ValueError:
        return False
    return True


def group_batchable(cfgs: list[TrainConfig]) -> list[list[int]]:
    """Indices of ``cfgs`` grouped into batchable sets (first-seen order); an unbatchable
    config (rprop, gains, plateau, ...) is a group of its own."""
    groups: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        # check_batchable's compatibility is equality on the fields members may not vary in,
        # an equivalence: comparing with each group's first member places every config.
        home = next((g for g in groups if _fits(cfgs[g[0]], cfg)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def trains_batched(cfgs: list[TrainConfig]) -> bool:
    """Whether ``cfgs`` train as one batched computation: two or more, batchable together
    (``check_batchable``), and ``batching_rule`` says so for them (they share ``batching``,
    model and device, or they would not be batchable together)."""
    return len(cfgs) > 1 and len(group_batchable(cfgs)) == 1 and batching_rule(cfgs[0])


def plan_many(cfgs: list[TrainConfig]) -> list[tuple[list[int], bool]]:
    """How ``train_many`` trains ``cfgs``: ``(indices, batched)`` per ``group_batchable`` group,
    batched where ``trains_batched`` says so. Deterministic: the same configs on the same
    device give the same plan on every call."""
    return [(idxs, trains_batched([cfgs[i] for i in idxs])) for idxs in group_batchable(cfgs)]


def train_many(
    cfgs: list[TrainConfig],
    data: Dataset,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
    plan: list[tuple[list[int], bool]] | None = None,
) -> list[TrainResult]:
    """Train every config, batching compatible ones where the declared policy says so.

    The one entry point for flows: results come back in ``cfgs`` order, each as train() would
    return it; ``on_epoch(i, row)`` names the config by its index in ``cfgs``. ``plan`` (from
    ``plan_many``, e.g. to tag runs with how they trained) is ``plan_many(cfgs)`` when None.
    """
    plan = plan_many(cfgs) if plan is None else plan
    if sorted(i for idxs, _ in plan for i in idxs) != list(range(len(cfgs))):
        raise ValueError(f"plan: got {plan!r}; allowed: every index of cfgs exactly once")
    results: list[TrainResult | None] = [None] * len(cfgs)
    for idxs, batched in plan:
        group = [cfgs[i] for i in idxs]
        if batched:
            hook = (lambda m, row, idxs=idxs: on_epoch(idxs[m], row)) if on_epoch else None
            outs = train_batched(group, data, on_epoch=hook)
        else:
            outs = [train(c, data, on_epoch=(lambda row, i=i: on_epoch(i, row))
                          if on_epoch else None) for i, c in zip(idxs, group, strict=True)]
        for i, out in zip(idxs, outs, strict=True):
            results[i] = out
    return results
