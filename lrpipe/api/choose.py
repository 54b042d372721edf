"""``choose_lr``: the whole search on the user's model, as ``lrpipe search`` runs it for the
built-in ones (flows/lr_search.py), from the same pure parts of ``lrpipe.search.choose``.

1. Evidence per seed: the range test (``find_lr``'s, every rule's band) and the halving search
   (``halving_search``: from ``start_lr`` down by ``factor`` until a rung is stable, then on
   while the loss keeps falling), each rung a short training from the seed's fresh model.
2. Candidates: the halving median and each rule's median, plus a coarse log grid around them
   (``candidate_grid``), each trained for ``regret_epochs`` on the full training data.
3. The candidate with the lowest validation loss (the user's ``loss_fn``) wins; ``regret``
   says how far each candidate is from the grid's best rate (``regret_table``, ``choose_rate``).

Every training runs through the engine's loop (``lrpipe.engine.loop.fit``) with the user's
model as a ``UserModel`` member: divergence (a non-finite loss or one above ``diverge_factor``
x the initial) and the History are the engine's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from lrpipe.api.evaluation import EvalSet, UserModel
from lrpipe.api.find import check_track, find_lr
from lrpipe.api.inputs import (
    BatchSource,
    Data,
    LossFn,
    OptimizerFn,
    built_model,
    check_loss_fn,
    check_seeds,
    checked_loss,
    model_optimizer,
    trainable_device,
)
from lrpipe.engine.config import (
    DEFAULT_DIVERGE_FACTOR,
    DEFAULT_NO_PROGRESS_ERROR_RATIO,
    DEFAULT_NO_PROGRESS_RATIO,
    ConfigError,
    TrainConfig,
    check_number,
)
from lrpipe.engine.loop import TrainResult, fit
from lrpipe.engine.members import group_ratios
from lrpipe.search.choose import (
    candidate_grid,
    candidate_rates,
    chosen_band,
    decide_rate,
    halving_search,
    log_median_band,
    regret_table,
)
from lrpipe.search.rangetest import ramp

EXPERIMENT = "choose-lr"  # MLflow experiment of track=True
Band3 = tuple[float | None, float | None, float | None]  # median, lo, hi over seeds


@dataclass(frozen=True)
class ChooseLRResult:
    """The chosen rate and its evidence.

    lr: the rate to train with (param group 0's; other groups keep their ratio to it).
    chosen_by: the candidate(s) at that rate (halving, valley, ...), or "grid best".
    reason: the evidence in words (validation losses, runner-up, regret).
    band: (lo, hi) over seeds of the candidates at ``lr``.
    candidates: name -> median rate; bands: name -> (median, lo, hi) over seeds.
    curves: the range tests (seed, step, lr, loss, smoothed, stop_reason).
    ladders: the halving rungs (seed, lr, loss, diverged, reason).
    grid: one row per trained rate (lr, status, val_loss, val_error, diverged_epoch, epochs).
    regret: ``regret_table`` (name, lr, val_loss, best_lr, best_val_loss, regret).
    run_id: the MLflow run it was logged to, or None.
    """

    lr: float
    chosen_by: str
    reason: str
    band: tuple[float, float]
    candidates: dict[str, float]
    bands: dict[str, Band3]
    curves: pd.DataFrame = field(repr=False)
    ladders: pd.DataFrame = field(repr=False)
    grid: pd.DataFrame = field(repr=False)
    regret: pd.DataFrame = field(repr=False)
    run_id: str | None = None

    def figure(self) -> Figure:
        """Two panels: the range tests with each rule's band, and the grid's validation loss
        against rate with the candidates and their regret (``lrpipe.plots.search``)."""
        from lrpipe.plots.search import plot_range_test, plot_regret  # seaborn on first use

        fig = Figure(figsize=(14.0, 4.8), layout="constrained")
        left, right = fig.subplots(1, 2)
        rules = {k: v for k, v in self.bands.items() if k != "halving"}
        plot_range_test(self.curves, rules, ax=left)
        plot_regret(self.grid, self.regret, ax=right)
        return fig


@dataclass
class Trainer:
    """What every short training of ``choose_lr`` shares: a fresh model per seed, the user's
    optimizer at a given reference rate, the training batches and the evaluation sets."""

    model_fn: Callable[[int], nn.Module]
    optimizer_fn: OptimizerFn | None
    loss_fn: LossFn
    train: BatchSource
    train_eval: EvalSet
    val: EvalSet
    diverge_factor: float

    def run(self, seed: int, lr: float, epochs: int, max_steps: int | None = None, *,
            model: nn.Module | None = None,
            on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
        """Train ``model_fn(seed)`` at reference rate ``lr`` for ``epochs`` epochs (at most
        ``max_steps`` updates in all) in the seed's batch order; History in loss_fn units.

        ``model``: a fresh ``built_model(model_fn, seed)`` the caller built (``sweep`` builds
        them under a lock, as threads share torch's global generator); None builds it here.
        ``on_epoch(row)``: called with each History row as the loop emits it (live logging).
        """
        model = built_model(self.model_fn, seed) if model is None else model
        optimizer = model_optimizer(model, self.optimizer_fn)
        for group, ratio in zip(optimizer.param_groups, group_ratios(optimizer), strict=True):
            group["lr"] = ratio * lr  # the factory's ratios between groups are kept
        per_epoch = None if max_steps is None else max(1, max_steps // epochs)
        members = UserModel(model, optimizer, self.loss_fn)
        model.train()
        with self.train.seeded(seed):
            (result,) = fit(
                members, lambda: ((x, y, True) for x, y in
                                  itertools.islice(self.train.epoch(), per_epoch)),
                epochs=epochs, train_eval=self.train_eval, val=self.val, loss="loss_fn",
                diverge_factor=self.diverge_factor,
                no_progress=(DEFAULT_NO_PROGRESS_RATIO,  # always a fresh model_fn(seed)
                             DEFAULT_NO_PROGRESS_ERROR_RATIO),
                on_epoch=None if on_epoch is None else lambda _, row: on_epoch(row))
        return result


def halving_ladders(trainer: Trainer, seeds: Sequence[int], opts: Mapping[str, Any],
                    max_steps: int | None) -> tuple[pd.DataFrame, list[float | None]]:
    """Each seed's halving search (``halving_search`` with the rungs trained by ``trainer``):
    all ladders in one table (a seed column first) and each seed's chosen rate."""
    # halving_search drives the ladder; the config it hands train_fn carries only the rung's
    # rate and budget, which is all train_fn reads (the model and data are the user's).
    ladders, chosen = [], []
    for seed in seeds:
        found = halving_search(
            TrainConfig(), None, train_fn=lambda cfg, _, s=seed: trainer.run(
                s, cfg.optim.lr, cfg.epochs, max_steps), **opts)
        ladders.append(found.ladder.assign(seed=seed))
        chosen.append(found.chosen_lr)
    table = pd.concat(ladders, ignore_index=True)
    return table[["seed", *(c for c in table.columns if c != "seed")]], chosen


def grid_results(trainer: Trainer, rates: Sequence[float], seed: int,
                 epochs: int) -> pd.DataFrame:
    """A full training of ``epochs`` at every rate (seed ``seed``): one row each."""
    rows = []
    for lr in rates:
        final = trainer.run(seed, lr, epochs).final()
        rows.append(dict(lr=lr, status=final["status"], val_loss=final["val_loss"],
                         val_error=final["val_error"], diverged_epoch=final["diverged_epoch"],
                         epochs=final["epoch"]))
    return pd.DataFrame(rows)


def eval_sets(train: BatchSource, val: BatchSource, seed: int) -> tuple[EvalSet, EvalSet]:
    """(a fixed training subset as large as the validation set, the validation set).

    The subset is the first batches of ``seed``'s order, kept in memory, so every training
    is evaluated on the same examples (as ``lrpipe.engine.train.eval_train_split``)."""
    size, kept, count = len(val), [], 0
    with train.seeded(seed):
        for x, y in train.epoch():
            kept.append((x, y))
            count += len(y)
            if count >= size:
                break
    return EvalSet(lambda: kept), EvalSet(lambda: val.epoch(shuffle=False))


def choose_lr(
    model_fn: Callable[[int], nn.Module],
    train: Data,
    val: Data,
    loss_fn: LossFn,
    optimizer_fn: OptimizerFn | None = None,
    *,
    seeds: int | Sequence[int] = 3,
    batch_size: int | None = None,
    range_steps: int = 100,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    start_lr: float = 10.0,
    factor: float = 0.5,
    halving_min_lr: float = 1e-5,
    budget_epochs: int = 1,
    max_steps: int | None = None,
    regret_epochs: int = 3,
    grid_span: float = 1.0,
    points_per_decade: int = 2,
    diverge_factor: float = DEFAULT_DIVERGE_FACTOR,
    track: bool | str = False,
) -> ChooseLRResult:
    """Choose a learning rate for your model with evidence: range test and halving search over
    seeds, then short full trainings at the candidates and a grid around them.

    Args:
        model_fn: ``model_fn(seed) -> nn.Module``, a fresh model (called with torch's
            generators seeded by ``seed``, so its initial weights are reproducible).
        train, val: training and validation data, each as ``find_lr``'s ``data`` (DataLoader,
            re-iterable of (x, y) batches, callable returning an iterator, or tensors (x, y)).
        loss_fn: ``loss_fn(model(x), y)`` -> scalar tensor (mean over the batch); trained on
            and evaluated with (validation loss = its mean over ``val``).
        optimizer_fn: ``optimizer_fn(model) -> Optimizer`` (its rate is replaced, every
            group's ratio to group 0 kept); None: plain SGD. Pass the optimizer you train with.
        seeds: how many seeds (3: 0, 1, 2) or which: one range test and one halving search each.
        batch_size: examples per batch when train and val are tensors (default 64).
        range_steps, min_lr, max_lr: the range test's updates per seed and reference rates.
        start_lr, factor, halving_min_lr: the halving ladder's rates, start_lr x factor^k
            down to halving_min_lr (defaults 10, 0.5, 1e-5).
        budget_epochs, max_steps: a rung's budget: epochs of ``train`` (default 1), at most
            ``max_steps`` updates in all (None: no cap).
        regret_epochs: epochs of full training per candidate and grid rate (default 3).
        grid_span, points_per_decade: the grid around the candidates: decades below the
            lowest and above the highest (default 1) and rates per decade (default 2).
        diverge_factor: a training stops as diverged at a batch loss above this multiple of
            its initial loss, or a non-finite one (default 10).
        track: False, True (MLflow experiment ``choose-lr``) or an experiment name.
    Returns:
        ChooseLRResult: ``.lr``, ``.chosen_by``, ``.reason``, ``.band``, the evidence tables
        and ``.figure()``.
    Raises:
        ValueError: an argument that is not allowed, before any training (the message names
            it), or no candidate at all (every range test and rung failed).
    """
    seeds = check_seeds(seeds)
    params = {"seeds": list(seeds), "range_steps": range_steps, "min_lr": min_lr,
              "max_lr": max_lr, "start_lr": start_lr, "factor": factor,
              "halving_min_lr": halving_min_lr, "budget_epochs": budget_epochs,
              "max_steps": max_steps, "regret_epochs": regret_epochs, "grid_span": grid_span,
              "points_per_decade": points_per_decade, "diverge_factor": diverge_factor}
    experiment = check_track(track)
    check_loss_fn(loss_fn)
    check_choose_args(params)
    device = trainable_device(built_model(model_fn, seeds[0]), "model_fn(seed)")
    sources = [BatchSource(d, name=n, batch_size=batch_size, device=device)
               for d, n in ((train, "train"), (val, "val"))]
    trainer = Trainer(model_fn, optimizer_fn, checked_loss(loss_fn), sources[0],
                      *eval_sets(*sources, seeds[0]), diverge_factor)
    found = find_lr(model_fn, train, loss_fn, optimizer_fn, seeds=seeds, batch_size=batch_size,
                    min_lr=min_lr, max_lr=max_lr, num_steps=range_steps)
    ladders, chosen = halving_ladders(trainer, seeds, dict(
        start_lr=start_lr, factor=factor, min_lr=halving_min_lr, budget_epochs=budget_epochs),
        max_steps)
    bands = {"halving": log_median_band(chosen),
             **{rule: tuple(band[:3]) for rule, band in found.bands.items()}}
    candidates = candidate_rates(bands)
    grid = grid_results(trainer, candidate_grid(list(candidates.values()), points_per_decade,
                                                grid_span), seeds[0], regret_epochs)
    regret = regret_table(grid, candidates)
    lr, chosen_by, reason = decide_rate(regret)
    choice = dict(lr=lr, chosen_by=chosen_by, reason=reason,
                  band=chosen_band(lr, candidates, bands))
    result = ChooseLRResult(choice["lr"], choice["chosen_by"], choice["reason"], choice["band"],
                            candidates, bands, found.curves, ladders, grid, regret)
    if experiment is None:
        return result
    from lrpipe.api.track import log_choose_lr  # mlflow loads only when asked to log

    params["model"] = getattr(model_fn, "__qualname__", type(model_fn).__name__)
    tables = {"curves": found.curves, "ladders": ladders, "grid": grid, "regret": regret,
              "bands": bands}
    run_id = log_choose_lr(experiment, params, tables, choice, result.figure())
    return dataclasses.replace(result, run_id=run_id)


def check_choose_args(opts: Mapping[str, Any]) -> None:
    """``choose_lr``'s numeric settings, or a ConfigError naming the bad one, before any work
    (the functions that use them check them again)."""
    ramp(opts["min_lr"], opts["max_lr"], opts["range_steps"])
    check_number("start_lr", opts["start_lr"], low=0.0, low_open=True)
    check_number("factor", opts["factor"], low=0.0, high=1.0, low_open=True)
    if opts["factor"] >= 1.0:  # a factor of 1 would retry the same rate for ever
        raise ConfigError(f"factor: got {opts['factor']!r}; allowed: a number > 0 and < 1")
    check_number("halving_min_lr", opts["halving_min_lr"], low=0.0, high=opts["start_lr"],
                 low_open=True)
    check_number("budget_epochs", opts["budget_epochs"], low=1, integer=True)
    if opts["max_steps"] is not None:
        check_number("max_steps", opts["max_steps"], low=1, integer=True)
    regret_epochs, diverge_factor = opts["regret_epochs"], opts["diverge_factor"]
    grid_span, points_per_decade = opts["grid_span"], opts["points_per_decade"]
    check_number("regret_epochs", regret_epochs, low=1, integer=True)
    check_number("diverge_factor", diverge_factor, low=1.0, low_open=True)
    check_number("grid_span", grid_span, low=0.0)
    check_number("points_per_decade", points_per_decade, low=1, integer=True)

