"""``sweep``: the learning-rate grid on the user's model, recorded as ``lrpipe sweep`` records
the built-in ones (flows/lr_sweep.py): one parent MLflow run, one child run per (rate, seed),
the sweep's figures and report on the parent.

Every training is ``choose_lr``'s ``Trainer``: a fresh ``model_fn(seed)``, the user's
optimizer at the rate (param groups keep their ratios), the engine's one loop
(``lrpipe.engine.loop.fit``) with the model as a ``UserModel``, so divergence and the History
are the engine's, in the units of the user's ``loss_fn``. The fan-out is in-process (lrpipe
knows nothing of Prefect): ``workers`` threads, each training on ``cores // workers`` torch
threads, the rule of flows/common.py ``set_torch_threads``, written down again here.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from lrpipe.api.choose import Trainer, eval_sets
from lrpipe.api.evaluation import EvalSet
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
    seeded_rng,
    trainable_device,
)
from lrpipe.engine.config import DEFAULT_DIVERGE_FACTOR, ConfigError, check_number
from lrpipe.engine.loop import TrainResult, clear_stop, request_stop, stop_requested
from lrpipe.engine.members import group_ratios
from lrpipe.report import sweep_finding

EXPERIMENT = "lr-sweep"  # the experiment ``lrpipe sweep`` records into
SUMMARY_COLUMNS = ("lr", "seed", "status", "val_loss", "val_error", "best_val_error",
                   "diverged_epoch", "run_id")
CURVES = ("train_loss", "val_loss", "train_error", "val_error")
# model_fn(seed) draws its weights from torch's global generator, which threads share: one
# model is built at a time, so each seed's initial weights are the same whatever ``workers``.
MODEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class SweepResult:
    """What ``sweep`` trained.

    best_lr: the rate with the lowest validation loss (mean over seeds) among those where no
        seed diverged (the rule of ``lrpipe sweep`` and its report); None if every rate
        diverged.
    summary: one row per training, sorted by rate and seed: lr, seed, status (ok | diverged),
        val_loss, val_error (after the last finite epoch), best_val_error (of any epoch),
        diverged_epoch (<NA> unless diverged), run_id (its MLflow child run, None untracked).
    history: one row per training and evaluated epoch (0 = before training): lr, seed, epoch,
        train_loss, val_loss, train_error, val_error (in ``loss_fn``'s units; errors NaN
        unless the model classifies), status, diverged_epoch, run_id, time_s, lr/<group>.
    parent_run_id: the MLflow parent run, None with ``track=False``.
    """

    best_lr: float | None
    summary: pd.DataFrame = field(repr=False)
    history: pd.DataFrame = field(repr=False)
    parent_run_id: str | None = None

    @property
    def by_rate(self) -> pd.DataFrame:
        """One row per rate (``rate_summary``): what the report and ``best_lr`` read."""
        return rate_summary(self.summary)

    def figures(self) -> dict[str, Any]:
        """The figures ``lrpipe sweep`` logs, by artifact name (``sweep_figures`` of
        ``seed_mean(history)``); error_vs_epoch only where the model classifies."""
        from lrpipe.plots.sweep import sweep_figures  # seaborn loads on first use only

        curves = seed_mean(self.history)
        figures = sweep_figures(curves)
        if curves["val_error"].isna().all():  # a regression net has no error to draw
            import matplotlib.pyplot as plt

            plt.close(figures.pop("error_vs_epoch"))
        return figures


def rate_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per rate, columns of ``lrpipe.report.SWEEP_COLUMNS`` plus seeds: the means over
    seeds of val_loss, val_error and best_val_error; status diverged if any seed diverged
    (a rate one seed cannot train is no safe choice); the earliest diverged_epoch; the first
    seed's run_id (the report links it)."""
    by = summary.groupby("lr", sort=True)
    out = by.agg(val_loss=("val_loss", "mean"), val_error=("val_error", "mean"),
                 best_val_error=("best_val_error", "mean"),
                 diverged_epoch=("diverged_epoch", "min"), run_id=("run_id", "first"),
                 seeds=("seed", "size"))
    out.insert(0, "status", by["status"].agg(worst_status))
    return out.reset_index()


