"""One optimizer factory over torch.optim, with explicit per-layer parameter groups.

Each parametrized layer of the model becomes its own parameter group, named after the layer
(``group["name"]``), with rate ``base lr x lr_mult[name]`` (Caffe's base_lr x lr_mult). A
multiplier of 0 freezes the layer (``requires_grad`` off, no group). Unknown layer names are an
error that lists the valid ones: PyTorch ignores unknown param-group keys, we never do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from lrpipe.engine.config import ConfigError, OptimConfig
from lrpipe.engine.models import layer_names


def _sgd(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _momentum(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def _nesterov(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay)


def _adagrad(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _rmsprop(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adam(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _rprop(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Rprop has no weight decay argument; its lr is the initial per-weight step size.
    if cfg.weight_decay:
        raise ConfigError("optim.weight_decay: got a nonzero value; allowed: 0 for rprop")
    return torch.optim.Rprop(params, lr=cfg.lr)


def _gains(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    from lrpipe.engine.gains import AdaptiveGains

    return AdaptiveGains(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


OPTIMIZER_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "nesterov": _nesterov,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "rprop": _rprop,
    "gains": _gains,
}


def check_lr_mult(model: nn.Module, lr_mult: Mapping[str, float]) -> None:
    """Raise ConfigError if a multiplier names no layer of ``model`` or is negative."""
    valid = layer_names(model)
    for name, mult in lr_mult.items():
        if name not in valid:
            raise ConfigError(f"optim.lr_mult: unknown layer {name!r}; allowed: "
                              f"{', '.join(valid)}")
        if not mult >= 0:
            raise ConfigError(f"optim.lr_mult[{name}]: got {mult!r}; allowed: a number >= 0")


def param_groups(
    model: nn.Module, base_lr: float, lr_mult: Mapping[str, float]
) -> list[dict]:
    """One group per parametrized layer: ``{"name", "params", "lr", "lr_mult"}``.

    Layers with multiplier 0 get ``requires_grad=False`` and no group: frozen, no update.
    """
    check_lr_mult(model, lr_mult)
    groups = []
    for name in layer_names(model):
        mult = float(lr_mult.get(name, 1.0))
        params = list(getattr(model, name).parameters())
        for p in params:
            p.requires_grad_(mult > 0)
        if mult > 0:
            groups.append({"name": name, "params": params, "lr": base_lr * mult,
                           "lr_mult": mult})
    if not groups:
        raise ConfigError("optim.lr_mult: every layer is frozen; allowed: at least one "
                          "layer with a multiplier > 0")
    return groups


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``model``'s per-layer groups at ``cfg.lr x lr_mult``."""
    groups = param_groups(model, cfg.lr, dict(cfg.lr_mult))
    return OPTIMIZER_FACTORIES[cfg.name](groups, cfg)


def check_layer_names(model_cfg, input_shape: tuple[int, int, int], names,
                      num_classes: int = 10) -> None:
    """Raise ConfigError naming ``optim.lr_mult`` if a name in ``names`` is no layer of the
    model ``model_cfg`` builds for ``input_shape`` (C, H, W). The model is built on the meta
    device (no memory, no weights drawn), so a sweep can check this before any run starts."""
    from lrpipe.engine.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg, tuple(input_shape), num_classes)
    check_lr_mult(model, {name: 1.0 for name in names})
