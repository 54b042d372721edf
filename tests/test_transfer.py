"""Transfer learning: strategies as per-layer rates, transplant, gradual unfreezing, real runs.

Real runs use scikit-learn's digits: classes 0-4 are the source, 5-9 the target, 10 target
examples per class, a small MLP, one torch thread.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from lrpipe.engine.config import ConfigError, ModelConfig, OptimConfig
from lrpipe.engine.models import make_model
from lrpipe.engine.optim import make_optimizer
from lrpipe.engine.train import METRICS, train
from lrpipe.experiments.transfer import (
    STRATEGIES,
    TransferConfig,
    check_layer_mult,
    final_rows,
    finetune,
    grid_configs,
    grid_table,
    load_task,
    pretrain,
    run_strategies,
    source_config,
    strategy_lr_mult,
    summarize_strategies,
    target_config,
    transplant,
    unfreeze_plan,
)
from lrpipe.plots.transfer import plot_grid_heatmap, plot_head_mult, plot_strategy_curves

torch.set_num_threads(1)

TC = TransferConfig(
    dataset="digits", source_classes=(0, 1, 2, 3, 4), target_classes=(5, 6, 7, 8, 9),
    source_val_size=200, target_val_size=200, per_class=10, hidden=(32, 16),
    pretrain_lr=0.05, pretrain_epochs=4, pretrain_batch_size=32, base_lr=0.01, head_mult=10.0,
    discr_factor=2.0, finetune_epochs=4, batch_size=10, seeds=(0, 1), scratch_lr=0.05,
    head_mults=(1.0, 10.0), base_lrs=(0.003, 0.01), device="cpu",
)


@pytest.fixture(scope="module")
def pretrained():
    return pretrain(TC).model


@pytest.fixture(scope="module")
def target():
    return load_task(target_config(TC, "uniform", 0))


def fresh_mlp(seed: int = 0):
    return make_model(ModelConfig(hidden=(32, 16)), (1, 8, 8), 5, seed)


# --- strategies as data: hand-computed multipliers and the param groups they build ----------

def test_strategy_multipliers_hand_computed():
    model = fresh_mlp()
    expected = {
        "uniform": {"fc1": 1.0, "fc2": 1.0, "head": 1.0},
        "scratch": {"fc1": 1.0, "fc2": 1.0, "head": 1.0},
        "head_mult": {"fc1": 1.0, "fc2": 1.0, "head": 10.0},
        "frozen_backbone": {"fc1": 0.0, "fc2": 0.0, "head": 10.0},
        "discriminative": {"fc1": 2.5, "fc2": 5.0, "head": 10.0},  # 10 / 2**k
        "gradual_unfreeze": {"fc1": 2.5, "fc2": 5.0, "head": 10.0},
    }
    assert set(expected) == set(STRATEGIES)
    for strategy, mult in expected.items():
        assert strategy_lr_mult(strategy, model, TC) == mult


def test_param_groups_hold_each_layers_tensors_at_its_rate():
    model = fresh_mlp()
    optimizer = make_optimizer(model, target_config(TC, "discriminative", 0).optim)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["fc1", "fc2", "head"]
    for name, rate in (("fc1", 0.025), ("fc2", 0.05), ("head", 0.1)):
        layer = getattr(model, name)
        assert [id(p) for p in groups[name]["params"]] == [id(layer.weight), id(layer.bias)]
        assert groups[name]["lr"] == pytest.approx(rate, rel=1e-12)


def test_frozen_backbone_gets_no_update_after_a_real_step():
    model = fresh_mlp()
    optimizer = make_optimizer(model, target_config(TC, "frozen_backbone", 0).optim)
    assert [g["name"] for g in optimizer.param_groups] == ["head"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert not any(p.requires_grad for p in [*model.fc1.parameters(), *model.fc2.parameters()])
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 5
    for _ in range(2):  # the second step exercises momentum state too
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    after = model.state_dict()
    for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_one_step_matches_torch_sgd_with_hand_built_groups():
    """Oracle: our discriminative groups vs torch.optim.SGD given the rates by hand."""
    ours, ref = fresh_mlp(), fresh_mlp()
    optim = OptimConfig(name="sgd", lr=0.01,
                        lr_mult=strategy_lr_mult("discriminative", ours, TC))
    opt_ours = make_optimizer(ours, optim)
    opt_ref = torch.optim.SGD([
        {"params": list(ref.fc1.parameters()), "lr": 0.01 * 2.5},
        {"params": list(ref.fc2.parameters()), "lr": 0.01 * 5.0},
        {"params": list(ref.head.parameters()), "lr": 0.01 * 10.0},
    ], lr=0.01)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 5
    for model, opt in ((ours, opt_ours), (ref, opt_ref)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name


# --- bad input: names, signs, types, strategies ---------------------------------------------

@pytest.mark.parametrize("bad", [{"fc9": 1.0}, {"Head": 10.0}, {"fc_1": 0.5}])
def test_unknown_layer_name_lists_valid_names(bad):
    with pytest.raises(ConfigError, match=r"allowed: fc1, fc2, head"):
        check_layer_mult(fresh_mlp(), bad)


@pytest.mark.parametrize("bad", [{"head": -1.0}, {"fc1": float("nan")}, {"head": "10"}])
def test_bad_multiplier_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"lr_mult\["):
        check_layer_mult(fresh_mlp(), bad)


def test_typo_in_lr_mult_fails_in_a_real_run(target):
    cfg = target_config(TC, "uniform", 0).replace(**{"optim.lr_mult": {"haed": 10.0}})
    with pytest.raises(ConfigError, match="fc1, fc2, head"):
        train(cfg, target)


def test_bad_strategy_and_config_fields_are_named():
    with pytest.raises(ConfigError, match="strategy: got 'ulmfit'; allowed: uniform, head_mult"):
        strategy_lr_mult("ulmfit", fresh_mlp(), TC)
    with pytest.raises(ConfigError, match="head_mult: got -10"):
        TransferConfig(head_mult=-10)
    with pytest.raises(ConfigError, match="model: got 'softmax'; allowed: mlp, cnn"):
        TransferConfig(model="softmax")
    with pytest.raises(ConfigError, match="target_classes"):
        TransferConfig(target_classes=(1, 1, 5))
    with pytest.raises(ValueError, match="pretrained_model"):
        finetune(TC, "uniform", 0, None)


# --- configs and grids ---------------------------------------------------------------------

def test_source_and_target_configs():
    src = source_config(TC)
    assert src.data.classes == (0, 1, 2, 3, 4) and src.data.per_class is None
    assert (src.optim.lr, src.epochs, src.seed) == (0.05, 4, TC.pretrain_seed)
    tgt = target_config(TC, "head_mult", 7)
    assert tgt.data.classes == (5, 6, 7, 8, 9) and tgt.data.per_class == 10
    assert (tgt.optim.lr, tgt.epochs, tgt.seed, tgt.batch_size) == (0.01, 4, 7, 10)
    assert dict(tgt.optim.lr_mult) == {"fc1": 1.0, "fc2": 1.0, "head": 10.0}
    assert target_config(TC, "scratch", 0).optim.lr == 0.05
    assert grid_configs(TC) == [(0.003, 1.0), (0.003, 10.0), (0.01, 1.0), (0.01, 10.0)]


# --- transplant ----------------------------------------------------------------------------

def test_transplant_keeps_backbone_and_reinitializes_head(pretrained):
    snapshot = copy.deepcopy(pretrained.state_dict())
    a, b, a2 = transplant(pretrained, 3, 0), transplant(pretrained, 3, 0), transplant(
        pretrained, 3, 1)
    assert [n for n, _ in a.named_children()] == [n for n, _ in pretrained.named_children()]
    for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(a.state_dict()[key], pretrained.state_dict()[key])
        assert a.state_dict()[key].data_ptr() != pretrained.state_dict()[key].data_ptr()
    assert a.head.weight.shape == (3, 16)
    assert torch.equal(a.head.weight, b.head.weight)  # same seed, same head
    assert not torch.equal(a.head.weight, a2.head.weight)
    assert float(a.head.weight.detach().abs().max()) <= 1 / math.sqrt(16)  # PyTorch's default bound
    with torch.no_grad():
        a.fc1.weight.add_(1.0)  # training the copy must not touch the original
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


# --- gradual unfreezing --------------------------------------------------------------------

def test_unfreeze_plan_hand_computed():
    plan = unfreeze_plan(fresh_mlp(), TC)
    assert plan == [
        (1, {"fc1": 0.0, "fc2": 0.0, "head": 10.0}),
        (1, {"fc1": 0.0, "fc2": 5.0, "head": 10.0}),
        (2, {"fc1": 2.5, "fc2": 5.0, "head": 10.0}),
    ]
    short = unfreeze_plan(fresh_mlp(), dataclasses.replace(TC, finetune_epochs=1))
    assert short == [(1, {"fc1": 0.0, "fc2": 0.0, "head": 10.0})]


def test_gradual_history_is_continuous_and_unfrozen_set_grows(pretrained, target):
    tc = dataclasses.replace(TC, finetune_epochs=5)
    result = finetune(tc, "gradual_unfreeze", 0, pretrained, target, keep_model=True)
    hist = result.history
    assert result.status == "ok"
    assert hist["epoch"].tolist() == [0, 1, 2, 3, 4, 5]
    assert hist["trainable_layers"].tolist() == [1, 1, 2, 3, 3, 3]
    assert hist["time_s"].is_monotonic_increasing
    assert len(result.lr_trace) == 5 * 5  # 50 examples / batch 10, 5 epochs


def test_head_only_stage_leaves_backbone_untouched(pretrained, target):
    tc = dataclasses.replace(TC, finetune_epochs=1)
    result = finetune(tc, "gradual_unfreeze", 0, pretrained, target, keep_model=True)
    for name in ("fc1", "fc2"):
        assert torch.equal(getattr(result.model, name).weight, getattr(pretrained, name).weight)
    assert not torch.equal(result.model.head.weight, transplant(pretrained, 5, 0).head.weight)


# --- small real runs, summaries and figures ------------------------------------------------

def test_every_strategy_runs_on_digits(pretrained, target):
    df = run_strategies(TC, pretrained, target)
    assert set(df["strategy"]) == set(STRATEGIES)
    assert (df["status"] == "ok").all()
    assert set(METRICS) <= set(df.columns)
    for (_, _), run in df.groupby(["strategy", "seed"]):
        assert run["epoch"].tolist() == [0, 1, 2, 3, 4]
        assert run[list(METRICS)].map(math.isfinite).all().all()
    summary = summarize_strategies(df)
    assert summary["rank"].tolist() == list(range(1, 7))
    assert summary["mean"].is_monotonic_increasing
    # Transfer helps on digits: the best fine-tuning strategy beats chance (0.8) by far.
    assert summary["min"].min() < 0.5
    for fig in (plot_strategy_curves(df), plot_head_mult(df)):
        assert fig.axes and fig.axes[0].get_ylabel()
        plt.close(fig)


def test_summaries_hand_computed():
    rows = []
    for strategy, finals in (("a", (0.2, 0.4)), ("b", (0.1, 0.1))):
        for seed, final in enumerate(finals):
            mult = 1.0 if strategy == "a" else 10.0
            rows += [dict(strategy=strategy, seed=seed, epoch=epoch, val_error=error,
                          base_lr=0.01, head_mult=mult, status="ok")
                     for epoch, error in ((0, 0.9), (1, final))]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter
    summary = summarize_strategies(df)
    assert summary["strategy"].tolist() == ["b", "a"]
    a = summary.set_index("strategy").loc["a"]
    assert (a["mean"], a["min"], a["max"], a["seeds"]) == pytest.approx((0.3, 0.2, 0.4, 2))
    assert a["std"] == pytest.approx(math.sqrt(0.02))  # sample std of (0.2, 0.4)
    assert len(final_rows(df, ["strategy"])) == 4
    table = grid_table(df.drop(columns="strategy"))
    assert table.loc[0.01, 10.0] == pytest.approx(0.1)
    assert table.loc[0.01, 1.0] == pytest.approx(0.3)
    fig = plot_grid_heatmap(df)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(texts) == ["0.100", "0.300"]
    plt.close(fig)
    with pytest.raises(ValueError, match="missing columns"):
        plot_head_mult(df.drop(columns="base_lr"))
