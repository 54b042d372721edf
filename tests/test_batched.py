"""Batched training (engine.batched) against K separate train() runs, torch.optim and by hand.

Equality tests run in float64 (default dtype and data converted), where batched and separate
runs agree to ~1e-15: GEMMs of other shapes only reorder the sums. In float32 they drift
apart over an epoch (FIELD_NOTES), so the float32 test compares few steps at stable rates.
Even float64 trajectories part at rates beyond stability: measured on Fashion-MNIST softmax,
SGD lr 0.316, the weight gap grew from 1e-17 to 1e-1 in 150 steps (chaos, not a bug; at lr
0.1 it stayed below 1e-9). Hence digits, 2 epochs of 19 steps.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from lrpipe.engine import batched, many
from lrpipe.engine.batched import check_batchable, member_losses, train_batched
from lrpipe.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.data import Dataset, Split, load_data
from lrpipe.engine.many import batching_rule, group_batchable, plan_many, train_many, trains_batched
from lrpipe.engine.member_update import direction
from lrpipe.engine.members import Stacked
from lrpipe.engine.train import batch_loss, train

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
STABLE_LRS = {"sgd": (0.05, 0.2, 0.5), "momentum": (0.01, 0.05, 0.1),
              "nesterov": (0.01, 0.05, 0.1), "adagrad": (0.01, 0.05, 0.1),
              "rmsprop": (0.001, 0.003, 0.01), "adam": (0.001, 0.003, 0.01)}
TORCH_OPTIMIZERS = {"sgd": (torch.optim.SGD, {}),
                    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
                    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
                    "adagrad": (torch.optim.Adagrad, {}), "rmsprop": (torch.optim.RMSprop, {}),
                    "adam": (torch.optim.Adam, {})}
COMPARED = ["epoch", "train_loss", "val_loss", "train_error", "val_error", "lr"]


def base_cfg(model: str = "mlp", opt: str = "sgd", **changes) -> TrainConfig:
    cfg = TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                      model=ModelConfig(name=model, hidden=(16,)),
                      optim=OptimConfig(name=opt, lr=0.1, weight_decay=1e-3),
                      epochs=2, batch_size=64, device="cpu")
    return cfg.replace(**changes)


def assert_same_run(got, want, rtol=1e-10, atol=1e-12) -> None:
    assert got.status == want.status
    assert got.diverged_epoch == want.diverged_epoch
    assert list(got.history.columns) == list(want.history.columns)
    cols = [c for c in want.history.columns if c != "time_s"]  # all but the clock: ratio/* too
    np.testing.assert_allclose(got.history[cols].to_numpy(dtype=float),
                               want.history[cols].to_numpy(dtype=float), rtol=rtol, atol=atol)
    np.testing.assert_allclose(got.lr_trace, want.lr_trace, rtol=1e-12)


# Oracles: K separate train() runs.

@pytest.mark.parametrize("model", ["softmax", "mlp"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_batched_equals_separate_runs(f64, digits64, model, opt):
    cfgs = [base_cfg(model, opt, **{"optim.lr": lr}) for lr in STABLE_LRS[opt]]
    results = train_batched(cfgs, digits64)
    for cfg, got in zip(cfgs, results, strict=True):
        assert_same_run(got, train(cfg, digits64))
    finals = [r.history["train_loss"].iloc[-1] for r in results]
    assert len(set(finals)) == len(finals)  # the rates really differ per member


def test_single_member_equals_train(f64, digits64):
    cfg = base_cfg("mlp", "nesterov", **{"optim.lr": 0.05})
    assert_same_run(train_batched([cfg], digits64)[0], train(cfg, digits64))


def test_distinct_seeds_dropout_and_lr_mult_match_separate_runs(f64, digits64):
    base = base_cfg("mlp", "momentum", **{"model.dropout": 0.3,
                                          "optim.lr_mult": {"head": 2.0, "fc1": 0.5}})
    cfgs = [base.replace(**{"optim.lr": lr, "seed": s}) for lr, s in
            [(0.05, 0), (0.05, 1), (0.1, 2)]]
    for cfg, got in zip(cfgs, train_batched(cfgs, digits64), strict=True):
        assert_same_run(got, train(cfg, digits64))


def test_frozen_layer_stays_frozen_like_train(f64, digits64):
    cfgs = [base_cfg("mlp", "adam", **{"optim.lr": lr, "optim.lr_mult": {"fc1": 0.0}})
            for lr in (0.003, 0.01)]
    for cfg, got in zip(cfgs, train_batched(cfgs, digits64), strict=True):
        assert_same_run(got, train(cfg, digits64))


def test_cnn_goes_through_vmap_and_matches(f64, digits64):
    cfgs = [base_cfg("cnn", "sgd", epochs=1, **{"optim.lr": lr, "data.subset": 256})
            for lr in (0.05, 0.1)]
    small = load_data(cfgs[0].data, "cpu")
    small = Dataset(*(Split(s.x.double(), s.y) for s in (small.train, small.val, small.test)),
                    small.num_classes, small.input_shape, small.class_names)
    assert not batched.stacked_members(cfgs, small, torch.device("cpu")).linear_only
    for cfg, got in zip(cfgs, train_batched(cfgs, small), strict=True):
        assert_same_run(got, train(cfg, small))


def test_diverging_member_is_masked_and_others_unchanged(f64, digits64):
    cfgs = [base_cfg("mlp", "sgd", **{"optim.lr": lr}) for lr in (0.05, 1e4, 0.2)]
    results = train_batched(cfgs, digits64)
    for cfg, got in zip(cfgs, results, strict=True):
        assert_same_run(got, train(cfg, digits64))
    assert results[1].status == "diverged" and results[1].diverged_epoch == 1
    assert list(results[1].history["epoch"]) == [0]
    assert [r.status for r in (results[0], results[2])] == ["ok", "ok"]
    # Without the diverging member the survivors' numbers are identical.
    alone = train_batched([cfgs[0], cfgs[2]], digits64)
    for a, b in zip(alone, (results[0], results[2]), strict=True):
        pd.testing.assert_frame_equal(a.history[COMPARED], b.history[COMPARED])


@pytest.mark.parametrize("schedule", [
    {"schedule.name": "cosine", "schedule.warmup_epochs": 1},
    {"schedule.name": "onecycle"},
    {"schedule.name": "step", "schedule.step_size": 1, "schedule.per_batch": False},
])
def test_schedule_via_lr_lambda_matches_train(f64, digits64, schedule):
    from lrpipe.engine import schedules

    cfgs = [base_cfg("softmax", "momentum", epochs=3, **{"optim.lr": lr, **schedule})
            for lr in (0.05, 0.1)]
    if not hasattr(schedules, "lr_lambda"):
        with pytest.raises(ValueError, match="schedule"):
            train_batched(cfgs, digits64)
        pytest.skip("lrpipe.engine.schedules.lr_lambda not there yet: only constant is batchable")
    results = train_batched(cfgs, digits64)
    for cfg, got in zip(cfgs, results, strict=True):
        assert_same_run(got, train(cfg, digits64))
    assert len(set(results[0].lr_trace)) > 1  # the rate really moved


def test_members_may_differ_in_schedule(f64, digits64):
    from lrpipe.engine import schedules

    if not hasattr(schedules, "lr_lambda"):
        pytest.skip("lrpipe.engine.schedules.lr_lambda not there yet")
    cfgs = [base_cfg("mlp", "adam", **{"optim.lr": 0.01, "schedule.name": name})
            for name in ("constant", "cosine", "exponential")]
    for cfg, got in zip(cfgs, train_batched(cfgs, digits64), strict=True):
        assert_same_run(got, train(cfg, digits64))


def test_float32_few_steps_agree_within_tolerance(digits32):
    # float32: GEMMs of another shape sum in another order; 2 epochs at stable rates stay
    # within 1e-4 relative in loss here, and the errors agree within one example.
    cfgs = [base_cfg("mlp", "sgd", **{"optim.lr": lr}) for lr in (0.05, 0.1)]
    for cfg, got in zip(cfgs, train_batched(cfgs, digits32), strict=True):
        want = train(cfg, digits32).history
        np.testing.assert_allclose(got.history["train_loss"], want["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(got.history["val_error"], want["val_error"], atol=1 / 300)


# Invariants and contract.

def test_histories_have_train_columns_and_hook_sees_every_row(digits32):
    cfgs = [base_cfg("softmax", **{"optim.lr": lr}) for lr in (0.1, 0.3)]
    seen: list[tuple[int, int]] = []
    results = train_batched(cfgs, digits32, on_epoch=lambda k, row: seen.append((k,
                                                                                 row["epoch"])))
    want = train(cfgs[0], digits32).history.columns
    for r in results:
        assert list(r.history.columns) == list(want)
        assert list(r.history["epoch"]) == [0, 1, 2]
        assert (r.history["time_s"].diff().dropna() > 0).all()
        assert r.model is None and r.final()["status"] == "ok"
    assert sorted(seen) == [(k, e) for k in range(2) for e in range(3)]


@pytest.mark.parametrize("change, field", [
    ({"optim.momentum": 0.5}, "optim.momentum"),
    ({"batch_size": 32}, "batch_size"),
    ({"model.hidden": (8,)}, "model.hidden"),
    ({"optim.name": "adam"}, "optim.name"),
    ({"epochs": 3}, "epochs"),
])
def test_members_differing_in_other_fields_raise(change, field):
    with pytest.raises(ValueError, match=field):
        check_batchable([base_cfg(), base_cfg(**change)])


@pytest.mark.parametrize("change, field", [
    ({"optim.name": "rprop", "optim.weight_decay": 0.0}, "optim.name"),
    ({"optim.name": "gains"}, "optim.name"),
    ({"schedule.name": "plateau"}, "schedule.name"),
])
def test_unbatchable_configs_raise(change, field):
    with pytest.raises(ValueError, match=field):
        check_batchable([base_cfg(**change)] * 2)
    with pytest.raises(ValueError, match="empty"):
        check_batchable([])


def test_lr_and_seed_may_differ():
    check_batchable([base_cfg(), base_cfg(seed=3, **{"optim.lr": 0.7})])


# Hand-computed values and torch.optim oracles for the update math.

def test_member_losses_by_hand():
    logits = torch.zeros(2, 3, 4)  # uniform over 4 classes: cross-entropy log 4
    y = torch.tensor([0, 1, 3])
    assert torch.allclose(member_losses(logits, y, "cross_entropy"), torch.full((2,),
                                                                                math.log(4)))
    # mse: sum of squared errors per example / B = (1 + 0 + 0 + 0) for zero logits.
    assert torch.allclose(member_losses(logits, y, "mse"), torch.ones(2))
    rand = torch.randn(2, 3, 4)
    for k in range(2):
        for loss in ("cross_entropy", "mse"):
            assert torch.allclose(member_losses(rand, y, loss)[k], batch_loss(rand[k], y, loss))


def test_sgd_step_by_hand():
    p, g = torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0], [2.0]])
    d, scale = direction(OptimConfig(name="sgd", lr=1.0), p, g, {}, step=1)
    rates = torch.tensor([[0.1], [0.5]])
    assert torch.allclose(p - rates * scale * d, torch.tensor([[0.8], [0.0]]))


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_update_math_matches_torch_optim(f64, opt):
    gen = torch.Generator().manual_seed(0)
    lrs, wd = (0.1, 0.03), 0.01
    cfg = OptimConfig(name=opt, lr=1.0, weight_decay=wd)
    p0 = torch.randn(2, 5, 3, generator=gen)
    grads = [torch.randn(2, 5, 3, generator=gen) for _ in range(4)]
    p, state = p0.clone(), {}
    for t, g in enumerate(grads, start=1):
        d, scale = direction(cfg, p, g, state, t)
        p -= torch.tensor(lrs).view(2, 1, 1) * scale * d
    for k, lr in enumerate(lrs):
        ref = torch.nn.Parameter(p0[k].clone())
        cls, kw = TORCH_OPTIMIZERS[opt]
        torch_opt = cls([ref], lr=lr, weight_decay=wd, **kw)
        for g in grads:
            ref.grad = g[k].clone()
            torch_opt.step()
        torch.testing.assert_close(p[k], ref.detach(), rtol=1e-12, atol=1e-14)


# The declared rule and the entry point.

@pytest.mark.parametrize("batching, model, device, want", [
    ("auto", "softmax", "cpu", True),  # not compute-bound: 4.4-5x faster batched
    ("auto", "mlp", "cpu", False),  # 0.7-1.3x on a 2-core CPU: no reliable gain
    ("auto", "cnn", "cpu", False),
    ("auto", "mlp", "cuda", True),  # every model on a GPU
    ("auto", "cnn", "cuda:1", True),
    ("on", "mlp", "cpu", True),
    ("on", "cnn", "cpu", True),
    ("off", "softmax", "cpu", False),
    ("off", "mlp", "cuda", False),
])
def test_batching_rule_by_hand(batching, model, device, want):
    assert batching_rule(base_cfg(model, batching=batching, device=device)) is want
    assert batching_rule(base_cfg(model, batching=batching), device) is want  # device given


def test_batching_rule_reads_the_configs_device():
    assert batching_rule(base_cfg("softmax")) is True  # device="cpu" in base_cfg
    assert batching_rule(base_cfg("mlp")) is False
    auto = base_cfg("mlp", device="auto")
    assert batching_rule(auto) is torch.cuda.is_available()


def test_trains_batched_needs_two_batchable_members_and_the_rule():
    two = [base_cfg("softmax", **{"optim.lr": lr}) for lr in (0.1, 0.2)]
    assert trains_batched(two)
    assert not trains_batched(two[:1])  # one member: nothing to batch
    assert not trains_batched([c.replace(batching="off") for c in two])
    assert not trains_batched([c.replace(**{"model.name": "mlp"}) for c in two])  # auto, CPU
    assert trains_batched([c.replace(batching="on", **{"model.name": "mlp"}) for c in two])
    rprop = [c.replace(**{"optim.name": "rprop", "optim.weight_decay": 0.0}, batching="on")
             for c in two]
    assert not trains_batched(rprop)  # on does not make rprop batchable
    assert not trains_batched([two[0], two[1].replace(batching="on")])  # they must share it


def test_group_batchable_groups_only_compatible_configs():
    cfgs = [base_cfg(**{"optim.lr": 0.1}), base_cfg(**{"optim.name": "adam"}),
            base_cfg(**{"optim.lr": 0.3}, seed=2), base_cfg(**{"optim.name": "gains"}),
            base_cfg(**{"optim.name": "gains"})]
    assert group_batchable(cfgs) == [[0, 2], [1], [3], [4]]
    off = [base_cfg(**{"optim.lr": 0.1}), base_cfg(batching="off"), base_cfg(**{"optim.lr": 0.2})]
    assert group_batchable(off) == [[0, 2], [1]]  # members of one group share batching


@pytest.mark.parametrize("model, batching, want_batched", [
    ("softmax", "auto", True), ("mlp", "auto", False), ("mlp", "on", True),
    ("softmax", "off", False)])
def test_train_many_follows_the_declared_rule(digits32, monkeypatch, model, batching,
                                              want_batched):
    calls = []
    real = many.train_batched
    monkeypatch.setattr(many, "train_batched",
                        lambda cfgs, data, **kw: calls.append(len(cfgs)) or real(cfgs, data, **kw))
    cfgs = [base_cfg(model, batching=batching, **{"optim.lr": lr}) for lr in (0.3, 0.1)]
    cfgs.append(base_cfg(model, "rprop", batching=batching,
                         **{"optim.lr": 0.01, "optim.weight_decay": 0.0}))
    rows = []
    results = train_many(cfgs, digits32, on_epoch=lambda i, row: rows.append(i))
    assert calls == ([2] if want_batched else [])
    assert sorted(rows) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for cfg, got in zip(cfgs, results, strict=True):
        want = train(cfg, digits32).history
        np.testing.assert_allclose(got.history["val_loss"], want["val_loss"], rtol=1e-4)


def test_plan_many_is_what_train_many_follows(digits32):
    cfgs = [base_cfg("softmax", **{"optim.lr": lr}) for lr in (0.3, 0.1)]
    cfgs.append(base_cfg("softmax", "rprop", **{"optim.lr": 0.01, "optim.weight_decay": 0.0}))
    assert plan_many(cfgs) == [([0, 1], True), ([2], False)]
    # A given plan is followed as is: here nothing batched, so every run is train()'s.
    results = train_many(cfgs[:2], digits32, plan=[([1], False), ([0], False)])
    for cfg, got in zip(cfgs, results, strict=False):
        pd.testing.assert_frame_equal(got.history.drop(columns="time_s"),
                                      train(cfg, digits32).history.drop(columns="time_s"))
    with pytest.raises(ValueError, match="plan: got"):
        train_many(cfgs[:2], digits32, plan=[([0, 0], False)])


def test_the_plan_is_the_same_on_every_call():
    """Declared, not raced: nothing timed, so the same configs plan the same work each time."""
    cfgs = [base_cfg(m, **{"optim.lr": lr}) for m in ("softmax", "mlp") for lr in (0.1, 0.2)]
    cfgs.append(base_cfg("mlp", batching="on", **{"optim.lr": 0.3}))
    cfgs.append(base_cfg("mlp", batching="on", **{"optim.lr": 0.4}))
    want = [([0, 1], True), ([2, 3], False), ([4, 5], True)]
    assert all(plan_many(cfgs) == want for _ in range(5))


def test_squared_error_divergence_is_judged_in_its_own_units(f64, digits64):
    """As train(): a batch's squared error is compared with diverge_factor x the initial
    squared error (1.72 here), not x the initial cross-entropy (2.32). At factor 1.05 the first
    batches' squared error (above 1.81, below 2.44) tells the two apart: train() stops every
    run; judged against cross-entropy four of six would go on."""
    for factor, diverged in ((1.05, 6), (3.0, 1)):
        cfgs = [base_cfg(loss="mse", diverge_factor=factor, **{"optim.lr": lr})
                for lr in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4)]
        got = train_batched(cfgs, digits64)
        want = [train(c, digits64) for c in cfgs]
        assert [r.status for r in want].count("diverged") == diverged
        for g, w in zip(got, want, strict=True):
            assert_same_run(g, w, rtol=1e-8, atol=1e-10)


def test_training_stops_at_once_when_every_member_diverged(f64, digits64, monkeypatch):
    calls = []
    losses = Stacked.losses  # one call per step, the one where all diverged included
    monkeypatch.setattr(Stacked, "losses",
                        lambda self, *a, **k: calls.append(1) or losses(self, *a, **k))
    cfgs = [base_cfg(**{"optim.lr": lr}) for lr in (1e4, 1e5)]
    got = train_batched(cfgs, digits64)
    want = [train(c, digits64) for c in cfgs]
    assert [r.status for r in got] == ["diverged", "diverged"]
    for g, w in zip(got, want, strict=True):
        assert_same_run(g, w)
    # 19 steps an epoch: stopping at the end of the epoch would have taken 19 calls.
    assert len(calls) == max(len(w.lr_trace) for w in want) < 5
