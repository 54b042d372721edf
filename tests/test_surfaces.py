"""2-D surfaces: values and gradients by hand and against autograd, the batched runner against
lone runs of the real optimizers, tuning, and the figures and GIF built from the paths."""

from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from lrpipe.engine.config import OptimConfig
from lrpipe.engine.optim import OPTIMIZER_FACTORIES
from lrpipe.experiments.entries import ENTRY_NAMES, entry_fields
from lrpipe.experiments.surfaces import (
    SURFACES,
    compare_on_surface,
    get_surface,
    quadratic,
    rosenbrock,
    run_grid,
    run_optimizer,
    summarize_paths,
    tune_lr,
)
from lrpipe.plots.surfaces import animate_paths, plot_contour_paths, plot_surface_losses

torch.set_num_threads(1)
F64 = torch.float64
ALL = [*SURFACES.values(), rosenbrock(a=2.0, b=10.0), quadratic(condition=10.0, angle_deg=0.0),
       quadratic(condition=7.0, angle_deg=20.0)]


def _points(surface, n=25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    (x0, x1), (y0, y1) = surface.bounds
    u = torch.rand(n, 2, generator=gen, dtype=F64)
    return torch.stack([x0 + (x1 - x0) * u[:, 0], y0 + (y1 - y0) * u[:, 1]], dim=-1)


def test_hand_computed_values_and_gradients():
    origin = torch.zeros(2, dtype=F64)
    ros, beale, saddle = SURFACES["rosenbrock"], SURFACES["beale"], SURFACES["saddle"]
    assert ros.fn(origin).item() == 1.0  # (1 - 0)^2 + 100 (0 - 0)^2
    assert ros.grad(origin).tolist() == [-2.0, 0.0]
    assert ros.fn(torch.tensor([-1.0, 1.0], dtype=F64)).item() == 4.0
    assert beale.fn(origin).item() == 1.5**2 + 2.25**2 + 2.625**2
    # the saddle: value 1/2, zero gradient, curvature +2 along x and -2 along y
    assert saddle.fn(origin).item() == 0.5 and saddle.grad(origin).tolist() == [0.0, 0.0]
    assert saddle.fn(torch.tensor([0.0, 0.1], dtype=F64)).item() < 0.5
    assert saddle.fn(torch.tensor([0.1, 0.0], dtype=F64)).item() > 0.5
    quad = SURFACES["quadratic"]  # eigenvalue 1 along (1, 1)/sqrt 2, 100 along (-1, 1)/sqrt 2
    r = 2**-0.5
    assert quad.fn(torch.tensor([r, r], dtype=F64)).item() == pytest.approx(0.5)
    assert quad.fn(torch.tensor([-r, r], dtype=F64)).item() == pytest.approx(50.0)


@pytest.mark.parametrize("surface", ALL, ids=lambda s: s.name)
def test_gradient_matches_autograd(surface):
    points = _points(surface).requires_grad_()
    (auto,) = torch.autograd.grad(surface.fn(points).sum(), points)
    torch.testing.assert_close(surface.grad(points.detach()), auto, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("surface", ALL, ids=lambda s: s.name)
def test_minima_have_zero_gradient_and_the_lowest_value_nearby(surface):
    assert surface.minima
    gen = torch.Generator().manual_seed(1)
    for minimum in surface.minima:
        m = torch.tensor(minimum, dtype=F64)
        assert surface.fn(m).item() == pytest.approx(0.0, abs=1e-12)
        torch.testing.assert_close(surface.grad(m), torch.zeros(2, dtype=F64), atol=1e-12,
                                   rtol=0)
        around = m + 1e-3 * torch.randn(200, 2, generator=gen, dtype=F64)
        assert bool((surface.fn(around) > surface.fn(m)).all())
        assert surface.distance(m).item() == 0.0


def test_surfaces_are_batched_elementwise():
    surface = SURFACES["beale"]
    points = _points(surface, n=12).reshape(3, 4, 2)
    assert surface.fn(points).shape == (3, 4)
    assert surface.grad(points).shape == (3, 4, 2)
    torch.testing.assert_close(surface.fn(points)[1, 2], surface.fn(points[1, 2]))


def _lone_run(surface, name, lr, steps):
    """The entry's real optimizer, from lrpipe's factory, on one nn.Parameter, with autograd."""
    p = torch.nn.Parameter(torch.tensor(surface.start, dtype=F64))
    cfg = OptimConfig(**{**entry_fields(name), "lr": lr})
    opt = OPTIMIZER_FACTORIES[cfg.name]([{"params": [p], "lr": lr}], cfg)
    path = [p.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        surface.fn(p).backward()
        opt.step()
        path.append(p.detach().clone())
    return torch.stack(path)


@pytest.mark.parametrize("name", ENTRY_NAMES)
def test_batched_grid_matches_lone_runs_of_the_real_optimizer(name):
    surface, lrs, steps = SURFACES["rosenbrock"], [1e-4, 3e-4, 1e-3], 60
    paths = run_grid(surface, name, lrs, steps)
    assert not paths["diverged"].any()
    for lr in lrs:
        run = paths[paths["lr"] == lr]
        got = torch.tensor(run[["x", "y"]].to_numpy())
        torch.testing.assert_close(got, _lone_run(surface, name, lr, steps), rtol=1e-9,
                                   atol=1e-12)
        assert run["step"].tolist() == list(range(steps + 1))


def test_run_optimizer_starts_at_the_start_and_stops_at_divergence():
    surface = SURFACES["rosenbrock"]
    ok = run_optimizer(surface, "sgd", 1e-3, steps=20)
    assert list(ok.columns) == ["step", "x", "y", "loss", "distance", "diverged"]
    assert len(ok) == 21 and not ok["diverged"].any()
    assert (ok.loc[0, "x"], ok.loc[0, "y"]) == surface.start
    bad = run_optimizer(surface, "sgd", 10.0, steps=200)
    assert bad["diverged"].all() and len(bad) < 201
    assert bad[["x", "y", "loss"]].notna().all().all()
    # a finite blow-up (x3.6 a step) is caught when it leaves the bounds widened 10x
    quad = SURFACES["quadratic"]
    blown = run_optimizer(quad, "sgd", 0.046, steps=100)
    assert blown["diverged"].all() and len(blown) < 20
    assert (blown[["x", "y"]].abs() <= 50).all().all() and quad.in_range(
        torch.tensor(blown[["x", "y"]].to_numpy())).all()
    moved = run_optimizer(surface, "adam", 1e-2, steps=5, start=(0.0, 0.0))
    assert (moved.loc[0, "x"], moved.loc[0, "y"]) == (0.0, 0.0)


def test_tune_lr_picks_the_lowest_final_loss_among_finite_runs():
    surface = SURFACES["quadratic"]
    best, table = tune_lr(surface, "sgd", steps=100)
    assert len(table) == 19 and table["chosen"].sum() == 1
    finite = table[~table["diverged"]]
    assert best == finite.loc[finite["final_loss"].idxmin(), "lr"]
    # sgd is stable on this quadratic below 2 / 100 and diverges above it
    assert best < 0.02 and table.loc[table["lr"] > 0.03, "diverged"].all()
    assert table.loc[table["diverged"], "final_loss"].isna().all()
    none, all_bad = tune_lr(surface, "sgd", steps=100, grid=[5.0, 10.0])
    assert none is None and not all_bad["chosen"].any()


def test_tuned_adam_and_momentum_reach_the_rosenbrock_minimum():
    surface = SURFACES["rosenbrock"]
    paths = compare_on_surface(surface, ["adam", "momentum"])
    summary = summarize_paths(paths, surface.success_radius)
    assert summary["optimizer"].tolist() == ["adam", "momentum"]
    assert (summary["final_distance"] < 0.1).all() and summary["success"].all()
    assert (summary["steps_to_success"] <= surface.steps).all()
    assert paths.groupby("optimizer")["lr"].nunique().eq(1).all()


def test_gains_enter_with_and_without_momentum():
    """Issue 27 item 6: the race's one "gains" entry had momentum 0.9, so it credited momentum
    to the gains. Plain gains (momentum 0) stop short of Rosenbrock's minimum after the budget;
    the same gains with momentum 0.9 reach it to ~1e-9."""
    assert set(OPTIMIZER_FACTORIES) < set(ENTRY_NAMES)
    assert entry_fields("gains") == {"name": "gains", "momentum": 0.0}
    assert entry_fields("gains_momentum") == {"name": "gains", "momentum": 0.9}
    surface = SURFACES["rosenbrock"]
    paths = compare_on_surface(surface, ["gains", "gains_momentum"])
    summary = summarize_paths(paths, surface.success_radius).set_index("optimizer")
    assert summary.loc["gains", "final_distance"] > 1e-2
    assert summary.loc["gains_momentum", "final_distance"] < 1e-6
    plain = run_optimizer(surface, "gains", 1e-3, steps=30)
    with_momentum = run_optimizer(surface, "gains_momentum", 1e-3, steps=30)
    assert not plain[["x", "y"]].equals(with_momentum[["x", "y"]])


def test_the_saddle_traps_plain_descent_longer_than_adam():
    """At the same small rate sgd is still at the saddle after 100 steps; adam has escaped."""
    surface = SURFACES["saddle"]
    sgd = run_optimizer(surface, "sgd", 0.05, steps=100)
    adam = run_optimizer(surface, "adam", 0.05, steps=100)
    assert sgd["loss"].iloc[-1] > 0.4 and abs(sgd["y"].iloc[-1]) < 0.1
    assert adam["loss"].iloc[-1] < 0.05


@pytest.mark.parametrize("call, field", [
    (lambda: run_optimizer(SURFACES["saddle"], "lbfgs", 0.1), "optimizer_name"),
    (lambda: run_optimizer(SURFACES["saddle"], "sgd", -0.1), "lr"),
    (lambda: run_optimizer(SURFACES["saddle"], "sgd", 0.1, steps=0), "steps"),
    (lambda: run_grid(SURFACES["saddle"], "sgd", [0.1, 0.1]), "lrs"),
    (lambda: run_grid(SURFACES["saddle"], "sgd", []), "lrs"),
    (lambda: run_optimizer(SURFACES["saddle"], "sgd", 0.1, start=(1.0,)), "start"),
    (lambda: run_optimizer(SURFACES["saddle"], "sgd", 0.1, start=(1.0, float("nan"))),
     "start"),
    (lambda: get_surface("himmelblau"), "surface"),
    (lambda: quadratic(condition=0.5), "condition"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=rf"^{field}: got .*allowed"):
        call()


@pytest.fixture(scope="module")
def saddle_paths():
    return compare_on_surface(SURFACES["saddle"], ["sgd", "adam", "rprop"], steps=40)


def test_contour_and_loss_figures_have_one_line_per_run(saddle_paths):
    fig = plot_contour_paths(SURFACES["saddle"], saddle_paths)
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["start", "minimum"] and all("lr" in t for t in labels[2:])
    fig2 = plot_surface_losses(saddle_paths)
    assert len(fig2.axes[0].lines) == 3 and fig2.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="paths_df"):
        plot_contour_paths(SURFACES["beale"], saddle_paths)
    plt.close(fig)
    plt.close(fig2)


def test_animation_is_a_small_valid_gif(saddle_paths):
    data = animate_paths(SURFACES["saddle"], saddle_paths, frames=8)
    assert data.startswith(b"GIF8") and len(data) < 2_000_000
    image = Image.open(io.BytesIO(data))
    assert image.n_frames == 8 and image.size == (504, 322)
    with pytest.raises(ValueError, match="frames"):
        animate_paths(SURFACES["saddle"], saddle_paths, frames=1)


# --- issue 27: the tuned rate from start points it was not tuned on -------------------------

def test_fresh_starts_ring_the_tuning_start():
    from lrpipe.experiments.surfaces import FRESH_RADIUS, fresh_starts, quadratic

    surface = quadratic()
    starts = fresh_starts(surface, n=4)
    side = min(high - low for low, high in surface.bounds)  # 10 on the quadratic
    assert len(starts) == 4 and len(set(starts)) == 4
    for x, y in starts:
        assert math.hypot(x - surface.start[0], y - surface.start[1]) == pytest.approx(
            FRESH_RADIUS * side)
    assert starts[0] == pytest.approx((-4.0 + 0.5 * math.cos(math.radians(30)),
                                       -2.5 + 0.5 * math.sin(math.radians(30))))


def test_confirm_on_starts_reports_every_fresh_start():
    from lrpipe.experiments.surfaces import confirm_on_starts, fresh_summary, quadratic

    surface = quadratic()
    # plain SGD on the condition-100 quadratic: a rate under 2/100 converges from anywhere,
    # one above it blows up along the stiff direction from every start
    good = confirm_on_starts(surface, "sgd", 0.019)
    assert len(good) == 6 and not good["diverged"].any()
    summary = fresh_summary(good)
    assert summary["fresh_success"] == f"{int(good['success'].sum())}/6"
    assert summary["fresh_min_distance"] <= summary["fresh_median_distance"] <= \
        summary["fresh_max_distance"]
    bad = confirm_on_starts(surface, "sgd", 0.021)
    assert bad["diverged"].all() and bad["final_distance"].isna().all()
    assert fresh_summary(bad)["fresh_diverged"] == 6 and fresh_summary(bad)["fresh_success"] \
        == "0/6"
