"""Batched range test (lrpipe.search.seeds) against the sequential one, seed by seed, and
the declared dispatch of range_test_seeds.

Equality tests run in float64 (default dtype and data converted), where batched and lone runs
agree to ~1e-12 even at the ramp's high rates over 60 steps (measured: 2e-15 .. 2e-10 relative
in loss); float32 is compared over few steps at small rates (FIELD_NOTES: it drifts apart).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.data import iterate_batches
from lrpipe.engine.members import Stacked
from lrpipe.engine.models import make_model
from lrpipe.engine.train import batch_loss
from lrpipe.search import seeds as rangetest_batched
from lrpipe.search.rangetest import ramp, range_test_config
from lrpipe.search.seeds import range_test_batched, range_test_seeds

torch.set_num_threads(1)
SEEDS = (0, 1, 2)
COLUMNS = ["seed", "step", "lr", "loss", "smoothed", "stop_reason"]




def _cfg(optim: str = "sgd", loss: str = "cross_entropy", dropout: float = 0.0,
         **optim_kw) -> TrainConfig:
    return TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                       model=ModelConfig(name="mlp", hidden=(16,), dropout=dropout),
                       optim=OptimConfig(name=optim, **optim_kw), batch_size=64, device="cpu",
                       loss=loss)


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame, rtol: float = 1e-8) -> None:
    """Same rows per seed, steps, rates and stop reasons; losses and smoothed to ``rtol``."""
    assert list(got.columns) == list(want.columns) == COLUMNS
    assert got.groupby("seed", sort=False).size().to_dict() == \
        want.groupby("seed", sort=False).size().to_dict()
    pd.testing.assert_frame_equal(got[["seed", "step", "stop_reason"]],
                                  want[["seed", "step", "stop_reason"]])
    np.testing.assert_allclose(got["lr"], want["lr"], rtol=1e-15)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=rtol)
    np.testing.assert_allclose(got["smoothed"], want["smoothed"], rtol=rtol)


def _both(cfg, data, seeds=SEEDS, **opts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(batched, sequential) tables of the same range tests."""
    return (range_test_batched(cfg, data, seeds, **opts),
            range_test_seeds(cfg, data, seeds, batched=False, **opts))


def _stops(df: pd.DataFrame) -> dict[int, tuple[int, str]]:
    """seed -> (recorded points, stop_reason)."""
    return {int(s): (len(g), g["stop_reason"].iloc[0]) for s, g in df.groupby("seed")}


# Oracles: the sequential range test, seed by seed.

@pytest.mark.parametrize("optim, lr_mult, max_lr", [
    ("sgd", {}, 10.0),
    ("momentum", {"fc1": 0.5, "head": 4.0}, 3.0),
    ("nesterov", {"fc1": 0.0}, 3.0),  # frozen first layer: group 0 is the head
    ("adam", {"head": 10.0}, 1.0),
    ("rmsprop", {}, 0.3),
    ("adagrad", {"fc1": 2.0}, 3.0),
])
def test_batched_equals_sequential_per_seed(f64, digits64, optim, lr_mult, max_lr):
    cfg = _cfg(optim, lr=0.05, weight_decay=1e-3, lr_mult=lr_mult)
    got, want = _both(cfg, digits64, min_lr=1e-4, max_lr=max_lr, num_steps=60)
    assert_same_table(got, want)
    assert len(got) > 3 * 40  # two epochs of 19 steps and more were compared
    curves = [tuple(g["loss"]) for _, g in got.groupby("seed")]
    assert len(set(curves)) == 3  # the seeds really differ


@pytest.mark.parametrize("loss, max_lr, stop_factor, reason", [
    ("cross_entropy", 1e3, 4.0, "diverged"),  # smoothed > 4 x best, at steps 45..51
    ("mse", 1e2, 1e300, "nonfinite"),  # seed 1's loss overflows at step 51, 0 and 2 complete
])
def test_one_seed_stops_early_and_the_others_go_on(f64, digits64, loss, max_lr, stop_factor,
                                                   reason):
    cfg = _cfg("sgd", loss=loss, lr=0.1)
    opts = dict(min_lr=1e-3, max_lr=max_lr, num_steps=60, stop_factor=stop_factor)
    got, want = _both(cfg, digits64, **opts)
    assert_same_table(got, want)
    stops = _stops(got)
    first = min(stops, key=lambda s: stops[s][0])
    assert stops[first][1] == reason
    assert any(n > stops[first][0] for n, _ in stops.values())  # others ran on after it
    # Masking the stopped member leaves the others' numbers as they are without it.
    rest = tuple(s for s in SEEDS if s != first)
    alone = range_test_batched(cfg, digits64, rest, **opts)
    assert_same_table(alone, got[got["seed"] != first].reset_index(drop=True), rtol=1e-12)


