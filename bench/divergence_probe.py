"""Measure how far above its initial loss a run goes, for runs that come back and runs that blow up.

Usage (from the repo root): ``.venv/bin/python bench/divergence_probe.py [--epochs 5]
[--lrs 0.1,0.3,...] [--seeds 0,1,2] [--subset N]``. Full Fashion-MNIST by default (50k train,
10k validation), SGD, batch 128, one torch thread. Each run trains through ``train()`` with the
divergence cut-off out of the way (``diverge_factor`` 1e300: only a non-finite loss stops it),
while every batch loss is recorded. Prints, per (model, rate, seed): the largest batch loss over
the initial (epoch-0, evaluated) training loss (``max_ratio``, in x initial loss), whether the run
went non-finite (``blew_up``; then ``max_ratio`` is its largest finite one), the epoch-0 and final
validation loss, their ratio (``val_ratio``), the epoch-0 and final validation error and their
ratio (``error_ratio``). These are the figures ``TrainConfig.diverge_factor``,
``no_progress_ratio`` and ``no_progress_error_ratio`` cite.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch

import lrpipe.engine.train as engine_train
from lrpipe.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.data import load_data

MODELS = {"softmax": ModelConfig(name="softmax"), "mlp": ModelConfig(name="mlp", hidden=(256,))}
BATCH_LOSSES: list[float] = []


class RecordingModel(engine_train.OneModel):
    """train()'s one member, with every batch loss (before its update) written down."""

    def losses(self, x: torch.Tensor, y: torch.Tensor, shared: bool = True) -> torch.Tensor:
        out = super().losses(x, y, shared)
        BATCH_LOSSES.append(float(out[0]))
        return out


def probe(cfg: TrainConfig, data) -> dict:
    BATCH_LOSSES.clear()
    result = engine_train.train(cfg, data)
    history = result.history
    finite = [v for v in BATCH_LOSSES if math.isfinite(v)]
    initial = float(history["train_loss"].iloc[0])
    val0, val_end = float(history["val_loss"].iloc[0]), float(history["val_loss"].iloc[-1])
    return dict(model=cfg.model.name, lr=cfg.optim.lr, seed=cfg.seed,
                max_ratio=max(finite) / initial, blew_up=len(finite) < len(BATCH_LOSSES),
                steps=len(BATCH_LOSSES), last_epoch=int(history["epoch"].iloc[-1]),
                val0=val0, val_end=val_end, val_ratio=val_end / val0,
                val_error0=float(history["val_error"].iloc[0]),
                val_error=float(history["val_error"].iloc[-1]),
                error_ratio=float(history["val_error"].iloc[-1] / history["val_error"].iloc[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lrs", default="0.1,0.3,0.5,1,2,3,5,10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="softmax,mlp")
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine_train.OneModel = RecordingModel  # train() looks the name up at call time
    data_cfg = DataConfig(root="data", subset=args.subset)
    data = load_data(data_cfg, torch.device("cpu"))
    rows = []
    for model in args.models.split(","):
        for lr in (float(v) for v in args.lrs.split(",")):
            for seed in (int(v) for v in args.seeds.split(",")):
                cfg = TrainConfig(data=data_cfg, model=MODELS[model], epochs=args.epochs,
                                  optim=OptimConfig(name="sgd", lr=lr), seed=seed, device="cpu",
                                  diverge_factor=1e300)
                rows.append(probe(cfg, data))
                print(pd.DataFrame([rows[-1]]).to_string(index=False, header=len(rows) == 1,
                                                         float_format="%.4g"), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.4g"))
    print(table.groupby(["model", "blew_up"])["max_ratio"].agg(["min", "max"]))


if __name__ == "__main__":
    main()
