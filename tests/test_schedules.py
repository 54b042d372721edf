"""Schedules: hand-computed values, torch.optim.lr_scheduler as oracle, invariants, real runs."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler as ls

from lrpipe.engine.config import SCHEDULES, ConfigError, ScheduleConfig
from lrpipe.engine.data import load_data
from lrpipe.engine.schedules import (
    check_budget,
    decay_horizon,
    decay_warning,
    derived_gamma,
    derived_inverse_k,
    lr_lambda,
    make_schedule,
    plateau_max_decay,
    preview,
    total_decay,
)
from lrpipe.engine.train import evaluate, train
from lrpipe.experiments.decay import default_schedules

torch.set_num_threads(1)
LR = 0.1


def _optimizer(groups: int = 1) -> torch.optim.SGD:
    """Plain SGD over dummy parameters; group g starts at LR x 10**g."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": LR * 10**g} for g, p in enumerate(params)],
                           lr=LR)


def _torch_rates(make, epochs: int, spe: int, per_batch: bool) -> list[float]:
    """Rate used by every update when torch's scheduler is stepped per batch or per epoch."""
    opt = _optimizer()
    sched = make(opt)
    rates = []
    for _ in range(epochs):
        for _ in range(spe):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_batch:
                sched.step()
        if not per_batch:
            sched.step()
    return rates


def _schedule_rates(cfg, epochs, spe, losses=None, groups=1) -> list[list[float]]:
    """Rates of every group at every update, driven through make_schedule like train() does."""
    opt = _optimizer(groups)
    sched = make_schedule(opt, cfg, epochs, spe)
    rates = []
    for epoch in range(epochs):
        for _ in range(spe):
            rates.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.after_batch()
        sched.after_epoch(losses[epoch] if losses else 1.0)
    return rates


def _lambda_rates(cfg, epochs, spe) -> list[float]:
    lam = lr_lambda(cfg, epochs, spe)
    return [LR * lam(i) for i in range(epochs * spe)]


def _close(a, b, rel=1e-9):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x == pytest.approx(y, rel=rel, abs=1e-15), f"update {i}: {x} != {y}"


# ---- hand-computed values --------------------------------------------------------------------

