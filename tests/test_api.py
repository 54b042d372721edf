"""The public API on a user's model: ``lrpipe.find_lr`` and ``lrpipe.choose_lr``.

1. Oracle: find_lr's rates and raw losses equal torch-lr-finder 0.2.2's on the same batches,
   fed a shuffling DataLoader (the same seed on both sides) and fed tensors (the batches
   lrpipe draws, written out with iterate_batches).
2. Invariants: model, optimizer (momentum buffers, step counts), gradients, BatchNorm buffers,
   train/eval mode, torch's global random state and a loader's generator are bit-identical
   after find_lr, also when loss_fn raises midway; the same call gives the same curves.
3. The answer: every rule's band, the suggestion = the chosen rule's median over seeds, group
   rates keep the optimizer's ratios, a model factory, the figure, MLflow logging.
4. Bad input: one-line errors naming the argument, raised before the model runs.
5. choose_lr end to end, on a classifier and on a regression net (loss-agnostic evaluation).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch_lr_finder import LRFinder

import lrpipe
from lrpipe.api.evaluation import is_classification, mean_loss_and_error
from lrpipe.engine.data import Split, iterate_batches
from lrpipe.search.suggest import RULES

torch.set_num_threads(1)


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits(digits32):
    """The digits training split as two tensors: x (1200, 1, 8, 8) float32, y (1200,) int64."""
    return digits32.train.x, digits32.train.y


# 1. Oracle: torch-lr-finder on the same batches ------------------------------------------

def finder_history(model, optimizer, loader, num_iter, min_lr=1e-4, max_lr=10.0):
    finder = LRFinder(model, optimizer, nn.CrossEntropyLoss())
    finder.range_test(loader, start_lr=min_lr, end_lr=max_lr, num_iter=num_iter,
                      step_mode="exp", smooth_f=0.0, diverge_th=4)
    return finder.history


def assert_same_curve(ours: pd.DataFrame, theirs: dict) -> None:
    """Same stop step, rates to an ulp (numpy's and Python's power round apart at a few
    steps, as tests/test_oracles.py explains), raw losses to float32 summation noise."""
    assert len(ours) == len(theirs["loss"]) == len(theirs["lr"])
    np.testing.assert_allclose(ours["lr"], theirs["lr"], rtol=4.5e-16, atol=0)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_find_lr_equals_torch_lr_finder_on_the_same_dataloader(digits, momentum):
    """A shuffling DataLoader: find_lr seeds torch's generator with the seed before the
    loader draws its order, so the finder, after torch.manual_seed(seed), sees the very same
    batches (60 steps: three passes of 19 batches, restarted on both sides)."""
    loader = DataLoader(TensorDataset(*digits), batch_size=64, shuffle=True)
    models = [mlp(0), mlp(0)]
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4, momentum=momentum) for m in models]
    found = lrpipe.find_lr(models[0], loader, F.cross_entropy, opts[0], seeds=[5],
                           min_lr=1e-4, max_lr=10.0, num_steps=60, smoothing=0.0)
    torch.manual_seed(5)
    theirs = finder_history(models[1], opts[1], loader, 60)
    assert found.curves["stop_reason"].iloc[0] == "diverged"  # both stopped at 4x the best
    assert_same_curve(found.curves, theirs)


def test_find_lr_equals_torch_lr_finder_on_tensors(digits):
    """Tensors: find_lr shuffles them with a generator seeded by the seed, one permutation a
    pass (iterate_batches); the finder gets those batches written out, pass after pass."""
    x, y = digits
    gen = torch.Generator().manual_seed(3)
    batches = [b for _ in range(3) for b in iterate_batches(Split(x, y), 64, gen)]
    models = [mlp(0), mlp(0)]
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in models]
    found = lrpipe.find_lr(models[0], (x, y), F.cross_entropy, opts[0], seeds=[3],
                           batch_size=64, min_lr=1e-4, max_lr=10.0, num_steps=50,
                           smoothing=0.0)
    theirs = finder_history(models[1], opts[1], DataLoader(batches, batch_size=None), 50)
    assert_same_curve(found.curves, theirs)


# 2. Invariants: the state find_lr changes is restored ------------------------------------

class Net(nn.Module):
    """Conv + BatchNorm (running buffers) + dropout: every kind of state a step changes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.norm(self.conv(x)))).flatten(1))


