"""LR range test: ramps against torch's schedulers, state restored bit-identically, group ratios,
stopping rules, batch cycling, and seeded runs on real digits."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.data import iterate_batches, load_data
from lrpipe.engine.models import make_model
from lrpipe.engine.optim import make_optimizer
from lrpipe.search.rangetest import (
    STOP_REASONS,
    ramp,
    range_test,
    range_test_config,
    suggest_band,
)
from lrpipe.search.seeds import range_test_seeds

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(dataset="digits", val_size=300))


def _cfg(name="mlp", optim="sgd", **optim_kw) -> TrainConfig:
    return TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                       model=ModelConfig(name=name, hidden=(16,), dropout=0.0),
                       optim=OptimConfig(name=optim, **optim_kw), batch_size=64, device="cpu")


def _setup(data, cfg, seed=0):
    model = make_model(cfg.model, data.input_shape, data.num_classes, seed)
    optimizer = make_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(seed)
    return model, optimizer, (lambda: iterate_batches(data.train, 64, gen))


def _snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_identical(model, optimizer, snap):
    model_state, optim_state = snap
    now = model.state_dict()
    assert now.keys() == model_state.keys()
    for key, tensor in model_state.items():
        assert torch.equal(now[key], tensor), key
    opt_now = optimizer.state_dict()
    assert opt_now["state"].keys() == optim_state["state"].keys()
    for pid, state in optim_state["state"].items():
        assert opt_now["state"][pid].keys() == state.keys()
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(opt_now["state"][pid][key], value), (pid, key)
            else:
                assert opt_now["state"][pid][key] == value, (pid, key)
    assert opt_now["param_groups"] == optim_state["param_groups"]


# Hand-computed ramps and oracles against torch.optim.lr_scheduler.

def test_ramp_hand_values():
    np.testing.assert_allclose(ramp(1e-3, 10.0, 5), [1e-3, 1e-2, 1e-1, 1.0, 10.0], rtol=1e-12)
    np.testing.assert_allclose(ramp(1.0, 5.0, 5, "linear"), [1, 2, 3, 4, 5], rtol=1e-12)


def test_exp_ramp_matches_exponential_lr():
    n, lo, hi = 30, 1e-5, 3.0
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lo)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(hi / lo) ** (1 / (n - 1)))
    oracle = []
    for _ in range(n):
        oracle.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    np.testing.assert_allclose(ramp(lo, hi, n, "exp"), oracle, rtol=1e-10)


def test_linear_ramp_matches_linear_lr():
    n, lo, hi = 30, 0.01, 2.0
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=hi)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=lo / hi, end_factor=1.0,
                                              total_iters=n - 1)
    oracle = []
    for _ in range(n):
        oracle.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    np.testing.assert_allclose(ramp(lo, hi, n, "linear"), oracle, rtol=1e-10)


def test_losses_match_a_hand_written_loop_with_exponential_lr(data):
    # Oracle: the same updates with torch's SGD + ExponentialLR on a copy of the model.
    cfg = _cfg(optim="momentum")
    model, optimizer, batches = _setup(data, cfg)
    twin = copy.deepcopy(model)
    n, lo, hi = 25, 1e-3, 1.0
    result = range_test(model, optimizer, batches, F.cross_entropy, min_lr=lo, max_lr=hi,
                        num_steps=n, stop_factor=1e9)
    opt = torch.optim.SGD(twin.parameters(), lr=lo, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(hi / lo) ** (1 / (n - 1)))
    gen = torch.Generator().manual_seed(0)  # two epochs, each reshuffled, as range_test does
    stream = itertools.chain(iterate_batches(data.train, 64, gen),
                             iterate_batches(data.train, 64, gen))
    want = []
    for _ in range(n):
        x, y = next(stream)
        loss = F.cross_entropy(twin(x), y)
        want.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert result.stop_reason == "completed" and result.steps == n
    np.testing.assert_allclose(result.losses, want, rtol=1e-5)
    np.testing.assert_allclose(result.lrs, ramp(lo, hi, n), rtol=1e-12)


def test_smoothed_is_bias_corrected_ema(data):
    model, optimizer, batches = _setup(data, _cfg())
    result = range_test(model, optimizer, batches, F.cross_entropy, min_lr=1e-3, max_lr=0.1,
                        num_steps=12, smoothing=0.9)
    avg, want = 0.0, []
    for i, loss in enumerate(result.losses):
        avg = 0.9 * avg + 0.1 * loss
        want.append(avg / (1 - 0.9 ** (i + 1)))
    assert result.smoothed[0] == pytest.approx(result.losses[0], rel=1e-12)
    np.testing.assert_allclose(result.smoothed, want, rtol=1e-12)
    flat = range_test(model, optimizer, batches, F.cross_entropy, min_lr=1e-3, max_lr=0.1,
                      num_steps=5, smoothing=0.0)
    assert flat.smoothed == flat.losses


# The test owns the state it changes.

@pytest.mark.parametrize("optim", ["momentum", "adam"])
@pytest.mark.parametrize("how", ["diverged", "raised"])
def test_state_restored_bit_identically(data, optim, how):
    cfg = _cfg(optim=optim, lr=0.01, lr_mult={"head": 10.0}).replace(**{"model.dropout": 0.5})
    model, optimizer, batches = _setup(data, cfg)
    for x, y in list(batches())[:3]:  # populate momentum / Adam state first
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    snap = _snapshot(model, optimizer)
    drop_state = model.drop1.generator.get_state()
    seen = []

    def loss_fn(logits, y):
        if len(seen) == 5:
            seen.append(model.head.weight.detach().clone())
            if how == "raised":
                raise RuntimeError("boom at step 5")
        seen.append(None)
        return F.cross_entropy(logits, y)

    if how == "raised":
        with pytest.raises(RuntimeError, match="boom"):
            range_test(model, optimizer, batches, loss_fn, min_lr=1e-2, max_lr=1e3)
    else:
        result = range_test(model, optimizer, batches, loss_fn, min_lr=1e-2, max_lr=1e4)
        assert result.stop_reason in ("diverged", "nonfinite")
    assert not torch.equal(seen[5], snap[0]["head.weight"])  # it did train in between
    _assert_identical(model, optimizer, snap)
    assert torch.equal(model.drop1.generator.get_state(), drop_state)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_keeps_group_ratios_and_records_group_rates(data):
    model, optimizer, batches = _setup(data, _cfg(lr=0.05, lr_mult={"head": 10.0}))
    result = range_test(model, optimizer, batches, F.cross_entropy, min_lr=1e-4, max_lr=1.0,
                        num_steps=20, stop_factor=1e9)
    assert set(result.group_lrs) == {"fc1", "head"}
    np.testing.assert_allclose(result.lrs, ramp(1e-4, 1.0, 20), rtol=1e-12)
    np.testing.assert_allclose(result.group_lrs["fc1"], result.lrs, rtol=1e-12)
    np.testing.assert_allclose(result.group_lrs["head"], 10 * np.array(result.lrs), rtol=1e-12)
    # The reference is group 0's base rate (lr / lr_mult), even when its multiplier is not 1.
    model, optimizer, batches = _setup(data, _cfg(lr=0.05, lr_mult={"fc1": 0.5, "head": 4.0}))
    result = range_test(model, optimizer, batches, F.cross_entropy, min_lr=1e-4, max_lr=1.0,
                        num_steps=20, stop_factor=1e9)
    np.testing.assert_allclose(result.lrs, ramp(1e-4, 1.0, 20), rtol=1e-12)
    np.testing.assert_allclose(result.group_lrs["fc1"], 0.5 * np.array(result.lrs), rtol=1e-12)
    np.testing.assert_allclose(result.group_lrs["head"], 4 * np.array(result.lrs), rtol=1e-12)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.025, 0.2])


# Stopping rules.

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_stops_at_first_nonfinite_loss(data, bad):
    model, optimizer, batches = _setup(data, _cfg())
    calls = []

    def loss_fn(logits, y):
        calls.append(1)
        loss = F.cross_entropy(logits, y)
        return loss * bad if len(calls) in (8, 9, 11) else loss

    result = range_test(model, optimizer, batches, loss_fn, min_lr=1e-4, max_lr=1e-2,
                        num_steps=30)
    assert result.stop_reason == "nonfinite"
    assert result.steps == len(result.lrs) == len(result.losses) == len(result.smoothed) == 7
    assert all(math.isfinite(v) for v in result.losses + result.smoothed)
    assert len(calls) == 8  # nothing ran past the first non-finite loss


def test_stops_when_smoothed_exceeds_stop_factor_times_best(data):
    model, optimizer, batches = _setup(data, _cfg())
    result = range_test(model, optimizer, batches, F.cross_entropy, min_lr=1e-3, max_lr=1e4,
                        num_steps=200, stop_factor=3.0)
    assert result.stop_reason == "diverged" and result.steps < 200
    s = np.array(result.smoothed)
    assert s[-1] > 3.0 * s[:-1].min()
    for i in range(1, len(s) - 1):  # no earlier point met the rule
        assert s[i] <= 3.0 * s[:i].min()


def test_completes_at_small_rates(data):
    model, optimizer, batches = _setup(data, _cfg())
    result = range_test(model, optimizer, batches, F.cross_entropy, min_lr=1e-5, max_lr=1e-3,
                        num_steps=40, mode="linear")
    assert result.stop_reason == "completed" and result.steps == 40
    assert result.stop_reason in STOP_REASONS
    np.testing.assert_allclose(result.lrs, ramp(1e-5, 1e-3, 40, "linear"))


# Batches: cycled, restarted, or an error that still restores the state.

def test_batches_are_cycled(data):
    model, optimizer, _ = _setup(data, _cfg())
    three = [(data.train.x[i:i + 8], data.train.y[i:i + 8]) for i in (0, 8, 16)]
    result = range_test(model, optimizer, three, F.cross_entropy, min_lr=1e-4, max_lr=1e-3,
                        num_steps=10)
    assert result.steps == 10
    # Steps 0 and 3 see the same batch; the weights barely moved at these rates.
    assert result.losses[3] == pytest.approx(result.losses[0], rel=0.02)


def test_one_shot_iterator_running_out_is_an_error_and_state_is_restored(data):
    model, optimizer, _ = _setup(data, _cfg())
    snap = _snapshot(model, optimizer)
    three = iter([(data.train.x[i:i + 8], data.train.y[i:i + 8]) for i in (0, 8, 16)])
    with pytest.raises(ValueError, match="batches: a one-shot iterator ran out"):
        range_test(model, optimizer, three, F.cross_entropy, num_steps=10)
    _assert_identical(model, optimizer, snap)
    with pytest.raises(ValueError, match="batches: yielded no batch"):
        range_test(model, optimizer, [], F.cross_entropy, num_steps=10)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"min_lr": 0.0}, "min_lr"),
    ({"min_lr": 1.0, "max_lr": 1.0}, "max_lr"),
    ({"num_steps": 1}, "num_steps"),
    ({"num_steps": 10.5}, "num_steps"),
    ({"mode": "cosine"}, "mode: got 'cosine'; allowed: exp, linear"),
    ({"smoothing": 1.0}, "smoothing"),
    ({"smoothing": -0.1}, "smoothing"),
    ({"stop_factor": 1.0}, "stop_factor"),
])
def test_bad_arguments_name_the_field(data, kwargs, field):
    model, optimizer, batches = _setup(data, _cfg())
    with pytest.raises(ConfigError, match=field):
        range_test(model, optimizer, batches, F.cross_entropy, **kwargs)


# Seeded runs from a config, and bands over seeds.

def test_range_test_config_is_seeded(data):
    cfg = _cfg(name="softmax")
    opts = dict(min_lr=1e-3, max_lr=10.0, num_steps=40)
    a = range_test_config(cfg, data, seed=1, **opts)
    b = range_test_config(cfg, data, seed=1, **opts)
    c = range_test_config(cfg, data, seed=2, **opts)
    assert a.losses == b.losses and a.losses != c.losses


def test_range_test_seeds_and_bands_on_digits(data):
    df = range_test_seeds(_cfg(name="softmax"), data, seeds=(0, 1, 2), min_lr=1e-4,
                          max_lr=100.0, num_steps=60)
    assert list(df.columns) == ["seed", "step", "lr", "loss", "smoothed", "stop_reason"]
    assert sorted(df["seed"].unique()) == [0, 1, 2]
    assert set(df["stop_reason"]) <= set(STOP_REASONS)
    for rule in ("steepest", "valley", "min_over_10"):
        band = suggest_band(df, rule)
        assert len(band.per_seed) == 3
        assert band.lo <= band.median <= band.hi
        assert 1e-4 <= band.lo and band.hi <= 100.0
    with pytest.raises(ValueError, match="rule: got 'best'"):
        suggest_band(df, "best")
    with pytest.raises(ValueError, match="missing columns"):
        suggest_band(df.drop(columns="smoothed"), "valley")


def test_suggest_band_hand_values():
    # Curve A of test_suggest (min_over_10 = 10^-1.5) with rates shifted by 0, 1 and 2 decades,
    # plus a seed whose curve is all NaN.
    lrs = np.array([10.0 ** (-5 + 0.5 * i) for i in range(11)])
    loss = [2.30, 2.30, 2.28, 2.20, 1.90, 1.20, 0.70, 0.50, 0.45, 0.40, 5.0]
    frames = [pd.DataFrame({"seed": s, "step": range(11), "lr": lrs * 10.0**s, "smoothed": loss})
              for s in (0, 1, 2)]
    frames.append(pd.DataFrame({"seed": 3, "step": range(11), "lr": lrs,
                                "smoothed": [math.nan] * 11}))
    band = suggest_band(pd.concat(frames), "min_over_10")
    assert band.median == pytest.approx(10**-0.5, rel=1e-9)
    assert (band.lo, band.hi) == pytest.approx((10**-1.5, 10**0.5), rel=1e-9)
    assert band.per_seed[3].lr is None and "non-finite" in band.per_seed[3].reason
    # An even count: the median is the geometric mean of the middle two.
    even = suggest_band(pd.concat([frames[0], frames[2]]), "min_over_10")
    assert even.median == pytest.approx(10**-0.5, rel=1e-9)
    none = suggest_band(frames[3], "valley")
    assert none[:3] == (None, None, None)
