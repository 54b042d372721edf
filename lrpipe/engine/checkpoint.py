"""A trained model as two files in a folder, and the model rebuilt from them.

``state_dict.pt`` holds tensors only (read back with ``torch.load(weights_only=True)``: no
pickled code runs on load) and ``model.json`` the ModelConfig, input shape, class count and
config hash. Loading rebuilds the nn.Sequential with make_model's builder, so the layer names
(fc1.., head) survive and transplant() works on a loaded model. tracking.py stores such a
folder as a run's artifacts and registers it; this module never touches MLflow.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrpipe.engine.config import ConfigError, ModelConfig
from lrpipe.engine.models import build_model, seed_dropout

MODEL_FORMAT = "lrpipe-state-dict/1"
STATE_FILE, SPEC_FILE = "state_dict.pt", "model.json"


def check_model_name(name: Any, field: str = "model_name") -> None:
    """Registered-model names: 1-128 of letters, digits, '.', '_', '-' (safe in filters)."""
    ok = isinstance(name, str) and 0 < len(name) <= 128 and all(
        ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)
    if not ok:
        raise ConfigError(f"{field}: got {name!r}; allowed: 1-128 letters, digits, '.', '_', '-'")


def check_config_hash(config_hash: Any) -> None:
    """Raise ValueError unless ``config_hash`` looks like a hex digest (safe in filters)."""
    if not isinstance(config_hash, str) or not config_hash.isalnum():
        raise ValueError(f"config_hash: got {config_hash!r}; allowed: a hex digest")


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@alias`` -> (name, None, alias)."""
    body = model_uri[len("models:/"):] if str(model_uri).startswith("models:/") else ""
    name, sep, version = body.partition("/")
    if name and sep and version.isdigit() and "@" not in name:
        return name, version, None
    name, sep, alias = body.partition("@")
    if name and sep and alias and "/" not in body:
        return name, None, alias
    raise ValueError(f"model_uri: got {model_uri!r}; allowed: models:/<name>/<version> or "
                     "models:/<name>@<alias>")


def model_spec(model_cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int,
               config_hash: str) -> dict:
    """What ``model.json`` holds: enough to rebuild the model's structure."""
    return {"format": MODEL_FORMAT, "model": json.loads(json.dumps(dataclasses.asdict(model_cfg))),
            "input_shape": list(input_shape), "num_classes": int(num_classes),
            "config_hash": config_hash}


def has_model_files(names: set[str]) -> bool:
    """Whether a folder listing ``names`` holds a complete saved model."""
    return {STATE_FILE, SPEC_FILE} <= names


def save_model(folder: Path, model: nn.Module, spec: dict) -> None:
    """Write ``model``'s weights (on the CPU) and ``spec`` into ``folder``."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / STATE_FILE)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def load_model(folder: Path, device: Any, source: str) -> nn.Module:
    """The model saved in ``folder``, on ``device``; ``source`` names it in errors.

    Raises ValueError where the files are not lrpipe's format.
    """
    spec = json.loads((folder / SPEC_FILE).read_text())
    if spec.get("format") != MODEL_FORMAT:
        raise ValueError(f"model_uri: {source} holds format {spec.get('format')!r}; "
                         f"allowed: {MODEL_FORMAT} (written by register_model)")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    # Built on the meta device (no memory, no draws from the global RNG that concurrent tasks
    # share), then the loaded tensors are assigned as the parameters.
    with torch.device("meta"):
        model = build_model(ModelConfig(**spec["model"]), tuple(spec["input_shape"]),
                            int(spec["num_classes"]))
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    seed_dropout(model, 0, device)
    return model
