"""Whether to batch, and the entry point that decides: many configs trained the fastest way.

``batching_pays`` times a few steps of K members batched (``lrpipe.batched``) against K
train()-style sequential steps on this machine and device, and says yes only when batched is
``PAYS_SPEEDUP`` x faster: on a GPU or for softmax regression it usually is (about 5x for 8
softmax regressions on one CPU thread), for an MLP on a busy 2-core CPU it usually is not
(FIELD_NOTES). ``train_many`` groups compatible configs (``group_batchable``) and trains each
group batched or one by one, as the measurement says; results are train()'s either way.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable

import torch

from lrpipe.batched import (
    _BatchedStep,
    _batches,
    _generators,
    _sync,
    _varies,
    check_batchable,
    train_batched,
    unbatchable_reason,
)
from lrpipe.config import ModelConfig, OptimConfig, TrainConfig
from lrpipe.data import Dataset
from lrpipe.models import make_model
from lrpipe.optim import make_optimizer
from lrpipe.train import TrainResult, batch_loss, resolve_device, train

# Batched must be this many times faster per step than sequential to be chosen. Not 1.0: the
# probe times steps only, and a group also trains members that a lone run would have stopped at
# divergence. Measured: the default sweep (MLP, K=4 per worker) probed 1.1x faster batched,
# and then took 27 s batched against 20 s one run per rate.
PAYS_SPEEDUP = 1.25
_PAYS_CACHE: dict[tuple, tuple[bool, dict]] = {}


def _probe_cfgs(model_cfg: ModelConfig, k: int, device: torch.device, optimizer: str,
                batch_size: int, shared: bool) -> list[TrainConfig]:
    base = TrainConfig(model=model_cfg, optim=OptimConfig(name=optimizer, lr=1e-3),
                       batch_size=batch_size, device=str(device), epochs=1)
    # Small, distinct, stable rates: the probe times steps, it must not diverge.
    return [base.replace(**{"optim.lr": 1e-3 * (1 + m / k), "seed": 0 if shared else m})
            for m in range(k)]


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_step_times(cfgs: list[TrainConfig], data: Dataset, steps: int = 7,
                       warmup: int = 2, min_seconds: float = 0.2,
                       max_rounds: int = 200) -> tuple[float, float]:
    """(sequential, batched): median seconds for all K members to make one update.

    Sequential is K train()-style steps (forward, loss, divergence check, backward,
    torch.optim step); batched is one step of all members. The two alternate round by round,
    so that load changes on a shared machine hit both; ``warmup`` rounds are not timed. At
    least ``steps`` rounds are timed, more until each side has run ``min_seconds`` (a few
    steps of 2-3 ms each are at the mercy of one scheduler hiccup), at most ``max_rounds``.
    """
    device, cfg = resolve_device(cfgs[0].device), cfgs[0]
    model = make_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, device)
    opt, batched = make_optimizer(model, cfg.optim), _BatchedStep(cfgs, data, device)
    rates = torch.tensor([c.optim.lr for c in cfgs], dtype=torch.float64, device=device)
    gens = _generators([c.seed for c in cfgs])
    pool = list(itertools.islice(_batches(data.train, cfg.batch_size, gens), warmup + steps))

    def sequential_step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = batch_loss(model(x), y, cfg.loss)
        bool(loss <= math.inf)  # train() checks every step on the CPU
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    seq, bat = [], []
    i = 0
    while i < warmup + steps or (i < max_rounds and min(sum(seq[warmup:]),
                                                        sum(bat[warmup:])) < min_seconds):
        x, y, shared = pool[i % len(pool)]
        one = (x, y) if shared else (x[0], y[0])
        seq.append(_seconds(lambda one=one: [sequential_step(*one) for _ in cfgs], device))
        bat.append(_seconds(lambda x=x, y=y, s=shared: batched(x, y, s, rates), device))
        i += 1
    return statistics.median(seq[warmup:]), statistics.median(bat[warmup:])


def batching_pays(
    model_cfg: ModelConfig,
    data: Dataset,
    k: int,
    device: torch.device | str,
    optimizer: str = "sgd",
    *,
    batch_size: int = 128,
    shared_batches: bool = True,
) -> tuple[bool, dict]:
    """Whether K batched members train measurably faster than K sequential runs, here.

    Times a few steps of each (``measure_step_times``) and chooses batched only if it is at
    least ``PAYS_SPEEDUP`` x faster. The decision is cached in-process per (model config, input
    shape, k, device, torch threads, optimizer, batch size, shared batches, dtype).
    Returns:
        (pays, {"sequential_s", "batched_s", "speedup", "cached"}), seconds per step of all K.
    Raises:
        ValueError: k < 1, or an optimizer that cannot be batched.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: got {k!r}; allowed: an integer >= 1 (members)")
    device = torch.device(device)
    batch_size = min(batch_size, len(data.train))
    key = (model_cfg, tuple(data.input_shape), data.num_classes, k, str(device),
           torch.get_num_threads(), optimizer, batch_size, shared_batches, data.train.x.dtype)
    if key in _PAYS_CACHE:
        pays, timings = _PAYS_CACHE[key]
        return pays, {**timings, "cached": True}
    cfgs = _probe_cfgs(model_cfg, k, device, optimizer, batch_size, shared_batches)
    check_batchable(cfgs)
    seq, bat = measure_step_times(cfgs, data)
    timings = {"sequential_s": seq, "batched_s": bat, "speedup": seq / bat, "cached": False}
    _PAYS_CACHE[key] = (seq / bat >= PAYS_SPEEDUP, timings)
    return _PAYS_CACHE[key][0], timings


def group_batchable(cfgs: list[TrainConfig]) -> list[list[int]]:
    """Indices of ``cfgs`` grouped into batchable sets (first-seen order); an unbatchable
    config (rprop, gains, plateau, ...) is a group of its own."""
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        if unbatchable_reason(cfg):
            key: tuple = ("alone", i)
        else:
            key = tuple(sorted((f, v) for f, v in cfg.flat().items() if not _varies(f)))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def group_pays(group: list[TrainConfig], data: Dataset) -> tuple[bool, dict]:
    """``batching_pays`` for this batchable group: its model, size, device, optimizer, batch
    size, and shared batches when all members share a seed (one batch order)."""
    check_batchable(group)
    first = group[0]
    return batching_pays(first.model, data, len(group), resolve_device(first.device),
                         first.optim.name, batch_size=first.batch_size,
                         shared_batches=len({c.seed for c in group}) == 1)


def plan_many(cfgs: list[TrainConfig], data: Dataset) -> list[tuple[list[int], bool]]:
    """How ``train_many`` trains ``cfgs``: ``(indices, batched)`` per ``group_batchable`` group,
    batched where the group has several members and ``group_pays`` says it is faster."""
    return [(idxs, len(idxs) > 1 and group_pays([cfgs[i] for i in idxs], data)[0])
            for idxs in group_batchable(cfgs)]


def train_many(
    cfgs: list[TrainConfig],
    data: Dataset,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
    plan: list[tuple[list[int], bool]] | None = None,
) -> list[TrainResult]:
    """Train every config, batching compatible ones where ``batching_pays`` says so.

    The one entry point for flows: results come back in ``cfgs`` order, each as train() would
    return it; ``on_epoch(i, row)`` names the config by its index in ``cfgs``. ``plan`` (from
    ``plan_many``, e.g. to tag runs with how they trained) is measured here when None.
    """
    plan = plan_many(cfgs, data) if plan is None else plan
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
