"""Case (h): the public API's ``lrpipe.find_lr`` on a user's model against torch-lr-finder,
as a user would call each: the same ``TensorDataset`` + ``DataLoader``, and lrpipe given the
tensors themselves (its in-memory path), on one torch thread."""

from __future__ import annotations

import contextlib
import io
import itertools
import math

import torch
import torch.nn.functional as F
from floor import DIMS, GemmFloor, floor_of
from kit import Row, cpu_pair, interleaved, say, speedup_row
from torch import nn

import lrpipe
from lrpipe.engine.data import Dataset


def user_mlp(seed: int = 0) -> nn.Module:
    """The network a user would write for Fashion-MNIST (lrpipe's own MLP's shape)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def case_h(data: Dataset, steps: int, repeats: int) -> list[Row]:
    from torch.utils.data import DataLoader, TensorDataset
    from torch_lr_finder import LRFinder

    x, y = data.train.x, data.train.y
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    lo, hi = 1e-4, 1.0  # no divergence in between: every side runs every step
    models = {side: user_mlp(0) for side in ("loader", "tensors", "finder")}
    opts = {side: torch.optim.SGD(m.parameters(), lr=lo) for side, m in models.items()}
    counts: dict[str, int] = {}

    def ours(side: str, source) -> None:
        found = lrpipe.find_lr(models[side], source, F.cross_entropy, opts[side], seeds=1,
                               batch_size=128 if side == "tensors" else None, min_lr=lo,
                               max_lr=hi, num_steps=steps, stop_factor=1e12)
        counts[side] = len(found.curves)

    def finder() -> None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lrf = LRFinder(models["finder"], opts["finder"], nn.CrossEntropyLoss(), device="cpu")
            lrf.range_test(loader, start_lr=lo, end_lr=hi, num_iter=steps, step_mode="exp",
                           diverge_th=math.inf)
            lrf.reset()
        counts["finder"] = len(lrf.history["loss"])

    def loader_alone() -> None:  # the floor of the loader path: its batches, no training
        for _ in itertools.islice(loader, steps):
            pass

    t = interleaved({"loader": lambda: ours("loader", loader),
                     "tensors": lambda: ours("tensors", (x, y)), "finder": finder,
                     "data": loader_alone, "floor": GemmFloor(DIMS["mlp"], 128, steps).sample},
                    repeats)
    floor = GemmFloor.seconds(floor_of(t), steps)
    if len(set(counts.values())) != 1:
        say(f"  (h) warning: step counts differ: {counts}")
    what = f"user MLP, {steps} steps, batch 128, lr {lo:g}..{hi:g}, seeds=1"
    note = (f"the loader's {steps} batches alone take {t['data']:.2f} s; both snapshot "
            "and restore the model; floor: the steps' GEMMs")
    return [
        speedup_row("h", f"find_lr vs LRFinder, both fed the same DataLoader(TensorDataset) "
                    f"({what})", t["loader"], t["finder"], 1.0, note,
                    cpu_pair(t, "loader", "finder"), floor),
        speedup_row("h", "find_lr given the tensors vs LRFinder fed that DataLoader",
                    t["tensors"], t["finder"], 1.3, "find_lr shuffles and slices in memory",
                    cpu_pair(t, "tensors", "finder"), floor),
    ]