def test_step_by_hand():
    lam = lr_lambda(ScheduleConfig(name="step", step_size=2, gamma=0.5, per_batch=False), 6, 4)
    assert [lam(i) for i in (0, 7, 8, 15, 16, 23)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_derived_gamma_and_k_by_hand():
    per_epoch = dict(per_batch=False, final_decay=16.0)
    assert derived_gamma(ScheduleConfig(name="exponential", **per_epoch), 5, 3) == \
        pytest.approx(0.5)  # 4 decays of 0.5 from epoch 0 to epoch 4 (the last one used)
    assert derived_gamma(ScheduleConfig(name="exponential", final_decay=16.0), 5, 4) == \
        pytest.approx(16 ** (-1 / 4.75))  # per batch: the last update is at epoch 4.75
    assert derived_gamma(ScheduleConfig(name="step", step_size=2, **per_epoch), 5, 3) == \
        pytest.approx(0.25)  # decays at epochs 2 and 4
    assert derived_gamma(ScheduleConfig(name="cosine"), 5, 3) is None
    k = derived_inverse_k(ScheduleConfig(name="inverse_time", per_batch=False, final_decay=9.0),
                          5, 3)
    assert k == pytest.approx(2.0)  # 1 + 2 * 4 = 9
    lam = lr_lambda(ScheduleConfig(name="inverse_time", per_batch=False, final_decay=9.0), 5, 3)
    assert lam(3) == pytest.approx(1 / 3)


def test_cosine_and_warmup_by_hand():
    lam = lr_lambda(ScheduleConfig(name="cosine", per_batch=False, final_decay=100.0), 5, 3)
    assert lam(0) == 1.0
    assert lam(6) == pytest.approx(0.01 + 0.99 / 2)  # epoch 2 of a 4-epoch horizon
    assert lam(14) == pytest.approx(0.01)
    warm = lr_lambda(ScheduleConfig(name="constant", warmup_epochs=2, warmup_start=0.2), 4, 4)
    assert [warm(i) for i in (0, 2, 4, 8, 9)] == pytest.approx([0.2, 0.4, 0.6, 1.0, 1.0])


def test_onecycle_starts_peaks_and_ends_where_configured():
    cfg = ScheduleConfig(name="onecycle", warmup_epochs=2, warmup_start=0.04, final_decay=1e3)
    lam = lr_lambda(cfg, 10, 10)
    assert lam(0) == pytest.approx(0.04)
    assert lam(19) == pytest.approx(1.0)  # the rise ends at pct_start x 100 - 1
    assert lam(99) == pytest.approx(1e-3)


def test_per_batch_cosine_is_smooth_and_per_epoch_is_flat_within_an_epoch():
    smooth = _lambda_rates(ScheduleConfig(name="cosine"), 3, 5)
    flat = _lambda_rates(ScheduleConfig(name="cosine", per_batch=False), 3, 5)
    assert len(set(smooth[:5])) == 5
    assert len(set(flat[:5])) == 1 and len(set(flat)) == 3


# ---- oracles: torch's own schedulers ------------------------------------------------------

E, SPE = 7, 5
ORACLES = {
    "step": (dict(name="step", step_size=2, gamma=0.3),
             lambda o: ls.StepLR(o, step_size=2, gamma=0.3)),
    "multistep": (dict(name="multistep", milestones=(2, 5), gamma=0.1),
                  lambda o: ls.MultiStepLR(o, milestones=[2, 5], gamma=0.1)),
    "exponential": (dict(name="exponential", gamma=0.7),
                    lambda o: ls.ExponentialLR(o, gamma=0.7)),
    "cosine": (dict(name="cosine", final_decay=50.0),
               lambda o: ls.CosineAnnealingLR(o, T_max=E - 1, eta_min=LR / 50)),
}


@pytest.mark.parametrize("name", list(ORACLES))
def test_per_epoch_schedules_match_torch(name):
    fields, make = ORACLES[name]
    cfg = ScheduleConfig(per_batch=False, **fields)
    expected = _torch_rates(make, E, SPE, per_batch=False)
    _close(_lambda_rates(cfg, E, SPE), expected)
    _close([r[0] for r in _schedule_rates(cfg, E, SPE)], expected)


PER_BATCH = {
    "exponential": (dict(name="exponential", gamma=0.7),
                    lambda o: ls.ExponentialLR(o, gamma=0.7 ** (1 / SPE))),
    "cosine": (dict(name="cosine", final_decay=50.0),
               lambda o: ls.CosineAnnealingLR(o, T_max=E * SPE - 1, eta_min=LR / 50)),
    "onecycle": (dict(name="onecycle"),  # defaults: start lr/10, end lr/100, 30% rising
                 lambda o: ls.OneCycleLR(o, max_lr=LR, total_steps=E * SPE, pct_start=0.3,
                                         div_factor=10.0, final_div_factor=10.0,
                                         cycle_momentum=False)),
    "onecycle_warmup": (dict(name="onecycle", warmup_epochs=2, warmup_start=0.04,
                             final_decay=1e3),
                        lambda o: ls.OneCycleLR(o, max_lr=LR, total_steps=E * SPE,
                                                pct_start=2 / E, div_factor=25.0,
                                                final_div_factor=40.0, cycle_momentum=False)),
    "warmup_cosine": (dict(name="cosine", warmup_epochs=2, warmup_start=0.1, final_decay=20.0),
                      lambda o: ls.SequentialLR(o, [
                          ls.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=2 * SPE),
                          ls.CosineAnnealingLR(o, T_max=(E - 2) * SPE - 1, eta_min=LR / 20)],
                          milestones=[2 * SPE])),
}


@pytest.mark.parametrize("name", list(PER_BATCH))
def test_per_batch_schedules_match_torch(name):
    fields, make = PER_BATCH[name]
    cfg = ScheduleConfig(per_batch=True, **fields)
    expected = _torch_rates(make, E, SPE, per_batch=True)
    _close(_lambda_rates(cfg, E, SPE), expected)
    _close([r[0] for r in _schedule_rates(cfg, E, SPE)], expected)


def test_plateau_matches_reduce_lr_on_plateau():
    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.8, 0.85, 0.9, 0.91, 0.5]
    cfg = ScheduleConfig(name="plateau", patience=1, plateau_factor=0.2)
    opt = _optimizer()
    oracle = ls.ReduceLROnPlateau(opt, mode="min", factor=0.2, patience=1)
    expected = []
    for loss in losses:
        expected += [opt.param_groups[0]["lr"]] * 3
        oracle.step(loss)
    rates = [r[0] for r in _schedule_rates(cfg, len(losses), 3, losses)]
    _close(rates, expected)
    assert min(rates) < LR  # the oracle did decay: the comparison is not vacuous


