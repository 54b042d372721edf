"""engine.checkpoint without MLflow: a model saved to a folder comes back equal, with its layer
names; files of another format are refused before any tensor is read."""

from __future__ import annotations

import json

import pytest
import torch

from lrpipe.engine import checkpoint
from lrpipe.engine.config import ModelConfig
from lrpipe.engine.models import layer_names, make_model


def test_saved_model_loads_back_equal_with_its_layer_names(tmp_path):
    cfg = ModelConfig(hidden=(16, 8), dropout=0.25)
    model = make_model(cfg, (1, 8, 8), 5, seed=3)
    spec = checkpoint.model_spec(cfg, (1, 8, 8), 5, "abc123")
    checkpoint.save_model(tmp_path, model, spec)
    assert checkpoint.has_model_files({p.name for p in tmp_path.iterdir()})
    loaded = checkpoint.load_model(tmp_path, "cpu", "here")
    assert layer_names(loaded) == layer_names(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(4, 1, 8, 8)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert json.loads((tmp_path / "model.json").read_text())["config_hash"] == "abc123"


def test_other_formats_and_incomplete_folders_are_refused(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"format": "pickle"}))
    (tmp_path / "state_dict.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="lrpipe-state-dict/1"):
        checkpoint.load_model(tmp_path, "cpu", "models:/m/1")
    assert not checkpoint.has_model_files({"model.json"})


def test_config_hash_must_be_a_digest():
    checkpoint.check_config_hash("beef01")
    for bad in ("", "a'; drop", None, "a b"):
        with pytest.raises(ValueError, match="config_hash"):
            checkpoint.check_config_hash(bad)
