"""The training loop: one config in, one History out.

``train()`` evaluates before any update (epoch 0) and after every epoch, on a fixed training
subset and on the validation split, both in eval mode. A non-finite training loss stops the
run at once: it is recorded as ``diverged`` with the epoch it happened in, and the finite
history is kept. A batch loss above ``diverge_factor`` x the initial loss counts as
divergence too: ReLU networks at too high a rate often blow up to huge but finite losses.
The loop emits (``on_epoch``); the caller logs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lrpipe.config import TrainConfig
from lrpipe.data import Dataset, Split, iterate_batches, load_data
from lrpipe.models import layer_names, make_model
from lrpipe.optim import make_optimizer
from lrpipe.schedules import Schedule, make_schedule

METRICS = ("train_loss", "val_loss", "train_error", "val_error", "lr")
EVAL_BATCH = 4096


def resolve_device(name: str) -> torch.device:
    """``auto`` means cuda when available, else cpu; an unavailable cuda is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: got {name!r} but CUDA is not available here; allowed: "
                         "auto, cpu")
    return torch.device(name)


@dataclass
class TrainResult:
    """What a run produced. ``history`` has one row per evaluated epoch (0 = before training)."""

    history: pd.DataFrame
    status: str  # "ok" | "diverged"
    diverged_epoch: int | None = None
    device: str = "cpu"
    model: nn.Module | None = field(default=None, repr=False)
    lr_trace: list[float] = field(default_factory=list, repr=False)  # base rate at every step

    def final(self) -> dict[str, float]:
        """Metrics of the last finite epoch (plus status), small enough to pass between tasks."""
        last = self.history.iloc[-1]
        out = {m: float(last[m]) for m in METRICS if m in last}
        out.update(epoch=int(last["epoch"]), status=self.status,
                   diverged_epoch=self.diverged_epoch,
                   best_val_loss=float(self.history["val_loss"].min()),
                   best_val_error=float(self.history["val_error"].min()))
        return out


def batch_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean training loss of a batch: cross-entropy, or squared error against one-hot targets."""
    if loss == "cross_entropy":
        return F.cross_entropy(logits, y)
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.mse_loss(logits, target, reduction="sum") / len(y)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """(cross-entropy, classification error) of ``model`` on ``split``, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, wrong = 0.0, 0
    for start in range(0, len(split), EVAL_BATCH):
        x, y = split.x[start:start + EVAL_BATCH], split.y[start:start + EVAL_BATCH]
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        wrong += int((logits.argmax(1) != y).sum())
    model.train(was_training)
    return total_loss / len(split), wrong / len(split)


@torch.no_grad()
def initial_training_loss(model: nn.Module, split: Split, loss: str, cross_entropy: float) -> float:
    """The epoch-0 loss in the training loss's own units (divergence is judged in them):
    ``cross_entropy`` as given, else the squared error evaluated on ``split``."""
    if loss == "cross_entropy":
        return cross_entropy
    was_training = model.training
    model.eval()
    total = sum(float(batch_loss(model(split.x[i:i + EVAL_BATCH]), split.y[i:i + EVAL_BATCH],
                                 loss)) * len(split.y[i:i + EVAL_BATCH])
                for i in range(0, len(split), EVAL_BATCH))
    model.train(was_training)
    return total / len(split)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The base rate: a group's rate divided by its multiplier (schedules scale all groups)."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) / float(group.get("lr_mult", 1.0))


def eval_train_split(data: Dataset, cfg: TrainConfig) -> Split:
    """A fixed, seeded training subset as large as the validation split (or eval_train_size)."""
    size = min(len(data.train), cfg.eval_train_size or len(data.val))
    if size == len(data.train):
        return data.train
    gen = torch.Generator().manual_seed(cfg.data.split_seed + 1)
    idx = torch.randperm(len(data.train), generator=gen)[:size].to(data.train.y.device)
    return Split(data.train.x[idx], data.train.y[idx])


