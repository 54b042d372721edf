"""The one training loop, for K >= 1 members (``lrpipe.engine.members``).

``fit`` trains: it evaluates before any update (epoch 0) and after every epoch, on a fixed
training subset and on the validation split, both in eval mode. A member whose batch loss is
not finite or above ``diverge_factor`` x its initial loss is stopped at once (that batch's
update is not applied) and recorded as ``diverged`` with the epoch, its finite history kept;
an epoch whose evaluated training loss is over that limit, or whose validation loss is not
finite, ends the member the same way. The others go on. A loss that oscillates but stays
under the limit is trained to the last epoch. A member that trained to the end but whose
final validation loss (and error) stayed near epoch 0's ends ``no_progress``
(``made_no_progress``). On request (``log_every``) the loop also keeps each member's smoothed
batch loss every few steps (``StepLog``). The loop emits (``on_epoch``); the caller logs.

``sweep`` is the same loop as the LR range test runs it: the rate follows a ramp, there is no
evaluation, and each member stops on its own rule (``Curve``).

``train()`` (one model, torch.optim and its scheduler), ``train_batched()`` (K stacked members)
and the range tests (one model, or K seeds stacked) all run through these two functions.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from lrpipe.engine.data import Split

METRICS = ("train_loss", "val_loss", "train_error", "val_error", "lr")
STATUSES = ("ok", "diverged", "no_progress")
STEP_COLUMNS = ("step", "epoch", "train_loss_smooth")
# The step log's smoothing: an exponential moving average of the batch loss with bias
# correction, beta 0.98 as in the range test's curve (fastai's and torch-lr-finder's
# default): about the last 50 batches weigh in, so the line follows the oscillation from
# one rate to another while a single batch's noise does not dominate it.
STEP_LOSS_BETA = 0.98


class Stopped(Exception):
    """Training was asked to stop (``should_stop`` returned True): Ctrl-C or SIGTERM, say.
    Raised between two updates; nothing of the interrupted step is applied."""


# One process-wide request to stop, like a KeyboardInterrupt that reaches every training
# thread: the command line sets it on SIGINT/SIGTERM, and every fit and sweep in the process
# (on Prefect's worker threads too) stops before its next update.
_STOP = threading.Event()


def request_stop() -> None:
    """Ask every training loop of this process to stop before its next update."""
    _STOP.set()


def clear_stop() -> None:
    """Withdraw the request (a new command in the same process, or a test)."""
    _STOP.clear()


def stop_requested() -> bool:
    """Whether ``request_stop`` was called (and not cleared): the loops' default check."""
    return _STOP.is_set()
Batch3 = tuple[torch.Tensor, torch.Tensor, bool]  # x, y, shared by every member


def empty_step_log() -> pd.DataFrame:
    """The step log of a run that kept none (``log_every`` 0): STEP_COLUMNS, no rows."""
    return pd.DataFrame({"step": pd.Series(dtype="int64"), "epoch": pd.Series(dtype="float64"),
                         "train_loss_smooth": pd.Series(dtype="float64")})


def made_no_progress(history: pd.DataFrame, loss_ratio: float, error_ratio: float) -> bool:
    """Whether a run that trained to its last epoch ended near where it started (chance).

    True when the last row's ``val_loss`` is at least ``loss_ratio`` x epoch 0's and, where
    both errors are numbers, its ``val_error`` at least ``error_ratio`` x epoch 0's too: the
    error keeps an overconfident but accurate run (cross-entropy up, error down, as the softmax
    net's at high rates) from counting; a user's loss without an error is judged on the loss.
    A history with epoch 0 alone has nothing to judge: False.
    """
    if len(history) < 2:
        return False
    first, last = history.iloc[0], history.iloc[-1]
    near = float(last["val_loss"]) >= loss_ratio * float(first["val_loss"])
    errors = float(first.get("val_error", math.nan)), float(last.get("val_error", math.nan))
    if all(math.isfinite(e) for e in errors):
        near = near and errors[1] >= error_ratio * errors[0]
    return near


