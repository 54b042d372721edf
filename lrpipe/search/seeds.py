"""The LR range test over seeds: one after another, or as one batched computation.

``range_test_batched(cfg, data, seeds)`` gives the table ``range_test_seeds`` gives, seed by
seed: member k is the fresh model ``make_model(..., seed_k)``, is updated with ``cfg.optim``'s
formulas (per-layer ``lr_mult`` included) and sees the batches ``range_test_config`` draws for
its seed, epoch after epoch from one generator. Every member's step i records the loss of its
batch before the update at ramp[i] through the engine's ``sweep`` (the loop a lone range test
runs, with ``Stacked`` members instead of ``OneModel``); a member stops
at a non-finite loss or when its smoothed loss exceeds ``stop_factor`` x its best (same
stop_reason strings), is masked from then on, and the others go on.

In float64 the table equals the sequential one to 1e-10 relative or better (digits, 60 steps,
six optimizers). In float32 the batched GEMMs sum in another order and the curves part where
the rate gets large (FIELD_NOTES): measured on Fashion-MNIST, MLP, 100 steps, SGD within 5e-6
throughout, Adam within 1e-3 up to lr 0.03 and then apart, its stop moving by up to 2 steps.
Whether the seeds batch is declared, not timed: ``range_test_seeds(batched=None)`` follows
``lrpipe.engine.many.trains_batched`` on ``member_cfgs`` (the config's ``batching`` field).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import pandas as pd

from lrpipe.engine.batched import stacked_members, unbatchable_reason
from lrpipe.engine.config import ScheduleConfig, TrainConfig
from lrpipe.engine.data import Dataset, batch_generators, member_batches
from lrpipe.engine.loop import sweep
from lrpipe.engine.many import trains_batched
from lrpipe.search.rangetest import (
    RangeTestResult,
    check_sweep_opts,
    curve_result,
    ramp,
    range_test_config,
    seeds_frame,
)


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
    return seeds_frame(seeds, range_test_stacked(cfgs, data, rates, smoothing, stop_factor))


def range_test_stacked(cfgs: list[TrainConfig], data: Dataset, rates: Sequence[float],
                       beta: float, stop_factor: float) -> list[RangeTestResult]:
    """Every member's range test (``member_cfgs``), one stacked update per rate of ``rates``,
    until every member stopped; one RangeTestResult per member, group rates included."""
    members = stacked_members(cfgs, data, data.train.x.device, ratios=False)
    # Batches for ever: each epoch a fresh order from the same generators, as
    # ``range_test_config`` restarts its iterator.
    gens = batch_generators([c.seed for c in cfgs])
    stream = itertools.chain.from_iterable(
        member_batches(data.train, cfgs[0].batch_size, gens) for _ in itertools.count())
    ratios = members.group_ratios()
    return [curve_result(curve, ratios)
            for curve in sweep(members, stream, rates, beta, stop_factor)]


def range_test_seeds(
    cfg: TrainConfig, data: Dataset, seeds: Sequence[int] = (0, 1, 2), *,
    batched: bool | None = None, **opts: Any
) -> pd.DataFrame:
    """One range test per seed, as one long table: seed, step, lr, loss, smoothed, stop_reason.

    Args:
        batched: True runs all seeds as one batched computation (``range_test_batched``),
            False one after another (``range_test_config``); None (default) follows the
            declared policy for the seeds' members on the data's device
            (``lrpipe.engine.many.trains_batched``: ``cfg.batching``, and for auto the rule of
            ``batching_rule``), sequential for one seed or an optimizer that cannot be batched.
        opts: go to ``range_test`` (min_lr, max_lr, num_steps, mode, smoothing, stop_factor).
    The table is the same either way, to tolerance (exactly so in float64).
    """
    if not seeds:
        raise ValueError("seeds: got none; allowed: one or more seeds (3 for a band)")
    if not (batched is None or isinstance(batched, bool)):
        raise ValueError(f"batched: got {batched!r}; allowed: True, False, None (the policy)")
    if batched or (batched is None and trains_batched(member_cfgs(cfg, data, seeds))):
        return range_test_batched(cfg, data, seeds, **opts)
    return seeds_frame(seeds, [range_test_config(cfg, data, seed=s, **opts) for s in seeds])
