"""One planned fine-tuning, as data: its config and how it trains from a pretrained model.

A transfer flow's member (``flows.children``) says ``init``: the registered model it starts
from and its strategy. ``strategy_config`` is the run's TrainConfig (its hash identifies the
run), ``finetune_from`` trains it: ``experiments.transfer.finetune`` for a named strategy, or
one train() of the transplant for ``CUSTOM`` (uniform plus the user's layer multipliers).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lrpipe.engine.config import TrainConfig
from lrpipe.engine.data import Dataset
from lrpipe.engine.train import TrainResult, train
from lrpipe.experiments.transfer import TransferConfig, finetune, target_config, transplant

CUSTOM = "custom"  # the strategy --lr-mult defines: uniform plus the given layer multipliers


def strategy_config(tc: TransferConfig, strategy: str, seed: int,
                    lr_mult: Mapping[str, float] | None = None) -> TrainConfig:
    """The fine-tuning run of ``strategy`` and ``seed`` (``target_config``); for ``CUSTOM``,
    uniform with ``lr_mult`` as its per-layer multipliers (x base_lr)."""
    if strategy == CUSTOM:
        return target_config(tc, "uniform", seed).replace(**{"optim.lr_mult": dict(lr_mult)})
    return target_config(tc, strategy, seed)


def finetune_from(tc: TransferConfig, strategy: str, cfg: TrainConfig,
                  pretrained: nn.Module | None, data: Dataset, seen: Dataset,
                  keep_model: bool = False) -> TrainResult:
    """Fine-tune ``cfg`` (``strategy_config``) from ``pretrained`` on ``seen`` (``data``, or
    ``data`` without its test split); ``data`` gives the new head's class count.

    Raises:
        ValueError: ``pretrained`` is None for a strategy other than scratch.
    """
    if strategy == CUSTOM:
        if pretrained is None:
            raise ValueError(f"pretrained: got None for strategy {CUSTOM!r}; allowed: a model "
                             "(only 'scratch' trains without one)")
        return train(cfg, seen, model=transplant(pretrained, data.num_classes, cfg.seed),
                     keep_model=keep_model)
    return finetune(tc, strategy, cfg.seed, pretrained, seen, keep_model)