def worst_status(statuses: pd.Series) -> str:
    """diverged if any of a rate's trainings diverged, else no_progress if any ended near
    chance, else ok."""
    for status in ("diverged", "no_progress"):
        if (statuses == status).any():
            return status
    return "ok"


def seed_mean(history: pd.DataFrame) -> pd.DataFrame:
    """The History the sweep figures draw: per rate and epoch, the mean over seeds of the
    losses and errors, for the epochs every seed of that rate reached (so a rate's curve ends
    where its first seed blew up); status and diverged_epoch as ``rate_summary``'s. With one
    seed, the History itself."""
    per_epoch = history.groupby(["lr", "epoch"])
    curves = per_epoch[list(CURVES)].mean().join(per_epoch["seed"].nunique().rename("n"))
    curves = curves.reset_index().merge(
        history.groupby("lr")["seed"].nunique().rename("seeds"), on="lr")
    rates = history.groupby("lr").agg(status=("status", worst_status),
                                      diverged_epoch=("diverged_epoch", "min"))
    kept = curves[curves["n"] == curves["seeds"]].drop(columns=["n", "seeds"])
    return kept.merge(rates, on="lr").sort_values(["lr", "epoch"]).reset_index(drop=True)


def check_lrs(lrs: Any) -> tuple[float, ...]:
    """``lrs`` sorted, as floats; a ConfigError naming ``lrs`` unless they are a non-empty
    collection of distinct finite rates > 0."""
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Iterable):
        raise ConfigError(f"lrs: got {lrs!r}; allowed: a non-empty list of finite rates > 0")
    rates = list(lrs)
    if not rates:
        raise ConfigError("lrs: got []; allowed: a non-empty list of finite rates > 0")
    for lr in rates:
        check_number("lrs", lr, low=0.0, low_open=True)
    if len(set(rates)) != len(rates):
        raise ConfigError(f"lrs: got {rates}; allowed: distinct rates")
    return tuple(sorted(float(lr) for lr in rates))


def check_sweep_args(epochs: Any, workers: Any, diverge_factor: Any, experiment: Any,
                     track: Any) -> None:
    """The other settings of ``sweep``, or a ConfigError naming the bad one."""
    check_number("epochs", epochs, low=1, integer=True)
    check_number("workers", workers, low=1, integer=True)
    check_number("diverge_factor", diverge_factor, low=1.0, low_open=True)
    if not isinstance(track, bool):
        raise ConfigError(f"track: got {track!r}; allowed: True or False")
    if not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError(f"experiment: got {experiment!r}; allowed: an MLflow experiment name")