def test_dropout_masks_are_each_seeds_own(f64, digits64):
    cfg = _cfg("momentum", dropout=0.3, lr=0.05)
    got, want = _both(cfg, digits64, min_lr=1e-4, max_lr=1.0, num_steps=45)
    assert_same_table(got, want)


def test_one_seed_twice_shares_the_batches(f64, digits64):
    cfg = _cfg("adam", lr=0.01)
    got, want = _both(cfg, digits64, seeds=(5, 5), min_lr=1e-4, max_lr=0.3, num_steps=30)
    assert_same_table(got, want)
    assert len(got) == 60  # one generator, one batch order: the two curves are identical
    pd.testing.assert_frame_equal(got.iloc[:30].reset_index(drop=True),
                                  got.iloc[30:].reset_index(drop=True))


def test_float32_few_steps_at_small_rates_agree(digits32):
    # float32: GEMMs of another shape sum in another order; at small rates over 30 steps the
    # losses stay within 1e-4 relative (measured ~1e-6).
    got, want = _both(_cfg("momentum", lr=0.05), digits32, min_lr=1e-4, max_lr=0.3,
                      num_steps=30)
    assert_same_table(got, want, rtol=1e-4)


# Hand-computed values and invariants.

def test_first_losses_lrs_and_smoothing_by_hand(f64, digits64):
    cfg = _cfg("sgd", lr=0.1)
    df = range_test_batched(cfg, digits64, (3, 7), min_lr=1e-3, max_lr=1.0, num_steps=25,
                            smoothing=0.9)
    for seed, g in df.groupby("seed"):
        # Step 0 is a fresh seeded model on the first batch its generator shuffles.
        model = make_model(cfg.model, digits64.input_shape, digits64.num_classes, seed)
        x, y = next(iterate_batches(digits64.train, 64, torch.Generator().manual_seed(seed)))
        assert g["loss"].iloc[0] == pytest.approx(float(batch_loss(model(x), y, cfg.loss).detach()),
                                                  rel=1e-12)
        np.testing.assert_allclose(g["lr"], ramp(1e-3, 1.0, 25)[:len(g)], rtol=0)
        assert list(g["step"]) == list(range(len(g)))
        avg, want = 0.0, []
        for i, loss in enumerate(g["loss"]):  # bias-corrected EMA, by hand
            avg = 0.9 * avg + 0.1 * loss
            want.append(avg / (1 - 0.9 ** (i + 1)))
        np.testing.assert_allclose(g["smoothed"], want, rtol=1e-12)


@pytest.mark.parametrize("lr_mult", [{"fc1": 0.5, "head": 4.0}, {"fc1": 0.0, "head": 3.0}])
def test_results_keep_each_groups_rates_as_the_sequential_test(f64, digits64, lr_mult):
    cfg = _cfg("momentum", lr=0.05, lr_mult=lr_mult)
    cfgs = rangetest_batched.member_cfgs(cfg, digits64, (0, 1))
    results = rangetest_batched.range_test_stacked(cfgs, digits64, ramp(1e-4, 1.0, 15), 0.98,
                                                   4.0)
    for seed, got in zip((0, 1), results, strict=True):
        want = range_test_config(cfg, digits64, seed=seed, min_lr=1e-4, max_lr=1.0,
                                 num_steps=15)
        assert got.group_lrs.keys() == want.group_lrs.keys()
        for name, rates in want.group_lrs.items():
            np.testing.assert_allclose(got.group_lrs[name], rates, rtol=1e-15)
        assert (got.steps, got.stop_reason) == (want.steps, want.stop_reason)


def test_stops_stepping_once_every_seed_stopped(digits32, monkeypatch):
    calls = []

    losses = Stacked.losses
    monkeypatch.setattr(Stacked, "losses",
                        lambda self, *a, **k: calls.append(1) or losses(self, *a, **k))
    df = range_test_batched(_cfg("sgd", lr=0.1), digits32, min_lr=1e-2, max_lr=1e6,
                            num_steps=400)
    stops = _stops(df)
    assert {r for _, r in stops.values()} <= {"diverged", "nonfinite"}
    # A diverged seed records its last step; a nonfinite one stops on an unrecorded step.
    assert len(calls) == max(n + (r == "nonfinite") for n, r in stops.values()) < 400


