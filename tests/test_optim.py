import copy

import pytest
import torch

from lrpipe.engine.config import ConfigError, ModelConfig, OptimConfig
from lrpipe.engine.models import make_model
from lrpipe.engine.optim import make_optimizer

REFERENCE = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
    "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "rprop": lambda p, lr: torch.optim.Rprop(p, lr=lr),
}


def _model():
    return make_model(ModelConfig(name="mlp", hidden=(8,)), (1, 4, 4), 3, seed=0)


def _steps(model, optimizer, n=4):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 1, 4, 4, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_factory_matches_torch_optim(name):
    ours, theirs = _model(), _model()
    _steps(ours, make_optimizer(ours, OptimConfig(name=name, lr=0.01)))
    _steps(theirs, REFERENCE[name](theirs.parameters(), 0.01))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_one_group_per_layer_with_multipliers():
    model = _model()
    opt = make_optimizer(model, OptimConfig(lr=0.01, lr_mult={"head": 10}))
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["fc1", "head"]
    assert groups["fc1"]["lr"] == pytest.approx(0.01)
    assert groups["head"]["lr"] == pytest.approx(0.1)
    assert groups["head"]["params"][0] is model.head.weight


def test_zero_multiplier_freezes_the_layer():
    model = _model()
    before = copy.deepcopy(model.fc1.state_dict())
    opt = make_optimizer(model, OptimConfig(lr=0.5, lr_mult={"fc1": 0}))
    _steps(model, opt)
    assert not model.fc1.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.fc1.state_dict().items())


@pytest.mark.parametrize("mult", [{"haed": 10}, {"backbone": 2}, {"fc9": 1}])
def test_unknown_layer_lists_the_valid_names(mult):
    with pytest.raises(ConfigError, match="allowed: fc1, head"):
        make_optimizer(_model(), OptimConfig(lr_mult=mult))