class StepLog:
    """Each member's batch loss, smoothed (STEP_LOSS_BETA, bias-corrected), read every
    ``every`` steps while the member trains.

    The average lives on the device and is updated without a sync; only every ``every``-th
    step reads it back (one sync). A stopped member's average stops with it: the batch that
    stopped it is left out, as its update was.
    """

    def __init__(self, k: int, device: torch.device, every: int, steps_per_epoch: int,
                 beta: float = STEP_LOSS_BETA) -> None:
        self.every, self.steps_per_epoch, self.beta = every, steps_per_epoch, beta
        self.avg = torch.zeros(k, dtype=torch.float64, device=device)
        self.rows: list[list[dict]] = [[] for _ in range(k)]

    def add(self, step: int, losses: torch.Tensor, alive: torch.Tensor) -> None:
        """The batch losses (K,) of global step ``step`` (1-based); ``alive``: members that
        took the step."""
        mixed = self.beta * self.avg + (1.0 - self.beta) * losses.to(torch.float64)
        self.avg = torch.where(alive, mixed, self.avg)
        if step % self.every:
            return
        smooth = (self.avg / (1.0 - self.beta ** step)).tolist()
        for m, live in enumerate(alive.tolist()):
            if live:
                self.rows[m].append(dict(step=step, epoch=step / self.steps_per_epoch,
                                         train_loss_smooth=smooth[m]))

    def table(self, m: int) -> pd.DataFrame:
        """Member ``m``'s rows (STEP_COLUMNS)."""
        return pd.DataFrame(self.rows[m], columns=list(STEP_COLUMNS)) if self.rows[m] else \
            empty_step_log()


@dataclass
class TrainResult:
    """What a run produced. ``history`` has one row per evaluated epoch (0 = before training)."""

    history: pd.DataFrame
    status: str  # one of STATUSES: "ok" | "diverged" | "no_progress"
    diverged_epoch: int | None = None
    device: str = "cpu"
    model: nn.Module | None = field(default=None, repr=False)
    lr_trace: list[float] = field(default_factory=list, repr=False)  # base rate at every step
    # The smoothed batch loss every ``log_every`` steps (STEP_COLUMNS; empty when off).
    step_log: pd.DataFrame = field(default_factory=empty_step_log, repr=False)

    def final(self) -> dict[str, float]:
        """Metrics of the last finite epoch (plus status), small enough to pass between tasks."""
        last = self.history.iloc[-1]
        out = {m: float(last[m]) for m in METRICS if m in last}
        out.update(epoch=int(last["epoch"]), status=self.status,
                   diverged_epoch=self.diverged_epoch,
                   best_val_loss=float(self.history["val_loss"].min()),
                   best_val_error=float(self.history["val_error"].min()))
        return out


@dataclass
class _Run:
    """One member's growing History and status while the loop runs."""

    rows: list[dict]
    status: str = "ok"
    diverged_epoch: int | None = None
    steps: int = 0  # updates whose rate the member saw (the diverging one included)


def _rows(members, train_eval: Split, val: Split, epoch: int, lrs: list[float],
          seconds: float, extra: dict[str, list[float]]) -> list[dict]:
    """One History row per member (``extra``: per-member columns, lr/<group> and
    ratio/<layer>)."""
    train_loss, train_error = members.evaluate(train_eval)
    val_loss, val_error = members.evaluate(val)
    return [dict(epoch=epoch, train_loss=train_loss[m], val_loss=val_loss[m],
                 train_error=train_error[m], val_error=val_error[m], lr=lrs[m], time_s=seconds,
                 **{col: values[m] for col, values in extra.items()})
            for m in range(members.k)]


class _Alive:
    """Which members still train, and the step at which each stopped (-1: not stopped).

    A batch loss that is not finite, or above the member's ``threshold`` (compared in the
    loss's dtype), stops the member. On the CPU ``check`` reads the K losses back once (one
    ``tolist``) and compares them in Python: the seven small tensor ops of the device check
    cost ~20 us a step there, a tenth of a small model's step. On a GPU the check stays on the
    device (a read-back would sync it every step) and ``any_left`` is asked every 25 steps.
    """

    def __init__(self, k: int, device: torch.device, threshold: torch.Tensor) -> None:
        self.mask = torch.ones(k, dtype=torch.bool, device=device)
        self.died_at = torch.full((k,), -1, dtype=torch.long, device=device)
        self.threshold, self.on_cpu = threshold, device.type == "cpu"
        self.every = 1 if self.on_cpu else 25
        self.live = list(range(k))
        self.limits: dict[torch.dtype, list[float]] = {}

    def check(self, losses: torch.Tensor, t: int) -> None:
        """Stop the members whose loss at global step ``t`` (0-based) breaks the rule."""
        if not self.on_cpu:
            ok = torch.isfinite(losses) & (losses <= self.threshold.to(losses.dtype))
            self.died_at = torch.where(self.mask & ~ok, t, self.died_at)
            self.mask &= ok
            return
        if losses.dtype not in self.limits:  # the threshold as the device compares it
            self.limits[losses.dtype] = self.threshold.to(losses.dtype).tolist()
        limits, values = self.limits[losses.dtype], losses.tolist()
        dead = [m for m in self.live if not (math.isfinite(values[m]) and values[m] <= limits[m])]
        if dead:
            self.mask[dead] = False
            self.died_at[dead] = t
            self.live = [m for m in self.live if m not in dead]

    def stop(self, m: int) -> None:
        """Member ``m`` stops after an epoch's evaluation (its step is the caller's)."""
        self.mask[m] = False
        self.live = [i for i in self.live if i != m]

    def any_left(self, t: int) -> bool:
        """Whether a member still trains; on a GPU True between checks (every 25 steps)."""
        if self.on_cpu:
            return bool(self.live)
        return t % self.every != 0 or bool(self.mask.any())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _emit(on_epoch: Callable[[int, dict], None] | None, runs: list[_Run], rows: list[dict],
          alive: list[bool]) -> None:
    for m, (run, row) in enumerate(zip(runs, rows, strict=True)):
        if alive[m]:
            run.rows.append(row)
            if on_epoch:
                on_epoch(m, row)


