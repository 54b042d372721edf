"""AdaptiveGains: the lecture-6d rule by hand, clamps, an SGD oracle, state round trip, digits."""

from __future__ import annotations

import copy

import pytest
import torch

from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from lrpipe.engine.gains import AdaptiveGains
from lrpipe.engine.optim import OPTIMIZER_FACTORIES

torch.set_num_threads(1)


def _run(opt: AdaptiveGains, param: torch.Tensor, grads: list[list[float]]) -> list[list[float]]:
    """Feed known gradients one step at a time; return the weights after each step."""
    out = []
    for g in grads:
        param.grad = torch.tensor(g, dtype=param.dtype)
        opt.step()
        out.append(param.detach().tolist())
    return out


def test_hand_computed_scalar_sequence():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = AdaptiveGains([w], lr=0.1)
    got = _run(opt, w, [[1.0], [2.0], [-1.0], [-0.5]])
    # step 1: no previous gradient, gain stays 1:          1 - 0.1*1*1           = 0.9
    # step 2: signs agree, gain 1 + 0.05 = 1.05:            0.9 - 0.1*1.05*2      = 0.69
    # step 3: signs disagree, gain 1.05*0.95 = 0.9975:      0.69 + 0.1*0.9975     = 0.78975
    # step 4: signs agree, gain 0.9975 + 0.05 = 1.0475:     0.78975 + 0.1*1.0475*0.5 = 0.842125
    assert [g[0] for g in got] == pytest.approx([0.9, 0.69, 0.78975, 0.842125], abs=1e-12)
    assert opt.state[w]["gain"].item() == pytest.approx(1.0475, abs=1e-12)
    assert opt.state[w]["step"] == 4


def test_hand_computed_vector_with_zero_gradient_and_momentum():
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))
    opt = AdaptiveGains([w], lr=0.5, momentum=0.5)
    _run(opt, w, [[1.0, 1.0, 0.0], [1.0, -1.0, 3.0]])
    # gains after step 2: agree -> 1.05, disagree -> 0.95, zero product -> 1 (unchanged).
    assert opt.state[w]["gain"].tolist() == pytest.approx([1.05, 0.95, 1.0], abs=1e-12)
    # v1 = -0.5*1*g1 = [-0.5, -0.5, 0]; w1 = v1
    # v2 = 0.5*v1 - 0.5*gain*g2 = [-0.25-0.525, -0.25+0.475, 0-1.5] = [-0.775, 0.225, -1.5]
    # w2 = w1 + v2 = [-1.275, -0.275, -1.5]
    assert w.tolist() == pytest.approx([-1.275, -0.275, -1.5], abs=1e-12)
    assert opt.state[w]["momentum_buffer"].tolist() == pytest.approx([-0.775, 0.225, -1.5])


def test_weight_decay_is_added_to_the_gradient_before_the_sign_test():
    w = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = AdaptiveGains([w], lr=0.1, weight_decay=0.5)
    # effective gradients: 1 + 0.5*2 = 2 -> w = 1.8; then -0.5 + 0.5*1.8 = 0.4 (same sign as 2:
    # the raw gradient flipped, the decayed one did not) -> gain 1.05, w = 1.8 - 0.1*1.05*0.4
    got = _run(opt, w, [[1.0], [-0.5]])
    assert [g[0] for g in got] == pytest.approx([1.8, 1.758], abs=1e-12)
    assert opt.state[w]["gain"].item() == pytest.approx(1.05)


def test_gains_are_clamped_to_their_range():
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = AdaptiveGains([w], lr=0.01, increase=4.0, decrease=0.01)
    gains = []
    for g in [1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0]:
        _run(opt, w, [[g]])
        gains.append(opt.state[w]["gain"].item())
    # 1 -> 5 -> 9 -> 13 clamped to 10 -> stays 10; flips: 10*0.01 = 0.1, then 0.001 -> 0.1
    assert gains == pytest.approx([1.0, 5.0, 9.0, 10.0, 0.1, 0.1, 0.1])


def test_fixed_gains_match_torch_sgd_with_momentum():
    """increase=0, decrease=1 freezes every gain at 1: the rule is classical momentum SGD."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(64, generator=gen, dtype=torch.float64)
    w_ref = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    w = w_ref.detach().clone().requires_grad_()
    ref = torch.optim.SGD([w_ref], lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt = AdaptiveGains([w], lr=0.05, increase=0.0, decrease=1.0, momentum=0.9,
                        weight_decay=1e-2)
    for _ in range(30):
        for param, o in ((w_ref, ref), (w, opt)):
            o.zero_grad()
            ((x @ param - y) ** 2).mean().backward()
            o.step()
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=gen)
    w = torch.randn(4, generator=gen).requires_grad_()

    def steps(param, opt, n):
        for _ in range(n):
            opt.zero_grad()
            (torch.sin(x @ param) ** 2).mean().backward()
            opt.step()

    opt = AdaptiveGains([w], lr=0.3, momentum=0.5)
    steps(w, opt, 5)
    # state_dict() holds references to the live state: copy it, as torch.save would.
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    steps(w, opt, 5)

    w2 = saved_w.clone().requires_grad_()
    opt2 = AdaptiveGains([w2], lr=0.3, momentum=0.5)
    opt2.load_state_dict(saved)
    steps(w2, opt2, 5)
    assert torch.equal(w2, w)
    assert torch.equal(opt2.state[w2]["gain"], opt.state[w]["gain"])
    assert opt2.state[w2]["step"] == 10


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(increase=-0.1), "increase"), (dict(decrease=0.0), "decrease"),
    (dict(decrease=1.5), "decrease"), (dict(min_gain=0.0), "min_gain"),
    (dict(min_gain=2.0), "min_gain"), (dict(max_gain=0.5), "max_gain"),
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=float("nan")), "lr"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: got .*allowed"):
        AdaptiveGains([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_factory_builds_gains_with_the_configs_momentum():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = OPTIMIZER_FACTORIES["gains"]([{"params": [p], "lr": 0.1}], OptimConfig(name="gains"))
    assert isinstance(opt, AdaptiveGains)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert isinstance(ConfigError("x"), ValueError)


def test_trains_softmax_regression_on_digits():
    from lrpipe.engine.train import train

    cfg = TrainConfig(data=DataConfig(dataset="digits", val_size=300),
                      model=ModelConfig(name="softmax"),
                      optim=OptimConfig(name="gains", lr=0.01, momentum=0.9),
                      epochs=3, batch_size=64, device="cpu")
    result = train(cfg)
    hist = result.history
    assert result.status == "ok"
    assert hist["train_loss"].iloc[-1] < 0.5 * hist["train_loss"].iloc[0]
    assert hist["val_error"].iloc[-1] < 0.15
