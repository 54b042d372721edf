"""The transfer flow's settings: every flag checked, and the fine-tuning config built, before
any run is recorded (``flows.transfer`` calls ``validate``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from lrpipe.engine import checkpoint
from lrpipe.engine.config import ConfigError, ModelConfig, check_number
from lrpipe.engine.models import build_model
from lrpipe.engine.optim import param_groups
from lrpipe.experiments.finetuning import CUSTOM
from lrpipe.experiments.transfer import STRATEGIES, TransferConfig, check_layer_mult

DEFAULT_SEEDS = 3
# The grid (4 base rates x 5 head multipliers) runs on the first seed only by default: with 3
# seeds it would triple the flow's cost, and `make sweep` must fit in about 8 minutes.
DEFAULT_GRID_SEEDS = 1
# Dotted TrainConfig names the other commands accept in --set, mapped to TransferConfig fields.
ALIASES = {"data.dataset": "dataset", "data.root": "root", "model.name": "model",
           "model.hidden": "hidden", "optim.name": "optimizer", "optim.lr": "base_lr",
           "epochs": "finetune_epochs"}

def transfer_config(lr=None, epochs=None, seeds=None, overrides=None) -> TransferConfig:
    """TransferConfig defaults, then ``overrides`` (its field names, or ALIASES), then ``lr``
    (fine-tuning base rate), ``epochs`` (fine-tuning epochs) and ``seeds`` (a count or a list).
    """
    fields = {f.name for f in dataclasses.fields(TransferConfig)}
    values = {}
    for key, value in (overrides or {}).items():
        name = ALIASES.get(key, key)
        if name not in fields:
            raise ConfigError(f"overrides: unknown field {key!r}; allowed: "
                              f"{', '.join(sorted(fields))} (or {', '.join(ALIASES)})")
        values[name] = value
    for name, value in (("base_lr", lr), ("finetune_epochs", epochs)):
        if value is not None:
            values[name] = value
    if seeds is not None:
        values["seeds"] = seed_list(seeds)
    return TransferConfig(**values)


def seed_list(seeds) -> tuple[int, ...]:
    """A count n -> seeds 0..n-1; a list is taken as given (TransferConfig checks it)."""
    if isinstance(seeds, (list, tuple)):
        return tuple(seeds)
    check_number("seeds", seeds, low=1, integer=True)
    return tuple(range(seeds))


def skeleton(tc: TransferConfig) -> torch.nn.Sequential:
    """The fine-tuned model's layers on the meta device: names only, no memory, no RNG."""
    shape = (1, 8, 8) if tc.dataset == "digits" else (1, 28, 28)
    with torch.device("meta"):
        return build_model(ModelConfig(name=tc.model, hidden=tc.hidden), shape,
                           len(tc.target_classes))


def check_strategies(strategies, lr_mult) -> tuple[str, ...]:
    """None -> every strategy (plus custom when ``lr_mult`` is given); names must be known."""
    if strategies is None:
        strategies = STRATEGIES
    elif isinstance(strategies, str):
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    strategies, allowed = tuple(strategies), (*STRATEGIES, CUSTOM)
    if (not strategies or len(set(strategies)) != len(strategies)
            or not set(strategies) <= set(allowed)):
        raise ConfigError(f"strategies: got {strategies!r}; allowed: distinct names from "
                          f"{', '.join(allowed)}")
    if CUSTOM in strategies and lr_mult is None:
        raise ConfigError("strategies: 'custom' needs lr_mult (--lr-mult layer=mult,...)")
    return strategies + ((CUSTOM,) if lr_mult is not None and CUSTOM not in strategies else ())


def check_custom_mult(tc: TransferConfig, lr_mult) -> dict[str, float] | None:
    """Validate the custom multipliers against the model's layer names (unknown names list the
    valid ones), their values (finite, >= 0) and that some layer still trains."""
    if lr_mult is None:
        return None
    if not isinstance(lr_mult, Mapping) or not lr_mult:
        raise ConfigError(f"lr_mult: got {lr_mult!r}; allowed: a mapping of layer name to "
                          "multiplier, e.g. {fc1: 0.1, head: 10}")
    model = skeleton(tc)
    mult = check_layer_mult(model, lr_mult)
    param_groups(model, tc.base_lr, mult)  # refuses a mapping that freezes every layer
    return mult


def validate(lr=None, epochs=None, seeds=None, overrides=None, strategies=None,
             grid_seeds=DEFAULT_GRID_SEEDS, lr_mult=None, model_name=None):
    """(TransferConfig, strategies, custom lr_mult, registered-model name), or ConfigError."""
    tc = transfer_config(lr, epochs, DEFAULT_SEEDS if seeds is None else seeds, overrides)
    mult = check_custom_mult(tc, lr_mult)
    names = check_strategies(strategies, mult)
    check_number("grid_seeds", grid_seeds, low=0, high=len(tc.seeds), integer=True)
    model_name = model_name or f"lrpipe-pretrained-{tc.model}"
    checkpoint.check_model_name(model_name)
    return tc, names, mult, model_name
