"""Per-weight adaptive gains: Hinton's "adaptive learning rates for each connection".

From lecture 6d of Hinton's Coursera course *Neural Networks for Machine Learning* (2012,
slides: https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf), after
Jacobs (1988), "Increased rates of convergence through learning rate adaptation":

* every weight has a gain, starting at 1;
* the gain grows additively (``+increase``, 0.05) while the gradient keeps its sign, and
  shrinks multiplicatively (``x decrease``, 0.95) when the sign flips, so an oscillating weight
  damps quickly while a weight moving steadily speeds up slowly;
* gains are clamped to ``[min_gain, max_gain]`` (0.1 and 10 in the lecture);
* the update is ``-lr * gain * grad``, optionally through classical momentum
  ``v = momentum * v - lr * gain * grad; w += v``.

A zero product of the two gradients (the first step, where there is no previous gradient, or a
gradient of exactly 0) carries no sign information and leaves the gain unchanged, as
``torch.optim.Rprop`` does with its step sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrpipe.engine.config import check_number


def _check_args(lr, increase, decrease, min_gain, max_gain, momentum, weight_decay) -> None:
    """Raise ValueError (ConfigError) naming the argument and its allowed range."""
    check_number("lr", lr, low=0.0)
    check_number("increase", increase, low=0.0)
    check_number("decrease", decrease, low=0.0, high=1.0, low_open=True)
    # The starting gain 1 must lie inside the clamp range.
    check_number("min_gain", min_gain, low=0.0, high=1.0, low_open=True)
    check_number("max_gain", max_gain, low=1.0)
    check_number("momentum", momentum, low=0.0, high=1.0)
    if momentum >= 1.0:
        raise ValueError(f"momentum: got {momentum!r}; allowed: a finite number >= 0 and < 1")
    check_number("weight_decay", weight_decay, low=0.0)


def adaptive_gains(
    params: list[Tensor],
    grads: list[Tensor],
    gains: list[Tensor],
    prev_grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    increase: float,
    decrease: float,
    min_gain: float,
    max_gain: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One adaptive-gains update of ``params`` in place (the math, without the bookkeeping).

    ``gains``, ``prev_grads`` and (when ``momentum > 0``) ``momentum_buffers`` are updated in
    place too; ``prev_grads`` receives the gradient used now (weight decay included).
    """
    for param, grad, gain, prev, buf in zip(params, grads, gains, prev_grads, momentum_buffers,
                                            strict=True):
        if weight_decay:
            grad = grad.add(param, alpha=weight_decay)
        agreement = grad * prev
        # Additive growth, multiplicative decay; zero products leave the gain alone.
        gain.copy_(torch.where(agreement > 0, gain + increase,
                               torch.where(agreement < 0, gain * decrease, gain)))
        gain.clamp_(min_gain, max_gain)
        prev.copy_(grad)
        update = gain * grad * -lr
        if buf is None:
            param.add_(update)
        else:
            buf.mul_(momentum).add_(update)
            param.add_(buf)


class AdaptiveGains(torch.optim.Optimizer):
    """Gradient descent with one adaptive gain per weight (Hinton, lecture 6d).

    Args:
        params: parameters or parameter groups, as for any torch.optim optimizer.
        lr: global learning rate (per update, for a mean loss), >= 0.
        increase: added to a gain when its gradient keeps its sign, >= 0 (0.05 in the lecture).
        decrease: multiplies a gain when its gradient flips sign, in (0, 1] (0.95).
        min_gain, max_gain: clamp range of the gains; 0 < min_gain <= 1 <= max_gain
            (0.1 and 10), so the starting gain 1 is inside it.
        momentum: classical momentum on the gained step, in [0, 1) (0 = plain gained descent).
        weight_decay: L2 coefficient added to the gradient (x weight) before the sign test.
    Raises:
        ValueError (ConfigError): an argument outside its range; the message names it.

    State per parameter: ``gain`` (starts at 1), ``prev_grad`` (starts at 0), ``step`` (int)
    and, when momentum is used, ``momentum_buffer`` (the velocity ``v``, starts at 0).
    """

    def __init__(self, params, lr: float = 1e-2, *, increase: float = 0.05,
                 decrease: float = 0.95, min_gain: float = 0.1, max_gain: float = 10.0,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        _check_args(lr, increase, decrease, min_gain, max_gain, momentum, weight_decay)
        defaults = dict(lr=lr, increase=increase, decrease=decrease, min_gain=min_gain,
                        max_gain=max_gain, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _init_group(self, group: dict) -> tuple[list[Tensor], ...]:
        """Collect the group's tensors that have gradients, creating their state lazily."""
        params, grads, gains, prevs, bufs = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaptiveGains does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["gain"] = torch.ones_like(p, memory_format=torch.preserve_format)
                state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["momentum"] and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            gains.append(state["gain"])
            prevs.append(state["prev_grad"])
            bufs.append(state["momentum_buffer"] if group["momentum"] else None)
        return params, grads, gains, prevs, bufs

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one update; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, gains, prevs, bufs = self._init_group(group)
            if not params:
                continue
            adaptive_gains(
                params, grads, gains, prevs, bufs, lr=group["lr"],
                increase=group["increase"], decrease=group["decrease"],
                min_gain=group["min_gain"], max_gain=group["max_gain"],
                momentum=group["momentum"], weight_decay=group["weight_decay"],
            )
        return loss
