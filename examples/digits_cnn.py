"""A small CNN on scikit-learn's 8x8 digits, fed by DataLoaders: what rate should SGD with
momentum use? Run from the repository root: ``python -m examples.digits_cnn``."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrpipe

BATCH = 64  # examples per update


def build(seed: int = 0) -> nn.Module:
    """Two 3x3 convolutions and a linear head: 8x8 grey image -> 10 class scores."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(), nn.Linear(128, 10))


def load(batch_size: int = BATCH) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders: the first 1,500 digits shuffled each epoch, the last 297 in order;
    pixels scaled from 0..16 to 0..1."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=256)
    return train, val


def momentum(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer this project trains with (its rate is what lrpipe chooses)."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def main(quick: bool = False) -> dict[str, float | None]:
    """Range test on the model as built, then the whole search; prints and returns both."""
    train, val = load()
    model = build(0)
    found = lrpipe.find_lr(model, train, nn.functional.cross_entropy, momentum(model),
                           num_steps=40 if quick else 100)
    print(f"find_lr: {found.lr:.3g} ({found.suggestion.reason})")
    chosen = lrpipe.choose_lr(build, train, val, nn.functional.cross_entropy, momentum,
                              seeds=2 if quick else 3, range_steps=40 if quick else 100,
                              max_steps=10 if quick else None,
                              regret_epochs=1 if quick else 3)
    print(f"choose_lr: {chosen.lr:.3g}, chosen by {chosen.chosen_by}: {chosen.reason}")
    return {"find_lr": found.lr, "choose_lr": chosen.lr}


if __name__ == "__main__":
    main()