def warmed_up(digits) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and an Adam optimizer with state (moments, step counts) and grads, in eval mode,
    two param groups at a 10x ratio."""
    model = Net()
    opt = torch.optim.Adam([{"params": [*model.conv.parameters(), *model.norm.parameters()]},
                            {"params": model.head.parameters(), "lr": 1e-2}], lr=1e-3)
    for i in range(3):
        opt.zero_grad()
        F.cross_entropy(model(digits[0][i * 32:(i + 1) * 32]),
                        digits[1][i * 32:(i + 1) * 32]).backward()
        opt.step()
    model.eval()
    return model, opt


def snapshot(model, opt, loader) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "grads": [p.grad.clone() for p in model.parameters()], "training": model.training,
            "rng": torch.get_rng_state(), "loader": loader.generator.get_state()}


def assert_same_state(before: dict, after: dict) -> None:
    assert after["training"] == before["training"]
    assert list(after["model"]) == list(before["model"])
    for name, tensor in before["model"].items():
        assert torch.equal(after["model"][name], tensor), name
    for a, b in zip(after["grads"], before["grads"], strict=True):
        assert torch.equal(a, b)
    assert after["opt"]["param_groups"] == before["opt"]["param_groups"]
    for key, state in before["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(after["opt"]["state"][key][name], value), (key, name)
    assert torch.equal(after["rng"], before["rng"])
    assert torch.equal(after["loader"], before["loader"])


def test_find_lr_restores_everything_bit_for_bit(digits):
    model, opt = warmed_up(digits)
    loader = DataLoader(TensorDataset(*digits), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(11))
    before = snapshot(model, opt, loader)
    first = lrpipe.find_lr(model, loader, F.cross_entropy, opt, seeds=2, num_steps=30)
    assert_same_state(before, snapshot(model, opt, loader))
    again = lrpipe.find_lr(model, loader, F.cross_entropy, opt, seeds=2, num_steps=30)
    pd.testing.assert_frame_equal(first.curves, again.curves)  # seeded: reproducible
    one, other = (g["loss"].to_numpy() for _, g in first.curves.groupby("seed"))
    assert not np.array_equal(one[:20], other[:20])  # the seeds' orders really differ


def test_find_lr_restores_everything_when_loss_fn_raises(digits):
    model, opt = warmed_up(digits)
    loader = DataLoader(TensorDataset(*digits), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(11))
    before = snapshot(model, opt, loader)
    calls = []

    def flaky(output, y):
        calls.append(1)
        if len(calls) == 17:  # midway through the first seed, 16 updates applied
            raise RuntimeError("boom")
        return F.cross_entropy(output, y)

    with pytest.raises(RuntimeError, match="boom"):
        lrpipe.find_lr(model, loader, flaky, opt, seeds=2, num_steps=30)
    assert len(calls) == 17
    assert_same_state(before, snapshot(model, opt, loader))


# 3. The answer -----------------------------------------------------------------------------

def test_find_lr_answer_is_the_rules_median_over_seeds_with_group_ratios(digits):
    model = mlp(0)
    opt = torch.optim.SGD([{"params": model[1].parameters(), "name": "body"},
                           {"params": model[4].parameters(), "name": "head", "lr": 0.3}],
                          lr=0.1, momentum=0.9)
    found = lrpipe.find_lr(model, digits, F.cross_entropy, opt, seeds=3, min_lr=1e-4,
                           max_lr=3.0, num_steps=40)
    assert list(found.curves.columns) == ["seed", "step", "lr", "loss", "smoothed",
                                          "stop_reason"]
    assert sorted(found.curves["seed"].unique()) == [0, 1, 2]
    assert set(found.bands) == set(RULES)
    assert found.suggestion.rule == "valley" and found.band is found.bands["valley"]
    assert found.lr == found.band.median is not None
    assert found.band.lo <= found.lr <= found.band.hi
    assert len(found.band.per_seed) == 3
    assert found.group_rates == pytest.approx({"body": found.lr, "head": 3 * found.lr})
    assert "median over" in found.suggestion.reason
    assert isinstance(found.figure(), Figure)


def test_find_lr_other_rule_and_model_factory(digits):
    found = lrpipe.find_lr(mlp, digits, F.cross_entropy, seeds=[0, 1], num_steps=30,
                           min_lr=1e-3, max_lr=3.0, rule="min_over_10")
    assert found.suggestion.rule == "min_over_10" and found.lr == found.bands[
        "min_over_10"].median
    first = found.curves.groupby("seed")["loss"].first()
    assert first[0] != first[1]  # a fresh model per seed: another initial loss


def test_find_lr_with_a_callable_and_a_list_of_batches(digits):
    x, y = digits
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 1200, 100)]
    by_list = lrpipe.find_lr(mlp(0), batches, F.cross_entropy, seeds=1, num_steps=20)
    by_callable = lrpipe.find_lr(mlp(0), lambda: iter(batches), F.cross_entropy, seeds=1,
                                 num_steps=20)
    pd.testing.assert_frame_equal(by_list.curves, by_callable.curves)


def test_find_lr_says_why_there_is_no_suggestion(digits):
    def flat(output, y):  # depends on the output, never moves: no rule can read a rate off it
        return (output * 0).sum() + 1.0

    found = lrpipe.find_lr(mlp(0), digits, flat, seeds=2, num_steps=10)
    assert found.lr is None and found.group_rates == {}
    assert found.suggestion.reason.startswith("valley: no rate on any of 2 seeds (seed 0: ")
    assert all(band.median is None for band in found.bands.values())


def test_find_lr_logs_one_mlflow_run(mlflow_store, digits):
    from lrpipe import tracking

    found = lrpipe.find_lr(mlp(0), digits, F.cross_entropy, seeds=2, num_steps=25,
                           track="api-find-test")
    run = tracking.client().get_run(found.run_id)
    assert run.data.metrics["suggested_lr"] == pytest.approx(found.lr)
    assert run.data.tags["rule"] == "valley"
    assert run.data.params["num_steps"] == "25"
    history = tracking.client().get_metric_history(found.run_id, "range_test_smoothed/seed_1")
    assert len(history) == (found.curves["seed"] == 1).sum()
    files = {f.path for f in tracking.client().list_artifacts(found.run_id)}
    assert {"range_test_curves.csv", "suggestions_per_seed.csv", "figures"} <= files


# 4. Bad input ------------------------------------------------------------------------------

class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = mlp(0), 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def one_shot(digits):
    return iter([digits])


BAD = {
    "rows": (lambda d: (d[0], d[1][:-1]), {}, "data: got x a tensor of shape"),
    "int": (lambda d: 3, {}, "data: got an int; allowed: a DataLoader"),
    "one-shot": (one_shot, {}, "data: got a one-shot iterator"),
    "dataset": (lambda d: TensorDataset(*d), {}, "data: got a TensorDataset; .* \\(wrap a "
                "Dataset in a DataLoader\\)"),
    "batch_size with a loader": (lambda d: DataLoader(TensorDataset(*d), batch_size=8),
                                 {"batch_size": 8}, "batch_size: got 8; allowed: None"),
    "batch_size": (lambda d: d, {"batch_size": 0}, "batch_size: got 0"),
    "loss_fn": (lambda d: d, {"loss_fn": "mse"}, "loss_fn: got a str; allowed: a callable"),
    "optimizer": (lambda d: d, {"optimizer": torch.optim.SGD(mlp(1).parameters(), lr=0.1)},
                  "optimizer: holds parameters that are not the model's"),
    "seeds": (lambda d: d, {"seeds": [1, 1]}, "seeds: got \\[1, 1\\]"),
    "rule": (lambda d: d, {"rule": "best"}, "rule: got 'best'; allowed: steepest"),
    "max_lr": (lambda d: d, {"max_lr": 1e-9}, "max_lr: got 1e-09"),
    "smoothing": (lambda d: d, {"smoothing": 1.0}, "smoothing: got 1.0"),
    "track": (lambda d: d, {"track": ""}, "track: got ''"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_error_before_any_work(digits, case):
    make, kwargs, message = BAD[case]
    model = Counting()
    kwargs = {"loss_fn": F.cross_entropy, **kwargs}
    with pytest.raises(ValueError, match=message) as err:
        lrpipe.find_lr(model, make(digits), **kwargs)
    assert "\n" not in str(err.value)
    assert model.calls == 0


@pytest.mark.parametrize("batches, message", [
    ([(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), 1)], "got a batch that is a "
     "tuple of 3"),
    ([{"x": torch.zeros(4, 64)}], "got a batch that is a dict"),
    ([(torch.zeros(4, 64), torch.zeros(3, dtype=torch.long))], "got a batch of a tensor of "
     "shape \\(4, 64\\) and a tensor of shape \\(3,\\)"),
])
def test_a_batch_of_the_wrong_shape_is_named(batches, message):
    with pytest.raises(ValueError, match=f"data: {message}"):
        lrpipe.find_lr(mlp(0), batches, F.cross_entropy, seeds=1)


def test_model_and_loss_output_checks(digits):
    with pytest.raises(ValueError, match="model: got a ReLU with no trainable parameters"):
        lrpipe.find_lr(nn.ReLU(), digits, F.cross_entropy)
    with pytest.raises(ValueError, match="model: got an int; allowed: a torch.nn.Module"):
        lrpipe.find_lr(3, digits, F.cross_entropy)
    with pytest.raises(ValueError, match="loss_fn: returned a tensor of shape \\(64,\\)"):
        lrpipe.find_lr(mlp(0), digits, lambda o, y: F.cross_entropy(o, y, reduction="none"))
    with pytest.raises(ValueError, match="loss_fn: returned a tensor that does not depend"):
        lrpipe.find_lr(mlp(0), digits, lambda o, y: torch.tensor(1.0))
    with pytest.raises(ValueError, match="optimizer: got an Optimizer with a model factory"):
        lrpipe.find_lr(mlp, digits, F.cross_entropy,
                       torch.optim.SGD(mlp(0).parameters(), lr=0.1))


# 5. choose_lr and the loss-agnostic evaluation ----------------------------------------------

def test_evaluation_reports_the_users_loss_and_error_only_for_classifiers():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])
    model = nn.Identity()
    model.register_parameter("w", nn.Parameter(torch.zeros(1)))
    loss, error = mean_loss_and_error(model, F.cross_entropy,
                                      [(logits[:2], labels[:2]), (logits[2:], labels[2:])])
    assert loss == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert error == pytest.approx(1 / 3)
    assert is_classification(logits, labels)
    assert not is_classification(torch.zeros(3, 1), torch.zeros(3, 1))
    loss, error = mean_loss_and_error(model, F.mse_loss, [(torch.ones(4, 1), torch.zeros(4, 1))])
    assert (loss, math.isnan(error)) == (1.0, True)


def small_search(model_fn, train, val, loss_fn, **kw):
    return lrpipe.choose_lr(model_fn, train, val, loss_fn, seeds=2, range_steps=30,
                            max_steps=8, regret_epochs=1, grid_span=0.5, **kw)


def check_choice(result) -> None:
    assert result.lr in set(result.grid["lr"])
    assert result.band[0] <= result.lr <= result.band[1]
    assert set(result.candidates) <= {"halving", *RULES}
    assert list(result.regret["name"]) == list(result.candidates)
    assert result.chosen_by == "grid best" or all(
        math.isclose(result.candidates[n], result.lr) for n in result.chosen_by.split(" = "))
    assert list(result.ladders.columns[:2]) == ["seed", "lr"]
    assert isinstance(result.figure(), Figure)


def test_choose_lr_on_a_classifier_fed_by_dataloaders(digits32):
    train = DataLoader(TensorDataset(digits32.train.x, digits32.train.y), batch_size=64,
                       shuffle=True)
    val = DataLoader(TensorDataset(digits32.val.x, digits32.val.y), batch_size=100)
    result = small_search(mlp, train, val, F.cross_entropy,
                          optimizer_fn=lambda m: torch.optim.SGD(m.parameters(), lr=0.1,
                                                                 momentum=0.9))
    check_choice(result)
    ok = result.grid[result.grid["status"] == "ok"]
    assert ok["val_error"].between(0, 1).all()  # a classifier: error is measured


def test_choose_lr_on_a_regression_net_with_mse(mlflow_store):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=gen)
    y = x @ torch.randn(5, 1, generator=gen) + 0.1 * torch.randn(400, 1, generator=gen)

    def build(seed):
        return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))

    result = small_search(build, (x[:300], y[:300]), (x[300:], y[300:]), F.mse_loss,
                          batch_size=32, track="api-choose-test")
    check_choice(result)
    assert result.grid["val_error"].isna().all()  # regression: no classification error
    assert result.regret["val_loss"].min() < float(y[300:].var())  # it learned something
    from lrpipe import tracking

    run = tracking.client().get_run(result.run_id)
    assert run.data.metrics["chosen_lr"] == pytest.approx(result.lr)
    assert run.data.tags["chosen_by"] == result.chosen_by


def test_choose_lr_checks_its_arguments_before_any_work(digits):
    built = []

    def build(seed):
        built.append(seed)
        return mlp(seed)

    for kwargs, message in [({"factor": 1.0}, "factor: got 1.0"),
                            ({"regret_epochs": 0}, "regret_epochs: got 0"),
                            ({"halving_min_lr": 100.0}, "halving_min_lr: got 100.0"),
                            ({"seeds": 0}, "seeds: got 0")]:
        with pytest.raises(ValueError, match=message):
            lrpipe.choose_lr(build, digits, digits, F.cross_entropy, **kwargs)
    assert built == []
