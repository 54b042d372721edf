"""The LR range test of several seeds as one batched computation (``lrpipe.batched``'s engine).

``range_test_batched(cfg, data, seeds)`` gives the table ``range_test_seeds`` gives, seed by
seed: member k is the fresh model ``make_model(..., seed_k)``, is updated with ``cfg.optim``'s
formulas (per-layer ``lr_mult`` included) and sees the batches ``range_test_config`` draws for
its seed, epoch after epoch from one generator. Every member's step i records the loss of its
batch before the update at ramp[i] and smooths it as ``rangetest._sweep`` does; a member stops
at a non-finite loss or when its smoothed loss exceeds ``stop_factor`` x its best (same
stop_reason strings), is masked from then on, and the others go on.

In float64 the table equals the sequential one to 1e-10 relative or better (digits, 60 steps,
six optimizers). In float32 the batched GEMMs sum in another order and the curves part where
the rate gets large (FIELD_NOTES): measured on Fashion-MNIST, MLP, 100 steps, SGD within 5e-6
throughout, Adam within 1e-3 up to lr 0.03 and then apart, its stop moving by up to 2 steps.
Whether the seeds batch is declared, not timed: ``range_test_seeds(batched=None)`` follows
``lrpipe.many.trains_batched`` on ``member_cfgs`` (the config's ``batching`` field).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from lrpipe.batched import _BatchedStep, _batches, _generators, unbatchable_reason
from lrpipe.config import ScheduleConfig, TrainConfig
from lrpipe.data import Dataset, Split
from lrpipe.models import layer_names
from lrpipe.rangetest import RangeTestResult, _ema, check_sweep_opts, ramp, seeds_frame


def member_cfgs(cfg: TrainConfig, data: Dataset, seeds: Sequence[int]) -> list[TrainConfig]:
    """``cfg`` once per seed, as batched members on the data's device (where
    ``range_test_config`` puts the model). The range test ramps the rate itself, so the
    schedule is set to constant: it plays no part in a range test and must not stop batching.

    Raises:
        ValueError: no seeds; ConfigError: a seed that is no integer >= 0 (names ``seed``).
    """
    if not seeds:
        raise ValueError("seeds: got none; allowed: one or more seeds (3 for a band)")
    device = str(data.train.x.device)
    return [dataclasses.replace(cfg, seed=seed, schedule=ScheduleConfig(), device=device)
            for seed in seeds]


class _Curve:
    """One member's recorded points and stopping state, kept as ``rangetest._sweep`` keeps
    them for a lone run."""

    def __init__(self, beta: float, stop_factor: float) -> None:
        self.beta, self.stop_factor = beta, stop_factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stop_reason, self.avg, self.best = "completed", 0.0, math.inf

    def add(self, step: int, rate: float, value: float) -> bool:
        """Record the loss ``value`` of step ``step`` at ``rate``; True if the member stops."""
        if not math.isfinite(value):  # not recorded, as in _sweep
            self.stop_reason = "nonfinite"
            return True
        self.avg, smooth = _ema(self.avg, value, self.beta, step)
        self.lrs.append(float(rate))
        self.losses.append(value)
        self.smoothed.append(smooth)
        if smooth > self.stop_factor * self.best:  # recorded, then stop
            self.stop_reason = "diverged"
            return True
        self.best = min(self.best, smooth)
        return False

    def result(self, ratios: dict[str, float]) -> RangeTestResult:
        """The member's RangeTestResult; ``ratios``: each group's rate over the reference."""
        return RangeTestResult(
            lrs=tuple(self.lrs), losses=tuple(self.losses), smoothed=tuple(self.smoothed),
            stop_reason=self.stop_reason, steps=len(self.lrs),
            group_lrs={n: tuple(r * lr for lr in self.lrs) for n, r in ratios.items()})


def _group_ratios(step: _BatchedStep, cfg: TrainConfig) -> dict[str, float]:
    """``rangetest.group_ratios`` by group name, computed as make_optimizer's groups give it:
    group lr = base lr x lr_mult, reference = group 0's lr / its lr_mult; frozen: no group."""
    mults = dict(cfg.optim.lr_mult)
    groups = [(n, float(mults.get(n, 1.0))) for n in layer_names(step.members.template)]
    lrs = {n: cfg.optim.lr * m for n, m in groups if m > 0}
    first = next(n for n, m in groups if m > 0)  # param_groups refused an all-frozen model
    reference = lrs[first] / mults.get(first, 1.0)
    return {n: lr / reference for n, lr in lrs.items()}


def _epochs(split: Split, batch_size: int,
            gens: list[torch.Generator]) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Batches for ever: each epoch a fresh ``iterate_batches`` order from the same generators,
    as ``range_test_config`` restarts its iterator."""
    while True:
        yield from _batches(split, batch_size, gens)


def _sweep_batched(cfgs: list[TrainConfig], data: Dataset, rates: np.ndarray, beta: float,
                   stop_factor: float) -> list[RangeTestResult]:
    """All members' range tests, one batched step per rate, until every member stopped."""
    device = data.train.x.device
    step = _BatchedStep(cfgs, data, device)
    curves = [_Curve(beta, stop_factor) for _ in cfgs]
    stream = _epochs(data.train, cfgs[0].batch_size, _generators([c.seed for c in cfgs]))
    table = torch.tensor(rates, dtype=torch.float64, device=device)
    live = list(range(len(cfgs)))
    for i, rate in enumerate(rates):
        x, y, shared = next(stream)
        # The step records every member's loss before its update at ramp[i]; a member that
        # stops here was updated too, but its record ends before that update could show.
        step(x, y, shared, table[i].expand(len(cfgs)))
        values = step.last_losses.tolist()
        stopped = [m for m in live if curves[m].add(i, float(rate), values[m])]
        if stopped:
            step.alive[stopped] = False  # masked: no further update, the others go on
            live = [m for m in live if m not in stopped]
        if not live:
            break
    ratios = _group_ratios(step, cfgs[0])
    return [curve.result(ratios) for curve in curves]


def range_test_batched(
    cfg: TrainConfig,
    data: Dataset,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    smoothing: float = 0.98,
    stop_factor: float = 4.0,
) -> pd.DataFrame:
    """``range_test_seeds``' table, all seeds trained as one batched computation.

    Arguments as ``range_test`` (rates, ramp, smoothing, stopping) and ``range_test_seeds``.
    Returns:
        One long table, seeds in ``seeds`` order: seed, step, lr, loss, smoothed, stop_reason
        (``RangeTestResult.to_frame`` per seed); equal to the sequential one to tolerance.
    Raises:
        ConfigError: a bad argument, named (min_lr, max_lr, num_steps, mode, smoothing,
            stop_factor, seed, optim.lr_mult); ValueError: no seeds, or an optimizer the
            engine cannot batch (names ``optim.name``).
    """
    rates = ramp(min_lr, max_lr, num_steps, mode)
    check_sweep_opts(smoothing, stop_factor)
    cfgs = member_cfgs(cfg, data, seeds)
    reason = unbatchable_reason(cfgs[0])
    if reason:
        raise ValueError(reason)
    return seeds_frame(seeds, _sweep_batched(cfgs, data, rates, smoothing, stop_factor))
