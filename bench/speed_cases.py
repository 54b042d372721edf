"""Cases (a), (b), (c), (e), (i): lrpipe's training loop, data path, batched rates and range
test against plain PyTorch, a TensorDataset DataLoader (and torchvision's ToTensor one) and
torch-lr-finder, and one epoch against its GEMM floor (``floor.GemmFloor``), on one thread."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from floor import DIMS, GemmFloor, evaluated_examples, floor_of, step_equivalents
from kit import (
    Row,
    cpu_pair,
    floor_row,
    interleaved,
    interleaved_samples,
    medians,
    say,
    speedup_row,
)

from lrpipe.engine.batched import train_batched
from lrpipe.engine.config import ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.data import Dataset, Split, iterate_batches
from lrpipe.engine.many import trains_batched
from lrpipe.engine.models import make_model
from lrpipe.engine.optim import make_optimizer
from lrpipe.engine.train import eval_train_split, train
from lrpipe.search.rangetest import range_test_config


def subset(data: Dataset, n: int | None) -> Dataset:
    """The first ``n`` training examples (already shuffled by load_data's split), same val."""
    if n is None or n >= len(data.train):
        return data
    return dataclasses.replace(data, train=Split(data.train.x[:n], data.train.y[:n]))


# (a) train() against a minimal hand-written loop ------------------------------------------

def hand_loop(cfg: TrainConfig, data: Dataset, evaluate: bool) -> dict:
    """The loop anyone would write: same model and seed, same batch order (the permutation
    drawn from a generator seeded like train()'s), plain torch.optim.SGD on all parameters.
    With ``evaluate``, the same evaluation train() does (before training and after each epoch,
    on its 10k training subset and the validation split)."""
    model = make_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)  # lrpipe's sgd: no momentum
    gen = torch.Generator().manual_seed(cfg.seed)
    splits = (eval_train_split(data, cfg), data.val) if evaluate else ()
    x_all, y_all, n = data.train.x, data.train.y, len(data.train)
    train_s = 0.0
    _hand_eval(model, splits)
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - start
        _hand_eval(model, splits)
    return {"train": train_s, "weights": [p.detach().clone() for p in model.parameters()],
            "model": model}


@torch.no_grad()
def _hand_eval(model: torch.nn.Module, splits: tuple[Split, ...]) -> None:
    model.eval()
    for split in splits:
        for i in range(0, len(split), 4096):
            logits = model(split.x[i:i + 4096])
            float(F.cross_entropy(logits, split.y[i:i + 4096], reduction="sum"))
            int((logits.argmax(1) != split.y[i:i + 4096]).sum())


def case_a(data: Dataset, epochs: int, repeats: int) -> list[Row]:
    cfg = TrainConfig(epochs=epochs, device="cpu")  # the default: MLP 784-256-10, SGD lr 0.1
    out: dict = {}

    def ours() -> dict:
        result = train(cfg, data, keep_model=True)
        out["ours"] = [p.detach() for p in result.model.parameters()]
        return {"train": float(result.history["time_s"].iloc[-1])}

    def hand() -> dict:
        got = hand_loop(cfg, data, evaluate=False)
        out["hand"] = got["weights"]
        return {"train": got["train"]}

    def hand_eval() -> dict:
        return {"train": hand_loop(cfg, data, evaluate=True)["train"]}

    steps = epochs * step_equivalents(len(data.train), cfg.batch_size)
    gemms = GemmFloor(DIMS["mlp"], cfg.batch_size, steps, _evaluated(data, cfg, epochs + 1))
    t = interleaved({"ours": ours, "hand": hand, "hand_eval": hand_eval,
                     "floor": gemms.sample}, repeats)
    train_floor = GemmFloor.seconds(floor_of(t), steps)
    whole_floor = GemmFloor.seconds(floor_of(t), steps, _evaluated(data, cfg, epochs + 1))
    same = max(float((a - b).abs().max()) for a, b in zip(out["ours"], out["hand"], strict=True))
    what = f"MLP, {epochs} epochs x {len(data.train)} examples, batch {cfg.batch_size}"
    return [
        speedup_row("a", f"train() vs hand loop, training only ({what})", t["ours.train"],
                    t["hand_eval.train"], 0.9, f"evaluation excluded from both timings (both "
                    f"evaluate in between, as train() does); without evaluation the hand loop "
                    f"trains in {t['hand.train']:.2f} s; final weights max abs diff {same:.1e} "
                    "(same batches, same updates); floor: the training steps' GEMMs",
                    floor_s=train_floor),
        speedup_row("a", "train() vs hand loop + the same evaluation, whole call", t["ours"],
                    t["hand_eval"], 0.9, "both evaluate 10k train + 10k val before training "
                    "and after each epoch; floor: training and evaluation GEMMs",
                    cpu_pair(t, "ours", "hand_eval"), whole_floor),
    ]


