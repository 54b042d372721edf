"""Optimizers side by side on 2-D test surfaces, each at its own tuned learning rate.

A ``Surface`` is a pure torch function of points ``(..., 2) -> (...)`` with a hand-written
gradient, a start point, its global minima (all of value 0, so a loss is also the gap to the
optimum and plots on a log axis) and what counts as success: ending within ``success_radius``
of a minimum. The optimizers are the real torch.optim ones, built through lrpipe's
``OPTIMIZER_FACTORIES`` with a default ``OptimConfig`` plus the fields of the comparison's
entry (``lrpipe.experiments.entries``: ``gains`` has momentum 0, ``gains_momentum`` 0.9), so a
surface sees the same settings (momentum 0.9, Adam's betas, ...) as a training run.

Every rate of a grid runs at once, as a batch of points: the surfaces and all the optimizers
act elementwise, so row k of a ``(K, 2)`` tensor moves exactly as a lone point would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lrpipe.engine.config import OptimConfig, check_choice, check_number
from lrpipe.engine.optim import OPTIMIZER_FACTORIES
from lrpipe.experiments.entries import ENTRY_NAMES, entry_fields

Point = tuple[float, float]
# Three rates per decade from 1e-5 to 10: every optimizer gets the same 19 tries.
LR_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-5, 1, 19))
DTYPE = torch.float64  # float32 loses the last digits that Rosenbrock's valley needs
# A run has diverged once it leaves the plot bounds widened this many times about their
# centre: a blow-up can stay finite for hundreds of steps (x3.6 a step: 1e55 after 100).
ESCAPE_FACTOR = 10.0


@dataclass(frozen=True)
class Surface:
    """A 2-D test function and what an optimizer must achieve on it.

    fn: points (..., 2) -> values (...); pure torch, differentiable.
    grad: points (..., 2) -> gradients (..., 2), written by hand (no autograd in the loop).
    start: where every optimizer starts.
    minima: the global minima (value 0); empty if unknown. ``minimum`` is the first.
    bounds: ((x_min, x_max), (y_min, y_max)) of the plots.
    success_radius: success = ending within this distance of a minimum.
    steps: the update budget of a comparison (updates, the same for every optimizer).
    note: one line on what the surface tests.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]
    start: Point
    minima: tuple[Point, ...]
    bounds: tuple[Point, Point]
    success_radius: float
    steps: int
    note: str = ""

    @property
    def minimum(self) -> Point | None:
        return self.minima[0] if self.minima else None

    def in_range(self, points: Tensor) -> Tensor:
        """(...,) True where a point (..., 2) is finite, as is its value, and inside the plot
        bounds widened ``ESCAPE_FACTOR`` times about their centre."""
        ok = torch.isfinite(self.fn(points))
        for axis, (low, high) in enumerate(self.bounds):
            centre, half = (low + high) / 2, ESCAPE_FACTOR * (high - low) / 2
            ok &= (points[..., axis] - centre).abs() <= half  # False for NaN
        return ok

    def distance(self, points: Tensor) -> Tensor:
        """Distance (...,) from each point (..., 2) to its nearest minimum (NaN if none known)."""
        if not self.minima:
            return torch.full(points.shape[:-1], math.nan, dtype=points.dtype)
        mins = torch.tensor(self.minima, dtype=points.dtype)
        return (points[..., None, :] - mins).norm(dim=-1).min(dim=-1).values


def _xy(p: Tensor) -> tuple[Tensor, Tensor]:
    return p[..., 0], p[..., 1]


def rosenbrock_fn(p: Tensor, a: float = 1.0, b: float = 100.0) -> Tensor:
    x, y = _xy(p)
    return (a - x) ** 2 + b * (y - x**2) ** 2


def rosenbrock_grad(p: Tensor, a: float = 1.0, b: float = 100.0) -> Tensor:
    x, y = _xy(p)
    valley = y - x**2
    return torch.stack((-2 * (a - x) - 4 * b * x * valley, 2 * b * valley), dim=-1)


def _beale_terms(p: Tensor) -> tuple[Tensor, ...]:
    x, y = _xy(p)
    return x, y, 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3


