"""What the training loop steps: K >= 1 members, one model or K stacked copies of it.

The loop (``lrpipe.engine.loop``) only asks members for a few things: the loss of each
member on a batch (before the update), an update of the members still alive at given rates,
each member's evaluation on a split, its current base rate and its update/weight ratios.

``OneModel`` is one ``nn.Module`` with its own ``torch.optim`` optimizer (and, in training, its
``lrpipe.engine.schedules.Schedule``), stepped unchanged: K = 1. ``Stacked`` is K copies of one
architecture whose weights carry a leading member axis; its update applies torch.optim's
formulas per member (``lrpipe.engine.member_update.direction``) at each member's own rate, and is
checked against torch.optim in float64 (tests/test_batched.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from lrpipe.engine.config import OptimConfig, TrainConfig
from lrpipe.engine.data import Split
from lrpipe.engine.member_update import UpdateRatios, direction
from lrpipe.engine.models import SeededDropout, layer_names
from lrpipe.engine.optim import param_groups

EVAL_BATCH = 4096
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LINEAR_ONLY = (nn.Flatten, nn.Linear, nn.ReLU, SeededDropout)


def batch_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean training loss of a batch: cross-entropy, or squared error against one-hot targets."""
    if loss == "cross_entropy":
        return F.cross_entropy(logits, y)
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.mse_loss(logits, target, reduction="sum") / len(y)


def member_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """(K,) mean batch loss per member of logits (K, B, classes), as ``batch_loss`` per model."""
    if y.dim() == 1:
        y = y.expand(logits.shape[0], -1)
    if loss == "cross_entropy":
        return -logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
    target = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return (logits - target).square().sum((1, 2)) / y.shape[1]


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