def fit(
    members,
    batches: Callable[[], Iterable[Batch3]],
    *,
    epochs: int,
    train_eval: Split,
    val: Split,
    loss: str,
    diverge_factor: float,
    rates: torch.Tensor | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[], bool] = stop_requested,
    no_progress: tuple[float, float] | None = None,
    log_every: int = 0,
    steps_per_epoch: int | None = None,
) -> list[TrainResult]:
    """Train ``members`` for ``epochs`` epochs; one TrainResult per member.

    Args:
        batches: called once per epoch for that epoch's (x, y, shared) batches.
        loss: the training loss's name; divergence is judged in its units, while epoch rows
            always report cross-entropy and classification error.
        diverge_factor: a batch (or evaluated training) loss above this x the initial one
            stops the member; a non-finite one always does.
        rates: (K, total steps + 1) float64 base rate of member k at global step t, or None
            when the members set their own (one model with its torch.optim scheduler).
        on_epoch: called as ``on_epoch(k, row)`` with member k's History row when it exists.
        should_stop: asked before every update (default: ``stop_requested``, an Event's
            is_set); True stops.
        no_progress: (loss ratio, error ratio): a member that trained to the end is
            ``no_progress`` when ``made_no_progress(history, *no_progress)``; None: never.
        log_every: keep each member's smoothed batch loss every this many steps in its
            ``step_log`` (``StepLog``); 0 = off, and then no batch loss is read back.
        steps_per_epoch: updates per epoch, for the step log's fractional epoch (step /
            steps_per_epoch); needed when ``log_every`` > 0.
    Returns:
        TrainResults in member order; ``time_s`` is the training wall time so far (evaluation
        excluded); ``lr_trace`` the base rate at every update the member saw; status one of
        STATUSES; ``step_log`` its smoothed batch losses (STEP_COLUMNS, empty when off).
    Raises:
        Stopped: ``should_stop`` said so; the rows emitted so far are all there is.
        ValueError: ``log_every`` > 0 without ``steps_per_epoch``.
    """
    k, device = members.k, members.device
    if log_every and not steps_per_epoch:
        raise ValueError(f"steps_per_epoch: got {steps_per_epoch!r}; allowed: the updates per "
                         f"epoch (>= 1) when log_every > 0 (got {log_every})")
    step_log = StepLog(k, device, log_every, steps_per_epoch) if log_every else None
    table = None if rates is None else rates.to(device)
    trace: list[float] = []  # base rates of a member that schedules itself
    lrs = members.base_rates() if rates is None else rates[:, 0].tolist()
    first = _rows(members, train_eval, val, 0, lrs, 0.0, members.group_lrs(lrs))
    runs = [_Run([]) for _ in range(k)]
    _emit(on_epoch, runs, first, [True] * k)
    initial = [r["train_loss"] for r in first] if loss == "cross_entropy" else \
        members.training_losses(train_eval, loss)
    guard = _Alive(k, device, diverge_factor * torch.tensor(initial, dtype=torch.float64,
                                                            device=device))
    eval_threshold = [diverge_factor * r["train_loss"] for r in first]
    t, elapsed = 0, 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        lrs = members.base_rates() if rates is None else rates[:, t].tolist()
        group_lrs = members.group_lrs(lrs)  # what each param group applies at the epoch's start
        for i, (x, y, shared) in enumerate(batches()):
            if should_stop():
                raise Stopped(f"stopped in epoch {epoch}, before update {t + 1}")
            if rates is None:
                trace.append(members.base_rates()[0])
            losses = members.losses(x, y, shared)
            # Non-finite always stops, even where a huge factor's threshold is inf in float32.
            guard.check(losses, t)
            t += 1
            if step_log is not None:
                step_log.add(t, losses, guard.mask)
            if not guard.any_left(t):
                break  # every member diverged: stop at once, that batch not applied
            members.update(guard.mask, i, None if table is None else table[:, t - 1])
        _sync(device)
        elapsed += time.perf_counter() - start
        still = guard.mask.tolist()
        died_at = guard.died_at.tolist()
        for m, run in enumerate(runs):
            if run.status == "ok" and not still[m]:
                run.status, run.diverged_epoch, run.steps = "diverged", epoch, died_at[m] + 1
        if not any(still):
            break
        rows = _rows(members, train_eval, val, epoch, lrs, elapsed,
                     {**group_lrs, **members.ratio_means()})
        for m, row in enumerate(rows):
            if still[m] and not (row["train_loss"] <= eval_threshold[m]
                                 and math.isfinite(row["val_loss"])):
                runs[m].status, runs[m].diverged_epoch, runs[m].steps = "diverged", epoch, t
                guard.stop(m)
                still[m] = False
        _emit(on_epoch, runs, rows, still)
        if not any(still):
            break
        members.after_epoch([row["val_loss"] for row in rows])
    device_name = str(device)
    results = []
    for m, run in enumerate(runs):
        steps = run.steps if run.status == "diverged" else t
        lr_trace = trace[:steps] if rates is None else rates[m, :steps].tolist()
        history = pd.DataFrame(run.rows)
        if run.status == "ok" and no_progress is not None and \
                made_no_progress(history, *no_progress):
            run.status = "no_progress"
        results.append(TrainResult(history=history, status=run.status,
                                   diverged_epoch=run.diverged_epoch, device=device_name,
                                   lr_trace=lr_trace,
                                   step_log=empty_step_log() if step_log is None
                                   else step_log.table(m)))
    return results


