"""The learning-rate range test (Smith 2017, https://arxiv.org/abs/1506.01186, section 3.3).

Train for ``num_steps`` updates while the rate ramps from ``min_lr`` to ``max_lr`` and record
the loss at each rate. The test owns the state it changes: the model's and the optimizer's
state dicts (deep copies), the gradients, the train/eval mode and any dropout generators are
snapshotted first and restored in a ``finally``, so after the test, also one that diverged or
raised, the model and optimizer are bit-identical to before.

Unlike finders that compare ``loss > k * best`` (False for NaN, so they run on through NaNs),
the test stops at the first non-finite loss and records nothing past it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from lrpipe.engine.config import ConfigError, TrainConfig, check_choice, check_number
from lrpipe.engine.data import Dataset, iterate_batches
from lrpipe.engine.loop import Curve, sweep
from lrpipe.engine.members import OneModel, batch_loss
from lrpipe.engine.models import make_model
from lrpipe.engine.optim import make_optimizer
from lrpipe.search.suggest import Suggestion, get_rule, log_median

MODES = ("exp", "linear")
STOP_REASONS = ("diverged", "nonfinite", "completed")

Batch = tuple[torch.Tensor, torch.Tensor]
Batches = Iterable[Batch] | Callable[[], Iterator[Batch]]


@dataclass(frozen=True)
class RangeTestResult:
    """One range test. Every sequence has one entry per recorded step.

    lrs: the reference rate at each step (the first group's base rate, group lr / lr_mult).
    losses: the raw training loss of the step's batch, before the step's update.
    smoothed: bias-corrected exponential moving average of ``losses``.
    stop_reason: diverged (smoothed > stop_factor x best smoothed; that point is recorded) |
        nonfinite (the next loss was NaN or inf; not recorded) | completed.
    steps: how many points were recorded.
    group_lrs: each param group's rate at each step, by group name (or index).
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    stop_reason: str
    steps: int
    group_lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Long table: step, lr, loss, smoothed, stop_reason."""
        return pd.DataFrame({"step": np.arange(self.steps), "lr": self.lrs, "loss": self.losses,
                             "smoothed": self.smoothed, "stop_reason": self.stop_reason})


def ramp(min_lr: float, max_lr: float, num_steps: int, mode: str = "exp") -> np.ndarray:
    """The ``num_steps`` rates from ``min_lr`` to ``max_lr`` (both included).

    exp: min_lr x (max_lr / min_lr) ** (i / (num_steps - 1)), evenly spaced in log rate;
    linear: evenly spaced in rate.
    """
    check_number("min_lr", min_lr, low=0.0, low_open=True)
    check_number("max_lr", max_lr, low=min_lr, low_open=True)
    check_number("num_steps", num_steps, low=2, integer=True)
    check_choice("mode", mode, MODES)
    frac = np.arange(num_steps) / (num_steps - 1)
    if mode == "exp":
        return min_lr * (max_lr / min_lr) ** frac
    return min_lr + (max_lr - min_lr) * frac


def _cycle(batches: Batches) -> Iterator[Batch]:
    """Yield batches for ever, restarting ``batches`` each time it runs out.

    A callable is called for a fresh iterator; a re-iterable (list, DataLoader) is iterated
    again; a one-shot iterator cannot restart, so running out of it is an error.
    """
    if callable(batches):
        make = batches
    elif isinstance(batches, Iterator):
        once = [batches]

        def make():
            if not once:
                raise ValueError("batches: a one-shot iterator ran out; allowed: a re-iterable "
                                 "(list, DataLoader) or a callable returning a fresh iterator")
            return once.pop()
    else:
        def make():
            return iter(batches)
    while True:
        count = 0
        for batch in make():
            count += 1
            yield batch
        if count == 0:
            raise ValueError("batches: yielded no batch; allowed: at least one (x, y) batch")


@contextlib.contextmanager
def preserved_state(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Snapshot model and optimizer on entry; restore them bit-identically on exit, always."""
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    params = list(model.parameters())
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    # Seeded dropout draws from per-module generators: restore them so later training is
    # the same as if the test never ran.
    generators = [(m.generator, m.generator.get_state()) for m in model.modules()
                  if isinstance(getattr(m, "generator", None), torch.Generator)]
    was_training = model.training
    try:
        yield
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        for gen, state in generators:
            gen.set_state(state)
        model.train(was_training)


def _group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]


def curve_result(curve: Curve, ratios: dict[str, float]) -> RangeTestResult:
    """A member's ``Curve`` as a RangeTestResult; ``ratios``: each group's rate over the
    reference rate, by group name."""
    return RangeTestResult(
        lrs=tuple(curve.lrs), losses=tuple(curve.losses), smoothed=tuple(curve.smoothed),
        stop_reason=curve.stop_reason, steps=len(curve.lrs),
        group_lrs={n: tuple(r * lr for lr in curve.lrs) for n, r in ratios.items()})


