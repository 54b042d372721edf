"""Second-order methods: Newton's step by hand (one step on a quadratic, the damping on an
indefinite or singular Hessian), Newton and L-BFGS on the surfaces, the counted L-BFGS against
torch's own, full-batch L-BFGS on real digits, the step-cost table and its memory formula, and
the figures."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from lrpipe.engine.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from lrpipe.engine.data import load_data
from lrpipe.experiments.second_order import (
    DAMPING,
    HISTORY_COLUMNS,
    PATH_COLUMNS,
    CountingClosure,
    LBFGSConfig,
    compare_second_order,
    lbfgs_against_sgd,
    make_lbfgs,
    newton_direction,
    run_full_batch_lbfgs,
    run_lbfgs,
    run_newton,
    summarize_race,
    with_evaluations,
)
from lrpipe.experiments.step_cost import (
    COST_COLUMNS,
    dense_hessian_bytes,
    measure_step_costs,
    newton_bytes,
)
from lrpipe.experiments.surfaces import SURFACES, Surface, compare_on_surface, quadratic, rosenbrock
from lrpipe.plots.second_order import (
    plot_full_batch,
    plot_race_losses,
    plot_race_paths,
    plot_step_cost,
)

torch.set_num_threads(1)
F64 = torch.float64


def bowl() -> Surface:
    """(x - 1)^2 + 10 (y + 2)^2: Hessian diag(2, 20), minimum (1, -2)."""
    def fn(p):
        return (p[..., 0] - 1) ** 2 + 10 * (p[..., 1] + 2) ** 2

    def grad(p):
        return torch.stack((2 * (p[..., 0] - 1), 20 * (p[..., 1] + 2)), dim=-1)
    return Surface("bowl", fn, grad, start=(0.0, 0.0), minima=((1.0, -2.0),),
                   bounds=((-3.0, 3.0), (-4.0, 2.0)), success_radius=0.1, steps=50)


def test_newton_lands_on_a_quadratics_minimum_in_one_step():
    # at (0, 0): g = (-2, 40), H = diag(2, 20), step = -(-2/2, 40/20) = (1, -2): the minimum
    path = run_newton(bowl())
    assert list(path.columns) == list(PATH_COLUMNS)
    assert path["step"].tolist() == [0, 1]  # the gradient at (1, -2) is 0: it stops there
    assert path[["x", "y"]].iloc[1].tolist() == pytest.approx([1.0, -2.0], abs=1e-15)
    assert path["loss"].iloc[1] < 1e-29 and path["damping"].iloc[1] == 0.0
    assert path[["evals", "hessians"]].iloc[1].tolist() == [1, 1]
    rotated = run_newton(quadratic())  # condition 100, rotated 45 degrees: still one step
    assert rotated["distance"].iloc[1] < 1e-12


def test_newton_direction_by_hand():
    g = torch.tensor([1.0, -3.0], dtype=F64)
    h = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=F64)  # positive definite: pure Newton
    step, mu = newton_direction(g, h)
    assert mu == 0.0
    torch.testing.assert_close(step, -torch.linalg.solve(h, g))
    # indefinite diag(2, -2) (the saddle): mu = -min H_ii + beta, beta = 1e-3 x max |H_ii|
    step, mu = newton_direction(torch.tensor([-3.0, -2e-6], dtype=F64),
                                torch.diag(torch.tensor([2.0, -2.0], dtype=F64)))
    assert mu == pytest.approx(2.002)
    torch.testing.assert_close(step, torch.tensor([3 / 4.002, 2e-6 / 0.002], dtype=F64))
    # singular diag(1, 0): min H_ii = 0 is not > 0, so mu = beta = 1e-3
    step, mu = newton_direction(torch.tensor([1.0, 0.0], dtype=F64),
                                torch.diag(torch.tensor([1.0, 0.0], dtype=F64)))
    assert mu == pytest.approx(DAMPING)
    torch.testing.assert_close(step, torch.tensor([-1 / 1.001, 0.0], dtype=F64))
    # every diagonal entry > 0 but indefinite: the Cholesky fails, mu doubles from beta
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # eigenvalues 3 and -1
    step, mu = newton_direction(g, h)
    assert mu > 1.0 and torch.linalg.eigvalsh(h + mu * torch.eye(2, dtype=F64)).min() > 0
    assert float(step @ g) < 0  # downhill


def test_damping_is_taken_at_the_saddle_and_newton_escapes():
    path = run_newton(SURFACES["saddle"])
    first = path.iloc[1]
    # at (-1.5, 1e-6): g = (-3, 2y(y^2 - 1)), H = diag(2, 2(3y^2 - 1)) ~ diag(2, -2)
    y0 = 1e-6
    h_yy = 2 * (3 * y0**2 - 1)
    mu = -h_yy + DAMPING * 2.0
    assert first["damping"] == pytest.approx(mu)
    assert first["x"] == pytest.approx(-1.5 + 3 / (2 + mu))
    assert first["y"] == pytest.approx(y0 - 2 * y0 * (y0**2 - 1) / (h_yy + mu))
    undamped = -1.5 + 3 / 2  # pure Newton would have gone to the saddle's x = 0
    assert first["x"] != pytest.approx(undamped)
    assert bool(path["distance"].iloc[-1] < 1e-8) and not path["diverged"].any()
    assert (path["damping"].iloc[-1]) == 0.0  # in the well: pure Newton again


def test_newton_on_rosenbrock_converges_in_few_iterations():
    for start in ((-1.5, 2.0), (-1.2, 1.0)):  # the race's start and the textbook one
        path = run_newton(rosenbrock(), start=start)
        assert path["distance"].iloc[-1] < 1e-8, start
        assert path["step"].max() <= 10, start  # first-order methods get 1,000 steps


def test_lbfgs_converges_on_a_quadratic_and_counts_its_evaluations():
    path = run_lbfgs(quadratic())
    assert list(path.columns) == list(PATH_COLUMNS)
    assert path["distance"].iloc[-1] < 1e-6 and path["step"].max() < 30
    assert (path["evals"].diff().dropna() >= 1).all()  # every iteration evaluates
    assert path["evals"].iloc[-1] >= path["step"].iloc[-1]
    assert (path["hessians"] == 0).all()


def test_counted_lbfgs_moves_as_torchs_own_lbfgs():
    """The cache only skips repeated evaluations: the iterates are those of a plain closure."""
    surface = rosenbrock()
    ours = run_lbfgs(surface, steps=15)
    param = torch.nn.Parameter(torch.tensor(surface.start, dtype=F64))
    opt = make_lbfgs([param], tolerance_grad=1e-10, tolerance_change=1e-15)
    calls = []

    def closure():
        opt.zero_grad()
        loss = surface.fn(param)
        loss.backward()
        calls.append(1)
        return loss
    points = []
    for _ in range(15):
        opt.step(closure)
        points.append(param.detach().clone())
    torch.testing.assert_close(torch.tensor(ours[["x", "y"]].to_numpy()[1:]),
                               torch.stack(points)[: len(ours) - 1])
    assert ours["evals"].iloc[-1] < len(calls)  # torch re-evaluates each start; we do not


def test_counting_closure_caches_a_repeated_point():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def evaluate_fn():
        p.grad = 2 * p.detach()
        return (p.detach() ** 2).sum()
    closure = CountingClosure([p], evaluate_fn)
    assert float(closure()) == 5.0 and float(closure()) == 5.0 and closure.count == 1
    assert p.grad.tolist() == [2.0, 4.0]
    with torch.no_grad():
        p.add_(1.0)
    assert float(closure()) == 13.0 and closure.count == 2


def test_race_table_holds_both_orders_and_counts_fairly():
    surface = quadratic()
    first = with_evaluations(compare_on_surface(surface, ["sgd"]))
    paths = pd.concat([first, compare_second_order(surface)], ignore_index=True)
    assert list(paths.columns) == list(PATH_COLUMNS)
    assert (first["evals"] == first["step"]).all()
    table = summarize_race(paths, surface.success_radius).set_index("optimizer")
    assert set(table.index) == {"sgd", "newton", "lbfgs"}
    assert table.loc["newton", "iterations"] == 1 and table.loc["newton", "hessians"] == 1
    assert table.loc["lbfgs", "evals"] >= table.loc["lbfgs", "iterations"]
    assert table.loc[["newton", "lbfgs"], "success"].all()
    assert table.loc["newton", "evals_to_success"] == 1
    # sgd at its tuned rate has not reached the minimum after its 300 evaluations
    assert table.loc["sgd", "final_distance"] > 1e6 * table.loc["newton", "final_distance"]
    with pytest.raises(ConfigError, match="methods"):
        compare_second_order(surface, ("newton", "bfgs"))


@pytest.fixture(scope="module")
def digits():
    cfg = TrainConfig(data=DataConfig(dataset="digits"), model=ModelConfig(name="softmax"),
                      epochs=1, batch_size=64, device="cpu")
    return cfg, load_data(cfg.data)


def test_full_batch_lbfgs_lowers_the_loss_on_real_digits(digits):
    cfg, data = digits
    hist = run_full_batch_lbfgs(cfg, data, LBFGSConfig(iterations=8))
    assert list(hist.columns) == list(HISTORY_COLUMNS)
    assert hist["iteration"].tolist() == list(range(9))
    first, last = hist.iloc[0], hist.iloc[-1]
    assert first["evals"] == 0 and last["evals"] >= 8 and (hist["passes"] == hist["evals"]).all()
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert last["val_error"] < first["val_error"]
    assert hist["train_loss"].is_monotonic_decreasing  # strong Wolfe: sufficient decrease
    with pytest.raises(ConfigError, match="lbfgs.iterations"):
        LBFGSConfig(iterations=0)


def test_lbfgs_against_sgd_gives_sgd_the_same_passes(digits):
    cfg, data = digits
    both = lbfgs_against_sgd(cfg, 0.1, LBFGSConfig(iterations=4), data)
    lb, sgd = both[both["method"] == "lbfgs"], both[both["method"] == "sgd"]
    assert sgd["passes"].max() == math.ceil(lb["passes"].max())
    updates_per_pass = math.ceil(len(data.train) / cfg.batch_size)
    assert (sgd["evals"] == sgd["passes"] * updates_per_pass).all()
    # the same seeded model at the start, evaluated on the same whole training set
    assert sgd["train_loss"].iloc[0] == pytest.approx(lb["train_loss"].iloc[0], rel=1e-5)


def test_dense_hessian_memory_formula():
    assert dense_hessian_bytes(3) == 36  # 3 x 3 float32
    assert dense_hessian_bytes(203_530) == 165_697_843_600  # the MLP 784-256-10: 165.7 GB
    assert dense_hessian_bytes(7_850, itemsize=8) == 7_850**2 * 8
    assert newton_bytes(10) == 2 * 400 + 2 * 40
    with pytest.raises(ConfigError, match="n_params"):
        dense_hessian_bytes(0)


@pytest.fixture(scope="module")
def costs():
    models = (ModelConfig(name="mlp", hidden=(1,)), ModelConfig(name="mlp", hidden=(2,)))
    return measure_step_costs(models, examples=32, newton_max_params=1000, repeats=1,
                              columns=8)


def test_cost_table_columns_and_sources(costs):
    assert list(costs.columns) == list(COST_COLUMNS)
    assert sorted(costs["n_params"].unique()) == [805, 1600]  # 784h + h + 10h + 10
    counts = costs.groupby(["method", "source"]).size().to_dict()
    assert counts == {("lbfgs", "measured"): 2, ("sgd", "measured"): 2,
                      ("newton", "measured"): 1, ("newton", "extrapolated"): 2}
    assert (costs["dense_hessian_bytes"] == costs["n_params"] ** 2 * 4).all()
    assert (costs["seconds_per_step"] > 0).all()
    by = costs.set_index(["method", "source", "n_params"])
    assert by.loc[("sgd", "measured", 805), "bytes_per_step"] == 805 * 4  # the gradient
    assert by.loc[("newton", "measured", 805), "bytes_per_step"] == newton_bytes(805)
    assert by.loc[("newton", "extrapolated", 1600), "bytes_per_step"] == newton_bytes(1600)
    # L-BFGS holds m = 10 pairs (s, y) of n float32 numbers, at least
    assert by.loc[("lbfgs", "measured", 1600), "bytes_per_step"] >= 2 * 10 * 1600 * 4
    assert by.loc[("newton", "measured", 805), "evals_per_step"] == 805
    with pytest.raises(ValueError, match="models"):
        measure_step_costs((ModelConfig(name="cnn"),))


def test_figures_build(digits, costs):
    surface = quadratic()
    paths = pd.concat([with_evaluations(compare_on_surface(surface, ["sgd", "adam"])),
                       compare_second_order(surface)], ignore_index=True)
    fig = plot_race_paths(surface, paths)
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any(label.startswith("newton (no rate): 1 iterations") for label in labels)
    assert len(fig.axes[0].get_lines()) == 4
    assert len(plot_race_losses(paths).axes[0].get_lines()) == 4
    cfg, data = digits
    history = lbfgs_against_sgd(cfg, 0.1, LBFGSConfig(iterations=3), data)
    for metric in ("train_loss", "val_error"):
        assert len(plot_full_batch(history, metric).axes[0].get_lines()) == 2
    fig = plot_step_cost(costs, "bytes_per_step")
    assert len(fig.axes[0].get_lines()) == 4  # sgd, lbfgs, newton measured + extrapolated
    assert "1,600^2 x 4 B" in fig.axes[0].texts[0].get_text()
    assert len(plot_step_cost(costs).axes[0].texts) == 0
    with pytest.raises(ValueError, match="metric"):
        plot_step_cost(costs, "flops")
    with pytest.raises(ValueError, match="paths: missing columns"):
        plot_race_paths(surface, paths.drop(columns="evals"))
