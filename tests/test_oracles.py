"""Oracles for the training engine: each test compares lrpipe with a reference written without it.

1. ``train()`` against a hand-written PyTorch loop (torch.optim, torch.optim.lr_scheduler,
   F.cross_entropy, the batch order written out): weights bit-identical after 1 and 2 epochs,
   history rows equal to metrics computed by hand.
2. K batched members against K single ``train()`` runs: every batchable optimizer x a constant
   and two decaying schedules, members differing in rate and in seed, every history column.
3. ``range_test`` against torch-lr-finder 0.2.2 fed the same batches from identical models and
   optimizers: the same rates, the same raw losses, the same stopping step.

Everything runs on scikit-learn's digits (1,200 training examples, 19 batches of 64 an epoch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR
from torch.utils.data import DataLoader, TensorDataset
from torch_lr_finder import LRFinder

from lrpipe.engine.batched import BATCHED_OPTIMIZERS, train_batched
from lrpipe.engine.config import ModelConfig
from lrpipe.engine.data import Dataset, Split, iterate_batches
from lrpipe.engine.models import make_model
from lrpipe.engine.train import eval_train_split, train
from lrpipe.search.rangetest import range_test

torch.set_num_threads(1)

# engine.optim.make_optimizer's mapping, written against torch.optim directly (one param group
# over all parameters where lrpipe makes one per layer: grouping must not change the update).
TORCH_OPTIMIZERS = {
    "sgd": lambda ps, c: torch.optim.SGD(ps, lr=c.lr, weight_decay=c.weight_decay),
    "momentum": lambda ps, c: torch.optim.SGD(ps, lr=c.lr, momentum=c.momentum,
                                              weight_decay=c.weight_decay),
    "nesterov": lambda ps, c: torch.optim.SGD(ps, lr=c.lr, momentum=c.momentum, nesterov=True,
                                              weight_decay=c.weight_decay),
    "adagrad": lambda ps, c: torch.optim.Adagrad(ps, lr=c.lr, weight_decay=c.weight_decay),
    "rmsprop": lambda ps, c: torch.optim.RMSprop(ps, lr=c.lr, weight_decay=c.weight_decay),
    "adam": lambda ps, c: torch.optim.Adam(ps, lr=c.lr, weight_decay=c.weight_decay),
    "rprop": lambda ps, c: torch.optim.Rprop(ps, lr=c.lr),
}
# Two stable rates per optimizer (per update, mean loss over 64 examples): the first is the
# single-run rate of part 1; chaotic rates would make even float64 trajectories part.
RATES = {"sgd": (0.1, 0.3), "momentum": (0.02, 0.05), "nesterov": (0.02, 0.05),
         "adagrad": (0.02, 0.05), "rmsprop": (0.002, 0.005), "adam": (0.002, 0.005),
         "rprop": (0.01, 0.02)}
METRICS = ("train_loss", "val_loss", "train_error", "val_error")


def as_dtype(data: Dataset, dtype: torch.dtype) -> Dataset:
    return Dataset(*(Split(s.x.to(dtype), s.y) for s in (data.train, data.val, data.test)),
                   data.num_classes, data.input_shape, data.class_names)


@torch.no_grad()
def hand_metrics(model: torch.nn.Module, split: Split, prefix: str) -> dict[str, float]:
    """Mean cross-entropy (accumulated in float64) and error of ``model`` on the whole split."""
    model.eval()
    logits = model(split.x).double()
    model.train()
    return {f"{prefix}_loss": F.cross_entropy(logits, split.y).item(),
            f"{prefix}_error": (logits.argmax(1) != split.y).double().mean().item()}


def hand_loop(cfg, data: Dataset, make_scheduler=None, per_batch: bool = True):
    """The ~20-line loop train() must equal. Returns one dict per epoch (weights, the rate at
    the epoch's start, metrics) and the rate of every update.

    The batch order is written out as train() draws it: a generator seeded with ``cfg.seed``,
    one CPU ``randperm`` of the training split per epoch, consecutive slices (last one short).
    """
    model = make_model(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    optimizer = TORCH_OPTIMIZERS[cfg.optim.name](model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    gen = torch.Generator().manual_seed(cfg.seed)
    train_eval = eval_train_split(data, cfg)
    epochs, rates = [], []
    for _ in range(cfg.epochs):
        epoch_lr = optimizer.param_groups[0]["lr"]
        for idx in torch.randperm(len(data.train), generator=gen).split(cfg.batch_size):
            rates.append(optimizer.param_groups[0]["lr"])
            loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None and per_batch:
                scheduler.step()
        if scheduler is not None and not per_batch:
            scheduler.step()
        epochs.append({"state": {k: v.clone() for k, v in model.state_dict().items()},
                       "lr": epoch_lr, **hand_metrics(model, train_eval, "train"),
                       **hand_metrics(model, data.val, "val")})
    return epochs, rates


def assert_weights_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), f"{name} differs from the hand loop's"


def assert_row_matches(row, want: dict, rtol: float) -> None:
    assert row["lr"] == want["lr"]
    for key in ("train_error", "val_error"):  # counts of wrong answers: exact
        assert row[key] == pytest.approx(want[key], abs=1e-12), key
    for key in ("train_loss", "val_loss"):  # sum-then-divide vs mean: summation order differs
        assert row[key] == pytest.approx(want[key], rel=rtol), key


# 1. train() against the hand loop.

@pytest.mark.parametrize("opt", list(TORCH_OPTIMIZERS))
def test_train_equals_hand_loop_bit_for_bit(digits_cfg, digits32, opt):
    """Float32, as users train: same model, batches and torch.optim step give the very same
    bits after each epoch; the epoch rows are the hand-computed metrics of those weights."""
    cfg = digits_cfg.replace(**{"optim.name": opt, "optim.lr": RATES[opt][0],
                                "optim.weight_decay": 0.0 if opt == "rprop" else 1e-3})
    want, rates = hand_loop(cfg, digits32)
    one = train(cfg.replace(epochs=1), digits32, keep_model=True)
    two = train(cfg, digits32, keep_model=True)
    assert one.status == two.status == "ok"
    assert_weights_equal(one.model, want[0]["state"])
    assert_weights_equal(two.model, want[1]["state"])
    assert two.lr_trace == rates
    rows = two.history.set_index("epoch")
    for epoch in (1, 2):
        # float32 logits summed per example vs a float64 mean: ~1e-7 apart.
        assert_row_matches(rows.loc[epoch], want[epoch - 1], rtol=1e-6)
    assert_row_matches(one.history.set_index("epoch").loc[1], want[0], rtol=1e-6)


def test_schedule_step_equals_torch_steplr_bit_for_bit(digits_cfg, digits32):
    """lrpipe's per-epoch step schedule against torch's StepLR stepped once an epoch.

    lrpipe evaluates base x gamma ** k through a LambdaLR lambda; StepLR multiplies the current
    rate by gamma once per epoch. With gamma = 0.5 both are exact (a power of two only moves
    the exponent), so weights and rates are bit-identical; with 0.1 they would part by an ulp.
    """
    cfg = digits_cfg.replace(epochs=3, **{"optim.name": "momentum", "optim.lr": 0.05,
                                          "schedule.name": "step", "schedule.step_size": 1,
                                          "schedule.gamma": 0.5, "schedule.per_batch": False})
    want, rates = hand_loop(cfg, digits32, lambda o: StepLR(o, step_size=1, gamma=0.5),
                            per_batch=False)
    got = train(cfg, digits32, keep_model=True)
    assert_weights_equal(got.model, want[-1]["state"])
    assert got.lr_trace == rates
    assert sorted(set(rates), reverse=True) == [0.05, 0.025, 0.0125]
    rows = got.history.set_index("epoch")
    for epoch in (1, 2, 3):
        assert_row_matches(rows.loc[epoch], want[epoch - 1], rtol=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_schedule_cosine_equals_torch_cosineannealinglr(f64, digits_cfg, digits64, opt):
    """lrpipe's per-batch cosine (to base / final_decay at the last update) against torch's
    CosineAnnealingLR(T_max = last update, eta_min = base / final_decay) stepped per batch.

    Not bitwise: lrpipe evaluates the closed form in a LambdaLR lambda (clock in epochs,
    t / steps_per_epoch over H = epochs - 1 / steps_per_epoch), while CosineAnnealingLR.step()
    multiplies the previous rate by a ratio of cosines, whose roundings accumulate (measured:
    at most 2.7e-15 relative over 57 steps). Hence float64, rates to 1e-13 and weights to 1e-12.
    """
    cfg = digits_cfg.replace(epochs=3, **{"optim.name": opt, "optim.lr": RATES[opt][0],
                                          "schedule.name": "cosine"})
    total = cfg.epochs * -(-len(digits64.train) // cfg.batch_size)
    eta_min = cfg.optim.lr / cfg.schedule.final_decay
    want, rates = hand_loop(cfg, digits64,
                            lambda o: CosineAnnealingLR(o, T_max=total - 1, eta_min=eta_min))
    got = train(cfg, digits64, keep_model=True)
    assert len(got.lr_trace) == len(rates) == total
    np.testing.assert_allclose(got.lr_trace, rates, rtol=1e-13)
    assert rates[-1] == pytest.approx(eta_min, rel=1e-13)
    for name, tensor in got.model.state_dict().items():
        torch.testing.assert_close(tensor, want[-1]["state"][name], rtol=1e-12, atol=1e-14)
    rows = got.history.set_index("epoch")
    for epoch in (1, 2, 3):
        assert rows.loc[epoch, "lr"] == pytest.approx(want[epoch - 1]["lr"], rel=1e-13)
        for key in METRICS:
            assert rows.loc[epoch, key] == pytest.approx(want[epoch - 1][key], rel=1e-10,
                                                         abs=1e-12), key


# 2. K batched members against K single runs.

# What tests/test_batched.py leaves out: every optimizer under decaying schedules, and members
# that differ in rate and in seed at once (there only momentum, constant).
SCHEDULES = {
    "constant": {},
    "cosine_warmup": {"schedule.name": "cosine", "schedule.warmup_epochs": 0.5},
    "exponential_per_epoch": {"schedule.name": "exponential", "schedule.per_batch": False},
}
# (rate index, seed): members 0 and 1 differ in rate only, 0 and 2 in seed only.
MEMBERS = ((0, 0), (1, 0), (0, 1))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("opt", BATCHED_OPTIMIZERS)
def test_batched_members_equal_single_runs(f64, digits_cfg, digits64, opt, schedule):
    base = digits_cfg.replace(**{"optim.name": opt, "optim.weight_decay": 1e-3,
                                 **SCHEDULES[schedule]})
    cfgs = [base.replace(seed=seed, **{"optim.lr": RATES[opt][i]}) for i, seed in MEMBERS]
    results = train_batched(cfgs, digits64)
    assert len(results) == len(cfgs)
    finals = set()
    for cfg, got in zip(cfgs, results, strict=True):
        want = train(cfg, digits64)
        assert (got.status, got.diverged_epoch) == (want.status, want.diverged_epoch) == ("ok",
                                                                                         None)
        assert list(got.history.columns) == list(want.history.columns)
        cols = [c for c in want.history.columns if c != "time_s"]  # every column but the clock
        assert any(c.startswith("ratio/") for c in cols)
        np.testing.assert_allclose(got.history[cols].to_numpy(dtype=float),
                                   want.history[cols].to_numpy(dtype=float), rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(got.lr_trace, want.lr_trace, rtol=1e-12)
        finals.add(float(want.history["train_loss"].iloc[-1]))
    assert len(finals) == len(cfgs)  # rate and seed really changed each member's run


# 3. The range test against torch-lr-finder.

@pytest.fixture
def dtype(request):
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(old)


def finder_smoothing(losses, smooth_f: float) -> list[float]:
    """torch-lr-finder 0.2.2's history["loss"] from raw losses: the first loss as is, then
    smooth_f x loss + (1 - smooth_f) x previous (no bias correction), in its float order."""
    out: list[float] = []
    for i, loss in enumerate(losses):
        out.append(loss if i == 0 or smooth_f == 0 else
                   smooth_f * loss + (1 - smooth_f) * out[-1])
    return out


def debiased_ema(losses, beta: float) -> list[float]:
    """The bias-corrected moving average (Adam's correction) of ``losses``."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def run_both(data: Dataset, dtype, mode, momentum, lrpipe_smoothing, finder_smooth_f):
    """The same 60-step ramp on the same batches through lrpipe and torch-lr-finder.

    Batches: one shuffle of the training split (iterate_batches, seed 0). lrpipe gets the list;
    torch-lr-finder gets a DataLoader (shuffle=False, batch 64) over the same examples in that
    order, which yields equal tensors. Both restart at the end of the 19 batches (lrpipe
    iterates the list again; TrainDataLoaderIter re-iterates the loader), so 60 steps see the
    epoch three times over in both.
    """
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(Split(data.train.x.to(dtype), data.train.y), 64, gen))
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in batches]),
                                      torch.cat([y for _, y in batches])),
                        batch_size=64, shuffle=False)
    min_lr, max_lr = (1e-4, 10.0) if mode == "exp" else (1e-3, 3.0)
    models = [make_model(ModelConfig(name="mlp", hidden=(32,)), data.input_shape,
                         data.num_classes, 0) for _ in "ab"]
    optims = [torch.optim.SGD(m.parameters(), lr=min_lr, momentum=momentum) for m in models]
    ours = range_test(models[0], optims[0], batches, F.cross_entropy, min_lr=min_lr,
                      max_lr=max_lr, num_steps=60, mode=mode, smoothing=lrpipe_smoothing,
                      stop_factor=4.0)
    finder = LRFinder(models[1], optims[1], torch.nn.CrossEntropyLoss())
    # start_lr = min_lr: the finder's ExponentialLR/LinearLR then start from it (base_lrs) and
    # reach end_lr at iteration num_iter - 1, as lrpipe's ramp does at step num_steps - 1.
    finder.range_test(loader, start_lr=min_lr, end_lr=max_lr, num_iter=60, step_mode=mode,
                      smooth_f=finder_smooth_f, diverge_th=4)
    return ours, finder.history


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("mode", ["exp", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"],
                         indirect=True)
def test_range_test_equals_torch_lr_finder(digits32, dtype, mode, momentum):
    """No smoothing on either side, so the finder's history["loss"] is the raw loss.

    What the finder records (lr_finder.py, 0.2.2): at iteration i it trains on the next batch
    and keeps that batch's loss computed before optimizer.step() (as lrpipe's ``losses``), the
    rate that step used (its scheduler's get_lr() before stepping), then stops once the loss
    exceeds diverge_th x the best so far, that point recorded; lrpipe stops at stop_factor x
    the best earlier smoothed loss, that point recorded. With smoothing off both rules read the
    raw loss (a new best never exceeds a multiple > 1 of itself), so both stop at one step.

    Rates: linear is the same float expression on both sides, so bit-identical. exp is
    min x (max/min) ** (i/(n-1)) on both sides, but lrpipe's numpy array power and the
    finder's Python float power round differently at a few steps by one ulp: rates to 4e-16,
    and in float64 the losses after such a step to 1e-12, not bitwise.
    """
    ours, theirs = run_both(digits32, dtype, mode, momentum, 0.0, 0.0)
    assert ours.stop_reason == "diverged"
    assert ours.steps == len(theirs["lr"]) == len(theirs["loss"]) < 60
    if mode == "linear":
        assert list(ours.lrs) == theirs["lr"]
    else:
        np.testing.assert_allclose(ours.lrs, theirs["lr"], rtol=4.5e-16, atol=0)
    rtol = 1e-6 if dtype == torch.float32 else (0.0 if mode == "linear" else 1e-12)
    np.testing.assert_allclose(ours.losses, theirs["loss"], rtol=rtol, atol=0)
    assert list(ours.smoothed) == list(ours.losses)  # smoothing 0: the raw curve


def test_range_test_smoothing_corresponds_to_torch_lr_finder(f64, digits64):
    """With smoothing, the two curves are different averages of the same raw losses.

    torch-lr-finder keeps s_0 = l_0, s_i = a l_i + (1 - a) s_{i-1} (smooth_f = a), stored as
    history["loss"]; lrpipe keeps the raw l_i and the bias-corrected EMA with beta = 1 - a,
    whose first point is l_0 too but which weights l_0 less afterwards. So the raw losses are
    compared through the finder's own formula applied to lrpipe's raw losses, and lrpipe's
    smoothed curve against the bias-corrected EMA of them. The stop rules read different
    curves, so the steps both recorded (the shorter run) are compared. Linear mode: rates and
    raw losses are bit-identical (see above), so the finder's curve is reproduced exactly.
    """
    beta = 0.9
    ours, theirs = run_both(digits64, torch.float64, "linear", 0.9, beta, 1 - beta)
    n = min(ours.steps, len(theirs["loss"]))
    assert n >= 10
    assert list(ours.lrs[:n]) == theirs["lr"][:n]
    assert finder_smoothing(ours.losses[:n], 1 - beta) == theirs["loss"][:n]
    np.testing.assert_allclose(ours.smoothed, debiased_ema(ours.losses, beta), rtol=1e-14)
    assert ours.smoothed[0] == theirs["loss"][0] == ours.losses[0]
    assert ours.smoothed[1] != pytest.approx(theirs["loss"][1], rel=1e-9)  # unlike averages
