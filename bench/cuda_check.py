"""The CUDA path in one prepared run, for the day a GPU is lent (issue 26's last target).

  python bench/cuda_check.py                    # on cuda: the full check (a few minutes)
  python bench/cuda_check.py --device cpu --quick   # the same code path, tiny, on the CPU

Measures, on one device, in one process:
  one       one MLP run through train() (Fashion-MNIST, batch 128, SGD, ``--epochs``)
  batched   ``--rates`` rates of the same run through train_many (batching=auto: batched on
            cuda, ``engine.many.batching_rule``), one computation
  ratio     batched / one (target on cuda: <= 2x for 16 rates)
  equal     the batched members' final validation losses against separate train() runs of
            three of the rates (float32 tolerance)
  command   ``lrpipe sweep`` with the same rates as a fresh process on the device, into a
            temporary store: wall seconds and exit status (the whole product, Prefect and
            MLflow included)
Timings are medians of ``--repeats`` after a warm-up run (CUDA context, kernels, the data on
the device); the device is synchronized around each. Prints one JSON object; with ``--out``
also writes it there (the device tool's $OUT comes back).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lrpipe.engine.config import TrainConfig, merge
from lrpipe.engine.data import load_data
from lrpipe.engine.many import plan_many, train_many
from lrpipe.engine.train import resolve_device, train

ROOT = Path(__file__).resolve().parent.parent
TARGET = 2.0  # a 16-rate sweep of the MLP costs at most 2x one run on a GPU


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--rates", type=int, default=16, help="rates in the batched sweep")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2,000 examples, 4 rates, 1 epoch")
    p.add_argument("--batching", default="auto", choices=("auto", "on", "off"),
                   help="the configs' batching (auto: the declared policy; on cuda, batched)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.epochs, args.repeats = min(args.rates, 4), 1, 1
    return args


def rates(k: int) -> list[float]:
    """``k`` log-spaced rates from 0.001 to 1 (the sweep's range, below divergence)."""
    return [10 ** (-3 + 3 * i / max(1, k - 1)) for i in range(k)]


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """(median seconds, last result) of ``fn()`` with the device synchronized around it."""
    seconds, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def command(lrs: list[float], args: argparse.Namespace, subset: int | None) -> dict:
    """``lrpipe sweep`` on the device as a fresh process, into a temporary store."""
    argv = [str(Path(sys.executable).parent / "lrpipe"), "sweep", "--lrs",
            ",".join(f"{x:.4g}" for x in lrs), "--epochs", str(args.epochs),
            "--set", f"device={args.device}", "--set", f"batching={args.batching}"]
    if subset:
        argv += ["--set", f"data.subset={subset}"]
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    return {"argv": " ".join(argv[1:]), "rc": done.returncode,
            "wall_s": round(time.perf_counter() - start, 2),
            "tail": done.stdout.strip().splitlines()[-1:] + done.stderr.strip().splitlines()[-2:]}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = resolve_device(args.device)
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    subset = 2000 if args.quick else None
    base = merge(TrainConfig(), {"epochs": args.epochs, "device": args.device,
                                 "batching": args.batching, "data": {"subset": subset}})
    data = load_data(base.data, device)
    lrs = rates(args.rates)
    cfgs = [base.replace(**{"optim.lr": lr}) for lr in lrs]
    train(base.replace(epochs=1), data)  # warm-up: context, kernels, allocator
    one_s, _ = timed(lambda: train(base.replace(**{"optim.lr": 0.1}), data), device,
                     args.repeats)
    many_s, results = timed(lambda: train_many(cfgs, data), device, args.repeats)
    check = [0, len(lrs) // 2, len(lrs) - 1]
    diffs = []
    for i in check:
        alone = train(cfgs[i], data).final()["val_loss"]
        together = results[i].final()["val_loss"]
        if math.isfinite(alone) and math.isfinite(together):
            diffs.append(abs(alone - together))
    ratio = many_s / one_s
    report = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.type == "cuda" else ""),
        "torch": torch.__version__, "examples": len(data.train), "epochs": args.epochs,
        "rates": len(lrs), "plan": [f"batched k={len(idxs)}" if batched else
                                    f"one by one x{len(idxs)}"
                                    for idxs, batched in plan_many(cfgs)],
        "one_run_s": round(one_s, 3), "batched_s": round(many_s, 3),
        "ratio": round(ratio, 2), "target": f"<= {TARGET:g}x one run" if len(lrs) == 16 else "",
        "met": (ratio <= TARGET) if len(lrs) == 16 and device.type == "cuda" else None,
        "max_val_loss_diff": max(diffs) if diffs else None,
        "statuses": [r.status for r in results],
        "command": command(lrs, args, subset),
    }
    text = json.dumps(report, indent=1)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["command"]["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
