"""``find_lr``: the LR range test on the user's own model and data, over seeds.

Each seed runs ``lrpipe.search.rangetest.range_test`` (which owns the state it changes: model,
optimizer, gradients, train/eval mode and dropout generators are restored bit-identically
after every test, also one that raised) from the same starting state with the seed's batch
order (``lrpipe.api.inputs``: what a seed means). Every rule of ``lrpipe.search.suggest.RULES``
reads every seed's smoothed curve (``suggest_band``); the answer is one rule's median over seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from lrpipe.api.inputs import (
    BatchSource,
    Data,
    LossFn,
    OptimizerFn,
    built_model,
    check_loss_fn,
    check_seeds,
    checked_loss,
    describe,
    model_optimizer,
    trainable_device,
)
from lrpipe.engine.members import group_ratios
from lrpipe.search.rangetest import (
    Band,
    RangeTestResult,
    check_sweep_opts,
    ramp,
    range_test,
    seeds_frame,
    suggest_band,
)
from lrpipe.search.suggest import RULES, Suggestion, get_rule

# fastai's default suggestion since v2.5: two thirds down the longest descent is still falling
# fast but keeps a margin below the minimum, where steepest reads a noisy derivative.
DEFAULT_RULE = "valley"
EXPERIMENT = "find-lr"  # MLflow experiment of track=True


@dataclass(frozen=True)
class FindLRResult:
    """What ``find_lr`` found.

    suggestion: the rate to take (``suggestion.lr``, the reference rate: param group 0's),
        the rule that gave it and why; ``lr`` None when the rule found no rate on any seed.
    bands: every rule's Band (median, lo, hi over seeds; per_seed suggestions).
    curves: one row per seed and step: seed, step, lr, loss (raw), smoothed, stop_reason.
    group_rates: each param group's rate at the suggestion (name, or index, -> rate): the
        optimizer's ratios between groups are kept.
    run_id: the MLflow run it was logged to, or None (``track`` off).
    """

    suggestion: Suggestion
    bands: dict[str, Band]
    curves: pd.DataFrame = field(repr=False)
    group_rates: dict[str, float]
    run_id: str | None = None

    @property
    def lr(self) -> float | None:
        """The suggested rate (``suggestion.lr``)."""
        return self.suggestion.lr

    @property
    def band(self) -> Band:
        """The chosen rule's Band: median, lo, hi over the seeds, and each seed's answer."""
        return self.bands[self.suggestion.rule]

    def figure(self, ax: Axes | None = None) -> Figure:
        """Smoothed loss against rate, one line per seed, each rule's median and band
        (``lrpipe.plots.search.plot_range_test``); the caller saves or shows it."""
        from lrpipe.plots.search import plot_range_test  # seaborn loads on first use only

        return plot_range_test(self.curves, {r: tuple(b[:3]) for r, b in self.bands.items()},
                               ax=ax)


def check_track(track: bool | str) -> str | None:
    """The MLflow experiment to log to (``EXPERIMENT`` for True), or None for False."""
    if isinstance(track, bool):
        return EXPERIMENT if track else None
    if isinstance(track, str) and track.strip():
        return track
    raise ValueError(f"track: got {track!r}; allowed: False, True (experiment "
                     f"{EXPERIMENT!r}) or an experiment name")


def summarize(curves: pd.DataFrame, rule: str) -> tuple[Suggestion, dict[str, Band]]:
    """Every rule's band over the seeds of ``curves``, and ``rule``'s median as the answer."""
    bands = {name: suggest_band(curves, name) for name in RULES}
    band, seeds = bands[rule], sorted(curves["seed"].unique())
    if band.median is None:
        why = "; ".join(f"seed {s}: {p.reason}" for s, p in zip(seeds, band.per_seed,
                                                                 strict=True))
        return Suggestion(rule, None, f"{rule}: no rate on any of {len(seeds)} seeds ({why})"), \
            bands
    found = sum(p.lr is not None for p in band.per_seed)
    return Suggestion(rule, band.median, (
        f"{rule}: median over {found} of {len(seeds)} seeds, band {band.lo:.3g}..{band.hi:.3g}"
    )), bands


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """Each param group's ``name`` entry, or its index."""
    return [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]


def find_lr(
    model: nn.Module | Callable[[int], nn.Module],
    data: Data,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer | OptimizerFn | None = None,
    *,
    seeds: int | Sequence[int] = 3,
    batch_size: int | None = None,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    smoothing: float = 0.98,
    stop_factor: float = 4.0,
    rule: str = DEFAULT_RULE,
    track: bool | str = False,
) -> FindLRResult:
    """The LR range test (Smith 2017) on your model and data, over seeds, every rule's band.

    Each seed trains ``num_steps`` updates while the rate ramps from ``min_lr`` to ``max_lr``
    and records each batch's loss before its update; afterwards the model and optimizer are
    bit-identical to before (also when ``loss_fn`` or the model raises), and so are torch's
    global random state and a DataLoader's own generator.

    Args:
        model: your ``nn.Module`` (every seed starts from its current state, with another
            batch order), or ``model_fn(seed) -> nn.Module`` (a fresh model per seed: then the
            band also covers initializations).
        data: a DataLoader, a re-iterable of (x, y) batches, a callable returning an iterator
            of them, or a pair of tensors (x, y), one row per example (the fast path: shuffled
            per seed, sliced into batches of ``batch_size``). Restarted when it runs out.
        loss_fn: ``loss_fn(model(x), y)`` -> scalar tensor, a mean over the batch.
        optimizer: the optimizer you train with (its state and every param group's ratio to
            group 0 are kept), ``optimizer_fn(model)`` returning one, or None: plain SGD. The
            answer is a rate for this optimizer: pass yours.
        seeds: how many seeds (3: seeds 0, 1, 2) or which; 3 or more give a band.
        batch_size: examples per batch when ``data`` is a pair of tensors (default 64); None
            otherwise.
        min_lr, max_lr: reference rates (param group 0's) of the first and last step, > 0.
        num_steps: updates per seed (>= 2; default 100), fewer if the loss blows up first.
        mode: exp (default: rates evenly spaced in log rate) | linear.
        smoothing: beta of the bias-corrected moving average the rules read, in [0, 1)
            (default 0.98, fastai's; 0 = raw losses).
        stop_factor: a seed stops once its smoothed loss exceeds this multiple of its best
            (> 1; default 4).
        rule: the rule whose median over seeds is the suggestion: valley (default; fastai's:
            two thirds down the longest descent), steepest or min_over_10; all are computed.
        track: False (default), True (log to the MLflow experiment ``find-lr``) or an
            experiment name: one run with the curves as metrics, every band, the table and
            the figure, through ``lrpipe.tracking``.
    Returns:
        FindLRResult: ``.suggestion`` (rule, lr, reason), ``.lr``, ``.band``, ``.bands``,
        ``.curves``, ``.group_rates``, ``.figure()``, ``.run_id``.
    Raises:
        ValueError: an argument that is not allowed, before any training (the one-line
            message names it and says what is allowed), or a batch that is not an (x, y)
            pair of tensors. Errors of ``loss_fn`` or the model propagate, state restored.
    """
    experiment = check_track(track)
    get_rule(rule)
    ramp(min_lr, max_lr, num_steps, mode)
    check_sweep_opts(smoothing, stop_factor)
    check_loss_fn(loss_fn)
    seeds = check_seeds(seeds)
    factory = not isinstance(model, nn.Module)
    first = model_instance(model, optimizer, seeds[0]) if factory else model
    source = BatchSource(data, name="data", batch_size=batch_size,
                         device=trainable_device(first))
    opts: dict[str, Any] = dict(min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, mode=mode,
                                smoothing=smoothing, stop_factor=stop_factor)
    results: list[RangeTestResult] = []
    for seed in seeds:
        net = first if seed == seeds[0] else built_model(model, seed) if factory else model
        opt = model_optimizer(net, optimizer)
        with source.seeded(seed):
            results.append(range_test(net, opt, source.epoch, checked_loss(loss_fn), **opts))
        if seed == seeds[0]:
            ratios = dict(zip(group_names(opt), group_ratios(opt), strict=True))
    curves = seeds_frame(seeds, results)
    suggestion, bands = summarize(curves, rule)
    rates = {} if suggestion.lr is None else {n: r * suggestion.lr for n, r in ratios.items()}
    result = FindLRResult(suggestion, bands, curves, rates)
    if experiment is None:
        return result
    from lrpipe.api.track import log_find_lr  # mlflow loads only when asked to log

    params = {**opts, "seeds": list(seeds), "rule": rule, "model": type(first).__name__,
              "optimizer": "SGD" if optimizer is None else type(opt).__name__,
              "batch_size": source.batch_size}
    run_id = log_find_lr(experiment, params, curves, bands, suggestion, result.figure())
    return dataclasses.replace(result, run_id=run_id)


def model_instance(model_fn: Any, optimizer: Any, seed: int) -> nn.Module:
    """The first seed's model from a factory, after checking the factory's arguments.

    Raises:
        ValueError: ``model`` is neither a module nor callable, or an optimizer instance came
            with a factory (it could not hold the fresh models' parameters).
    """
    if not callable(model_fn):
        raise ValueError(f"model: got {describe(model_fn)}; allowed: a torch.nn.Module or a "
                         "callable model_fn(seed) returning one")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError("optimizer: got an Optimizer with a model factory; allowed: None or "
                         "optimizer_fn(model), which builds one for each fresh model")
    return built_model(model_fn, seed)
