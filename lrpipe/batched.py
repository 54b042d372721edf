"""Many learning rates in one pass: K copies of one model trained as one batched computation.

``train_batched(cfgs, data)`` trains K members that differ only in base rate, seed and
schedule as one computation: every weight tensor gets a leading member axis (K, ...), Linear
layers run as one wide GEMM (shared batch) or ``baddbmm`` (per-member batches), other models
(the CNN) through ``torch.func.vmap`` + ``functional_call``. Member k starts from the weights
``make_model(..., seed=cfg_k.seed)`` gives, sees the batches ``train()`` would draw for its
seed, is updated with torch.optim's formulas at its own rate (``lrpipe.member_update``),
and yields its own TrainResult with ``train()``'s history columns. A diverging member is
frozen and dropped; the others go on.

Batching pays for small models and on GPUs; on a busy 2-core CPU a K-batched MLP is about as
fast as K sequential runs (FIELD_NOTES). ``lrpipe.many`` writes that down as the declared
policy (the config's ``batching`` field, ``batching_rule``) and holds the entry point for flows
(``train_many``), which batches only where the policy says so.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from lrpipe.config import TrainConfig
from lrpipe.data import Dataset, Split, iterate_batches
from lrpipe.member_update import UpdateRatios, direction
from lrpipe.models import SeededDropout, make_model
from lrpipe.optim import param_groups
from lrpipe.train import EVAL_BATCH, TrainResult, eval_train_split, resolve_device

BATCHED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
_LINEAR_ONLY = (nn.Flatten, nn.Linear, nn.ReLU, SeededDropout)


def _varies(key: str) -> bool:
    """Fields members may differ in: the rate, the seed and (when lr_lambda exists) schedule."""
    return key in ("optim.lr", "seed") or (key.startswith("schedule.") and _lr_lambda() is not None)


def _lr_lambda() -> Callable | None:
    from lrpipe import schedules  # lazily: the schedules module is being extended

    return getattr(schedules, "lr_lambda", None)


def unbatchable_reason(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` cannot be a member of a batched run, or None if it can."""
    if cfg.optim.name not in BATCHED_OPTIMIZERS:
        return (f"optim.name: got {cfg.optim.name!r}; allowed for batched training: "
                f"{', '.join(BATCHED_OPTIMIZERS)}")
    sched = cfg.schedule
    if sched.name == "plateau":
        return "schedule.name: got 'plateau'; allowed: any other (plateau follows each run's val)"
    if _lr_lambda() is None and (sched.name != "constant" or sched.warmup_epochs > 0):
        return (f"schedule: got {sched.name!r} with warmup_epochs={sched.warmup_epochs}; "
                "allowed without lrpipe.schedules.lr_lambda: constant, no warmup")
    return None


def check_batchable(cfgs: list[TrainConfig]) -> None:
    """Raise ValueError unless ``cfgs`` may train as one batch: same everything except
    ``optim.lr``, ``seed`` and (if ``lrpipe.schedules.lr_lambda`` exists) ``schedule.*``."""
    if not cfgs:
        raise ValueError("cfgs: got an empty list; allowed: at least one TrainConfig")
    first = cfgs[0].flat()
    for cfg in cfgs:
        reason = unbatchable_reason(cfg)
        if reason:
            raise ValueError(reason)
        for key, value in cfg.flat().items():
            if value != first[key] and not _varies(key):
                raise ValueError(f"{key}: members differ ({first[key]!r} vs {value!r}); allowed "
                                 "to differ: optim.lr, seed, schedule.* (with lr_lambda)")


def _rate_table(cfgs: list[TrainConfig], steps_per_epoch: int) -> torch.Tensor:
    """(K, total steps + 1) float64: base rate of member k at global step t (t = steps: end)."""
    total = cfgs[0].epochs * steps_per_epoch
    rows = []
    for cfg in cfgs:
        if _lr_lambda() is None:
            rows.append([cfg.optim.lr] * (total + 1))
        else:
            lam = _lr_lambda()(cfg.schedule, cfg.epochs, steps_per_epoch)
            rows.append([cfg.optim.lr * lam(t) for t in range(total + 1)])
    return torch.tensor(rows, dtype=torch.float64)