def _evaluated(data: Dataset, cfg: TrainConfig, evaluations: int) -> int:
    """Examples train() evaluates in ``evaluations`` evaluations (val + its training subset)."""
    return evaluated_examples(len(data.val), len(eval_train_split(data, cfg)), evaluations)


# (b) lrpipe's data path against torchvision's DataLoader + ToTensor ------------------------

def _mlp_step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def case_b(data: Dataset, root: str, repeats: int) -> list[Row]:
    """lrpipe's data path against what a competent user writes (a ``TensorDataset`` in a
    shuffling ``DataLoader``; a hand index gather), and the tutorial's ``ToTensor`` loader."""
    import torchvision
    from torch.utils.data import DataLoader, Subset, TensorDataset

    n, (x, y) = len(data.train), (data.train.x, data.train.y)
    images = torchvision.datasets.FashionMNIST(root, train=True, download=False,
                                               transform=torchvision.transforms.ToTensor())
    images = Subset(images, range(n))  # as many examples as lrpipe's training split
    tensors = TensorDataset(x, y)
    cfg = TrainConfig(device="cpu")

    def run(batches, learn: bool) -> None:
        model = make_model(cfg.model, data.input_shape, 10, 0, "cpu")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for xb, yb in batches:
            if learn:
                _mlp_step(model, opt, xb, yb)

    def hand(select: bool = False):  # what a user writes over tensors held in memory
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        for i in range(0, n, 128):
            idx = perm[i:i + 128]
            yield (x.index_select(0, idx), y.index_select(0, idx)) if select else (x[idx], y[idx])

    def copies():  # the memory floor of the data: contiguous slices copied, no gather
        for i in range(0, n, 128):
            yield x[i:i + 128].clone(), y[i:i + 128].clone()

    sources = {"ours": lambda: iterate_batches(data.train, 128, torch.Generator().manual_seed(0)),
               "td": lambda: DataLoader(tensors, batch_size=128, shuffle=True),
               "hand": hand, "tv": lambda: DataLoader(images, batch_size=128, shuffle=True)}
    sides = {name: (lambda f=f: run(f(), True)) for name, f in sources.items()}
    sides |= {f"{name}_data": (lambda f=f: run(f(), False)) for name, f in sources.items()}
    sides |= {"select_data": lambda: run(hand(True), False), "copy": lambda: run(copies(), False),
              "floor": GemmFloor(DIMS["mlp"], 128, step_equivalents(n, 128)).sample}
    t = interleaved(sides, repeats)
    floor = GemmFloor.seconds(floor_of(t), step_equivalents(n, 128))
    what = f"one MLP epoch of {n} examples, batch 128"
    user = "DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True), num_workers=0"
    return [
        speedup_row("b", f"lrpipe data path vs {user} ({what})", t["ours"], t["td"], 1.2,
                    "what a user who converts the images to tensors once writes; floor: the "
                    "steps' GEMMs", cpu_pair(t, "ours", "td"), floor),
        speedup_row("b", "the same vs a hand index gather (x[perm[i:i+128]])", t["ours"],
                    t["hand"], note="the same gather as lrpipe's; floor: the steps' GEMMs",
                    cpu=cpu_pair(t, "ours", "hand"), floor_s=floor),
        speedup_row("b", "the same vs the tutorial's DataLoader + ToTensor over PIL images",
                    t["ours"], t["tv"], note="num_workers=0 (two busy cores leave none)",
                    cpu=cpu_pair(t, "ours", "tv"), floor_s=floor),
        speedup_row("b", f"data only (no step): lrpipe vs {user}", t["ours_data"],
                    t["td_data"], note="per-index __getitem__ + collate vs one gather; floor: "
                    "copying the epoch's bytes as contiguous slices",
                    cpu=cpu_pair(t, "ours_data", "td_data"), floor_s=t["copy"]),
        speedup_row("b", "data only: lrpipe vs a hand index gather", t["ours_data"],
                    t["hand_data"], note=f"the same gather as x.index_select(0, idx): "
                    f"{1000 * t['select_data']:.0f} ms against x[idx]'s "
                    f"{1000 * t['hand_data']:.0f} ms (lrpipe.engine.data gathers with x[idx])",
                    cpu=cpu_pair(t, "ours_data", "hand_data"), floor_s=t["copy"]),
    ]


