"""Many learning rates in one pass: K copies of one model trained as one batched computation.

``train_batched(cfgs, data)`` trains K members that differ only in base rate, seed and
schedule as one computation through the engine's one loop (``lrpipe.engine.loop.fit``) with
``lrpipe.engine.members.Stacked`` members: every weight tensor gets a leading member axis
(K, ...). Member k starts from the weights ``make_model(..., seed=cfg_k.seed)`` gives, sees the
batches ``train()`` would draw for its seed, is updated with torch.optim's formulas at its own
rate from a table of every step's rate (``lrpipe.engine.schedules.lr_lambda``), and yields its own
TrainResult with ``train()``'s history columns. A diverging member is frozen and dropped; the
others go on.

Batching pays for small models and on GPUs; on a busy 2-core CPU a K-batched MLP is about as
fast as K sequential runs (FIELD_NOTES). ``lrpipe.engine.many`` writes that down as the declared
policy (the config's ``batching`` field, ``batching_rule``) and holds the entry point for flows
(``train_many``), which batches only where the policy says so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lrpipe.engine.config import TrainConfig
from lrpipe.engine.data import Dataset, batch_generators, member_batches
from lrpipe.engine.loop import TrainResult, fit
from lrpipe.engine.members import Stacked, member_losses
from lrpipe.engine.models import make_model
from lrpipe.engine.schedules import lr_lambda
from lrpipe.engine.train import check_batch_size, eval_train_split, resolve_device

__all__ = ["BATCHED_OPTIMIZERS", "check_batchable", "member_losses", "train_batched",
           "unbatchable_reason", "varies", "stacked_members"]

BATCHED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")


def varies(key: str) -> bool:
    """Fields members may differ in: the rate, the seed and the schedule (a rate table)."""
    return key in ("optim.lr", "seed") or key.startswith("schedule.")


def unbatchable_reason(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` cannot be a member of a batched run, or None if it can."""
    if cfg.optim.name not in BATCHED_OPTIMIZERS:
        return (f"optim.name: got {cfg.optim.name!r}; allowed for batched training: "
                f"{', '.join(BATCHED_OPTIMIZERS)}")
    if cfg.schedule.name == "plateau":
        return "schedule.name: got 'plateau'; allowed: any other (plateau follows each run's val)"
    return None


def check_batchable(cfgs: list[TrainConfig]) -> None:
    """Raise ValueError unless ``cfgs`` may train as one batch: same everything except
    ``optim.lr``, ``seed`` and ``schedule.*``."""
    if not cfgs:
        raise ValueError("cfgs: got an empty list; allowed: at least one TrainConfig")
    first = cfgs[0].flat()
    for cfg in cfgs:
        reason = unbatchable_reason(cfg)
        if reason:
            raise ValueError(reason)
        for key, value in cfg.flat().items():
            if value != first[key] and not varies(key):
                raise ValueError(f"{key}: members differ ({first[key]!r} vs {value!r}); allowed "
                                 "to differ: optim.lr, seed, schedule.*")


def rate_table(cfgs: list[TrainConfig], steps_per_epoch: int) -> torch.Tensor:
    """(K, total steps + 1) float64: base rate of member k at global step t (t = steps: end)."""
    total = cfgs[0].epochs * steps_per_epoch
    rows = []
    for cfg in cfgs:
        lam = lr_lambda(cfg.schedule, cfg.epochs, steps_per_epoch)
        rows.append([cfg.optim.lr * lam(t) for t in range(total + 1)])
    return torch.tensor(rows, dtype=torch.float64)


def stacked_members(cfgs: list[TrainConfig], data: Dataset, device: torch.device, *,
                    ratios: bool = True) -> Stacked:
    """The K members' fresh seeded models (``make_model`` per config), stacked."""
    models = [make_model(c.model, data.input_shape, data.num_classes, c.seed, device)
              for c in cfgs]
    return Stacked(models, cfgs, device, ratios=ratios)


def train_batched(
    cfgs: list[TrainConfig],
    data: Dataset,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[TrainResult]:
    """Train K members as one batched computation; one TrainResult per member, as train() would.

    Args:
        cfgs: the members; they may differ only in ``optim.lr``, ``seed`` and ``schedule.*``.
            Dropout is supported with per-member masks from each member's own generator (the
            masks a lone run draws).
        data: the Dataset, on the members' device.
        on_epoch: called as ``on_epoch(k, row)`` with member k's History row when it exists.
    Returns:
        TrainResults in ``cfgs`` order. ``time_s`` is the shared wall time of the batched
        training (evaluation excluded, as in train()); ``model`` is None.
    Raises:
        ValueError: members differ in another field, or use rprop/gains/plateau.
    """
    check_batchable(cfgs)
    cfg, device = cfgs[0], resolve_device(cfgs[0].device)
    check_batch_size(cfg.batch_size, len(data.train))
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    gens = batch_generators([c.seed for c in cfgs])
    return fit(stacked_members(cfgs, data, device),
               lambda: member_batches(data.train, cfg.batch_size, gens),
               epochs=cfg.epochs, train_eval=eval_train_split(data, cfg), val=data.val,
               loss=cfg.loss, diverge_factor=cfg.diverge_factor,
               no_progress=cfg.no_progress, log_every=cfg.log_every,
               steps_per_epoch=steps_per_epoch, rates=rate_table(cfgs, steps_per_epoch),
               on_epoch=on_epoch)