def group_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's rate over the reference rate (group 0's lr / its lr_mult)."""
    first = optimizer.param_groups[0]
    reference = float(first["lr"]) / float(first.get("lr_mult", 1.0))
    if not reference > 0:
        raise ValueError(f"optimizer.param_groups[0]: got lr {first['lr']!r}; allowed: a rate "
                         "> 0 (it is the reference the ramp scales)")
    return [float(g["lr"]) / reference for g in optimizer.param_groups]


class UpdateRatio:
    """||update|| / ||weight|| per layer of one model, averaged over every ``every``-th step of
    an epoch (the cs231n rule of thumb: about 1e-3 is healthy; far above, the rate is too high;
    far below, too low). Sampled because it copies the weights: the optimizer is the user's
    torch.optim one, so the update is known only as weights after minus weights before.

    A sampled step costs one copy, two fused norm passes and one read-back of all the norms.
    """

    def __init__(self, model: nn.Module, every: int = 10) -> None:
        self.layers = {name: list(getattr(model, name).parameters())
                       for name in layer_names(model)}
        self.params = [p for ps in self.layers.values() for p in ps]
        self.every, self.before, self.sums, self.counts = every, None, {}, {}

    def before_step(self, step: int) -> None:
        if step % self.every == 0:
            self.before = [p.detach().clone() for p in self.params]

    def after_step(self) -> None:
        if self.before is None:
            return
        with torch.no_grad():
            torch._foreach_sub_(self.before, self.params)  # -(update), in the copy's memory
            norms = torch.stack([*torch._foreach_norm(self.before),
                                 *torch._foreach_norm(self.params)]).double().square().tolist()
        n = len(self.params)
        deltas, weights = iter(norms[:n]), iter(norms[n:])
        for name, params in self.layers.items():
            delta = sum(next(deltas) for _ in params)
            norm = sum(next(weights) for _ in params)
            if norm > 0:
                self.sums[name] = self.sums.get(name, 0.0) + (delta / norm) ** 0.5
                self.counts[name] = self.counts.get(name, 0) + 1
        self.before = None

    def epoch_means(self) -> dict[str, list[float]]:
        """``{"ratio/<layer>": [mean]}``; the sums start again."""
        means = {f"ratio/{n}": [self.sums[n] / self.counts[n]] for n in self.sums}
        self.sums, self.counts = {}, {}
        return means


class OneModel:
    """One model and its own torch.optim optimizer: K = 1, stepped as torch.optim says.

    ``schedule`` (an ``lrpipe.engine.schedules.Schedule``) advances after every update and hears the
    validation loss after every epoch; without one, ``update`` takes the rate from the loop
    (the range test's ramp), keeping every param group's ratio to the reference rate.
    """

    k = 1

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 *, schedule=None, ratios: bool = False) -> None:
        self.model, self.optimizer, self.loss_fn, self.schedule = model, optimizer, loss_fn, \
            schedule
        self.device = next(model.parameters()).device
        self.ratios = UpdateRatio(model) if ratios else None
        self.ratio_to_reference = group_ratios(optimizer)
        self._loss: torch.Tensor | None = None

    def base_rates(self) -> list[float]:
        """The base rate now: group 0's rate over its multiplier (schedules scale all groups)."""
        group = self.optimizer.param_groups[0]
        return [float(group["lr"]) / float(group.get("lr_mult", 1.0))]

    def group_lrs(self, base_rates: list[float]) -> dict[str, list[float]]:
        """``{"lr/<group>": [rate]}``: the rate each param group applies now (its optimizer's
        own value, multiplier and schedule included; ``base_rates`` is not needed)."""
        return {f"lr/{g.get('name', i)}": [float(g["lr"])]
                for i, g in enumerate(self.optimizer.param_groups)}

    def group_rates(self, rate: float) -> list[float]:
        """Each param group's rate when the reference rate is ``rate``."""
        return [ratio * float(rate) for ratio in self.ratio_to_reference]

    def losses(self, x: torch.Tensor, y: torch.Tensor, shared: bool = True) -> torch.Tensor:
        """(1,) the batch's training loss before the update (the graph is kept for it)."""
        self._loss = self.loss_fn(self.model(x), y)
        return self._loss.detach().reshape(1)

    def update(self, alive: torch.Tensor, step_in_epoch: int,
               rates: torch.Tensor | None = None) -> None:
        """Backward and one optimizer step (a dead model is never updated: the loop stops)."""
        if rates is not None:
            for group, lr in zip(self.optimizer.param_groups, self.group_rates(float(rates[0])),
                                 strict=True):
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self._loss.backward()
        if self.ratios:
            self.ratios.before_step(step_in_epoch)
        self.optimizer.step()
        if self.ratios:
            self.ratios.after_step()
        if self.schedule is not None:
            self.schedule.after_batch()
        self._loss = None

    def after_epoch(self, val_losses: list[float]) -> None:
        if self.schedule is not None:
            self.schedule.after_epoch(val_losses[0])

    def evaluate(self, split: Split) -> tuple[list[float], list[float]]:
        """([cross-entropy], [classification error]) on ``split``, in eval mode."""
        loss, error = evaluate(self.model, split)
        return [loss], [error]

    @torch.no_grad()
    def training_losses(self, split: Split, loss: str) -> list[float]:
        """[mean ``loss``] on ``split`` in eval mode (divergence is judged in its units)."""
        was_training = self.model.training
        self.model.eval()
        total = sum(float(batch_loss(self.model(split.x[i:i + EVAL_BATCH]),
                                     split.y[i:i + EVAL_BATCH], loss))
                    * len(split.y[i:i + EVAL_BATCH]) for i in range(0, len(split), EVAL_BATCH))
        self.model.train(was_training)
        return [total / len(split)]

    def ratio_means(self) -> dict[str, list[float]]:
        return self.ratios.epoch_means() if self.ratios else {}


class Stacked:
    """K copies of one architecture, weights stacked on a leading member axis (K, ...).

    Linear-only models run as one wide GEMM (shared batch) or ``baddbmm`` (per-member
    batches); others (the CNN) through ``torch.func.vmap`` + ``functional_call``. Member k
    starts from ``models[k]``'s weights; dropout masks come from each member's own generator,
    the ones a lone run of that seed draws. The update is torch.optim's per member, at each
    member's own rate times the layer's ``lr_mult``; a member that is not alive is not updated.
    """

    def __init__(self, models: list[nn.Module], cfgs: list[TrainConfig],
                 device: torch.device, *, ratios: bool = True) -> None:
        self.template, self.k, self.device = models[0], len(models), device
        self.optim: OptimConfig = cfgs[0].optim
        self.loss = cfgs[0].loss
        mults = dict(self.optim.lr_mult)
        param_groups(self.template, 1.0, mults)  # the factory's checks: names, all frozen
        self.params: dict[str, torch.Tensor] = {}
        self.mult: dict[str, float] = {}
        for name, _ in self.template.named_parameters():
            self.mult[name] = float(mults.get(name.split(".")[0], 1.0))
            stacked = torch.stack([dict(m.named_parameters())[name].detach() for m in models])
            self.params[name] = stacked.requires_grad_(self.mult[name] > 0)  # 0 = frozen
        self.linear_only = all(isinstance(c, _LINEAR_ONLY) for c in self.template.children())
        drops = [m for m in self.template.modules() if isinstance(m, SeededDropout)]
        # The generators SeededDropout would get in each member (models.seed_dropout).
        self.dropout_gens = {
            id(d): [torch.Generator(device=device).manual_seed(c.seed * 1000 + i + 1)
                    for c in cfgs] for i, d in enumerate(drops)}
        self.state: dict[str, dict] = {n: {} for n in self.params}
        self.steps = 0
        self.ratios = UpdateRatios(self.params) if ratios else None
        self._losses: torch.Tensor | None = None

    # --- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        """Logits (K, B, classes) for inputs x: (B, ...) seen by all if shared, else (K, B, ...)."""
        if self.linear_only:
            return self._forward_linear(x, shared, training)
        return self._forward_vmap(x, shared, training)

    def _dropout(self, module: SeededDropout, h: torch.Tensor) -> torch.Tensor:
        # Member k's mask comes from its own generator, shaped as in a lone run: same masks.
        keep = torch.stack([torch.rand(h.shape[1:], generator=g, device=h.device) >= module.p
                            for g in self.dropout_gens[id(module)]])
        return h * keep / (1.0 - module.p)

    def _forward_linear(self, h: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        for name, child in self.template.named_children():
            if isinstance(child, nn.Flatten):
                h = h.flatten(1 if shared else 2)
            elif isinstance(child, nn.Linear):
                w, b = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
                k, out, inp = w.shape
                if shared:  # one wide GEMM: every member sees the same batch
                    h = F.linear(h, w.reshape(k * out, inp), b.reshape(k * out))
                    h = h.view(-1, k, out).transpose(0, 1)
                else:
                    h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                shared = False
            elif isinstance(child, nn.ReLU):
                h = F.relu(h)
            elif training and child.p > 0:
                h = self._dropout(child, h if not shared else h.expand(self.k, *h.shape))
                shared = False
        return h

    def _forward_vmap(self, h: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        segment: list[tuple[str, nn.Module]] = []
        for name, child in [*self.template.named_children(), ("", None)]:
            if child is not None and not isinstance(child, SeededDropout):
                segment.append((name, child))
                continue
            if segment:
                h = self._vmap_segment(nn.Sequential(OrderedDict(segment)), h, shared)
                shared, segment = False, []
            if child is not None and training and child.p > 0:
                h = self._dropout(child, h)
        return h

    def _vmap_segment(self, seq: nn.Sequential, h: torch.Tensor, shared: bool) -> torch.Tensor:
        params = {n: self.params[n] for n, _ in seq.named_parameters()}
        return vmap(lambda p, x: functional_call(seq, p, (x,)),
                    in_dims=(0, None if shared else 0))(params, h)

    # --- the loop's interface -------------------------------------------------------------
    def losses(self, x: torch.Tensor, y: torch.Tensor, shared: bool) -> torch.Tensor:
        """(K,) each member's training loss on its batch before the update (graph kept)."""
        self._losses = member_losses(self.forward(x, shared, training=True), y, self.loss)
        return self._losses.detach()

    def update(self, alive: torch.Tensor, step_in_epoch: int, rates: torch.Tensor) -> None:
        """One torch.optim-style update of every member in ``alive`` at ``rates`` (K,)."""
        trainable = {n: p for n, p in self.params.items() if p.requires_grad}
        grads = torch.autograd.grad(torch.where(alive, self._losses, 0).sum(),
                                    list(trainable.values()))
        self._losses = None
        self.steps += 1
        # On the CPU knowing "all alive" costs nothing and saves a masking pass per tensor.
        all_alive = alive.device.type == "cpu" and bool(alive.all())
        sampled = self.ratios is not None and self.ratios.sampled(step_in_epoch)
        with torch.no_grad():
            for (name, p), g in zip(trainable.items(), grads, strict=True):
                d, scale = direction(self.optim, p, g, self.state[name], self.steps)
                shape = (-1,) + (1,) * (p.dim() - 1)
                rate = (rates * (self.mult[name] * scale)).to(p.dtype).view(shape)
                if not all_alive:  # where, not rate 0: 0 x NaN would reach frozen weights
                    d = torch.where(alive.view(shape), d, 0)
                if sampled:
                    self.ratios.add_update(name, d, rate)
                p.addcmul_(d, rate, value=-1)
            if sampled:
                self.ratios.end_step(self.params)

    def after_epoch(self, val_losses: list[float]) -> None:
        """Nothing: stacked members follow a rate table (plateau cannot be stacked)."""

    @torch.no_grad()
    def evaluate(self, split: Split) -> tuple[list[float], list[float]]:
        """Per-member (cross-entropy, error) on ``split`` in eval mode."""
        chunk = max(256, EVAL_BATCH // self.k)  # keeps (K, chunk, width) activations bounded
        loss = torch.zeros(self.k, dtype=torch.float64, device=split.y.device)
        wrong = torch.zeros(self.k, dtype=torch.long, device=split.y.device)
        for start in range(0, len(split), chunk):
            x, y = split.x[start:start + chunk], split.y[start:start + chunk]
            logits = self.forward(x, shared=True, training=False)
            loss += member_losses(logits, y, "cross_entropy").double() * len(y)
            wrong += (logits.argmax(-1) != y).sum(1)
        return (loss / len(split)).tolist(), (wrong.double() / len(split)).tolist()

    @torch.no_grad()
    def training_losses(self, split: Split, loss: str) -> list[float]:
        """Per-member mean ``loss`` on ``split`` in eval mode."""
        total = torch.zeros(self.k, dtype=torch.float64, device=split.y.device)
        chunk = max(256, EVAL_BATCH // self.k)
        for start in range(0, len(split), chunk):
            x, y = split.x[start:start + chunk], split.y[start:start + chunk]
            total += member_losses(self.forward(x, True, False), y, loss).double() * len(y)
        return (total / len(split)).tolist()

    def ratio_means(self) -> dict[str, list[float]]:
        return self.ratios.epoch_means() if self.ratios else {}

    def group_lrs(self, base_rates: list[float]) -> dict[str, list[float]]:
        """``{"lr/<layer>": [member 0, ...]}``: each trainable layer's rate, the member's base
        rate times the layer's ``lr_mult`` (frozen layers have no group, as in make_optimizer)."""
        mults = dict(self.optim.lr_mult)
        return {f"lr/{n}": [rate * float(mults.get(n, 1.0)) for rate in base_rates]
                for n in layer_names(self.template) if float(mults.get(n, 1.0)) > 0}

    def group_ratios(self) -> dict[str, float]:
        """Each trainable layer's rate over the reference rate (the first trainable layer's
        base rate), as ``group_ratios`` computes it for ``make_optimizer``'s groups."""
        mults = dict(self.optim.lr_mult)
        groups = [(n, float(mults.get(n, 1.0))) for n in layer_names(self.template)]
        lrs = {n: self.optim.lr * m for n, m in groups if m > 0}
        first = next(n for n, m in groups if m > 0)  # param_groups refused an all-frozen model
        reference = lrs[first] / mults.get(first, 1.0)
        return {n: lr / reference for n, lr in lrs.items()}
