"""Measure K learning rates trained batched (lrpipe.engine.batched) vs K sequential train() runs.

Usage (from the repo root): ``.venv/bin/python bench/batched_probe.py [--k 16] [--epochs 1]``.
Full Fashion-MNIST (50k train, 10k validation), batch 128, one torch thread by default. Prints,
per model: total wall seconds (training + per-epoch evaluation), training seconds (train()'s
``time_s``, summed over the sequential runs), their ratios, and what the declared rule chooses
(``lrpipe.engine.many.trains_batched`` with ``batching=auto`` on this device): the figures that rule
cites come from this script and ``make bench`` case (c); re-run it on a new device or model
before changing the rule.
Note the machine's load (printed from /proc/loadavg): on a shared CPU the numbers move.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lrpipe.engine.batched import train_batched
from lrpipe.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.data import load_data
from lrpipe.engine.many import trains_batched
from lrpipe.engine.train import resolve_device, train

MODELS = {"softmax": ModelConfig(name="softmax"), "mlp": ModelConfig(name="mlp", hidden=(256,))}


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def probe(model: str, k: int, epochs: int, optimizer: str, device: str, data,
          distinct_seeds: bool = False) -> dict:
    lrs = np.logspace(-3, -0.5, k) if optimizer in ("sgd", "momentum") else np.logspace(-4, -2, k)
    base = TrainConfig(data=DataConfig(root="data"), model=MODELS[model], epochs=epochs,
                       optim=OptimConfig(name=optimizer, lr=0.1), device=device)
    cfgs = [base.replace(**{"optim.lr": float(lr), "seed": m if distinct_seeds else 0})
            for m, lr in enumerate(lrs)]
    start = time.perf_counter()
    seq = [train(c, data) for c in cfgs]
    seq_wall = time.perf_counter() - start
    start = time.perf_counter()
    bat = train_batched(cfgs, data)
    bat_wall = time.perf_counter() - start
    seq_train = sum(r.history["time_s"].iloc[-1] for r in seq)
    bat_train = float(bat[0].history["time_s"].iloc[-1])
    gap = max(abs(a.history["val_error"].iloc[-1] - b.history["val_error"].iloc[-1])
              for a, b in zip(seq, bat, strict=True))
    return dict(model=model, optimizer=optimizer, k=k, seq_wall=seq_wall, bat_wall=bat_wall,
                wall_speedup=seq_wall / bat_wall, seq_train=seq_train, bat_train=bat_train,
                train_speedup=seq_train / bat_train, max_val_error_gap=gap,
                chosen=trains_batched(cfgs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="softmax,mlp")
    parser.add_argument("--optimizers", default="sgd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distinct-seeds", action="store_true",
                        help="seed m for member m: per-member batches (a (K, B, ...) gather)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_data(DataConfig(root="data"), device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, "
          f"{len(data.train)} train examples; load {load_average()}")
    for model in args.models.split(","):
        for optimizer in args.optimizers.split(","):
            r = probe(model, args.k, args.epochs, optimizer, args.device, data,
                      args.distinct_seeds)
            seeds = "distinct seeds" if args.distinct_seeds else "one seed"
            print(f"{model:8s} {optimizer:8s} K={r['k']} {seeds}: wall {r['seq_wall']:.1f} s "
                  f"sequential vs {r['bat_wall']:.1f} s batched ({r['wall_speedup']:.2f}x); "
                  f"training {r['seq_train']:.1f} vs {r['bat_train']:.1f} s "
                  f"({r['train_speedup']:.2f}x); "
                  f"max |val_error gap| {r['max_val_error_gap']:.4f}; batching=auto "
                  f"chooses {'batched' if r['chosen'] else 'alone'}; load {load_average()}",
                  flush=True)


if __name__ == "__main__":
    main()
