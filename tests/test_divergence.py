"""How a run ends (issue 22 items 3-4, issue 27 item 7): divergence means divergence, a run that
ends near chance is ``no_progress``, and the smoothed batch loss every N steps on request.

The loop's rules are checked by hand on scripted members (``Scripted``: batch losses and
evaluations written down, so every threshold is a hand computation), then on real training
(digits) through train() and train_batched(), which must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from lrpipe.engine.batched import train_batched
from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from lrpipe.engine.data import Split
from lrpipe.engine.loop import STEP_COLUMNS, STEP_LOSS_BETA, fit, made_no_progress
from lrpipe.engine.members import OneModel
from lrpipe.engine.train import train

STEPS = 4  # updates per epoch of a scripted run
TRAIN_EVAL, VAL = Split(torch.zeros(1, 1), torch.zeros(1)), Split(torch.ones(1, 1), torch.ones(1))


class Scripted:
    """K members whose batch losses (K, steps) and evaluations are given: epoch e's
    evaluated (train loss, val loss, val error) of member k is ``evals[e][k]``."""

    def __init__(self, batch_losses: list[list[float]], evals: list[list[tuple]]) -> None:
        self.script = torch.tensor(batch_losses, dtype=torch.float32)
        self.k, self.device = self.script.shape[0], torch.device("cpu")
        self.evals, self.step, self.epoch = evals, 0, 0
        self.updated: list[list[bool]] = []  # which members each update applied to

    def base_rates(self) -> list[float]:
        return [0.1] * self.k

    def group_lrs(self, base_rates):
        return {}

    def losses(self, x, y, shared):
        self.step += 1
        return self.script[:, self.step - 1]

    def update(self, alive, step_in_epoch, rates=None):
        self.updated.append(alive.tolist())

    def evaluate(self, split):
        rows = self.evals[self.epoch]
        if split is VAL:
            self.epoch += 1
            return [r[1] for r in rows], [r[2] for r in rows]
        return [r[0] for r in rows], [r[2] for r in rows]

    def ratio_means(self):
        return {}

    def after_epoch(self, val_losses):
        pass


def run_script(batch_losses, evals, *, diverge_factor=1000.0, no_progress=None, log_every=0):
    epochs = len(evals) - 1
    members = Scripted(batch_losses, evals)
    results = fit(members, lambda: [(torch.zeros(1), torch.zeros(1), True)] * STEPS,
                  epochs=epochs, train_eval=TRAIN_EVAL, val=VAL, loss="cross_entropy",
                  diverge_factor=diverge_factor, no_progress=no_progress, log_every=log_every,
                  steps_per_epoch=STEPS)
    return results, members


def learning(epochs: int) -> list[list[tuple]]:
    """One member whose evaluations fall from 2.0 (error 0.9) to well below."""
    return [[(2.0 / (e + 1), 2.0 / (e + 1), 0.9 / (e + 1))] for e in range(epochs + 1)]


# --- divergence -------------------------------------------------------------------------------

def test_a_finite_oscillating_run_is_trained_to_its_last_epoch():
    # Initial (epoch-0 evaluated) training loss 2.0; batches swing between 2 and 1800 (900x),
    # the evaluated losses between 2 and 1500: finite, under 1000 x 2.0, so it trains on.
    swing = [[2.0, 1800.0] * 6]
    evals = [[(2.0, 2.0, 0.9)], [(1500.0, 1400.0, 0.5)], [(2.5, 2.4, 0.3)], [(1.0, 1.0, 0.2)]]
    (result,), members = run_script(swing, evals)
    assert result.status == "ok" and result.diverged_epoch is None
    assert list(result.history["epoch"]) == [0, 1, 2, 3]
    assert len(members.updated) == 12 and all(u == [True] for u in members.updated)
    # The old cut-off (10 x) stopped it at its second batch, that batch not applied.
    (old,), members = run_script(swing, evals, diverge_factor=10.0)
    assert (old.status, old.diverged_epoch, len(old.lr_trace)) == ("diverged", 1, 2)
    assert len(members.updated) == 1 and list(old.history["epoch"]) == [0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_batch_loss_stops_the_run_whatever_the_factor(bad):
    losses = [[2.0] * 5 + [bad] + [2.0] * 6]  # step 6: epoch 2's second batch
    for factor in (1000.0, 1e300):  # 1e300 x 2.0 is inf in float32: non-finite still stops
        (result,), members = run_script(losses, learning(3), diverge_factor=factor)
        assert (result.status, result.diverged_epoch) == ("diverged", 2)
        assert list(result.history["epoch"]) == [0, 1]  # the last finite epoch is kept
        assert len(result.lr_trace) == 6 and len(members.updated) == 5


def test_a_runaway_loss_above_the_factor_stops_and_just_below_does_not():
    # Initial 2.0, factor 1000: the limit is 2000.
    (over,), _ = run_script([[2.0] * 6 + [2000.5] + [2.0] * 5], learning(3))
    (under,), _ = run_script([[2.0] * 6 + [1999.5] + [2.0] * 5], learning(3))
    assert (over.status, over.diverged_epoch, len(over.lr_trace)) == ("diverged", 2, 7)
    assert (under.status, list(under.history["epoch"])) == ("ok", [0, 1, 2, 3])


def test_an_evaluated_training_loss_above_the_factor_ends_the_run_at_that_epoch():
    evals = [[(2.0, 2.0, 0.9)], [(1.0, 1.0, 0.5)], [(2001.0, 3.0, 0.9)], [(1.0, 1.0, 0.2)]]
    (result,), _ = run_script([[2.0] * 12], evals)
    assert (result.status, result.diverged_epoch) == ("diverged", 2)
    assert list(result.history["epoch"]) == [0, 1]


def test_diverge_factor_is_configurable_and_checked():
    assert TrainConfig().diverge_factor == 1000.0
    assert TrainConfig(diverge_factor=50.0).hash() != TrainConfig().hash()
    with pytest.raises(ConfigError, match="diverge_factor: got 1.0"):
        TrainConfig(diverge_factor=1.0)


# --- no_progress ------------------------------------------------------------------------------

def test_a_run_that_ends_near_its_start_is_no_progress_and_a_learning_one_is_not():
    # (train loss, val loss, val error) per epoch; members: near chance, learned, overconfident
    # but accurate (cross-entropy up 2.5x, error down to a fifth), near chance by loss only.
    evals = [[(2.3, 2.3, 0.9)] * 4,
             [(2.2, 2.2, 0.85), (1.0, 1.0, 0.3), (3.0, 3.0, 0.4), (2.0, 2.0, 0.5)],
             [(2.1, 2.1, 0.8), (0.5, 0.5, 0.15), (5.75, 5.75, 0.18), (1.7, 1.7, 0.2)]]
    results, _ = run_script([[2.3] * 8] * 4, evals, no_progress=(0.7, 0.5))
    # 2.1 >= 0.7 x 2.3 = 1.61 and 0.8 >= 0.5 x 0.9 = 0.45; 0.5 < 1.61; 0.18 < 0.45; 0.2 < 0.45.
    assert [r.status for r in results] == ["no_progress", "ok", "ok", "ok"]
    assert results[0].final()["status"] == "no_progress"
    assert list(results[0].history["epoch"]) == [0, 1, 2]  # trained and drawn to the end
    off, _ = run_script([[2.3] * 8] * 4, evals)
    assert [r.status for r in off] == ["ok"] * 4  # no_progress=None: the rule is off


def test_a_diverged_run_stays_diverged_not_no_progress():
    evals = [[(2.3, 2.3, 0.9)], [(2.3, 2.3, 0.9)], [(2.3, 2.3, 0.9)]]
    (result,), _ = run_script([[2.3, 2.3, 2.3, 2.3, math.nan, 2.3, 2.3, 2.3]], evals,
                              no_progress=(0.7, 0.5))
    assert result.status == "diverged"


def test_made_no_progress_by_hand():
    history = pd.DataFrame({"epoch": [0, 1], "val_loss": [2.0, 1.4], "val_error": [0.8, 0.4]})
    assert made_no_progress(history, 0.7, 0.5)  # 1.4 >= 1.4 and 0.4 >= 0.4: at the bounds
    assert not made_no_progress(history, 0.71, 0.5)
    assert not made_no_progress(history, 0.7, 0.51)
    user_loss = history.assign(val_error=math.nan)  # a user's loss without an error
    assert made_no_progress(user_loss, 0.7, 0.99) and not made_no_progress(user_loss, 0.8, 0.1)
    assert not made_no_progress(history.iloc[:1], 0.7, 0.5)  # epoch 0 alone: nothing to judge


def test_no_progress_ratios_are_config_fields_checked_and_hashed():
    cfg = TrainConfig()
    assert cfg.no_progress == (0.7, 0.5)
    assert cfg.replace(no_progress_ratio=0.9).hash() != cfg.hash()
    assert cfg.replace(no_progress_error_ratio=0.9).hash() != cfg.hash()
    for name, bad in (("no_progress_ratio", 0.0), ("no_progress_ratio", 1.5),
                      ("no_progress_error_ratio", -0.1), ("no_progress_error_ratio", "0.5")):
        with pytest.raises(ConfigError, match=f"^{name}: got"):
            TrainConfig(**{name: bad})


# --- the step log -----------------------------------------------------------------------------

def ema_by_hand(losses: list[float], step: int, beta: float = STEP_LOSS_BETA) -> float:
    """The bias-corrected moving average at ``step`` (1-based) as a weighted mean: weight
    beta^(step - i) on the loss of step i."""
    weights = [beta ** (step - i) for i in range(1, step + 1)]
    return sum(w * v for w, v in zip(weights, losses[:step], strict=True)) / sum(weights)


def test_step_log_is_off_by_default_and_costs_no_read_back():
    (result,), _ = run_script([[2.0] * 8], learning(2))
    assert result.step_log.empty and list(result.step_log.columns) == list(STEP_COLUMNS)
    assert TrainConfig().log_every == 0


def test_step_log_every_n_steps_matches_the_hand_computed_average():
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
    # Member 1 stops at step 7 (NaN): its log ends at step 6, the NaN never enters it.
    stopped = losses[:6] + [math.nan] + losses[7:]
    (a, b), _ = run_script([losses, stopped], [[r[0]] * 2 for r in learning(3)], log_every=3)
    assert list(a.step_log["step"]) == [3, 6, 9, 12]
    np.testing.assert_allclose(a.step_log["epoch"], [0.75, 1.5, 2.25, 3.0])  # step / 4
    want = [ema_by_hand(losses, s) for s in (3, 6, 9, 12)]
    np.testing.assert_allclose(a.step_log["train_loss_smooth"], want, rtol=1e-12)
    # By hand at step 3: (0.98^2 x 1 + 0.98 x 2 + 3) / (0.98^2 + 0.98 + 1) = 1.98656...
    assert a.step_log["train_loss_smooth"].iloc[0] == pytest.approx(5.9204 / 2.9404, rel=1e-12)
    assert b.status == "diverged" and list(b.step_log["step"]) == [3, 6]
    np.testing.assert_allclose(b.step_log["train_loss_smooth"], want[:2], rtol=1e-12)


def test_step_log_needs_the_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        fit(Scripted([[2.0] * 4], learning(1)), lambda: [], epochs=1, train_eval=TRAIN_EVAL,
            val=VAL, loss="cross_entropy", diverge_factor=10.0, log_every=2)
    with pytest.raises(ConfigError, match="log_every: got -1"):
        TrainConfig(log_every=-1)


# --- real training: train() and train_batched() -------------------------------------------------

PER_EPOCH = 19  # digits: 1,200 training examples (after validation and test), batches of 64


def digits(**changes) -> TrainConfig:
    cfg = TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                      model=ModelConfig(name="mlp", hidden=(16,)), epochs=2, batch_size=64,
                      device="cpu")
    return cfg.replace(**changes)


def test_train_logs_the_smoothed_batch_loss_it_saw(monkeypatch):
    seen: list[float] = []
    losses = OneModel.losses

    def recorded(self, *args):
        out = losses(self, *args)
        seen.append(float(out[0]))
        return out

    monkeypatch.setattr(OneModel, "losses", recorded)
    result = train(digits(log_every=5))
    per_epoch = PER_EPOCH
    assert len(seen) == 2 * per_epoch
    steps = list(range(5, 2 * per_epoch + 1, 5))
    assert list(result.step_log["step"]) == steps
    np.testing.assert_allclose(result.step_log["epoch"], [s / per_epoch for s in steps])
    np.testing.assert_allclose(result.step_log["train_loss_smooth"],
                               [ema_by_hand(seen, s) for s in steps], rtol=1e-6)


def test_a_run_that_barely_moves_is_no_progress_and_one_that_learns_is_ok():
    slow, learns = train(digits(**{"optim.lr": 1e-5})), train(digits(**{"optim.lr": 0.1}))
    assert slow.status == "no_progress"  # the old code called it "ok"
    h = slow.history
    assert h["val_loss"].iloc[-1] >= 0.7 * h["val_loss"].iloc[0]
    assert list(h["epoch"]) == [0, 1, 2]
    assert learns.status == "ok"
    # From a given model (fine-tuning) epoch 0 is not chance: the rule does not apply.
    from lrpipe.engine.data import load_data
    from lrpipe.engine.models import make_model

    cfg = digits(**{"optim.lr": 1e-5})
    data = load_data(cfg.data, "cpu")
    given = make_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, "cpu")
    assert train(cfg, data, model=given).status == "ok"


def test_batched_and_single_runs_agree_on_status_and_step_log(f64, digits64):
    # One near chance (lr 1e-5), one learning (0.1), one blowing up (1e4).
    cfgs = [digits(log_every=7, **{"optim.lr": lr}) for lr in (1e-5, 0.1, 1e4)]
    got, want = train_batched(cfgs, digits64), [train(c, digits64) for c in cfgs]
    assert [r.status for r in want] == ["no_progress", "ok", "diverged"]
    for g, w in zip(got, want, strict=True):
        assert (g.status, g.diverged_epoch) == (w.status, w.diverged_epoch)
        pd.testing.assert_frame_equal(g.step_log, w.step_log, rtol=1e-9)
    assert len(want[1].step_log) == (2 * PER_EPOCH) // 7 and want[2].step_log.empty


def test_the_step_log_is_logged_as_its_own_metric_at_the_global_step(mlflow_store, monkeypatch):
    from lrpipe import tracking

    calls = []
    log_batch = tracking.MlflowClient.log_batch
    monkeypatch.setattr(tracking.MlflowClient, "log_batch",
                        lambda self, run_id, **kw: calls.append(len(kw["metrics"]))
                        or log_batch(self, run_id, **kw))
    steps = pd.DataFrame({"step": range(3, 7503, 3), "epoch": [s / 40 for s in range(3, 7503, 3)],
                          "train_loss_smooth": [1.0 / s for s in range(3, 7503, 3)]})
    run = tracking.start_run("step-log", "steps")
    tracking.log_step_losses(run, steps)
    tracking.log_step_losses(run, steps.iloc[:0])  # an empty log writes nothing
    assert calls == [1000, 1000, 500]  # 2,500 points, at most 1,000 per call
    history = tracking.client().get_metric_history(run, tracking.STEP_METRIC)
    assert tracking.STEP_METRIC == "train_loss_step"
    assert sorted(m.step for m in history) == list(range(3, 7503, 3))
    assert {m.step: m.value for m in history}[300] == pytest.approx(1 / 300)
    tracking.end_run(run)  # no test leaves a run RUNNING in the session's store
