"""The halving ladder trained a window of rungs at a time: the same ladder and choice as the
one-rung-at-a-time search, on real digits (batched against train(), float64 as in
test_batched) and with stand-ins that count the calls; the declared window rule.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lrpipe.engine import many
from lrpipe.engine.batched import train_batched
from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.train import TrainResult
from lrpipe.search.choose import halving_search, halving_window

torch.set_num_threads(1)




def make_cfg(model: str = "mlp", opt: str = "sgd", **changes) -> TrainConfig:
    cfg = TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                      model=ModelConfig(name=model, hidden=(16,)), optim=OptimConfig(name=opt),
                      batch_size=64, device="cpu", seed=3)
    return cfg.replace(**changes)


def batched_counting(sizes: list[int]):
    """train_many_fn forced to batch (whatever the policy says), recording window sizes."""
    def fn(cfgs, data):
        sizes.append(len(cfgs))
        assert len({c.seed for c in cfgs}) == 1  # rungs share a seed: one batch order
        return train_batched(cfgs, data)
    return fn


def table_many(outcomes: dict[float, float | None], sizes: list[int]):
    """train_many_fn replaced by a table: lr -> final train loss (None: diverged in epoch 1)."""
    def fn(cfgs, data):
        sizes.append(len(cfgs))
        out = []
        for cfg in cfgs:
            final = outcomes[cfg.optim.lr]
            rows = [dict(epoch=0, train_loss=2.0)] + ([] if final is None else
                                                      [dict(epoch=1, train_loss=final)])
            out.append(TrainResult(pd.DataFrame(rows), status="ok" if rows[1:] else "diverged",
                                   diverged_epoch=None if rows[1:] else 1))
        return out
    return fn


def assert_same_search(got, want) -> None:
    assert got.ladder["lr"].tolist() == want.ladder["lr"].tolist()
    assert got.ladder["diverged"].tolist() == want.ladder["diverged"].tolist()
    assert got.ladder["reason"].tolist() == want.ladder["reason"].tolist()
    np.testing.assert_allclose(got.ladder["loss"], want.ladder["loss"], rtol=1e-9,
                               equal_nan=True)
    assert got.chosen_lr == want.chosen_lr and got.reason == want.reason


# Real runs: batched windows against train() rung by rung.

# Measured ladders (float64, seed 3) at diverge_factor 10 (the old default, pinned here: it
# makes the first rungs diverge, which this test needs; at 1000 the mlp's lr 10 trains, to
# train loss 1.22, and its ladder stops at the third rung): mlp 100/10 steps: 5 diverged
# rungs, 3.125 stable, stop at 1.5625 ("final train loss > initial"): rung 7 of window 2.
# mlp 10/full: 5.0 is judged
# diverged by its loss, stop at 0.3125 (rung 6 of window 2). softmax 10/10: stop at 0.3125.
@pytest.mark.parametrize(("model", "start_lr", "max_steps", "rungs"), [
    ("mlp", 100.0, 10, 7), ("mlp", 10.0, None, 6), ("softmax", 10.0, 10, 6)])
def test_window_of_batched_rungs_gives_the_sequential_ladder(f64, digits64, model, start_lr,
                                                             max_steps, rungs):
    cfg = make_cfg(model, diverge_factor=10.0)
    want = halving_search(cfg, digits64, start_lr=start_lr, max_steps=max_steps)
    sizes: list[int] = []
    got = halving_search(cfg, digits64, start_lr=start_lr, max_steps=max_steps, window=4,
                         train_many_fn=batched_counting(sizes))
    assert_same_search(got, want)
    assert len(want.ladder) == rungs and rungs % 4 != 0  # the search stopped mid-window
    assert want.ladder["diverged"].iloc[0] and "stopped at lr" in want.reason
    assert sizes == [4, 4] and got.window == 4 and got.rungs_trained == 8
    assert want.window == 1 and want.rungs_trained == rungs


def test_window_larger_than_the_ladder_trains_it_in_one_call(f64, digits64):
    cfg = make_cfg("softmax")
    # 2.5, 1.25, 0.625: all stable, the loss falls at each (1.15, 0.45, 0.41): min_lr reached.
    want = halving_search(cfg, digits64, start_lr=2.5, min_lr=0.625, max_steps=10)
    sizes: list[int] = []
    got = halving_search(cfg, digits64, start_lr=2.5, min_lr=0.625, max_steps=10, window=8,
                         train_many_fn=batched_counting(sizes))
    assert_same_search(got, want)
    assert sizes == [3] and got.rungs_trained == 3 and "reached min_lr 0.625" in got.reason
    assert not got.ladder["diverged"].any()


def test_auto_window_follows_the_declared_rule_and_keeps_the_ladder(f64, digits64,
                                                                     monkeypatch):
    cfg = make_cfg("mlp")
    want = halving_search(cfg, digits64, start_lr=10.0, max_steps=10)
    calls = []
    real = many.train_batched
    monkeypatch.setattr(many, "train_batched",
                        lambda cfgs, data, **kw: calls.append(len(cfgs)) or real(cfgs, data))
    got = halving_search(cfg.replace(batching="on"), digits64, start_lr=10.0, max_steps=10,
                         window="auto")
    assert got.window == 4 and calls == [4, 4]  # the default train_many batched both windows
    assert_same_search(got, want)
    # auto: an MLP on the CPU trains rung by rung (make_cfg's default); so does batching off.
    slow = halving_search(cfg, digits64, start_lr=10.0, max_steps=10, window="auto")
    assert slow.window == 1 and calls == [4, 4]  # no batched call: train() rung by rung
    assert_same_search(slow, want)
    off = halving_search(cfg.replace(batching="off", **{"model.name": "softmax"}), digits64,
                         start_lr=10.0, max_steps=10, window="auto")
    assert off.window == 1 and calls == [4, 4]


# Stand-ins: which rungs are trained, in which calls.

def test_windows_after_the_stop_are_never_trained():
    # 8 rates from 8.0; 4.0 is the first stable rung, 2.0 does not lower its loss: stop there.
    outcomes = {8.0 / 2**k: 1.0 for k in range(8)} | {8.0: None, 4.0: 1.0, 2.0: 1.2, 1.0: 0.5}
    sizes: list[int] = []
    result = halving_search(make_cfg(), None, start_lr=8.0, min_lr=8.0 / 2**7, window=4,
                            train_many_fn=table_many(outcomes, sizes))
    assert sizes == [4]  # rates 1.0 .. 0.0625 never trained
    assert result.ladder["lr"].tolist() == [8.0, 4.0, 2.0]  # 1.0 trained, then discarded
    assert result.ladder["diverged"].tolist() == [True, False, False]
    assert result.chosen_lr == 4.0 and "stopped at lr 2: the loss no longer fell" in result.reason
    assert result.rungs_trained == 4


def test_last_window_is_what_remains_of_the_ladder():
    outcomes = {1.0 / 2**k: 1.0 - 0.1 * k for k in range(7)}  # every rung lowers the loss
    sizes: list[int] = []
    result = halving_search(make_cfg(), None, start_lr=1.0, min_lr=1 / 64, window=3,
                            train_many_fn=table_many(outcomes, sizes))
    assert sizes == [3, 3, 1] and len(result.ladder) == 7 and result.rungs_trained == 7
    assert result.chosen_lr == 1 / 64 and "reached min_lr" in result.reason


@pytest.mark.parametrize("window", [0, -2, 2.5, True, "4", None, "AUTO"])
def test_bad_window_names_window(window):
    with pytest.raises(ConfigError, match=r"window: got .*allowed: an integer >= 1"):
        halving_search(make_cfg(), None, window=window, train_many_fn=table_many({}, []))


def test_custom_train_fn_needs_train_many_fn_for_windows():
    with pytest.raises(ValueError, match="train_fn: a custom train_fn trains window=1 only"):
        halving_search(make_cfg(), None, window=2, train_fn=lambda c, d: None)


def test_train_many_fn_must_return_one_result_per_config():
    with pytest.raises(ValueError, match="train_many_fn: returned 1 results for 4 configs"):
        halving_search(make_cfg(), None, start_lr=1.0, window=4,
                       train_many_fn=lambda cfgs, d: table_many({1.0: 0.5}, [])(cfgs[:1], d))


# The declared window rule: max_window when the policy batches the rungs, else 1.

def test_halving_window_is_1_for_an_unbatchable_optimizer():
    rprop = make_cfg(opt="rprop", batching="on", **{"optim.weight_decay": 0.0})
    assert halving_window(rprop) == 1
    assert halving_window(make_cfg(opt="gains", batching="on"), max_window=8) == 1
    assert halving_window(make_cfg(batching="on"), max_window=1) == 1  # nothing to batch


@pytest.mark.parametrize(("model", "batching", "device", "max_window", "want"), [
    ("softmax", "auto", "cpu", 4, 4),  # not compute-bound on the CPU: batched
    ("mlp", "auto", "cpu", 4, 1),  # no reliable gain on a 2-core CPU: rung by rung
    ("cnn", "auto", "cpu", 4, 1),
    ("mlp", "auto", "cuda", 5, 5),  # every model on a GPU
    ("mlp", "on", "cpu", 2, 2),
    ("softmax", "off", "cpu", 4, 1),
])
def test_halving_window_follows_the_declared_rule(model, batching, device, max_window, want):
    cfg = make_cfg(model, "adam", batching=batching, device=device)
    assert all(halving_window(cfg, max_window=max_window) == want for _ in range(3))


@pytest.mark.parametrize("max_window", [0, 2.0, "4"])
def test_halving_window_bad_max_window(max_window):
    with pytest.raises(ConfigError, match="max_window"):
        halving_window(make_cfg(), max_window=max_window)
