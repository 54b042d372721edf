import pandas as pd
import pytest

from lrpipe.engine.train import METRICS, train


def test_history_has_epoch_zero_and_every_metric(digits_cfg):
    result = train(digits_cfg)
    h = result.history
    assert list(h["epoch"]) == [0, 1, 2]
    assert set(METRICS) <= set(h.columns)
    assert result.status == "ok"
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert h["val_error"].iloc[-1] < 0.5


def test_same_config_same_numbers(digits_cfg):
    a, b = train(digits_cfg).history, train(digits_cfg).history
    pd.testing.assert_frame_equal(a.drop(columns="time_s"), b.drop(columns="time_s"))


def test_other_seed_other_numbers(digits_cfg):
    a = train(digits_cfg).history
    b = train(digits_cfg.replace(seed=1)).history
    assert a["val_loss"].iloc[-1] != b["val_loss"].iloc[-1]


@pytest.mark.parametrize("lr", [1e4, 1e8])
def test_a_surely_diverging_rate_is_recorded_not_raised(digits_cfg, lr):
    result = train(digits_cfg.replace(**{"optim.lr": lr, "epochs": 3}))
    assert result.status == "diverged"
    assert result.diverged_epoch == 1
    assert list(result.history["epoch"]) == [0]  # the finite history is kept
    assert result.final()["status"] == "diverged"


def test_mse_loss_trains_and_reports_cross_entropy(digits_cfg):
    result = train(digits_cfg.replace(loss="mse", **{"optim.lr": 0.05}))
    h = result.history
    assert result.status == "ok"
    assert h["val_loss"].iloc[-1] < h["val_loss"].iloc[0]


def test_on_epoch_sees_every_row(digits_cfg):
    rows = []
    train(digits_cfg, on_epoch=rows.append)
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_batch_larger_than_data_is_refused(digits_cfg):
    with pytest.raises(ValueError, match="batch_size"):
        train(digits_cfg.replace(batch_size=5000))


def test_each_param_group_rate_is_a_history_column(digits_cfg):
    # lr 0.1, head x10, halved every epoch: the rate each group applied during each epoch.
    cfg = digits_cfg.replace(**{"optim.lr": 0.1, "optim.lr_mult": {"head": 10.0},
                                "schedule.name": "step", "schedule.gamma": 0.5,
                                "schedule.step_size": 1})
    h = train(cfg).history
    assert h["lr/fc1"].tolist() == pytest.approx([0.1, 0.1, 0.05])
    assert h["lr/head"].tolist() == pytest.approx([1.0, 1.0, 0.5])
    assert h["lr"].tolist() == pytest.approx(h["lr/fc1"].tolist())


def test_batched_members_log_the_same_group_rates(digits_cfg):
    from lrpipe.engine.batched import train_batched
    from lrpipe.engine.data import load_data

    cfgs = [digits_cfg.replace(**{"optim.lr": lr, "optim.lr_mult": {"fc1": 0.0, "head": 3.0}})
            for lr in (0.05, 0.2)]
    data = load_data(cfgs[0].data)
    for cfg, got in zip(cfgs, train_batched(cfgs, data), strict=True):
        want = train(cfg, data).history
        assert "lr/fc1" not in got.history  # frozen: no group, as make_optimizer makes none
        assert got.history["lr/head"].tolist() == pytest.approx(want["lr/head"].tolist())
        assert got.history["lr/head"].tolist() == pytest.approx([3 * cfg.optim.lr] * 3)
