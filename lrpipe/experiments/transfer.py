"""Pretrain, then fine-tune: per-layer learning rates for transfer learning.

A network is pretrained on a SOURCE task (by default Fashion-MNIST's five clothing tops), its
head is replaced by a fresh one for the TARGET task (the other five classes, few examples per
class), and the copy is fine-tuned under one of ``STRATEGIES``: a named rule that maps every
layer to a multiplier of the base rate (Caffe's ``lr_mult``). Strategies are data: each becomes
``OptimConfig.lr_mult`` and goes through the one optimizer factory, so a typo in a layer name is
a ConfigError listing the valid names, never a silently ignored group.

References: Yosinski et al. 2014 (how transferable are features), Howard & Ruder 2018 (ULMFiT:
discriminative rates with factor 2.6, gradual unfreezing, https://arxiv.org/abs/1801.06146).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from lrpipe.engine.config import (
    DATASETS,
    MODELS,
    OPTIMIZERS,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_choice,
    check_device,
    check_number,
)
from lrpipe.engine.data import Dataset, load_data
from lrpipe.engine.models import (
    HEAD,
    backbone_names,
    build_model,
    init_weights,
    layer_names,
    seed_dropout,
)
from lrpipe.engine.optim import check_lr_mult
from lrpipe.engine.train import TrainResult, resolve_device, train

STRATEGIES = ("uniform", "head_mult", "frozen_backbone", "discriminative", "gradual_unfreeze",
              "scratch")
STAGE_SEED_STRIDE = 1000  # gradual unfreezing: stage k shuffles with seed + 1000 k


@dataclass(frozen=True)
class TransferConfig:
    """One transfer experiment: a source pretraining and target fine-tunings under strategies.

    dataset, root: as in DataConfig (``digits`` for fast tests).
    source_classes / target_classes: labels of each task, relabelled 0..k-1 in the given order.
    source_val_size / target_val_size: validation examples drawn from each task's training
        split (count; about 30,000 training images per five Fashion-MNIST classes).
    per_class: target training examples per class (the few-shot budget; count).
    model: mlp | cnn (softmax has no backbone to transfer). hidden: MLP widths (units); two
        layers by default so discriminative rates and gradual unfreezing act on a real stack.
    optimizer: OptimConfig name for both phases (momentum 0.9 where it applies).
    pretrain_lr: base rate of the source training (per update, mean loss over the batch).
    pretrain_epochs / pretrain_batch_size: source budget (epochs, examples per update).
    base_lr: fine-tuning base rate: every backbone layer's rate under uniform and head_mult.
        0.01 (SGD momentum 0.9) measured best for head_mult on the default task (3 seeds, 10
        epochs, grid 0.001-0.1); uniform's own best was 0.03, where head_mult x10 degrades.
    head_mult: the head's rate as a multiple of base_lr (x base_lr; the "10x head" rule).
    discr_factor: discriminative rates: each layer below the head is this factor slower than
        the layer above it (ULMFiT's 2.6).
    unfreeze_every: gradual unfreezing: epochs per stage before the next layer down thaws.
    scratch_lr: the "scratch" baseline's uniform rate; None = base_lr. A fresh network wants a
        larger rate than fine-tuning does, so scratch gets its own: 0.03 measured best.
    finetune_epochs / batch_size: target budget (epochs, examples per update), every strategy.
    seeds: fine-tuning seeds (new head's init, batch order); pretrain_seed: the source run's.
    head_mults / base_lrs: the grids of the head-multiplier and base-rate x multiplier sweeps.
    device: auto | cpu | cuda | cuda:N.
    """

    dataset: str = "fashion_mnist"
    root: str = "data"
    source_classes: tuple[int, ...] = (0, 2, 3, 4, 6)
    target_classes: tuple[int, ...] = (1, 5, 7, 8, 9)
    source_val_size: int = 5000
    target_val_size: int = 5000
    per_class: int = 100
    model: str = "mlp"
    hidden: tuple[int, ...] = (256, 128)
    optimizer: str = "momentum"
    pretrain_lr: float = 0.05
    pretrain_epochs: int = 5
    pretrain_batch_size: int = 128
    base_lr: float = 0.01
    head_mult: float = 10.0
    discr_factor: float = 2.6
    unfreeze_every: int = 1
    scratch_lr: float | None = 0.03
    finetune_epochs: int = 10
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_seed: int = 0
    head_mults: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
    base_lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, tuple(m for m in MODELS if m != "softmax"))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_device(self.device)
        for name in ("source_classes", "target_classes", "hidden", "seeds", "head_mults",
                     "base_lrs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("source_classes", "target_classes"):
            _check_classes(name, getattr(self, name))
        for name in ("source_val_size", "target_val_size", "per_class", "pretrain_epochs",
                     "pretrain_batch_size", "unfreeze_every", "finetune_epochs", "batch_size"):
            check_number(name, getattr(self, name), low=1, integer=True)
        ModelConfig(name=self.model, hidden=self.hidden)  # widths: ModelConfig's own checks
        for name in ("pretrain_lr", "base_lr", "head_mult"):
            check_number(name, getattr(self, name), low=0.0, low_open=True)
        if self.scratch_lr is not None:
            check_number("scratch_lr", self.scratch_lr, low=0.0, low_open=True)
        check_number("discr_factor", self.discr_factor, low=1.0)
        check_number("pretrain_seed", self.pretrain_seed, low=0, integer=True)
        _check_grid("seeds", self.seeds, integer=True)
        _check_grid("head_mults", self.head_mults)
        _check_grid("base_lrs", self.base_lrs)


def _check_classes(name: str, classes: tuple[int, ...]) -> None:
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"{name}: got {classes!r}; allowed: at least 2 distinct labels 0..9")
    for c in classes:
        check_number(name, c, low=0, high=9, integer=True)


def _check_grid(name: str, values: tuple, integer: bool = False) -> None:
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"{name}: got {values!r}; allowed: a non-empty tuple of distinct values")
    for v in values:
        check_number(name, v, low=0, low_open=not integer, integer=integer)


def source_config(tc: TransferConfig) -> TrainConfig:
    """The pretraining run: all source training examples, ``pretrain_*`` budget, uniform rate."""
    return TrainConfig(
        data=DataConfig(dataset=tc.dataset, root=tc.root, val_size=tc.source_val_size,
                        classes=tc.source_classes),
        model=ModelConfig(name=tc.model, hidden=tc.hidden),
        optim=OptimConfig(name=tc.optimizer, lr=tc.pretrain_lr),
        epochs=tc.pretrain_epochs, batch_size=tc.pretrain_batch_size, seed=tc.pretrain_seed,
        device=tc.device,
    )


def target_config(tc: TransferConfig, strategy: str, seed: int) -> TrainConfig:
    """The fine-tuning run of ``strategy`` with ``seed``; lr_mult holds the strategy's rates.

    For gradual_unfreeze this is the final stage's config (every layer thawed); the earlier
    stages are ``unfreeze_plan``'s. For scratch the rate is ``scratch_lr or base_lr``, uniform.
    """
    mult = strategy_lr_mult(strategy, _skeleton(tc), tc)
    lr = (tc.scratch_lr or tc.base_lr) if strategy == "scratch" else tc.base_lr
    return TrainConfig(
        data=DataConfig(dataset=tc.dataset, root=tc.root, val_size=tc.target_val_size,
                        classes=tc.target_classes, per_class=tc.per_class),
        model=ModelConfig(name=tc.model, hidden=tc.hidden),
        optim=OptimConfig(name=tc.optimizer, lr=lr, lr_mult=mult),
        epochs=tc.finetune_epochs, batch_size=tc.batch_size, seed=seed, device=tc.device,
    )


def _skeleton(tc: TransferConfig) -> nn.Sequential:
    """The model's layer structure on the meta device: names only, no memory, no RNG draws."""
    with torch.device("meta"):
        return build_model(ModelConfig(name=tc.model, hidden=tc.hidden), (1, 28, 28),
                           len(tc.target_classes))


def check_layer_mult(model: nn.Module, lr_mult: Mapping[str, float]) -> dict[str, float]:
    """Validate per-layer multipliers against ``model``'s layer names; return them as floats.

    Raises:
        ConfigError: a name that is no layer of ``model`` (the message lists the valid ones),
            a multiplier that is not a finite number, or a negative one.
    """
    check_lr_mult(model, {name: 0.0 for name in lr_mult})  # names first: lists valid names
    for name, mult in lr_mult.items():
        check_number(f"lr_mult[{name}]", mult, low=0.0)
    return {name: float(mult) for name, mult in lr_mult.items()}


def strategy_lr_mult(strategy: str, model: nn.Module, tc: TransferConfig) -> dict[str, float]:
    """Every layer's multiplier of the base rate under ``strategy`` (0 = frozen).

    uniform, scratch: every layer 1.
    head_mult: backbone 1, head ``head_mult``.
    frozen_backbone: backbone 0 (frozen), head ``head_mult``: the same head rate as head_mult,
        so the two differ only in whether the backbone moves.
    discriminative, gradual_unfreeze: ULMFiT's ladder anchored at the head: head ``head_mult``,
        the k-th layer below it ``head_mult / discr_factor**k``. Anchoring at the head (not at
        1) keeps the head rate equal to head_mult's, so discriminative differs from head_mult
        only in the backbone: one flat base rate versus a geometric ladder down from the head.
    Raises:
        ConfigError: an unknown strategy (lists STRATEGIES) or a model without a head.
    """
    check_choice("strategy", strategy, STRATEGIES)
    if HEAD not in layer_names(model):
        raise ConfigError(f"model: no layer named {HEAD!r}; allowed: a model from make_model")
    backbone = backbone_names(model)
    if strategy in ("uniform", "scratch"):
        mult = {name: 1.0 for name in backbone}
        mult[HEAD] = 1.0
    elif strategy == "head_mult":
        mult = {**{name: 1.0 for name in backbone}, HEAD: tc.head_mult}
    elif strategy == "frozen_backbone":
        mult = {**{name: 0.0 for name in backbone}, HEAD: tc.head_mult}
    else:
        depth = len(backbone)
        mult = {name: tc.head_mult / tc.discr_factor ** (depth - i)
                for i, name in enumerate(backbone)}
        mult[HEAD] = tc.head_mult
    return check_layer_mult(model, mult)


def unfreeze_plan(model: nn.Module, tc: TransferConfig) -> list[tuple[int, dict[str, float]]]:
    """Gradual unfreezing as data: ``[(epochs, lr_mult), ...]`` stages from the top down.

    Stage 0 trains the head alone; each later stage thaws the next layer down, every
    ``unfreeze_every`` epochs, at the discriminative rates; the last stage (everything thawed)
    takes the remaining epochs. Stages past ``finetune_epochs`` are dropped.
    """
    names = layer_names(model)
    ladder = strategy_lr_mult("gradual_unfreeze", model, tc)
    plan, used = [], 0
    for k in range(1, len(names) + 1):
        epochs = tc.unfreeze_every if k < len(names) else tc.finetune_epochs - used
        epochs = min(epochs, tc.finetune_epochs - used)
        if epochs <= 0:
            break
        thawed = set(names[-k:])
        plan.append((epochs, {n: (ladder[n] if n in thawed else 0.0) for n in names}))
        used += epochs
    return plan


def transplant(pretrained: nn.Module, num_classes: int, seed: int) -> nn.Sequential:
    """A deep copy of ``pretrained`` with a fresh head for ``num_classes`` classes.

    The backbone's weights are copied exactly; the new head (same name, same input width, on
    the old head's device) is initialized from ``seed`` by the scheme make_model uses, and
    dropout masks are reseeded. ``pretrained`` is not modified.
    """
    check_number("num_classes", num_classes, low=2, integer=True)
    old_head = getattr(pretrained, HEAD, None)
    if not isinstance(old_head, nn.Linear):
        raise ValueError(f"pretrained: its {HEAD!r} layer is {type(old_head).__name__}; "
                         "allowed: a model from make_model with a Linear head")
    model = copy.deepcopy(pretrained)
    device = old_head.weight.device
    head = nn.Linear(old_head.in_features, num_classes)
    init_weights(head, torch.Generator().manual_seed(seed))
    setattr(model, HEAD, head.to(device))
    seed_dropout(model, seed, device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def load_task(cfg: TrainConfig) -> Dataset:
    """The dataset a source or target config names, on its device (load once, reuse)."""
    return load_data(cfg.data, resolve_device(cfg.device))


def pretrain(tc: TransferConfig, data: Dataset | None = None) -> TrainResult:
    """Train the source task (``source_config``); the result keeps the trained model."""
    cfg = source_config(tc)
    return train(cfg, data if data is not None else load_task(cfg), keep_model=True)


def finetune(
    tc: TransferConfig,
    strategy: str,
    seed: int,
    pretrained_model: nn.Module | None,
    data: Dataset | None = None,
    keep_model: bool = False,
) -> TrainResult:
    """Fine-tune a transplant of ``pretrained_model`` on the target task under ``strategy``.

    ``scratch`` ignores ``pretrained_model`` and trains a fresh seeded network at
    ``scratch_lr or base_lr`` with the same budget. ``gradual_unfreeze`` runs ``unfreeze_plan``
    as consecutive train() calls (see ``train_stages``). The history has train()'s columns plus
    ``trainable_layers`` (layers with a nonzero rate during that epoch).
    """
    check_choice("strategy", strategy, STRATEGIES)
    cfg = target_config(tc, strategy, seed)
    data = data if data is not None else load_task(cfg)
    if strategy == "scratch":
        return _with_trainable(train(cfg, data, keep_model=keep_model), cfg)
    if pretrained_model is None:
        raise ValueError(f"pretrained_model: got None for strategy {strategy!r}; allowed: a "
                         "model from pretrain() (only 'scratch' trains without one)")
    model = transplant(pretrained_model, data.num_classes, seed)
    if strategy == "gradual_unfreeze":
        return train_stages(cfg, model, data, unfreeze_plan(model, tc), keep_model)
    return _with_trainable(train(cfg, data, model=model, keep_model=keep_model), cfg)


def _with_trainable(result: TrainResult, cfg: TrainConfig) -> TrainResult:
    result.history["trainable_layers"] = sum(m > 0 for _, m in cfg.optim.lr_mult)
    return result


def trainable_layers(history: pd.DataFrame) -> pd.Series:
    """The ``trainable_layers`` column of a fine-tuning's history, read from its ``lr/<layer>``
    columns: the engine records a rate for each layer that trains (multiplier > 0) and none
    for a frozen one. Rebuilds the column from a logged history, which carries the rates."""
    return history.filter(regex=r"^lr/").notna().sum(axis=1)


def train_stages(
    cfg: TrainConfig,
    model: nn.Module,
    data: Dataset,
    plan: Sequence[tuple[int, Mapping[str, float]]],
    keep_model: bool = False,
) -> TrainResult:
    """Train ``model`` through ``plan``'s stages; one history with continuous epoch numbers.

    Each stage is one train() call with that stage's epochs and lr_mult (frozen layers at 0).
    Epoch 0 (before any update) appears once; times accumulate. The optimizer, and so its
    momentum or Adam moments, restarts at every stage, as with a fresh optimizer over the newly
    thawed groups. Stage k shuffles with ``seed + 1000 k`` so stages see different batch orders.
    The divergence threshold stays the first stage's absolute loss level. A diverged stage ends
    the run.
    """
    parts, lr_trace, offset, elapsed = [], [], 0, 0.0
    first_loss = last_loss = None
    result = None
    for k, (epochs, mult) in enumerate(plan):
        changes = {"epochs": epochs, "optim.lr_mult": dict(mult),
                   "seed": cfg.seed + STAGE_SEED_STRIDE * k}
        if first_loss is not None and hasattr(cfg, "diverge_factor"):
            changes["diverge_factor"] = max(cfg.diverge_factor * first_loss / last_loss, 1 + 1e-6)
        stage_cfg = cfg.replace(**changes)
        result = train(stage_cfg, data, model=model)
        hist = _with_trainable(result, stage_cfg).history
        hist = hist.assign(epoch=hist["epoch"] + offset, time_s=hist["time_s"] + elapsed)
        parts.append(hist if k == 0 else hist.iloc[1:])
        lr_trace += result.lr_trace
        first_loss = first_loss if first_loss is not None else float(hist["train_loss"].iloc[0])
        last_loss = float(hist["train_loss"].iloc[-1])
        offset, elapsed = int(hist["epoch"].iloc[-1]), float(hist["time_s"].iloc[-1])
        if result.status == "diverged":  # the next stages would start from a blown-up model
            break
    if result is None:
        raise ValueError("plan: got no stages; allowed: at least one (epochs, lr_mult) stage")
    diverged = None if result.diverged_epoch is None else result.diverged_epoch + offset
    return TrainResult(
        history=pd.concat(parts, ignore_index=True), status=result.status,
        diverged_epoch=diverged, device=result.device,
        model=model if keep_model else None, lr_trace=lr_trace,
    )


def grid_configs(tc: TransferConfig) -> list[tuple[float, float]]:
    """Every (base_lr, head_mult) pair of the grid, base rate major, in the config's order."""
    return [(lr, mult) for lr in tc.base_lrs for mult in tc.head_mults]


def history_frame(result: TrainResult, **labels) -> pd.DataFrame:
    """The run's history with its labels (strategy, seed, base_lr, ...) and status as columns."""
    return result.history.assign(**labels, status=result.status)


def run_strategies(tc: TransferConfig, pretrained: nn.Module, data: Dataset,
                   strategies: Sequence[str] = STRATEGIES) -> pd.DataFrame:
    """Fine-tune every strategy x seed: long-form histories labelled strategy, seed, base_lr and
    head_mult (the head's actual multiplier under that strategy: 1 for uniform and scratch)."""
    frames = []
    for strategy in strategies:
        for seed in tc.seeds:
            result = finetune(tc, strategy, seed, pretrained, data)
            optim = target_config(tc, strategy, seed).optim
            frames.append(history_frame(result, strategy=strategy, seed=seed, base_lr=optim.lr,
                                        head_mult=dict(optim.lr_mult)[HEAD]))
    return pd.concat(frames, ignore_index=True)


def run_grid(tc: TransferConfig, pretrained: nn.Module, data: Dataset,
             pairs: Sequence[tuple[float, float]] | None = None) -> pd.DataFrame:
    """The head_mult strategy at each (base_lr, head_mult) pair (default: the whole grid)."""
    frames = []
    for lr, mult in pairs if pairs is not None else grid_configs(tc):
        run_tc = dataclasses.replace(tc, base_lr=lr, head_mult=mult)
        frames.append(run_strategies(run_tc, pretrained, data, ("head_mult",)))
    return pd.concat(frames, ignore_index=True)


def final_rows(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The last recorded epoch of each run: one run = one value of ``keys``, strategy (where
    the column exists) and seed."""
    needed = (*keys, "seed", "epoch", "val_error")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"df: missing columns {missing}; allowed: a long-form history with "
                         f"{', '.join(needed)}")
    run = [*keys, *(["strategy"] if "strategy" in df and "strategy" not in keys else []), "seed"]
    ordered = df.sort_values("epoch", kind="stable")
    return ordered.groupby(run, as_index=False).tail(1).reset_index(drop=True)


def summarize_strategies(df: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: mean, std, min, max of the final val_error over seeds, best first.

    Columns: strategy, mean, std, min, max, seeds, diverged (runs whose last finite epoch is
    what the final error reports), rank (1 = lowest mean error).
    """
    last = final_rows(df, ["strategy"])
    last = last.assign(diverged=(last["status"] != "ok") if "status" in last else False)
    table = last.groupby("strategy").agg(
        mean=("val_error", "mean"), std=("val_error", "std"), min=("val_error", "min"),
        max=("val_error", "max"), seeds=("seed", "nunique"), diverged=("diverged", "sum"))
    table = table.sort_values("mean", kind="stable").reset_index()
    table["rank"] = range(1, len(table) + 1)
    return table


def grid_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean final val_error over seeds, base_lr rows x head_mult columns (NaN where unrun)."""
    last = final_rows(df, ["base_lr", "head_mult"])
    table = last.pivot_table(index="base_lr", columns="head_mult", values="val_error",
                             aggfunc="mean")
    return table.sort_index().sort_index(axis=1)

