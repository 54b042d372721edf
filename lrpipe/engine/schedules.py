"""Learning-rate schedules as pure functions of training progress.

Every schedule except plateau is a multiplier of the base rate, a pure function of the global
step: ``lr_lambda(cfg, epochs, steps_per_epoch)(i)`` is the rate used by update ``i``
(0-based) divided by the base rate. Each parameter group's rate is its own initial rate x
that multiplier, so per-layer ratios (``lr_mult``) hold under every schedule.

Progress. The schedule's clock ``t`` is in epochs: ``i / steps_per_epoch`` when
``per_batch`` (smooth), or whole epochs ``i // steps_per_epoch`` otherwise; onecycle always
runs per batch. A linear warmup takes the rate from ``warmup_start`` to 1 over
``warmup_epochs``; then the decay runs on its own clock ``s = t - warmup_epochs`` (as torch's
SequentialLR would), so ``step_size`` and ``milestones`` count epochs after the warmup.

Horizon. Derived parameters aim at the last update that is actually made (update
``epochs x steps_per_epoch - 1``), at decay clock ``H = decay_horizon(...)``: the last rate
used is exactly base / ``final_decay`` for step, multistep, exponential (derived gamma),
cosine and inverse_time (derived k). Past the budget the rate stays at its last value.

Attached to an optimizer by ``Schedule``: LambdaLR for the pure functions, torch's OneCycleLR
for onecycle and ReduceLROnPlateau for plateau (driven by validation loss, so it has no
``lr_lambda``; ``plateau_max_decay`` bounds how far it can go).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from lrpipe.engine.config import SCHEDULES, ConfigError, ScheduleConfig

DECAYING = ("step", "multistep", "exponential", "cosine", "inverse_time")
ONECYCLE_DEFAULT_PCT = 0.3  # torch's default share of the budget spent rising, without warmup
WARN_BELOW = 10.0  # a schedule decaying less than this (first/last) gets a warning
_EPS = 1e-9  # epochs; absorbs float error at step boundaries (t - warmup is not exact)


def _fail(name: str, value, allowed: str) -> None:
    raise ConfigError(f"{name}: got {value!r}; allowed: {allowed}")


def _check_sizes(epochs: int, steps_per_epoch: int) -> None:
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(name, value, "an integer >= 1")


def last_clock(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> float:
    """The clock (epochs) at the last update: ``epochs - 1/steps_per_epoch``, or ``epochs - 1``
    when the schedule steps per epoch."""
    if cfg.per_batch or cfg.name == "onecycle":
        return epochs - 1 / steps_per_epoch
    return float(epochs - 1)


def decay_horizon(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> float:
    """The decay clock (epochs after warmup) at the last update: where derived decays land."""
    return last_clock(cfg, epochs, steps_per_epoch) - cfg.warmup_epochs


def _decays_within(cfg: ScheduleConfig, horizon: float) -> int:
    """How many step/multistep decays happen at or before decay clock ``horizon``."""
    if cfg.name == "step":
        return max(0, math.floor(horizon / cfg.step_size + _EPS))
    return sum(m <= horizon + _EPS for m in cfg.milestones)


def check_budget(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> None:
    """Raise ConfigError if ``cfg`` cannot run as documented within this budget.

    Decaying schedules need room after the warmup; a derived step gamma needs at least one
    decay within the budget; every multistep milestone must be reached; onecycle's warmup
    (its rising phase) must end before the budget does.
    """
    _check_sizes(epochs, steps_per_epoch)
    horizon = decay_horizon(cfg, epochs, steps_per_epoch)
    if cfg.name == "onecycle":
        rise = onecycle_params(cfg, epochs)["pct_start"] * epochs * steps_per_epoch
        if cfg.warmup_epochs >= epochs or rise < 2:
            _fail("schedule.warmup_epochs", cfg.warmup_epochs,
                  f"< epochs ({epochs}) and >= 2 updates ({2 / steps_per_epoch:g} epochs) "
                  "for onecycle's rising phase")
    if cfg.name in DECAYING and horizon <= _EPS:
        _fail("schedule.warmup_epochs", cfg.warmup_epochs,
              f"< {horizon + cfg.warmup_epochs:g} epochs (the last update of a {epochs}-epoch "
              f"budget) so that {cfg.name} has room to decay")
    if cfg.name == "step" and cfg.gamma is None and _decays_within(cfg, horizon) == 0:
        _fail("schedule.step_size", cfg.step_size,
              f"<= {horizon:g} epochs after warmup, so one decay happens (or set schedule.gamma)")
    if cfg.name == "plateau" and cfg.plateau_factor >= 1.0:  # config.py lets 1.0 through
        _fail("schedule.plateau_factor", cfg.plateau_factor, "0 < plateau_factor < 1")
    if cfg.name == "multistep":
        late = [m for m in cfg.milestones if m > horizon + _EPS]
        if not cfg.milestones or late:
            _fail("schedule.milestones", cfg.milestones,
                  f"at least one epoch, all <= {horizon:g} epochs after warmup (reached within "
                  f"the {epochs}-epoch budget)")


def derived_gamma(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> float | None:
    """Decay factor per epoch (exponential) or per decay (step, multistep); None for others.

    ``cfg.gamma`` when set; otherwise chosen so that the last rate used is base/final_decay:
    ``final_decay ** (-1/H)`` (exponential, H = decay_horizon) or ``final_decay ** (-1/n)``
    with n the decays that happen within the budget (step, multistep).
    """
    if cfg.name not in ("step", "multistep", "exponential"):
        return None
    if cfg.gamma is not None:
        return float(cfg.gamma)
    check_budget(cfg, epochs, steps_per_epoch)
    horizon = decay_horizon(cfg, epochs, steps_per_epoch)
    if cfg.name == "exponential":
        return cfg.final_decay ** (-1.0 / horizon)
    return cfg.final_decay ** (-1.0 / _decays_within(cfg, horizon))


def derived_inverse_k(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> float | None:
    """k of inverse_time (per epoch): ``cfg.inverse_k``, or ``(final_decay - 1) / H`` so that
    ``1 / (1 + k H) = 1 / final_decay`` at the last update; None for other schedules."""
    if cfg.name != "inverse_time":
        return None
    if cfg.inverse_k is not None:
        return float(cfg.inverse_k)
    check_budget(cfg, epochs, steps_per_epoch)
    return (cfg.final_decay - 1.0) / decay_horizon(cfg, epochs, steps_per_epoch)


def onecycle_params(cfg: ScheduleConfig, epochs: int) -> dict[str, float]:
    """OneCycleLR's knobs from the config: the peak is the base rate.

    pct_start = warmup_epochs / epochs (torch's 0.3 without warmup); the start is
    warmup_start x peak (div_factor = 1/warmup_start); the end is peak/final_decay
    (final_div_factor = final_decay x warmup_start), so peak/last = final_decay.
    """
    pct = cfg.warmup_epochs / epochs if cfg.warmup_epochs > 0 else ONECYCLE_DEFAULT_PCT
    return dict(pct_start=float(pct), div_factor=1.0 / cfg.warmup_start,
                final_div_factor=cfg.final_decay * cfg.warmup_start)


@dataclass(frozen=True)
class LrLambda:
    """Multiplier of the base rate as a pure function of the global step (picklable).

    Build it with ``lr_lambda``; parameters derived from the budget are fixed at construction.
    """

    cfg: ScheduleConfig
    epochs: int
    steps_per_epoch: int
    gamma: float | None
    inverse_k: float | None
    horizon: float

    def clock(self, step: int) -> float:
        """Epochs of progress at ``step`` (fractional when per batch)."""
        if self.cfg.per_batch or self.cfg.name == "onecycle":
            return step / self.steps_per_epoch
        return float(step // self.steps_per_epoch)

    def warmup(self, t: float) -> float:
        """Linear warmup factor at clock ``t``: warmup_start at 0, 1 from warmup_epochs on."""
        w = self.cfg.warmup_epochs
        if t >= w:
            return 1.0
        return self.cfg.warmup_start + (1.0 - self.cfg.warmup_start) * t / w

    def decay(self, s: float) -> float:
        """The schedule's factor at decay clock ``s`` (epochs after warmup, clamped to H)."""
        cfg, s = self.cfg, min(max(s, 0.0), self.horizon)
        if cfg.name in ("step", "multistep"):
            return self.gamma ** _decays_within(cfg, s)
        if cfg.name == "exponential":
            return self.gamma ** s
        if cfg.name == "cosine":
            floor = 1.0 / cfg.final_decay
            return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * s / self.horizon)) / 2.0
        if cfg.name == "inverse_time":
            return 1.0 / (1.0 + self.inverse_k * s)
        return 1.0  # constant, and plateau before validation loss has a say

    def onecycle(self, step: int) -> float:
        """torch's OneCycleLR (two phases, cosine annealing) at ``step``, as a multiple of peak."""
        p = onecycle_params(self.cfg, self.epochs)
        total = self.epochs * self.steps_per_epoch
        start = 1.0 / p["div_factor"]
        end = start / p["final_div_factor"]
        rise_end = float(p["pct_start"] * total) - 1  # same float expression as torch
        if step <= rise_end:
            lo, hi, pct = start, 1.0, step / rise_end
        else:
            lo, hi, pct = 1.0, end, (step - rise_end) / (total - 1 - rise_end)
        return hi + (lo - hi) / 2.0 * (math.cos(math.pi * pct) + 1)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step: got {step}; allowed: an integer >= 0")
        step = min(int(step), self.epochs * self.steps_per_epoch - 1)
        if self.cfg.name == "onecycle":
            return self.onecycle(step)
        t = self.clock(step)
        return self.warmup(t) * self.decay(t - self.cfg.warmup_epochs)