def test_schedule_of_the_config_plays_no_part(f64, digits64):
    cfg = _cfg("momentum", lr=0.05).replace(**{"schedule.name": "plateau"})
    got, want = _both(cfg, digits64, min_lr=1e-4, max_lr=1.0, num_steps=20)
    assert_same_table(got, want)


# Bad input names the field.

@pytest.mark.parametrize("kwargs, field", [
    ({"min_lr": 0.0}, "min_lr"),
    ({"min_lr": 1.0, "max_lr": 1.0}, "max_lr"),
    ({"num_steps": 1}, "num_steps"),
    ({"num_steps": 10.5}, "num_steps"),
    ({"mode": "cosine"}, "mode: got 'cosine'; allowed: exp, linear"),
    ({"smoothing": 1.0}, "smoothing"),
    ({"smoothing": -0.1}, "smoothing"),
    ({"stop_factor": 1.0}, "stop_factor"),
])
def test_bad_arguments_name_the_field(digits32, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        range_test_batched(_cfg(), digits32, **kwargs)


@pytest.mark.parametrize("seeds, cfg, error, field", [
    ((), _cfg(), ValueError, "seeds: got none"),
    ((0, -1), _cfg(), ConfigError, "seed: got -1"),
    ((0, 1.5), _cfg(), ConfigError, "seed: got 1.5"),
    (SEEDS, _cfg("gains"), ValueError, "optim.name: got 'gains'"),
    (SEEDS, _cfg(lr_mult={"fc9": 2.0}), ConfigError, "optim.lr_mult: unknown layer 'fc9'"),
])
def test_bad_seeds_and_configs_name_the_field(digits32, seeds, cfg, error, field):
    with pytest.raises(error, match=field):
        range_test_batched(cfg, digits32, seeds, num_steps=5)
    with pytest.raises(error, match=field):
        range_test_seeds(cfg, digits32, seeds, batched=True, num_steps=5)


@pytest.mark.parametrize("batched", ["yes", 1, 0.0])
def test_batched_flag_must_be_bool_or_none(digits32, batched):
    with pytest.raises(ValueError, match="batched: got"):
        range_test_seeds(_cfg(), digits32, batched=batched, num_steps=5)


# The declared dispatch of range_test_seeds.

def _spy_batched(monkeypatch) -> list[tuple]:
    calls, real = [], rangetest_batched.range_test_batched
    monkeypatch.setattr(rangetest_batched, "range_test_batched",
                        lambda cfg, data, seeds, **o: calls.append(tuple(seeds))
                        or real(cfg, data, seeds, **o))
    return calls


@pytest.mark.parametrize("model, batching, want_batched", [
    ("mlp", "auto", False),  # an MLP on the CPU: no reliable gain, sequential
    ("softmax", "auto", True),  # not compute-bound: batched on the CPU too
    ("mlp", "on", True), ("softmax", "off", False)])
def test_dispatch_follows_the_declared_rule(f64, digits64, monkeypatch, model, batching,
                                            want_batched):
    calls = _spy_batched(monkeypatch)
    cfg = _cfg("adam", lr=0.01, lr_mult={"head": 2.0}).replace(
        batching=batching, **{"model.name": model})
    df = range_test_seeds(cfg, digits64, SEEDS, min_lr=1e-4, max_lr=0.3, num_steps=20)
    assert calls == ([SEEDS] if want_batched else [])
    assert_same_table(df, range_test_seeds(cfg, digits64, SEEDS, batched=False, min_lr=1e-4,
                                           max_lr=0.3, num_steps=20))


@pytest.mark.parametrize("cfg, seeds, batched", [
    (_cfg("gains").replace(batching="on"), SEEDS, None),  # the engine cannot batch it
    (_cfg("rprop", weight_decay=0.0).replace(batching="on"), SEEDS, None),
    (_cfg().replace(batching="on"), (4,), None),  # one seed
    (_cfg().replace(batching="on"), SEEDS, False),  # forced
])
def test_dispatch_runs_sequential_where_it_cannot_or_must_not_batch(digits32, monkeypatch, cfg,
                                                                    seeds, batched):
    calls = _spy_batched(monkeypatch)
    df = range_test_seeds(cfg, digits32, seeds, batched=batched, min_lr=1e-4, max_lr=0.1,
                          num_steps=8)
    assert calls == [] and sorted(df["seed"].unique()) == sorted(set(seeds))


def test_forced_batched_overrides_the_policy(digits32, monkeypatch):
    calls = _spy_batched(monkeypatch)
    range_test_seeds(_cfg().replace(batching="off"), digits32, SEEDS, batched=True, num_steps=8)
    assert calls == [SEEDS]