# (c) K rates batched against K sequential runs ----------------------------------------------

def case_c(data: Dataset, mlp_data: Dataset, k: int, repeats: int) -> list[Row]:
    """Both sides timed directly, next to what the declared rule (``batching_rule``, batching
    auto on this device) chooses: these rows are the figures the rule cites, and a row where
    the rule batches but batched was slower fails."""
    rows = []
    for model, d in (("softmax", data), ("mlp", mlp_data)):
        base = TrainConfig(model=ModelConfig(name=model), device="cpu", epochs=1,
                           optim=OptimConfig(name="sgd", lr=0.1))
        cfgs = [base.replace(**{"optim.lr": float(lr)}) for lr in np.logspace(-3, -0.5, k)]
        seq_train, bat_train = [], []

        def sequential(cfgs=cfgs, d=d, acc=seq_train) -> None:
            acc.append(sum(float(train(c, d).history["time_s"].iloc[-1]) for c in cfgs))

        def batched(cfgs=cfgs, d=d, acc=bat_train) -> None:
            acc.append(float(train_batched(cfgs, d)[0].history["time_s"].iloc[-1]))

        t = interleaved({"seq": sequential, "bat": batched,
                         "floor": GemmFloor(DIMS[model], 128,
                                            step_equivalents(len(d.train), 128),
                                            _evaluated(d, base, 2)).sample}, repeats)
        floor = GemmFloor.seconds(floor_of(t), step_equivalents(len(d.train), 128),
                                  _evaluated(d, base, 2), members=k)
        chosen = trains_batched(cfgs)
        ratio = t["seq"] / t["bat"]
        verdict = ("batched and faster" if chosen and ratio > 1 else
                   f"alone (batched was {ratio:.2f}x)" if not chosen else "BATCHED BUT SLOWER")
        target = 3.0 if model == "softmax" else None
        rows.append(speedup_row(
            "c", f"{k} rates batched vs {k} sequential runs, {model} SGD, 1 epoch x "
            f"{len(d.train)}", t["bat"], t["seq"], target,
            f"whole runs incl. evaluation; training only "
            f"{np.median(seq_train) / np.median(bat_train):.2f}x; "
            f"batching=auto on {base.device} chooses: {verdict}; floor: the GEMMs of {k} "
            "separate runs (training + evaluation; batching's wide GEMMs may go below it)",
            cpu_pair(t, "bat", "seq"), floor))
        rows[-1].met = (rows[-1].met if target else True) and verdict != "BATCHED BUT SLOWER"
    return rows


# (e) range test against torch-lr-finder ----------------------------------------------------

