"""Your model and your data, named in a config: ``package.module:callable``.

``model.name: examples.digits_cnn:build`` names a factory ``build(seed) -> nn.Module`` (a fresh
model, seeded by the run's seed); ``data.dataset: examples.digits_cnn:load`` names a loader
``load() -> (train, held_out)``, each a ``DataLoader``, any iterable of ``(x, y)`` batches, or an
``(x, y)`` pair of tensors, with integer class labels ``y``. lrpipe reads the loader once into
tensors: the validation split is drawn from ``train`` (``data.val_size``), ``held_out`` becomes
the test split, scored only at the end. This module is lrpipe's one plug-in loader: the only
place that imports code named at run time.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lrpipe.engine.config import PLUGIN_SEPARATOR, ConfigError

# How errors name a plug-in: the config field and the command-line flag that sets it.
MODEL_FIELD, DATA_FIELD = "model.name (--model)", "data.dataset (--data)"


def load_callable(spec: str, field: str) -> Callable[..., Any]:
    """The callable ``spec`` names, imported as ``python -m`` would (the working folder first).

    Raises:
        ConfigError: a malformed spec, a module that does not import, or no such callable;
            the message names ``field``.
    """
    module_name, _, attr = spec.partition(PLUGIN_SEPARATOR)
    allowed = "package.module:callable, importable from the folder you run lrpipe in"
    if not module_name or not attr.isidentifier():
        raise ConfigError(f"{field}: got {spec!r}; allowed: {allowed}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import {module_name!r} ({exc}); allowed: "
                          f"{allowed}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field}: {module_name} has no callable {attr!r}; allowed: {allowed}")
    return fn


def plugin_model(spec: str, seed: int) -> nn.Module:
    """A fresh model from the factory ``spec`` names, called with the run's seed.

    Raises:
        ConfigError: the factory cannot be loaded, or returns no nn.Module with parameters.
    """
    model = load_callable(spec, MODEL_FIELD)(seed)
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise ConfigError(f"{MODEL_FIELD}: {spec}({seed}) returned {type(model).__name__}; "
                          "allowed: a factory(seed) returning an nn.Module with parameters")
    return model


@functools.lru_cache(maxsize=4)
def plugin_arrays(spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_held_out, y_held_out) from the loader ``spec`` names, read once.

    Raises:
        ConfigError: the loader cannot be loaded, or returns something else than two splits of
            (x, y) with as many labels as inputs, integer labels >= 0 and float inputs.
    """
    out = load_callable(spec, DATA_FIELD)()
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ConfigError(f"{DATA_FIELD}: {spec}() returned {type(out).__name__}; allowed: "
                          "(train, held_out), each a DataLoader, an iterable of (x, y) batches "
                          "or an (x, y) pair of tensors")
    train = _tensors(out[0], spec, "train")
    held_out = _tensors(out[1], spec, "held_out")
    if train[0].shape[1:] != held_out[0].shape[1:]:
        raise ConfigError(f"{DATA_FIELD}: {spec}() gave train inputs of shape "
                          f"{tuple(train[0].shape[1:])} and held-out ones of shape "
                          f"{tuple(held_out[0].shape[1:])}; allowed: the same shape")
    return (*train, *held_out)


def _tensors(split: Any, spec: str, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (x float32, y int64) tensors, batches concatenated."""
    if isinstance(split, (tuple, list)) and len(split) == 2 and all(
            isinstance(t, torch.Tensor) for t in split):
        x, y = split
    elif isinstance(split, Iterable):
        batches = list(split)
        if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
            raise ConfigError(f"{DATA_FIELD}: {spec}() {which} split yielded no (x, y) batches; "
                              "allowed: a DataLoader or iterable of (x, y) batches")
        x = torch.cat([torch.as_tensor(b[0]) for b in batches])
        y = torch.cat([torch.as_tensor(b[1]) for b in batches])
    else:
        raise ConfigError(f"{DATA_FIELD}: {spec}() {which} split is a {type(split).__name__}; "
                          "allowed: a DataLoader, an iterable of (x, y) batches or (x, y)")
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"{DATA_FIELD}: {spec}() {which} split has x {tuple(x.shape)} and y "
                          f"{tuple(y.shape)}; allowed: x (N, ...) and y (N,) class labels")
    if y.is_floating_point() or bool((y < 0).any()):
        raise ConfigError(f"{DATA_FIELD}: {spec}() {which} labels are {y.dtype}, min "
                          f"{y.min().item()}; allowed: integer class labels >= 0")
    return x.float(), y.long()
