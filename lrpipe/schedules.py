"""Learning-rate schedules (constant for now; the decay issue adds the others)."""

from __future__ import annotations

import torch

from lrpipe.config import ScheduleConfig


class Schedule:
    """Drives the rate of ``optimizer``: ``after_batch()`` each update, ``after_epoch(val_loss)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                 steps_per_epoch: int) -> None:
        if cfg.name != "constant":
            raise NotImplementedError(f"schedule.name={cfg.name!r} is not implemented yet")
        self.optimizer = optimizer

    def after_batch(self) -> None:
        pass

    def after_epoch(self, val_loss: float) -> None:
        pass


def make_schedule(optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> Schedule:
    return Schedule(optimizer, cfg, epochs, steps_per_epoch)