class Curve:
    """One member's range-test record: rate, raw loss and bias-corrected smoothed loss per
    step, and why it stopped."""

    def __init__(self, beta: float, stop_factor: float) -> None:
        self.beta, self.stop_factor = beta, stop_factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stop_reason, self.avg, self.best = "completed", 0.0, math.inf

    def add(self, step: int, rate: float, value: float) -> bool:
        """Record the loss ``value`` of step ``step`` at ``rate``; True if the member stops:
        at a non-finite loss (not recorded) or once the smoothed loss exceeds ``stop_factor``
        x its best (recorded, then stop)."""
        if not math.isfinite(value):
            self.stop_reason = "nonfinite"
            return True
        self.avg = self.beta * self.avg + (1.0 - self.beta) * value
        smooth = self.avg / (1.0 - self.beta ** (step + 1))
        self.lrs.append(float(rate))
        self.losses.append(value)
        self.smoothed.append(smooth)
        if smooth > self.stop_factor * self.best:
            self.stop_reason = "diverged"
            return True
        self.best = min(self.best, smooth)
        return False


def sweep(members, stream: Iterator[Batch3], ramp: Iterable[float], beta: float,
          stop_factor: float, should_stop: Callable[[], bool] = stop_requested) -> list[Curve]:
    """The range test: one update per rate of ``ramp`` (the reference rate of every member),
    recording each member's batch loss before its update, until every member stopped.
    Raises Stopped when ``should_stop`` says so."""
    curves = [Curve(beta, stop_factor) for _ in range(members.k)]
    alive = torch.ones(members.k, dtype=torch.bool, device=members.device)
    live = list(range(members.k))
    for i, rate in enumerate(ramp):
        if should_stop():
            raise Stopped(f"range test stopped at step {i}")
        x, y, shared = next(stream)
        values = members.losses(x, y, shared).tolist()
        stopped = [m for m in live if curves[m].add(i, float(rate), values[m])]
        if stopped:
            alive[stopped] = False  # no further update; the others go on
            live = [m for m in live if m not in stopped]
        if not live:
            break
        rates = torch.full((members.k,), float(rate), dtype=torch.float64, device=members.device)
        members.update(alive, i, rates)
    return curves