def _make_lambda(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> LrLambda:
    check_budget(cfg, epochs, steps_per_epoch)
    return LrLambda(cfg, epochs, steps_per_epoch, derived_gamma(cfg, epochs, steps_per_epoch),
                    derived_inverse_k(cfg, epochs, steps_per_epoch),
                    decay_horizon(cfg, epochs, steps_per_epoch))


def lr_lambda(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> LrLambda:
    """The multiplier of the base rate at each global step (0-based update index).

    Raises:
        ConfigError: plateau (it depends on validation loss, not on the step), or a config
            that does not fit the budget (see ``check_budget``).
    """
    if cfg.name == "plateau":
        _fail("schedule.name", cfg.name,
              "a schedule that is a function of the step: " + ", ".join(
                  n for n in SCHEDULES if n != "plateau") + " (plateau follows validation loss)")
    return _make_lambda(cfg, epochs, steps_per_epoch)


PLATEAU_NOTE = ("plateau follows validation loss: shown at its highest (no decay after warmup); "
                "it divides the rate by 1/plateau_factor after each plateau of patience+1 epochs")


def preview(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int,
            base_lr: float = 1.0) -> pd.DataFrame:
    """The rate at every update of the budget, without training.

    Returns:
        DataFrame(step, epoch, lr): ``step`` 0..N-1, ``epoch = step / steps_per_epoch``
        (fractional), ``lr`` = base_lr x multiplier. train()'s history row e >= 1 records the
        rate at step (e - 1) x steps_per_epoch. For plateau the curve is its upper bound
        (warmup, then constant) and ``df.attrs["note"]`` says so.
    """
    lam = _make_lambda(cfg, epochs, steps_per_epoch)
    steps = range(epochs * steps_per_epoch)
    df = pd.DataFrame({"step": list(steps),
                       "epoch": [i / steps_per_epoch for i in steps],
                       "lr": [base_lr * lam(i) for i in steps]})
    if cfg.name == "plateau":
        df.attrs["note"] = PLATEAU_NOTE
    return df


def total_decay(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> float | None:
    """Peak rate / last rate over the updates of the budget, known before training.

    Equal to first/last for schedules that start at their peak; with a warmup (and for
    onecycle) the peak is the base rate, not the first. None for plateau: its decay depends on
    validation loss (``plateau_max_decay`` gives the most it can reach).
    """
    if cfg.name == "plateau":
        return None
    lam = lr_lambda(cfg, epochs, steps_per_epoch)
    mults = [lam(i) for i in range(epochs * steps_per_epoch)]
    return max(mults) / mults[-1]


def plateau_max_decay(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> float:
    """The largest decay plateau can reach in the budget: validation loss never improving.

    The first epoch considered (the first to end after warmup, e0) sets the best loss; then
    each run of patience+1 bad epochs divides the rate, and a reduction at the end of epoch e
    counts only if e <= epochs - 1: n = floor((epochs - 1 - e0) / (patience + 1)) reductions.
    """
    check_budget(cfg, epochs, steps_per_epoch)
    first = max(1, math.ceil(cfg.warmup_epochs - _EPS))
    reductions = max(0, (epochs - 1 - first) // (cfg.patience + 1))
    return (1.0 / cfg.plateau_factor) ** reductions


def decay_warning(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int,
                  threshold: float = WARN_BELOW) -> str | None:
    """A sentence when the rate decays less than ``threshold`` x over the budget, else None.

    A rate still high at the end leaves the final weights as noisy as the largest steps made;
    about 100x decay is the usual target. Plateau is judged by ``plateau_max_decay``.
    """
    if cfg.name == "plateau":
        most = plateau_max_decay(cfg, epochs, steps_per_epoch)
        if most >= threshold:
            return None
        return (f"schedule plateau can decay at most {most:.3g}x in {epochs} epochs "
                f"(patience {cfg.patience}, factor {cfg.plateau_factor:g}), < {threshold:g}x: "
                "lower patience or plateau_factor, or train longer")
    decay = total_decay(cfg, epochs, steps_per_epoch)
    if decay >= threshold:
        return None
    return (f"schedule {cfg.name} decays the rate only {decay:.3g}x over {epochs} epochs "
            f"(< {threshold:g}x): the last updates are still large and noisy; a decaying "
            f"schedule (e.g. cosine, final_decay ~100) usually ends at a lower loss")


class Schedule:
    """Drives the rate of ``optimizer``: ``after_batch()`` after every optimizer.step(),
    ``after_epoch(val_loss)`` after each epoch's evaluation.

    Pure schedules go through LambdaLR (stepped every batch; the function itself holds the
    rate constant within an epoch when per_batch is off), onecycle through OneCycleLR (peak =
    each group's current rate, momentum left alone) and plateau through ReduceLROnPlateau,
    which starts listening once the warmup is over. Group ratios are kept by all three.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                 steps_per_epoch: int) -> None:
        self.cfg, self.optimizer = cfg, optimizer
        self.total_steps = epochs * steps_per_epoch
        self.lam = _make_lambda(cfg, epochs, steps_per_epoch)
        for group in optimizer.param_groups:
            # LRScheduler keeps an existing initial_lr (setdefault): a stale one would win.
            group["initial_lr"] = group["lr"]
        self.plateau: ReduceLROnPlateau | None = None
        if cfg.name == "onecycle":
            self.per_step = OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=self.total_steps, cycle_momentum=False, **onecycle_params(cfg, epochs))
        else:
            self.per_step = LambdaLR(optimizer, self.lam)
        if cfg.name == "plateau":
            # eps=0: torch skips reductions smaller than eps per group, which would break ratios
            self.plateau = ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                             patience=cfg.patience, eps=0.0)
        self.steps = 0

    @property
    def warmed_up(self) -> bool:
        """Whether the warmup is over (always true without one)."""
        return self.lam.clock(self.steps) >= self.cfg.warmup_epochs

    def after_batch(self) -> None:
        """Advance one update; past the budget the last rate stays (OneCycleLR would go on).

        Plateau's warmup stops stepping once over, so that it cannot undo a decay.
        """
        if self.steps + 1 >= self.total_steps or (self.plateau is not None and self.warmed_up):
            self.steps += 1
            return
        self.steps += 1
        self.per_step.step()

    def after_epoch(self, val_loss: float) -> None:
        """Let plateau judge the epoch's validation loss; a no-op for the other schedules."""
        if self.plateau is not None and self.warmed_up:
            self.plateau.step(val_loss)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                  steps_per_epoch: int) -> Schedule:
    """The Schedule for ``cfg`` over ``epochs x steps_per_epoch`` updates of ``optimizer``.

    Raises:
        ConfigError: the config does not fit the budget (``check_budget``).
    """
    return Schedule(optimizer, cfg, epochs, steps_per_epoch)
