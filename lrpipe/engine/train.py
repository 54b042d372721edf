"""One config in, one History out: a single model trained through the engine's loop.

``train()`` builds the seeded model, its torch.optim optimizer and its schedule from the
config and runs ``lrpipe.engine.loop.fit`` with them as one member (K = 1, torch.optim and its
lr_scheduler unchanged): evaluation before any update (epoch 0) and after every epoch, the
divergence rules (a non-finite loss, or one above ``diverge_factor`` x the initial loss: ReLU
networks at too high a rate often blow up to huge but finite losses), the ``no_progress``
status, the optional step log (``log_every``) and the History are the loop's, shared with
batched training and the range test. The loop emits (``on_epoch``); the caller logs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lrpipe.engine.config import TrainConfig
from lrpipe.engine.data import Dataset, Split, iterate_batches, load_data
from lrpipe.engine.loop import METRICS, TrainResult, fit
from lrpipe.engine.members import EVAL_BATCH, OneModel, batch_loss, evaluate
from lrpipe.engine.models import make_model
from lrpipe.engine.optim import make_optimizer
from lrpipe.engine.schedules import make_schedule

__all__ = ["METRICS", "EVAL_BATCH", "TrainResult", "batch_loss", "evaluate", "train",
           "resolve_device", "eval_train_split", "check_batch_size"]


def resolve_device(name: str) -> torch.device:
    """``auto`` means cuda when available, else cpu; an unavailable cuda is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: got {name!r} but CUDA is not available here; allowed: "
                         "auto, cpu")
    return torch.device(name)


def eval_train_split(data: Dataset, cfg: TrainConfig) -> Split:
    """A fixed, seeded training subset as large as the validation split (or eval_train_size)."""
    size = min(len(data.train), cfg.eval_train_size or len(data.val))
    if size == len(data.train):
        return data.train
    gen = torch.Generator().manual_seed(cfg.data.split_seed + 1)
    idx = torch.randperm(len(data.train), generator=gen)[:size].to(data.train.y.device)
    return Split(data.train.x[idx], data.train.y[idx])


def train(
    cfg: TrainConfig,
    data: Dataset | None = None,
    *,
    model: nn.Module | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    keep_model: bool = False,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.epochs`` epochs.

    Args:
        data: a loaded Dataset on the run's device (loaded from ``cfg.data`` when None).
        model: start from this model (e.g. a pretrained backbone with a new head) instead of a
            fresh seeded one; it is trained in place. Its run is never ``no_progress`` (that
            status compares the end with a fresh model's start, near chance).
        on_epoch: called with each History row as soon as it exists (for live logging).
        keep_model: return the trained model in the result.
    Returns:
        TrainResult with the per-epoch history; status ``diverged`` if a loss was non-finite
        or above ``cfg.diverge_factor`` x the initial one, ``no_progress`` if a fresh model ended
        near its epoch-0 validation loss and error (``cfg.no_progress``), else ``ok``; its
        ``step_log`` holds the smoothed batch loss every ``cfg.log_every`` steps (empty when
        0).
    """
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg.data, device)
    # Only a fresh model starts at chance: a given one (fine-tuning) is never no_progress.
    no_progress = cfg.no_progress if model is None else None
    if model is None:
        model = make_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, device)
    optimizer = make_optimizer(model, cfg.optim)
    check_batch_size(cfg.batch_size, len(data.train))
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    schedule = make_schedule(optimizer, cfg.schedule, cfg.epochs, steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    members = OneModel(model, optimizer, lambda logits, y: batch_loss(logits, y, cfg.loss),
                       schedule=schedule, ratios=True)
    model.train()
    (result,) = fit(
        members, lambda: ((x, y, True) for x, y in iterate_batches(data.train, cfg.batch_size,
                                                                     gen)),
        epochs=cfg.epochs, train_eval=eval_train_split(data, cfg), val=data.val, loss=cfg.loss,
        diverge_factor=cfg.diverge_factor, no_progress=no_progress,
        log_every=cfg.log_every, steps_per_epoch=steps_per_epoch,
        on_epoch=(lambda _, row: on_epoch(row)) if on_epoch else None)
    result.device = str(device)
    result.model = model if keep_model else None
    return result


def check_batch_size(batch_size: int, examples: int) -> None:
    """A batch no larger than the training set, or a ValueError naming batch_size."""
    if batch_size > examples:
        raise ValueError(f"batch_size: got {batch_size}; allowed: <= {examples} "
                         "(training examples)")
