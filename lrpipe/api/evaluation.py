"""A user's model as the engine's member, evaluated with the user's own loss.

The engine's ``OneModel`` evaluates cross-entropy and classification error, which is right
for lrpipe's classifiers but not for a regression net trained with MSE. ``UserModel`` is the
same member (the same forward, backward and torch.optim step through ``lrpipe.engine.loop.fit``)
whose evaluation reports the mean of the user's ``loss_fn`` over a fixed set of batches, and
the classification error only where the task is one (``is_classification``), NaN otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lrpipe.api.inputs import Batch, LossFn
from lrpipe.engine.members import OneModel


class EvalSet:
    """Fixed examples to evaluate on: ``batches()`` returns one pass of (x, y) batches on the
    model's device, the same examples every call (the engine's loop passes it through to the
    member's ``evaluate`` in place of a ``Split``)."""

    def __init__(self, batches: Callable[[], Iterable[Batch]]) -> None:
        self.batches = batches


def is_classification(output: torch.Tensor, y: torch.Tensor) -> bool:
    """True when ``output`` holds one score per class (B, C >= 2) and ``y`` integer labels
    (B,): then the error (the share of argmax != y) means something."""
    return (output.dim() == 2 and output.shape[1] >= 2 and y.dim() == 1
            and not y.is_floating_point() and not y.is_complex())


@torch.no_grad()
def mean_loss_and_error(model: nn.Module, loss_fn: LossFn,
                        batches: Iterable[Batch]) -> tuple[float, float]:
    """(mean ``loss_fn`` over the examples, classification error or NaN), in eval mode.

    ``loss_fn`` is taken to be a mean over its batch, so each batch counts by its size.
    """
    was_training = model.training
    model.eval()
    total, wrong, count, classes = 0.0, 0, 0, True
    try:
        for x, y in batches:
            output = model(x)
            total += float(loss_fn(output, y)) * len(y)
            count += len(y)
            classes = classes and is_classification(output, y)
            if classes:
                wrong += int((output.argmax(1) != y).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("data: an evaluation pass yielded no examples; allowed: at least one "
                         "(x, y) batch")
    return total / count, (wrong / count if classes else math.nan)


class UserModel(OneModel):
    """``OneModel`` (the user's model and optimizer, stepped unchanged) evaluated with the
    user's loss: History's ``train_loss``/``val_loss`` are ``loss_fn``'s mean, and divergence
    is judged in its units; ``train_error``/``val_error`` are NaN unless it classifies."""

    def evaluate(self, split: EvalSet) -> tuple[list[float], list[float]]:
        """([mean loss_fn], [classification error or NaN]) over ``split``'s batches."""
        loss, error = mean_loss_and_error(self.model, self.loss_fn, split.batches())
        return [loss], [error]

    def training_losses(self, split: EvalSet, loss: str) -> list[float]:
        """[mean loss_fn] over ``split`` (``loss`` is only the name the loop was given)."""
        return [mean_loss_and_error(self.model, self.loss_fn, split.batches())[0]]
