"""What a trained model is registered as, as data: name, tags, description, figures.

A member of a flow's training task (``flows.children``) that is registered says so with one
of these dicts, built before it trains: ``final_registration`` (the pipeline's final model,
``lrpipe-final-<model>``, tagged with its plan and its test figures) or
``pretrained_registration`` (the transfer flow's source network, tagged with its source
validation error). ``filled`` completes one with the figures of the finished training.

Keys: ``name`` (registered model), ``tags``, ``figures`` (tag -> result key, each written
``:.4f``), ``description`` (``{key}`` placeholders for result keys, written ``:.4f``),
``files`` (log the config and the rate plan on the run: the final model's), ``diverged``
(the error raised when the training diverged; None: a diverged model is just not
registered).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lrpipe.engine.config import TrainConfig
from lrpipe.experiments.final import TEST_KEYS
from lrpipe.experiments.transfer import TransferConfig


def final_model_name(cfg: TrainConfig) -> str:
    """The registered final model's name: ``lrpipe-final-<model>`` (a plug-in model's spec
    with every character the registry refuses as '-')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.model.name).strip("-")[:100]
    return f"lrpipe-final-{slug}"


def final_registration(cfg: TrainConfig, plan_tags: Mapping[str, object]) -> dict:
    """The final model of ``cfg``: its plan's tags (``schedule``, ``test_set``...) and test
    figures as tags; its config and rate plan as files of its run."""
    return {"name": final_model_name(cfg), "tags": dict(plan_tags),
            "figures": {k: k for k in TEST_KEYS}, "files": True, "diverged": None,
            "description": f"{cfg.model.name} trained {cfg.epochs} epochs at lr "
                           f"{cfg.optim.lr:g} with the {plan_tags['schedule']} schedule; test "
                           f"accuracy {{test_accuracy}} on {plan_tags['test_set']}"}


def pretrained_registration(tc: TransferConfig, model_name: str) -> dict:
    """The transfer flow's source network: dataset and source classes as tags, and its
    source validation error; a diverged pretraining is an error naming ``pretrain_lr``."""
    return {"name": model_name, "files": False,
            "tags": {"dataset": tc.dataset, "source_classes": list(tc.source_classes)},
            "figures": {"source_val_error": "val_error"},
            "description": f"{tc.model} {list(tc.hidden)} pretrained on {tc.dataset} classes "
                           f"{list(tc.source_classes)}, {tc.pretrain_epochs} epochs",
            "diverged": "pretraining diverged in epoch {epoch}; allowed: a smaller "
                        f"pretrain_lr than {tc.pretrain_lr:g}"}


def filled(registration: Mapping, result: Mapping[str, float]) -> tuple[dict, str]:
    """(tags, description) of ``registration`` with the figures of ``result``."""
    tags = {**registration["tags"], **{tag: f"{result[key]:.4f}"
                                       for tag, key in registration["figures"].items()}}
    text = registration["description"]
    for key in set(registration["figures"].values()):
        text = text.replace("{" + key + "}", f"{result[key]:.4f}")
    return tags, text