def beale_fn(p: Tensor) -> Tensor:
    _, _, t1, t2, t3 = _beale_terms(p)
    return t1**2 + t2**2 + t3**2


def beale_grad(p: Tensor) -> Tensor:
    x, y, t1, t2, t3 = _beale_terms(p)
    dx = 2 * (t1 * (y - 1) + t2 * (y**2 - 1) + t3 * (y**3 - 1))
    dy = 2 * x * (t1 + 2 * y * t2 + 3 * y**2 * t3)
    return torch.stack((dx, dy), dim=-1)


def saddle_fn(p: Tensor) -> Tensor:
    """x^2 + (y^2 - 1)^2 / 2 = x^2 - y^2 + y^4/2 + 1/2: the saddle x^2 - y^2 made bounded."""
    x, y = _xy(p)
    return x**2 + (y**2 - 1) ** 2 / 2


def saddle_grad(p: Tensor) -> Tensor:
    x, y = _xy(p)
    return torch.stack((2 * x, 2 * y * (y**2 - 1)), dim=-1)


def _rotate(p: Tensor, angle_deg: float) -> tuple[Tensor, Tensor, float, float]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    x, y = _xy(p)
    return c * x + s * y, -s * x + c * y, c, s


def quadratic_fn(p: Tensor, condition: float = 100.0, angle_deg: float = 45.0) -> Tensor:
    """(u^2 + condition * v^2) / 2 in axes (u, v) rotated by ``angle_deg``."""
    u, v, _, _ = _rotate(p, angle_deg)
    return (u**2 + condition * v**2) / 2


def quadratic_grad(p: Tensor, condition: float = 100.0, angle_deg: float = 45.0) -> Tensor:
    u, v, c, s = _rotate(p, angle_deg)
    w = condition * v
    return torch.stack((c * u - s * w, s * u + c * w), dim=-1)


def rosenbrock(a: float = 1.0, b: float = 100.0) -> Surface:
    """Rosenbrock's banana valley; minimum (a, a^2). Tests progress along a curved valley."""
    return Surface("rosenbrock", partial(rosenbrock_fn, a=a, b=b),
                   partial(rosenbrock_grad, a=a, b=b), start=(-1.5, 2.0), minima=((a, a * a),),
                   bounds=((-2.0, 2.0), (-1.0, 3.0)), success_radius=0.1, steps=1000,
                   note="a flat, curved valley: speed along it without leaving it")


def beale() -> Surface:
    """Beale's function; minimum (3, 0.5). Sharp walls around a long, flat basin."""
    return Surface("beale", beale_fn, beale_grad, start=(1.0, 1.5), minima=((3.0, 0.5),),
                   bounds=((-4.5, 4.5), (-4.5, 4.5)), success_radius=0.1, steps=1000,
                   note="a flat basin between steep walls")


def saddle() -> Surface:
    """A saddle at the origin (value 1/2) between two wells at (0, +-1) (value 0).

    The start lies 1e-6 off the ridge y = 0, where the escaping gradient is only
    ~2y: plain descent first slides to the saddle and then needs many steps to leave it
    (the offset grows by a factor 1 + 2 lr a step), while sign- and scale-free methods
    (rprop, adam, rmsprop, adagrad) step away at once. Success = ending within 0.1 of either
    well, i.e. escaped and settled.
    """
    return Surface("saddle", saddle_fn, saddle_grad, start=(-1.5, 1e-6),
                   minima=((0.0, 1.0), (0.0, -1.0)), bounds=((-2.0, 2.0), (-1.5, 1.5)),
                   success_radius=0.1, steps=100, note="escape from a saddle point")


def quadratic(condition: float = 100.0, angle_deg: float = 45.0) -> Surface:
    """An ill-conditioned bowl, Hessian eigenvalues 1 and ``condition``, minimum (0, 0).

    Rotated by 45 degrees by default, so both coordinates see the same curvature on the
    Hessian's diagonal: per-coordinate scaling (adagrad, rmsprop, adam, rprop, gains) cannot
    undo the conditioning; ``angle_deg=0`` gives the axis-aligned bowl where it can.
    """
    check_number("condition", condition, low=1.0)
    check_number("angle_deg", angle_deg)
    return Surface("quadratic", partial(quadratic_fn, condition=condition, angle_deg=angle_deg),
                   partial(quadratic_grad, condition=condition, angle_deg=angle_deg),
                   start=(-4.0, -2.5), minima=((0.0, 0.0),), bounds=((-5.0, 5.0), (-5.0, 5.0)),
                   success_radius=0.1, steps=300,
                   note=f"condition number {condition:g}: a narrow valley to zig-zag across")