def threads_per_training(workers: int) -> int:
    """Torch threads for each of ``workers`` concurrent trainings: workers x threads <= the
    cores this process may use (oversubscribed, the same work ran 8-26x slower here)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


def check_first_batch(model: nn.Module, loss_fn: LossFn, batches: EvalSet, seed: int) -> None:
    """``loss_fn(model(x), y)`` on the first training batch, on a model no training uses, so
    that a model that does not fit the data, or a loss that cannot be trained on, is one line
    naming the argument before any run is recorded."""
    x, y = next(iter(batches.batches()))
    with seeded_rng(seed):  # dropout draws leave the caller's stream as it was
        try:
            output = model(x)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is the message
            raise ValueError(f"model_fn: its model fails on a batch of train (x {describe(x)}): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        try:
            loss_fn(output, y)
        except ValueError:
            raise  # checked_loss's own one-line message, naming loss_fn
        except Exception as exc:  # noqa: BLE001 - the user's loss on the model's output
            raise ValueError(f"loss_fn: fails on the model's output ({describe(output)}) and y "
                             f"({describe(y)}): {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0]}") from None


@dataclass(frozen=True)
class Grid:
    """What every training of one sweep shares; ``train_one`` is one (rate, seed)."""

    trainer: Trainer
    train: Data  # the user's training data: each training gets its own BatchSource
    batch_size: int | None
    epochs: int
    threads: int | None  # torch threads of a worker thread; None: the caller's thread, as is
    experiment: str
    parent_run_id: str | None
    params: dict[str, Any]  # the child runs' params that all trainings share

    def train_one(self, lr: float, seed: int) -> tuple[dict[str, Any], pd.DataFrame]:
        """Train ``model_fn(seed)`` at ``lr`` (a child run when tracked): (summary row, History
        with lr, seed, status, diverged_epoch and run_id columns)."""
        if self.threads is not None:  # per OS thread under OpenMP: set in the worker itself
            torch.set_num_threads(self.threads)
        own = BatchSource(self.train, name="train", batch_size=self.batch_size,
                          device=self.trainer.train.device)  # its own shuffle generator
        trainer = dataclasses.replace(self.trainer, train=own)
        with MODEL_LOCK:
            model = built_model(trainer.model_fn, seed)
        if self.parent_run_id is None:
            return outcome(lr, seed, trainer.run(seed, lr, self.epochs, model=model), None)
        from lrpipe.api.track import log_outcome, training_child

        name = f"lr={lr:g} {self.params['optim.name']} {self.params['model.name']} seed={seed}"
        with training_child(self.experiment, self.parent_run_id, name,
                            {**self.params, "optim.lr": lr, "seed": seed}) as (run_id, log):
            result = trainer.run(seed, lr, self.epochs, model=model, on_epoch=log)
            log_outcome(run_id, result)
        return outcome(lr, seed, result, run_id)


def outcome(lr: float, seed: int, result: TrainResult, run_id: str | None
            ) -> tuple[dict[str, Any], pd.DataFrame]:
    """One training's summary row and its History, labelled with rate, seed and run."""
    final = result.final()
    row = dict(lr=lr, seed=seed, status=result.status, val_loss=final["val_loss"],
               val_error=final["val_error"], best_val_error=final["best_val_error"],
               diverged_epoch=result.diverged_epoch, run_id=run_id)
    history = result.history.assign(lr=lr, seed=seed, status=result.status,
                                    diverged_epoch=result.diverged_epoch, run_id=run_id)
    return row, history


def run_all(train_one: Callable[[float, int], Any], jobs: Sequence[tuple[float, int]],
            workers: int) -> list[Any]:
    """``train_one(lr, seed)`` for every job, results in job order: in this thread for one
    worker, else on a pool of ``workers`` threads. After a failure no further job starts
    (nothing recorded for them) and the running ones end; then the failure is raised (the
    first in job order). On Ctrl-C the running ones stop before their next update (their
    runs end KILLED) and KeyboardInterrupt is raised."""
    if workers == 1:
        return [train_one(*job) for job in jobs]
    failed = threading.Event()

    def guarded(job: tuple[float, int]) -> Any:
        if failed.is_set():
            return None  # never started: the failure below is what the caller sees
        try:
            return train_one(*job)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(workers, thread_name_prefix="lrpipe-sweep") as pool:
        futures = [pool.submit(guarded, job) for job in jobs]
        try:
            wait(futures)
        except KeyboardInterrupt:
            failed.set()
            stopping = not stop_requested()
            if stopping:
                request_stop()
            try:
                wait(futures)
            finally:
                if stopping:
                    clear_stop()
            raise
    for future in futures:
        if future.exception() is not None:
            future.result()  # raises it
    return [future.result() for future in futures]