def case_e(data: Dataset, root: str, steps: int, repeats: int,
           memory_repeats: int) -> list[Row]:
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset
    from torch_lr_finder import LRFinder

    cfg = TrainConfig(device="cpu", optim=OptimConfig(name="sgd", lr=1e-4))
    lo, hi = 1e-4, 1.0  # no divergence in between: both sides run every step
    images = torchvision.datasets.FashionMNIST(root, train=True, download=False,
                                               transform=torchvision.transforms.ToTensor())
    counts = {}

    def ours(cfg: TrainConfig = cfg) -> None:
        result = range_test_config(cfg, data, seed=0, min_lr=lo, max_lr=hi, num_steps=steps,
                                   stop_factor=1e12)
        counts["ours"] = result.steps

    def finder(make_loader, key: str, cfg: TrainConfig = cfg) -> None:
        model = make_model(cfg.model, data.input_shape, 10, 0, "cpu")
        opt = make_optimizer(model, cfg.optim)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lrf = LRFinder(model, opt, torch.nn.CrossEntropyLoss(), device="cpu")
            lrf.range_test(make_loader(), start_lr=lo, end_lr=hi, num_iter=steps,
                           step_mode="exp", diverge_th=math.inf)
            lrf.reset()
        counts[key] = len(lrf.history["loss"])

    def in_memory():
        # The very batches lrpipe draws (gathered here, inside the timing, as lrpipe does).
        gen = torch.Generator().manual_seed(0)
        batches = list(itertools.islice(iterate_batches(data.train, 128, gen), steps))
        return DataLoader(batches, batch_size=None)

    tensors = TensorDataset(data.train.x, data.train.y)
    t = interleaved({
        "ours": ours,
        "td": lambda: finder(lambda: DataLoader(tensors, batch_size=128, shuffle=True), "td"),
        "loader": lambda: finder(lambda: DataLoader(images, batch_size=128, shuffle=True),
                                 "loader"),
        "floor": GemmFloor(DIMS["mlp"], 128, steps).sample}, repeats)
    floor = GemmFloor.seconds(floor_of(t), steps)
    soft_floor = GemmFloor.seconds(GemmFloor(DIMS["softmax"], 128, steps).sample(), steps)
    # Against in-memory batches the two differ by per-step bookkeeping only (~0.1-0.2 ms of a
    # 2-4 ms step), so a few 0.3 s rounds cannot tell them apart on a shared machine: many
    # short rounds, medians and the round-by-round ratios.
    close = interleaved_samples({"ours": ours, "memory": lambda: finder(in_memory, "memory")},
                                memory_repeats)
    # Softmax regression: a step of ~0.1 ms, so the bookkeeping difference is most of it.
    soft = cfg.replace(**{"model.name": "softmax"})
    lean = interleaved_samples({"ours": lambda: ours(soft),
                                "memory": lambda: finder(in_memory, "softmax", soft)},
                               memory_repeats)
    m, m_soft = medians(close), medians(lean)

    def by_round(samples) -> str:
        r = sorted(b / a for a, b in zip(samples["ours"], samples["memory"], strict=True))
        return (f"{len(r)} rounds, round by round {r[0]:.2f}x (min), "
                f"{statistics.median(r):.2f}x (median), {r[-1]:.2f}x (max)")

    if len(set(counts.values())) != 1:
        say(f"  (e) warning: step counts differ: {counts}")
    what = f"MLP, {steps} steps, batch 128, lr {lo:g}..{hi:g}"
    return [
        speedup_row("e", f"range test (lrpipe's in-memory data) vs LRFinder fed "
                    f"DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True) ({what})",
                    t["ours"], t["td"], 1.3, "what a competent user feeds LRFinder; both "
                    "snapshot and restore the model; floor: the steps' GEMMs",
                    cpu_pair(t, "ours", "td"), floor),
        speedup_row("e", "the same vs LRFinder fed the tutorial's DataLoader + ToTensor",
                    t["ours"], t["loader"], note="PIL images decoded per example",
                    cpu=cpu_pair(t, "ours", "loader"), floor_s=floor),
        speedup_row("e", "range test vs LRFinder fed lrpipe's in-memory batches", m["ours"],
                    m["memory"], 1.0, "same batches; DataLoader(list, batch_size=None); "
                    + by_round(close), cpu_pair(m, "ours", "memory"), floor),
        speedup_row("e", "the same, softmax regression (the step is cheap: bookkeeping shows)",
                    m_soft["ours"], m_soft["memory"], note=by_round(lean),
                    cpu=cpu_pair(m_soft, "ours", "memory"), floor_s=soft_floor),
    ]


# (i) one epoch of the MLP against its GEMM floor -------------------------------------------

def case_i(data: Dataset, repeats: int, target: float = 2.2) -> list[Row]:
    """One epoch of the default MLP through train() (its two evaluations included) against
    the same epoch's GEMMs timed alone; the hand loop's multiple beside it."""
    cfg = TrainConfig(epochs=1, device="cpu")
    def ours() -> dict:
        result = train(cfg, data)
        return {"train": float(result.history["time_s"].iloc[-1])}

    def hand() -> dict:
        return {"train": hand_loop(cfg, data, evaluate=True)["train"]}

    steps = step_equivalents(len(data.train), cfg.batch_size)
    t = interleaved({"ours": ours, "hand": hand,
                     "floor": GemmFloor(DIMS["mlp"], cfg.batch_size, steps,
                                        _evaluated(data, cfg, 2)).sample}, repeats)
    whole = GemmFloor.seconds(floor_of(t), steps, _evaluated(data, cfg, 2))
    training = GemmFloor.seconds(floor_of(t), steps)
    what = f"MLP 784-256-10, 1 epoch x {len(data.train)}, batch 128, SGD, 1 thread"
    return [
        floor_row("i", f"one epoch through train() vs its GEMM floor ({what}), whole call",
                  t["ours"], whole, target, f"floor: {steps:.0f} steps' GEMMs + 2 evaluations "
                  f"of 20k examples; the hand loop with the same evaluation: "
                  f"{t['hand'] / whole:.2f}x",
                  (t["ours.cpu"], GemmFloor.seconds(floor_of(t, cpu=True), steps,
                                                    _evaluated(data, cfg, 2)))),
        floor_row("i", "the same, training only (train()'s time_s vs the steps' GEMMs)",
                  t["ours.train"], training, target, "the hand loop's training: "
                  f"{t['hand.train'] / training:.2f}x floor"),
    ]