@pytest.mark.parametrize("patience,warmup", [(0, 0.0), (1, 0.0), (2, 1.5), (1, 3.0)])
def test_plateau_max_decay_is_what_torch_reaches_when_loss_never_improves(patience, warmup):
    cfg = ScheduleConfig(name="plateau", patience=patience, plateau_factor=0.5,
                         warmup_epochs=warmup)
    rates = [r[0] for r in _schedule_rates(cfg, 9, 4, losses=[1.0] * 9)]
    assert max(rates) / rates[-1] == pytest.approx(plateau_max_decay(cfg, 9, 4))


# ---- invariants -----------------------------------------------------------------------------

ALL = {**{n: ScheduleConfig(name=n, milestones=(3,) if n == "multistep" else ())
          for n in SCHEDULES},
       "warmup_step": ScheduleConfig(name="step", warmup_epochs=1.5, step_size=2),
       "per_epoch_warmup_exp": ScheduleConfig(name="exponential", warmup_epochs=1,
                                              per_batch=False),
       "warmup_plateau": ScheduleConfig(name="plateau", warmup_epochs=1, patience=0)}


@pytest.mark.parametrize("name", list(ALL))
def test_group_ratios_hold_under_every_schedule(name):
    cfg = ALL[name]
    losses = [1.0, 0.9, 1.1, 1.2, 1.3, 1.4]  # makes plateau decay
    rates = _schedule_rates(cfg, 6, 5, losses, groups=2)
    for low, high in rates:
        assert high == pytest.approx(10 * low, rel=1e-12)
    if cfg.name != "plateau":
        _close([r[0] for r in rates], _lambda_rates(cfg, 6, 5), rel=1e-12)
    else:
        assert rates[-1][0] < rates[0][0] or cfg.warmup_epochs  # plateau did act


@pytest.mark.parametrize("name", ["step", "multistep", "exponential", "cosine", "inverse_time",
                                  "warmup_step", "per_epoch_warmup_exp"])
def test_decay_never_rises_after_warmup(name):
    cfg = ALL[name]
    lam = lr_lambda(cfg, 6, 5)
    start = math.ceil(cfg.warmup_epochs * 5)
    values = [lam(i) for i in range(start, 30)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))
    assert lam(start) == pytest.approx(1.0)


def test_rates_hold_past_the_budget_and_lambda_is_pure_and_picklable():
    for name in ("cosine", "onecycle"):
        cfg = ScheduleConfig(name=name)
        lam = lr_lambda(cfg, 3, 4)
        assert lam(11) == lam(12) == lam(1000)
        assert pickle.loads(pickle.dumps(lam))(5) == lam(5)
        opt = _optimizer()
        sched = make_schedule(opt, cfg, 3, 4)
        for _ in range(20):  # more updates than the budget: no error, rate stays
            opt.step()
            sched.after_batch()
        assert opt.param_groups[0]["lr"] == pytest.approx(LR * lam(11))


def test_total_decay_of_the_defaults_is_about_100_and_constant_warns():
    for name, cfg in default_schedules(epochs=10).items():
        decay = total_decay(cfg, 10, 47)
        if name == "constant":
            assert decay == 1.0 and "1x" in decay_warning(cfg, 10, 47)
        elif name == "plateau":
            assert decay is None and plateau_max_decay(cfg, 10, 47) == pytest.approx(1e4)
        else:
            assert decay == pytest.approx(100.0, rel=1e-3), name
            assert decay_warning(cfg, 10, 47) is None


def test_preview_matches_lambda_and_notes_plateau():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1)
    df = preview(cfg, 4, 10, base_lr=0.5)
    assert list(df.columns) == ["step", "epoch", "lr"] and len(df) == 40
    assert df["epoch"].iloc[15] == 1.5
    assert df["lr"].iloc[-1] == pytest.approx(0.5 / 100)
    plateau = preview(ScheduleConfig(name="plateau"), 4, 10)
    assert set(plateau["lr"]) == {1.0} and "validation" in plateau.attrs["note"]
    warn = decay_warning(ScheduleConfig(name="plateau", patience=5), 4, 10)
    assert warn is not None and "at most 1x" in warn


# ---- bad values ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields,field", [
    (dict(name="linear"), "schedule.name"),
    (dict(gamma=1.5), "schedule.gamma"),
    (dict(milestones=(5, 3)), "schedule.milestones"),
    (dict(plateau_factor=0.0), "schedule.plateau_factor"),
    (dict(warmup_start=0.0), "schedule.warmup_start"),
    (dict(final_decay=0.5), "schedule.final_decay"),
])
def test_bad_fields_raise_config_error(fields, field):
    with pytest.raises(ConfigError, match=field):
        ScheduleConfig(**fields)