def tables(results: list[tuple[dict[str, Any], pd.DataFrame]]
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, history) of the trainings, sorted by rate, seed (and epoch)."""
    summary = pd.DataFrame([row for row, _ in results], columns=list(SUMMARY_COLUMNS))
    summary = summary.astype({"diverged_epoch": "Int64"}).sort_values(["lr", "seed"])
    history = pd.concat([h for _, h in results], ignore_index=True)
    history = history.astype({"diverged_epoch": "Int64"}).sort_values(["lr", "seed", "epoch"])
    first = ["lr", "seed", "epoch", *CURVES, "status", "diverged_epoch", "run_id"]
    history = history[first + [c for c in history.columns if c not in first]]
    return summary.reset_index(drop=True), history.reset_index(drop=True)


def sweep(
    model_fn: Callable[[int], nn.Module],
    train: Data,
    val: Data,
    loss_fn: LossFn,
    optimizer_fn: OptimizerFn | None = None,
    *,
    lrs: Sequence[float],
    epochs: int,
    seeds: int | Sequence[int] = (0,),
    batch_size: int | None = None,
    workers: int = 1,
    diverge_factor: float = DEFAULT_DIVERGE_FACTOR,
    experiment: str = EXPERIMENT,
    track: bool = True,
) -> SweepResult:
    """Train your model at every rate of ``lrs`` (and every seed) for ``epochs`` epochs and
    record each training as an MLflow child run of one parent run, with the sweep's figures
    and report, as ``lrpipe sweep`` does for the built-in models.

    Each child run has params (optim.lr, seed, epochs, model.name, optim.name, loss_fn, ...),
    the per-epoch metrics train_loss, val_loss, train_error, val_error, lr (step = epoch, 0 =
    before training), tags status (ok | diverged) and diverged_epoch, and NaN losses at the
    epoch where it blew up. The parent holds the figures (``figures/*.png``), summary.csv,
    best_lr and report.md. The Prefect-orchestrated equivalent, one Prefect task per rate, is
    the command ``lrpipe sweep --model pkg.mod:build --data pkg.mod:load``.

    Args:
        model_fn: ``model_fn(seed) -> nn.Module``, a fresh model (built with torch's
            generators seeded by ``seed``, so its initial weights are reproducible).
        train, val: training and validation data, each a DataLoader, a re-iterable of (x, y)
            batches, a callable returning an iterator of them, or tensors (x, y).
        loss_fn: ``loss_fn(model(x), y)`` -> scalar tensor (mean over the batch); trained on
            and evaluated with (train_loss on a fixed training subset as large as ``val``).
        optimizer_fn: ``optimizer_fn(model) -> Optimizer`` (its rate is replaced by each rate
            of ``lrs``, every group's ratio to group 0 kept); None: plain SGD.
        lrs: the rates (param group 0's), distinct and > 0; trained in increasing order.
        epochs: passes over ``train`` per training (>= 1).
        seeds: how many seeds (3: 0, 1, 2) or which (default one, seed 0): each rate trains
            once per seed (fresh weights and batch order); figures and report show the mean.
        batch_size: examples per batch when train and val are tensors (default 64).
        workers: trainings at once (>= 1). 1 (default): one after another in this thread.
            More: a thread pool, each training on max(1, cores // workers) torch threads.
            Reproducibility: a model's initial weights (built one at a time), the tensors'
            shuffle and a fixed list of batches are seeded per training, so with tensors (or
            unshuffled batches) and a model that draws nothing random while training,
            workers > 1 gives workers=1's numbers (bit for bit at the same torch thread
            count). A DataLoader with shuffle=True and dropout draw from torch's global
            generator (or the loader's own), which threads share: their draws interleave, and
            the numbers vary from call to call. Use workers=1 for those: then every call
            gives the same numbers, and torch's and the loader's generators are left as
            they were.
        diverge_factor: a training stops as diverged at a batch loss above this multiple of
            its initial loss, or a non-finite one (> 1; default 10).
        experiment: the MLflow experiment (default ``lr-sweep``, the command's).
        track: record in MLflow (default True: store ``MLFLOW_TRACKING_URI`` or
            ./mlruns); False trains only.
    Returns:
        SweepResult: ``.summary``, ``.history``, ``.best_lr``, ``.by_rate``,
        ``.parent_run_id``, ``.figures()``.
    Raises:
        ValueError: an argument that is not allowed (a ConfigError for the settings), or a
            model and loss that fail on the first batch: one line naming it, before any run
            is recorded. An error in a training ends its run FAILED and the parent FAILED
            (KILLED on Ctrl-C), then propagates; no run is left RUNNING.
    """
    rates, seeds = check_lrs(lrs), check_seeds(seeds)
    check_sweep_args(epochs, workers, diverge_factor, experiment, track)
    check_loss_fn(loss_fn)
    loss = checked_loss(loss_fn)
    first = built_model(model_fn, seeds[0])
    device = trainable_device(first, "model_fn(seed)")
    optimizer = model_optimizer(first, optimizer_fn)
    group_ratios(optimizer)  # a reference rate it can scale
    sources = [BatchSource(d, name=n, batch_size=batch_size, device=device)
               for d, n in ((train, "train"), (val, "val"))]
    with seeded_rng(seeds[0]):  # a DataLoader draws its base seed from torch's generator
        train_eval, val_set = eval_sets(*sources, seeds[0])
    check_first_batch(first, loss, train_eval, seeds[0])
    params = {"model.name": type(first).__name__, "optim.name": type(optimizer).__name__,
              "loss_fn": getattr(loss_fn, "__name__", type(loss_fn).__name__),
              "epochs": epochs, "batch_size": sources[0].batch_size,
              "diverge_factor": diverge_factor}
    grid = Grid(Trainer(model_fn, optimizer_fn, loss, sources[0], train_eval, val_set,
                        diverge_factor), train, batch_size, epochs,
                None if workers == 1 else threads_per_training(workers), experiment, None,
                params)
    jobs = [(lr, seed) for lr in rates for seed in seeds]
    if not track:
        return finished(run_grid(grid, jobs, workers, sources[0], seeds[0]), None)
    from lrpipe.api.track import log_sweep, sweep_parent  # mlflow loads only when asked

    name = f"sweep {params['optim.name']} {params['model.name']} {len(rates)} rates"
    with sweep_parent(experiment, name + (f" x {len(seeds)} seeds" if len(seeds) > 1 else ""),
                      {**params, "lrs": list(rates), "seeds": list(seeds),
                       "workers": workers}) as parent:
        result = finished(run_grid(dataclasses.replace(grid, parent_run_id=parent), jobs,
                                   workers, sources[0], seeds[0]), parent)
        title = f"Learning-rate sweep: {len(rates)} rates" + (
            f" x {len(seeds)} seeds (means over seeds)" if len(seeds) > 1 else "")
        log_sweep(parent, experiment, result.summary, result.by_rate, result.figures(), title)
    return result


def run_grid(grid: Grid, jobs: list[tuple[float, int]], workers: int, train: BatchSource,
             seed: int) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Every training of ``grid``; with threads, the caller's global random state, a loader's
    own generator and torch's thread count are restored afterwards (each training in one
    thread restores them itself)."""
    if workers == 1:
        return run_all(grid.train_one, jobs, 1)
    threads = torch.get_num_threads()
    try:
        with train.seeded(seed):
            return run_all(grid.train_one, jobs, workers)
    finally:
        torch.set_num_threads(threads)


def finished(results: list[tuple[dict[str, Any], pd.DataFrame]],
             parent_run_id: str | None) -> SweepResult:
    """The SweepResult of the trainings; best_lr by ``lrpipe.report.sweep_finding``."""
    summary, history = tables(results)
    return SweepResult(sweep_finding(rate_summary(summary)).best_lr, summary, history,
                       parent_run_id)
