"""The baseline of case (j): what a user writes instead of ``lrpipe sweep``, as a script.

One hand-written torch.optim loop per rate (``speed_cases.hand_loop``: the same model, seed,
batches and evaluation as train()), on lrpipe's Fashion-MNIST tensors, printing each rate's
final validation loss. Run as its own process by bench/sweep_cases.py, so that its start-up
and exit are timed like the command's. Usage:
``python bench/hand_sweep.py --lrs 0.03,0.1,0.3 --epochs 1 --subset 5000``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", required=True, help="comma-separated rates")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--subset", type=int, help="training examples (data.subset)")
    parser.add_argument("--root", default="data", help="where Fashion-MNIST lies")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from speed_cases import hand_loop

    from lrpipe.engine.config import DataConfig, TrainConfig
    from lrpipe.engine.data import load_data
    from lrpipe.engine.members import evaluate

    data = load_data(DataConfig(root=args.root, subset=args.subset), "cpu")
    for lr in (float(v) for v in args.lrs.split(",")):
        cfg = TrainConfig(epochs=args.epochs, device="cpu").replace(**{"optim.lr": lr})
        model = hand_loop(cfg, data, evaluate=True)["model"]
        print(f"lr {lr:g}: val loss {evaluate(model, data.val)[0]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