class UpdateRatio:
    """||update|| / ||weight|| per layer, averaged over every ``every``-th step of an epoch.

    The cs231n rule of thumb: about 1e-3 is healthy; far above, the rate is too high; far below,
    too low. Measured on a sample of steps because it copies the weights.
    """

    def __init__(self, model: nn.Module, every: int = 10) -> None:
        self.layers = {name: list(getattr(model, name).parameters())
                       for name in layer_names(model)}
        self.every, self.before, self.sums, self.counts = every, None, {}, {}

    def before_step(self, step: int) -> None:
        if step % self.every == 0:
            self.before = {n: [p.detach().clone() for p in ps] for n, ps in self.layers.items()}

    def after_step(self) -> None:
        if self.before is None:
            return
        for name, params in self.layers.items():
            delta = sum(float((p.detach() - b).pow(2).sum()) for p, b in
                        zip(params, self.before[name], strict=True))
            norm = sum(float(p.detach().pow(2).sum()) for p in params)
            if norm > 0:
                self.sums[name] = self.sums.get(name, 0.0) + (delta / norm) ** 0.5
                self.counts[name] = self.counts.get(name, 0) + 1
        self.before = None

    def epoch_means(self) -> dict[str, float]:
        means = {f"ratio/{n}": self.sums[n] / self.counts[n] for n in self.sums}
        self.sums, self.counts = {}, {}
        return means


def _row(epoch: int, model: nn.Module, train_eval: Split, val: Split, lr: float,
         seconds: float) -> dict:
    train_loss, train_error = evaluate(model, train_eval)
    val_loss, val_error = evaluate(model, val)
    return dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, train_error=train_error,
                val_error=val_error, lr=lr, time_s=seconds)


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                 ratios: UpdateRatio,
                 split: Split, cfg: TrainConfig, gen: torch.Generator, threshold: float,
                 check_every: int, lr_trace: list[float]) -> bool:
    """One pass over ``split``; False as soon as a checked batch loss is not finite or above
    ``threshold`` (that batch's update is not applied)."""
    for step, (x, y) in enumerate(iterate_batches(split, cfg.batch_size, gen)):
        lr_trace.append(base_lr(optimizer))
        loss = batch_loss(model(x), y, cfg.loss)
        # One comparison catches both: NaN <= x is False, inf <= x is False.
        if step % check_every == 0 and not bool(loss <= threshold):
            return False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ratios.before_step(step)
        optimizer.step()
        ratios.after_step()
        schedule.after_batch()
    return True


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
            fresh seeded one; it is trained in place.
        on_epoch: called with each History row as soon as it exists (for live logging).
        keep_model: return the trained model in the result.
    Returns:
        TrainResult with the per-epoch history; status ``diverged`` if a loss was non-finite.
    """
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg.data, device)
    if model is None:
        model = make_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, device)
    optimizer = make_optimizer(model, cfg.optim)
    if cfg.batch_size > len(data.train):
        raise ValueError(f"batch_size: got {cfg.batch_size}; allowed: <= {len(data.train)} "
                         "(training examples)")
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    schedule = make_schedule(optimizer, cfg.schedule, cfg.epochs, steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_eval = eval_train_split(data, cfg)
    check_every = 1 if device.type == "cpu" else 25  # a finiteness check syncs the GPU

    rows = [_row(0, model, train_eval, data.val, base_lr(optimizer), 0.0)]
    if on_epoch:
        on_epoch(rows[0])
    # Batch losses are in the training loss's units; epoch rows always report cross-entropy.
    threshold = cfg.diverge_factor * initial_training_loss(model, train_eval, cfg.loss,
                                                           rows[0]["train_loss"])
    eval_threshold = cfg.diverge_factor * rows[0]["train_loss"]
    ratios = UpdateRatio(model)
    lr_trace: list[float] = []
    status, diverged_epoch, elapsed = "ok", None, 0.0
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        epoch_lr = base_lr(optimizer)
        finite = _train_epoch(model, optimizer, schedule, ratios, data.train, cfg, gen,
                              threshold, check_every, lr_trace)
        elapsed += time.perf_counter() - start
        if finite:
            row = _row(epoch, model, train_eval, data.val, epoch_lr, elapsed)
            row.update(ratios.epoch_means())
            finite = row["train_loss"] <= eval_threshold and math.isfinite(row["val_loss"])
        if not finite:
            status, diverged_epoch = "diverged", epoch
            break
        rows.append(row)
        if on_epoch:
            on_epoch(row)
        schedule.after_epoch(row["val_loss"])
    return TrainResult(
        history=pd.DataFrame(rows), status=status, diverged_epoch=diverged_epoch,
        device=str(device), model=model if keep_model else None, lr_trace=lr_trace,
    )