def check_sweep_opts(smoothing: float, stop_factor: float) -> None:
    """The range test's smoothing (beta in [0, 1)) and stop factor (> 1), or a ConfigError."""
    check_number("smoothing", smoothing, low=0.0, high=1.0)
    if smoothing >= 1.0:  # beta = 1 would never move off its start
        raise ConfigError(f"smoothing: got {smoothing!r}; allowed: a number >= 0 and < 1")
    check_number("stop_factor", stop_factor, low=1.0, low_open=True)


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    smoothing: float = 0.98,
    stop_factor: float = 4.0,
) -> RangeTestResult:
    """Ramp the rate from ``min_lr`` to ``max_lr`` over ``num_steps`` updates; record the loss.

    Args:
        batches: (x, y) pairs; a re-iterable or a callable returning a fresh iterator is
            restarted when it runs out (several epochs of a small set).
        loss_fn: ``loss_fn(model(x), y)`` -> scalar tensor.
        min_lr, max_lr: reference rates (group 0's base rate) of the first and last step. With
            several param groups each keeps its ratio to the reference (per-layer lr_mult).
        mode: exp (evenly spaced in log rate) | linear.
        smoothing: beta of the loss's moving average, in [0, 1); 0 = no smoothing.
        stop_factor: stop once the smoothed loss exceeds this multiple of its best (> 1).
    Returns:
        RangeTestResult; model and optimizer are restored to their state before the call.
    Raises:
        ConfigError: a bad argument (names the argument and what is allowed). Errors raised by
            ``loss_fn`` or the model propagate, after the state is restored.
    """
    rates = ramp(min_lr, max_lr, num_steps, mode)
    check_sweep_opts(smoothing, stop_factor)
    with preserved_state(model, optimizer):
        members = OneModel(model, optimizer, loss_fn)
        model.train()
        stream = ((x, y, True) for x, y in _cycle(batches))
        (curve,) = sweep(members, stream, rates, smoothing, stop_factor)
    return curve_result(curve, dict(zip(_group_names(optimizer), members.ratio_to_reference,
                                        strict=True)))


def range_test_config(
    cfg: TrainConfig, data: Dataset, *, seed: int, **opts: Any
) -> RangeTestResult:
    """Range test of a fresh ``cfg.model`` (seeded by ``seed``) with ``cfg.optim``'s groups.

    Batches of ``cfg.batch_size`` come from ``data.train`` shuffled by a generator seeded with
    ``seed`` (epoch after epoch if the test outlasts one); the loss is ``cfg.loss``. The model
    lives on the data's device. ``opts`` go to ``range_test``.
    """
    check_number("seed", seed, low=0, integer=True)
    device = data.train.x.device
    model = make_model(cfg.model, data.input_shape, data.num_classes, seed, device)
    optimizer = make_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(seed)
    return range_test(
        model, optimizer, lambda: iterate_batches(data.train, cfg.batch_size, gen),
        lambda logits, y: batch_loss(logits, y, cfg.loss), **opts,
    )


def seeds_frame(seeds: Sequence[int], results: Sequence[RangeTestResult]) -> pd.DataFrame:
    """One long table of per-seed results: seed, then ``RangeTestResult.to_frame``'s columns."""
    frames = []
    for seed, result in zip(seeds, results, strict=True):
        frame = result.to_frame()
        frame.insert(0, "seed", seed)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


class Band(NamedTuple):
    """A rule's answer over seeds: median and min..max of the suggested rates (None if none)."""

    median: float | None
    lo: float | None
    hi: float | None
    per_seed: list[Suggestion]


def suggest_band(
    df: pd.DataFrame, rule: str, *, column: str = "smoothed", **rule_opts: Any
) -> Band:
    """Apply ``rule`` (a name in ``lrpipe.search.suggest.RULES``) to each seed's curve.

    Args:
        df: ``range_test_seeds`` output (columns seed, step, lr and ``column``).
        column: which loss curve the rule reads (smoothed by default; raw losses are noisy).
    Returns:
        Band(median, lo, hi, per_seed): per_seed holds one Suggestion per seed, in ascending
        seed order; median (taken in log10 rate, so an even count gives the geometric mean of
        the middle two), lo and hi use only the seeds whose suggestion is not None.
    """
    fn = get_rule(rule)
    missing = {"seed", "step", "lr", column} - set(df.columns)
    if missing:
        raise ValueError(f"df: missing columns {sorted(missing)}; allowed: range_test_seeds "
                         "output")
    per_seed = [fn(g["lr"].to_numpy(), g[column].to_numpy(), **rule_opts)
                for _, g in df.sort_values(["seed", "step"]).groupby("seed", sort=True)]
    found = np.array([s.lr for s in per_seed if s.lr is not None], dtype=float)
    if len(found) == 0:
        return Band(None, None, None, per_seed)
    return Band(log_median(found), float(found.min()), float(found.max()), per_seed)