@pytest.mark.parametrize("fields,epochs,field", [
    (dict(name="multistep", milestones=(2, 12)), 10, "schedule.milestones"),
    (dict(name="multistep"), 10, "schedule.milestones"),
    (dict(name="step", step_size=10), 10, "schedule.step_size"),
    (dict(name="cosine", warmup_epochs=10), 10, "schedule.warmup_epochs"),
    (dict(name="cosine", per_batch=False), 1, "schedule.warmup_epochs"),
    (dict(name="onecycle", warmup_epochs=12), 10, "schedule.warmup_epochs"),
    (dict(name="plateau", plateau_factor=1.0), 10, "schedule.plateau_factor"),
    (dict(name="constant"), 0, "epochs"),
])
def test_configs_that_do_not_fit_the_budget_raise(fields, epochs, field):
    with pytest.raises(ConfigError, match=field):
        check_budget(ScheduleConfig(**fields), epochs, 10)
    with pytest.raises(ConfigError, match=field):
        make_schedule(_optimizer(), ScheduleConfig(**fields), epochs, 10)


def test_plateau_has_no_lambda_and_train_rejects_unknown_names(digits_cfg):
    with pytest.raises(ConfigError, match="schedule.name.*cosine"):
        lr_lambda(ScheduleConfig(name="plateau"), 5, 10)
    with pytest.raises(ConfigError, match="schedule.name"):
        digits_cfg.replace(**{"schedule.name": "warm_restarts"})
    assert decay_horizon(ScheduleConfig(name="cosine", per_batch=False), 5, 10) == 4


# ---- small real runs ----------------------------------------------------------------------

RUNS = {n: {"schedule.name": n} for n in SCHEDULES}
RUNS["multistep"]["schedule.milestones"] = [1, 2]
RUNS["warmup_cosine"] = {"schedule.name": "cosine", "schedule.warmup_epochs": 1.0}
RUNS["per_epoch_step"] = {"schedule.name": "step", "schedule.step_size": 1,
                          "schedule.per_batch": False}


def _plateau_expected(history, base: float, factor: float, patience: int) -> list[float]:
    """Per-epoch rates replayed through torch's ReduceLROnPlateau on the run's val losses."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    oracle = ls.ReduceLROnPlateau(opt, factor=factor, patience=patience)
    rates = [base]
    for loss in history["val_loss"].iloc[1:]:
        rates.append(opt.param_groups[0]["lr"])
        oracle.step(loss)
    return rates


@pytest.mark.parametrize("name", list(RUNS))
def test_real_run_lr_column_matches_preview(digits_cfg, name):
    cfg = digits_cfg.replace(epochs=4, **{"optim.lr": 0.05, "optim.lr_mult": {"head": 3.0}},
                             **RUNS[name])
    result = train(cfg)
    # Trained to the end. inverse_time's rate falls 26x within epoch 1 (lr 0.05 -> 0.0019):
    # the run barely learns (val error 0.93 -> 0.89) and ends no_progress, which is right.
    assert result.status == ("no_progress" if name == "inverse_time" else "ok")
    spe = len(result.lr_trace) // cfg.epochs
    curve = preview(cfg.schedule, cfg.epochs, spe, base_lr=cfg.optim.lr)["lr"].tolist()
    hist = result.history["lr"].tolist()
    expected = [curve[0]] + [curve[(e - 1) * spe] for e in range(1, cfg.epochs + 1)]
    if name == "plateau":
        expected = _plateau_expected(result.history, 0.05, 0.1, 1)
        assert hist == pytest.approx(expected, rel=1e-12)
        return
    assert hist == pytest.approx(expected, rel=1e-12)
    assert result.lr_trace == pytest.approx(curve, rel=1e-12)


def test_mse_and_cross_entropy_runs_both_report_cross_entropy_and_error(digits_cfg):
    cfg = digits_cfg.replace(epochs=3, **{"optim.lr": 0.05, "schedule.name": "cosine"})
    for loss in ("cross_entropy", "mse"):
        result = train(cfg.replace(loss=loss), keep_model=True)
        h = result.history
        assert result.status == "ok", loss
        assert h["val_error"].iloc[-1] < h["val_error"].iloc[0], loss
        assert h["val_error"].between(0, 1).all()
        val = load_data(cfg.data).val
        ce, err = evaluate(result.model, val)
        with torch.no_grad():
            logits = result.model.eval()(val.x)
        assert h["val_loss"].iloc[-1] == pytest.approx(ce, rel=1e-6)
        assert ce == pytest.approx(float(F.cross_entropy(logits, val.y)), rel=1e-5), loss
        assert h["val_error"].iloc[-1] == pytest.approx(err)