SURFACES: dict[str, Surface] = {s.name: s for s in (rosenbrock(), beale(), saddle(),
                                                     quadratic())}


def get_surface(name: str) -> Surface:
    """The default surface called ``name``; ValueError naming the allowed ones otherwise."""
    check_choice("surface", name, tuple(SURFACES))
    return SURFACES[name]


def _check_run(surface: Surface, optimizer_name: str, steps: int | None) -> int:
    if not isinstance(surface, Surface):
        raise ValueError(f"surface: got {surface!r}; allowed: a Surface (see SURFACES)")
    entry_fields(optimizer_name, "optimizer_name")
    steps = surface.steps if steps is None else steps
    check_number("steps", steps, low=1, integer=True)
    return steps


def _make_optimizer(name: str, param: Tensor) -> torch.optim.Optimizer:
    """The comparison entry ``name``'s optimizer at rate 1 over one tensor (a default
    OptimConfig plus the entry's fields)."""
    groups = [{"name": "points", "params": [param], "lr": 1.0, "lr_mult": 1.0}]
    cfg = OptimConfig(**{**entry_fields(name, "optimizer_name"), "lr": 1.0})
    return OPTIMIZER_FACTORIES[cfg.name](groups, cfg)


def _stepper(name: str, points: Tensor, lrs: Tensor) -> Callable[[Tensor], None]:
    """A function ``step(grad)`` that moves row k of ``points`` as entry ``name`` at lrs[k].

    Rprop's rate is only its initial step size (later sizes are clamped to absolute bounds), so
    it moves the points itself, its per-weight step sizes seeded with each row's rate after a
    zero-gradient step that creates its state and moves nothing. Every other optimizer's move is
    ``-lr x`` a direction that depends on the gradients alone (weight decay is 0 here), so it
    runs at rate 1 on a zeroed shadow tensor and row k moves by lrs[k] x the shadow's move.
    Tests check both against lone runs of the real optimizer.
    """
    if entry_fields(name, "optimizer_name")["name"] == "rprop":
        param = torch.nn.Parameter(points)  # shares storage: moving it moves the points
        opt = _make_optimizer(name, param)
        param.grad = torch.zeros_like(points)
        opt.step()
        opt.state[param]["step_size"].copy_(lrs[:, None].expand_as(points))

        def step(grad: Tensor) -> None:
            param.grad = grad
            opt.step()
        return step

    shadow = torch.nn.Parameter(torch.zeros_like(points))
    opt = _make_optimizer(name, shadow)
    scale = lrs[:, None]

    def step(grad: Tensor) -> None:
        shadow.zero_()
        shadow.grad = grad
        opt.step()
        points.add_(shadow * scale)
    return step


@torch.no_grad()
def run_grid(surface: Surface, optimizer_name: str, lrs: Sequence[float],
             steps: int | None = None, start: Point | None = None) -> pd.DataFrame:
    """Run ``optimizer_name`` from ``start`` once per rate in ``lrs``, all at once.

    Args:
        steps: updates per run (None: ``surface.steps``); start: None = ``surface.start``.
    Returns:
        Long-form DataFrame (lr, step, x, y, loss, distance, diverged), step 0 = the start.
        A run stops at its first point out of ``surface.in_range`` (non-finite, or beyond the
        plot bounds widened 10x); it keeps the rows before and ``diverged`` is True on all.
    """
    steps = _check_run(surface, optimizer_name, steps)
    lr_t = torch.tensor([float(v) for v in lrs], dtype=DTYPE)
    if (lr_t.numel() == 0 or not bool(torch.isfinite(lr_t).all() and (lr_t > 0).all())
            or len(set(lr_t.tolist())) != len(lr_t)):
        raise ValueError(f"lrs: got {list(lrs)!r}; allowed: one or more distinct finite "
                         "rates > 0")
    start = surface.start if start is None else tuple(start)
    if len(start) != 2:
        raise ValueError(f"start: got {start!r}; allowed: a point (x, y)")
    for value in start:
        check_number("start", value)
    points = torch.tensor(start, dtype=DTYPE).repeat(len(lr_t), 1)
    step = _stepper(optimizer_name, points, lr_t)
    path = [points.clone()]
    for t in range(1, steps + 1):
        step(surface.grad(points))
        path.append(points.clone())
        if t % 50 == 0 and not surface.in_range(points).any():
            break  # every run has diverged
    return _paths_frame(surface, torch.stack(path), lr_t)