class _Members:
    """K models' weights stacked on a leading member axis, and their batched forward pass."""

    def __init__(self, cfgs: list[TrainConfig], data: Dataset, device: torch.device) -> None:
        models = [make_model(c.model, data.input_shape, data.num_classes, c.seed, device)
                  for c in cfgs]
        self.template, self.k = models[0], len(models)
        mults = dict(cfgs[0].optim.lr_mult)
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

    def _dropout(self, module: SeededDropout, h: torch.Tensor) -> torch.Tensor:
        # Member k's mask comes from its own generator, shaped as in a lone run: same masks.
        keep = torch.stack([torch.rand(h.shape[1:], generator=g, device=h.device) >= module.p
                            for g in self.dropout_gens[id(module)]])
        return h * keep / (1.0 - module.p)

    def forward(self, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        """Logits (K, B, classes) for inputs x: (B, ...) seen by all if shared, else (K, B, ...)."""
        if self.linear_only:
            return self._forward_linear(x, shared, training)
        return self._forward_vmap(x, shared, training)

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
        names = [n for n, _ in seq.named_parameters()]
        params = {n: self.params[n] for n in names}
        return vmap(lambda p, x: functional_call(seq, p, (x,)),
                    in_dims=(0, None if shared else 0))(params, h)


def member_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """(K,) mean batch loss per member, as ``train.batch_loss`` computes it for one model."""
    if y.dim() == 1:
        y = y.expand(logits.shape[0], -1)
    if loss == "cross_entropy":
        return -logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
    target = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return (logits - target).square().sum((1, 2)) / y.shape[1]


class _BatchedStep:
    """One training step of all members: forward, per-member loss, backward, masked update."""

    def __init__(self, cfgs: list[TrainConfig], data: Dataset, device: torch.device) -> None:
        self.members = _Members(cfgs, data, device)
        self.cfg, self.steps, self.state = cfgs[0], 0, {n: {} for n in self.members.params}
        k = self.members.k
        self.alive = torch.ones(k, dtype=torch.bool, device=device)
        self.ratios = UpdateRatios(self.members.params)
        self.threshold = torch.full((k,), math.inf, dtype=torch.float64, device=device)
        self.eval_threshold = [math.inf] * k  # epoch rows' cross-entropy limit per member
        self.last_losses: torch.Tensor | None = None  # (K,) last step's losses, before its update

    def __call__(self, x: torch.Tensor, y: torch.Tensor, shared: bool, rates: torch.Tensor,
                 step_in_epoch: int = 1) -> torch.Tensor:
        """Step every live member at ``rates`` (K,); returns the members that just diverged."""
        logits = self.members.forward(x, shared, training=True)
        losses = member_losses(logits, y, self.cfg.loss)
        self.last_losses = losses.detach()
        ok = losses.detach() <= self.threshold.to(losses.dtype)  # False for NaN and inf, too
        died = self.alive & ~ok
        self.alive &= ok
        trainable = {n: p for n, p in self.members.params.items() if p.requires_grad}
        grads = torch.autograd.grad(torch.where(self.alive, losses, 0).sum(),
                                    list(trainable.values()))
        self.steps += 1
        # On the CPU knowing "all alive" costs nothing and saves a masking pass per tensor.
        all_alive = self.alive.device.type == "cpu" and bool(self.alive.all())
        sampled = self.ratios.sampled(step_in_epoch)
        with torch.no_grad():
            for (name, p), g in zip(trainable.items(), grads, strict=True):
                d, scale = direction(self.cfg.optim, p, g, self.state[name], self.steps)
                shape = (-1,) + (1,) * (p.dim() - 1)
                rate = (rates * (self.members.mult[name] * scale)).to(p.dtype).view(shape)
                if not all_alive:  # where, not rate 0: 0 x NaN would reach frozen weights
                    d = torch.where(self.alive.view(shape), d, 0)
                if sampled:
                    self.ratios.add_update(name, d, rate)
                p.addcmul_(d, rate, value=-1)
            if sampled:
                self.ratios.end_step(self.members.params)
        return died


@torch.no_grad()
def _evaluate(members: _Members, split: Split) -> tuple[list[float], list[float]]:
    """Per-member (cross-entropy, error) on ``split`` in eval mode, like ``train.evaluate``."""
    chunk = max(256, EVAL_BATCH // members.k)  # keeps (K, chunk, width) activations bounded
    loss = torch.zeros(members.k, dtype=torch.float64, device=split.y.device)
    wrong = torch.zeros(members.k, dtype=torch.long, device=split.y.device)
    for start in range(0, len(split), chunk):
        x, y = split.x[start:start + chunk], split.y[start:start + chunk]
        logits = members.forward(x, shared=True, training=False)
        loss += member_losses(logits, y, "cross_entropy").double() * len(y)
        wrong += (logits.argmax(-1) != y).sum(1)
    return (loss / len(split)).tolist(), (wrong.double() / len(split)).tolist()


def _generators(seeds: list[int]) -> list[torch.Generator]:
    """One batch-order generator if all members share a seed, else one per member."""
    return [torch.Generator().manual_seed(s) for s in (seeds if len(set(seeds)) > 1 else seeds[:1])]


def _batches(split: Split, batch_size: int, gens: list[torch.Generator]):
    """Yield (x, y, shared) for one epoch: one shared order if there is one generator, else
    one order per member. Member k's order is ``iterate_batches``' for its generator; distinct
    seeds cost a (K, B, ...) gather per step instead of one (B, ...) gather.
    """
    if len(gens) == 1:
        for x, y in iterate_batches(split, batch_size, gens[0]):
            yield x, y, True
        return
    perms = torch.stack([torch.randperm(len(split), generator=g) for g in gens])
    perms = perms.to(split.y.device)
    for start in range(0, len(split), batch_size):
        idx = perms[:, start:start + batch_size]
        yield split.x[idx], split.y[idx], False


def _eval_rows(members: _Members, train_eval: Split, val: Split, epoch: int, lrs: list[float],
               seconds: float, extra: dict[str, list[float]] | None = None) -> list[dict]:
    """One History row per member, with train()'s columns (``extra``: per-member columns)."""
    train_loss, train_error = _evaluate(members, train_eval)
    val_loss, val_error = _evaluate(members, val)
    return [dict(epoch=epoch, train_loss=train_loss[k], val_loss=val_loss[k],
                 train_error=train_error[k], val_error=val_error[k], lr=lrs[k], time_s=seconds,
                 **{col: values[k] for col, values in (extra or {}).items()})
            for k in range(members.k)]


@torch.no_grad()
def _initial_losses(members: _Members, split: Split, loss: str, rows: list[dict]) -> torch.Tensor:
    """(K,) float64 epoch-0 loss in the training loss's units: the rows' cross-entropy, else
    ``loss`` evaluated on ``split`` (``train.initial_training_loss`` per member)."""
    if loss == "cross_entropy":
        return torch.tensor([r["train_loss"] for r in rows], dtype=torch.float64)
    total = torch.zeros(members.k, dtype=torch.float64, device=split.y.device)
    chunk = max(256, EVAL_BATCH // members.k)
    for start in range(0, len(split), chunk):
        x, y = split.x[start:start + chunk], split.y[start:start + chunk]
        total += member_losses(members.forward(x, True, False), y, loss).double() * len(y)
    return (total / len(split)).cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_batched(
    cfgs: list[TrainConfig],
    data: Dataset,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[TrainResult]:
    """Train K members as one batched computation; one TrainResult per member, as train() would.

    Args:
        cfgs: the members; they may differ only in ``optim.lr``, ``seed`` and (if
            ``lrpipe.schedules.lr_lambda`` exists) ``schedule.*``. Dropout is supported with
            per-member masks from each member's own generator (the masks a lone run draws).
        data: the Dataset, on the members' device.
        on_epoch: called as ``on_epoch(k, row)`` with member k's History row when it exists.
    Returns:
        TrainResults in ``cfgs`` order. ``time_s`` is the shared wall time of the batched
        training (evaluation excluded, as in train()); ``model`` is None.
    Raises:
        ValueError: members differ in another field, or use rprop/gains/plateau.
    """
    check_batchable(cfgs)
    cfg, device, k = cfgs[0], resolve_device(cfgs[0].device), len(cfgs)
    if cfg.batch_size > len(data.train):
        raise ValueError(f"batch_size: got {cfg.batch_size}; allowed: <= {len(data.train)} "
                         "(training examples)")
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    table = _rate_table(cfgs, steps_per_epoch)
    rates, step = table.to(device), _BatchedStep(cfgs, data, device)
    gens = _generators([c.seed for c in cfgs])
    train_eval = eval_train_split(data, cfg)
    rows = _eval_rows(step.members, train_eval, data.val, 0, table[:, 0].tolist(), 0.0)
    # As train(): batch losses are judged in the training loss's units, epoch rows in CE.
    step.threshold = cfg.diverge_factor * _initial_losses(step.members, train_eval, cfg.loss,
                                                          rows).to(device)
    step.eval_threshold = [cfg.diverge_factor * r["train_loss"] for r in rows]
    runs = [_MemberRun([r], cfg.epochs * steps_per_epoch) for r in rows]
    _emit(on_epoch, runs, rows)
    died_at = torch.full((k,), -1, dtype=torch.long, device=device)
    t, elapsed = 0, 0.0
    check_every = 1 if device.type == "cpu" else 25  # as train(): asking the GPU syncs it
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        for i, (x, y, shared) in enumerate(_batches(data.train, cfg.batch_size, gens)):
            died_at = torch.where(step(x, y, shared, rates[:, t], i), t, died_at)
            t += 1
            if t % check_every == 0 and not bool(step.alive.any()):
                break  # every member diverged: stop at once, as train() does for one
        _sync(device)
        elapsed += time.perf_counter() - start
        lrs = table[:, (epoch - 1) * steps_per_epoch].tolist()
        rows = _eval_rows(step.members, train_eval, data.val, epoch, lrs, elapsed,
                          step.ratios.epoch_means())
        _mark_diverged(runs, step, rows, died_at.tolist(), epoch, t)
        _emit(on_epoch, runs, rows)
        if not bool(step.alive.any()):
            break
    return [run.result(table[m], str(device)) for m, run in enumerate(runs)]


class _MemberRun:
    """One member's growing History and status while the batch trains."""

    def __init__(self, rows: list[dict], steps: int) -> None:
        self.rows, self.steps, self.status, self.epoch = rows, steps, "ok", None

    def diverge(self, epoch: int, steps: int) -> None:
        self.status, self.epoch, self.steps = "diverged", epoch, steps

    def result(self, rates: torch.Tensor, device: str) -> TrainResult:
        return TrainResult(history=pd.DataFrame(self.rows), status=self.status,
                           diverged_epoch=self.epoch, device=device,
                           lr_trace=rates[:self.steps].tolist())


def _mark_diverged(runs: list[_MemberRun], step: _BatchedStep, rows: list[dict],
                   died_at: list[int], epoch: int, steps: int) -> None:
    """train()'s two divergence checks: a batch loss this epoch (``step.alive`` is already
    off), or the epoch's evaluation (train loss over the threshold, or non-finite val loss)."""
    alive, threshold = step.alive.tolist(), step.eval_threshold
    for m, run in enumerate(runs):
        if run.status != "ok":
            continue
        if not alive[m]:
            run.diverge(epoch, steps=died_at[m] + 1)
        elif not (rows[m]["train_loss"] <= threshold[m] and math.isfinite(rows[m]["val_loss"])):
            run.diverge(epoch, steps=steps)
            step.alive[m] = False


def _emit(on_epoch, runs: list[_MemberRun], rows: list[dict]) -> None:
    """Append each live member's row (epoch 0 rows are already there) and call the hook."""
    for m, (run, row) in enumerate(zip(runs, rows, strict=True)):
        if run.status != "ok":
            continue
        if run.rows[-1] is not row:
            run.rows.append(row)
        if on_epoch:
            on_epoch(m, row)

