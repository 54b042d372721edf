"""The example user projects under examples/ run end to end through the public API (quick
sizes) and answer with a usable rate; their factories and loaders keep their contracts."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def examples(monkeypatch):
    """``examples`` importable as from the repository root (``python -m examples.x``)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return lambda name: importlib.import_module(f"examples.{name}")


@pytest.mark.parametrize("name", ["digits_cnn", "diabetes_mlp"])
def test_example_main_finds_and_chooses_a_rate(examples, name, capsys):
    answer = examples(name).main(quick=True)
    out = capsys.readouterr().out
    assert set(answer) == {"find_lr", "choose_lr"}
    for rate in answer.values():
        assert rate is not None and math.isfinite(rate) and 1e-6 < rate < 10
    assert "find_lr: " in out and "choose_lr: " in out


def test_digits_cnn_builds_reproducibly_and_loads_dataloaders(examples):
    mod = examples("digits_cnn")
    a, b = mod.build(3), mod.build(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    train, val = mod.load()
    x, y = next(iter(train))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long
    assert a(x).shape == (64, 10)
    assert len(train.dataset) + len(val.dataset) == 1797


def test_diabetes_mlp_is_a_standardized_regression(examples):
    mod = examples("diabetes_mlp")
    (x, y), (xv, yv) = mod.load()
    assert x.shape == (362, 10) and y.shape == (362, 1) and xv.shape == (80, 10)
    assert float(y.mean()) == pytest.approx(0.0, abs=1e-5)
    assert isinstance(mod.build(0), nn.Module) and mod.build(0)(x).shape == (362, 1)