def _paths_frame(surface: Surface, path: Tensor, lrs: Tensor) -> pd.DataFrame:
    """(T+1, K, 2) path -> long-form rows up to each run's first point out of range."""
    loss = surface.fn(path)
    alive = torch.cumprod(surface.in_range(path).to(torch.int8), dim=0).bool()
    steps, runs = torch.nonzero(alive, as_tuple=True)
    frame = pd.DataFrame({
        "lr": lrs[runs].numpy(), "step": steps.numpy(),
        "x": path[steps, runs, 0].numpy(), "y": path[steps, runs, 1].numpy(),
        "loss": loss[steps, runs].numpy(),
        "distance": surface.distance(path[steps, runs]).numpy(),
        "diverged": (~alive[-1])[runs].numpy(),
    })
    return frame.sort_values(["lr", "step"], kind="stable", ignore_index=True)


def run_optimizer(surface: Surface, optimizer_name: str, lr: float, steps: int | None = None,
                  start: Point | None = None) -> pd.DataFrame:
    """One run at rate ``lr``: DataFrame (step, x, y, loss, distance, diverged), see run_grid."""
    check_number("lr", lr, low=0.0, low_open=True)
    return run_grid(surface, optimizer_name, [lr], steps, start).drop(columns="lr")


def tune_lr(surface: Surface, optimizer_name: str, steps: int | None = None,
            grid: Sequence[float] | None = None) -> tuple[float | None, pd.DataFrame]:
    """The grid rate with the lowest final loss after ``steps`` updates (same budget for all).

    Criterion: the loss at the last step (every minimum has value 0, so this is the gap to the
    optimum), ties broken by the mean loss over the run (the faster one wins). Diverged runs
    are excluded. Returns (best rate, or None when every rate diverged; one row per rate with
    lr, final_loss, mean_loss, final_distance, diverged, chosen).
    """
    best, table, _ = _tune(surface, optimizer_name, steps, grid)
    return best, table


def _tune(surface: Surface, optimizer_name: str, steps: int | None,
          grid: Sequence[float] | None) -> tuple[float | None, pd.DataFrame, pd.DataFrame]:
    """tune_lr's answer plus the paths of every rate (so the winner need not run again)."""
    paths = run_grid(surface, optimizer_name, LR_GRID if grid is None else grid, steps)
    by_lr = paths.groupby("lr", sort=True)
    table = pd.DataFrame({
        "final_loss": by_lr["loss"].last(), "mean_loss": by_lr["loss"].mean(),
        "final_distance": by_lr["distance"].last(), "diverged": by_lr["diverged"].first(),
    }).reset_index()
    table.loc[table["diverged"], ["final_loss", "final_distance"]] = math.nan
    ok = table[~table["diverged"]].sort_values(["final_loss", "mean_loss"], kind="stable")
    best = None if ok.empty else float(ok["lr"].iloc[0])
    table["chosen"] = table["lr"] == best
    return best, table, paths


