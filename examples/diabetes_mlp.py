"""A regression net on scikit-learn's diabetes data (442 patients, 10 features, disease
progression a year later), trained with MSE: what rate should Adam use? Data as tensors, the
fast in-memory path. Run from the repository root: ``python -m examples.diabetes_mlp``."""

from __future__ import annotations

import torch
from sklearn.datasets import load_diabetes
from torch import nn

import lrpipe

Tensors = tuple[torch.Tensor, torch.Tensor]


def build(seed: int = 0) -> nn.Module:
    """10 features -> 32 -> 32 -> 1 predicted (standardized) progression."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 1))


def load() -> tuple[Tensors, Tensors]:
    """((x, y) train, (x, y) val): a seeded 362/80 split; features and target standardized
    with the training split's mean and std, y shaped (N, 1) like the model's output."""
    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = order[:362], order[362:]
    mx, sx, my, sy = x[tr].mean(0), x[tr].std(0), y[tr].mean(), y[tr].std()
    return ((x[tr] - mx) / sx, (y[tr] - my) / sy), ((x[va] - mx) / sx, (y[va] - my) / sy)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def main(quick: bool = False) -> dict[str, float | None]:
    """Range test on the model as built, then the whole search; prints and returns both."""
    train, val = load()
    model = build(0)
    found = lrpipe.find_lr(model, train, nn.functional.mse_loss, adam(model), batch_size=32,
                           num_steps=40 if quick else 100)
    print(f"find_lr: {found.lr:.3g} ({found.suggestion.reason})")
    chosen = lrpipe.choose_lr(build, train, val, nn.functional.mse_loss, adam, batch_size=32,
                              seeds=2 if quick else 3, range_steps=40 if quick else 100,
                              start_lr=1.0, regret_epochs=2 if quick else 10)
    print(f"choose_lr: {chosen.lr:.3g}, chosen by {chosen.chosen_by}: {chosen.reason}")
    return {"find_lr": found.lr, "choose_lr": chosen.lr}


if __name__ == "__main__":
    main()