def compare_on_surface(surface: Surface, optimizer_names: Sequence[str] = ENTRY_NAMES,
                       steps: int | None = None,
                       grid: Sequence[float] | None = None) -> pd.DataFrame:
    """Every optimizer's path at its own tuned rate, in one long-form table.

    ``optimizer_names``: comparison entries (``entries.ENTRY_NAMES``: the engine's optimizers,
    with gains split into ``gains`` and ``gains_momentum``).

    Returns columns surface, optimizer, lr (the tuned rate), step, x, y, loss, distance,
    diverged. An optimizer whose every grid rate diverged has no rows (see ``tune_lr``).
    """
    frames = []
    for name in optimizer_names:
        best, _, paths = _tune(surface, name, steps, grid)
        if best is not None:
            frames.append(paths[paths["lr"] == best].assign(surface=surface.name,
                                                            optimizer=name))
    columns = ["surface", "optimizer", "lr", "step", "x", "y", "loss", "distance", "diverged"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(
        columns=columns)


def summarize_paths(paths: pd.DataFrame, success_radius: float) -> pd.DataFrame:
    """One row per (surface, optimizer) of ``compare_on_surface``'s paths.

    Columns: lr, final_loss, final_distance, success (ended within ``success_radius`` of a
    minimum) and steps_to_success (the step from which the path stays that close; NaN if it
    does not end there), which tells a fast escape or approach from a lucky fly-by.
    """
    def one(run: pd.DataFrame) -> pd.Series:
        outside = run.loc[run["distance"] >= success_radius, "step"]
        last = run.iloc[-1]
        success = bool(last["distance"] < success_radius)
        settled = (outside.max() + 1 if len(outside) else run["step"].min()) if success else None
        return pd.Series({"lr": last["lr"], "final_loss": last["loss"],
                          "final_distance": last["distance"], "success": success,
                          "steps_to_success": math.nan if settled is None else settled})
    keys = ["surface", "optimizer"]
    return paths.groupby(keys, sort=False)[list(paths.columns.drop(keys))].apply(
        one).reset_index()


# --- the tuned rate, confirmed from fresh start points ---------------------------------------

FRESH_STARTS = 6  # start points on a ring around the tuning start, none of them tuned on
FRESH_RADIUS = 0.05  # the ring's radius, as a fraction of the plot's smaller side


def fresh_starts(surface: Surface, n: int = FRESH_STARTS,
                 radius: float = FRESH_RADIUS) -> list[Point]:
    """``n`` start points evenly spaced on a ring of ``radius`` x the plot's smaller side around
    ``surface.start`` (the first at 30 degrees, so none lies on an axis through the start)."""
    check_number("n", n, low=1, integer=True)
    side = min(high - low for low, high in surface.bounds)
    r = radius * side
    x0, y0 = surface.start
    return [(x0 + r * math.cos(math.radians(30 + 360 * k / n)),
             y0 + r * math.sin(math.radians(30 + 360 * k / n))) for k in range(n)]


def confirm_on_starts(surface: Surface, optimizer_name: str, lr: float,
                      starts: Sequence[Point] | None = None,
                      steps: int | None = None) -> pd.DataFrame:
    """``optimizer_name`` at the rate tuned from ``surface.start``, run from each fresh start
    (``fresh_starts`` by default) with the same budget: one row per start with start_x,
    start_y, final_loss, final_distance (NaN where it diverged), diverged and success (ended
    within the surface's success radius). Out of sample: no rate was tuned on these starts."""
    rows = []
    for x, y in fresh_starts(surface) if starts is None else starts:
        path = run_optimizer(surface, optimizer_name, lr, steps, (x, y))
        last = path.iloc[-1]
        diverged = bool(path["diverged"].any())
        distance = math.nan if diverged else float(last["distance"])
        rows.append({"start_x": x, "start_y": y,
                     "final_loss": math.nan if diverged else float(last["loss"]),
                     "final_distance": distance, "diverged": diverged,
                     "success": bool(not diverged and distance < surface.success_radius)})
    return pd.DataFrame(rows)


def fresh_summary(fresh: pd.DataFrame) -> dict:
    """``confirm_on_starts``' rows in one line: median, min and max final distance over the
    starts that did not diverge, successes and divergences out of the starts."""
    ok = fresh.loc[~fresh["diverged"], "final_distance"]
    return {"fresh_median_distance": float(ok.median()) if len(ok) else math.nan,
            "fresh_min_distance": float(ok.min()) if len(ok) else math.nan,
            "fresh_max_distance": float(ok.max()) if len(ok) else math.nan,
            "fresh_success": f"{int(fresh['success'].sum())}/{len(fresh)}",
            "fresh_diverged": int(fresh["diverged"].sum())}
