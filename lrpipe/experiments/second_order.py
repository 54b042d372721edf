"""Second-order methods, which need no learning rate: Newton and L-BFGS beside the first-order
race on the 2-D surfaces, and full-batch L-BFGS against SGD on real data.

Newton's step solves ``(H + mu I) p = -g`` with the exact Hessian
(``torch.autograd.functional.hessian``). ``mu = 0`` is the pure Newton step, which lands on the
minimum of a quadratic with a positive definite Hessian in one step. An indefinite Hessian (a
saddle: pure Newton walks to the saddle, a stationary point) or a singular one (a flat
direction: the solve blows up) is damped as Levenberg did, with the shift of Nocedal & Wright's
Algorithm 3.3 ("Cholesky with added multiple of the identity", Numerical Optimization, 2nd
ed., p. 51): ``mu`` starts at 0 when every diagonal entry is positive, else at ``-min H_ii +
beta``, and doubles (at least to ``beta``) until the Cholesky factorization succeeds with every
pivot^2 above ``n eps`` x scale (numerically positive definite); ``beta = damping x scale``,
scale = ``max |H_ii|``. ``H + mu I`` is then positive definite, so the step goes downhill; a
large ``mu`` turns it into a short gradient step ``-g / mu``. The path records ``mu``.

L-BFGS is ``torch.optim.LBFGS`` with ``line_search_fn="strong_wolfe"`` and rate 1 (its line
search picks the step length). Its line search evaluates the loss and gradient several times
per iteration, so every path and history counts iterations AND evaluations: ``evals`` counts
distinct (loss, gradient) evaluations (a re-evaluation at a point just evaluated, which
torch's ``step`` does at each call, is served from a cache and not counted); a first-order
update is one evaluation; a Newton iteration is one evaluation plus one Hessian
(``hessians``). On real data one full-batch evaluation is one pass over the training set.

Both methods have no tuned rate: the ``lr`` column of their paths holds their nominal step 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from lrpipe.engine.config import TrainConfig, check_choice, check_number
from lrpipe.engine.data import Dataset, load_data
from lrpipe.engine.members import batch_loss, evaluate
from lrpipe.engine.models import make_model
from lrpipe.engine.train import resolve_device, train
from lrpipe.experiments.surfaces import DTYPE, Point, Surface, summarize_paths

METHODS = ("newton", "lbfgs")
DAMPING = 1e-3  # beta of the damping shift, x max |H_ii| (N&W Algorithm 3.3 suggest 1e-3)
GRAD_TOL = 1e-10  # a surface run stops once max |gradient| is below this (float64 surfaces)
CHANGE_TOL = 1e-15  # torch LBFGS's tolerance_change on the surfaces (float64 resolution)
LBFGS_HISTORY = 10  # m, the (s, y) pairs L-BFGS keeps: N&W 7.2 suggest 3..20; torch's 100
LINE_SEARCH_EVALS = 25  # evaluations one strong-Wolfe search may make (torch's max_ls)
PATH_COLUMNS = ("surface", "optimizer", "lr", "step", "x", "y", "loss", "distance",
                "diverged", "evals", "hessians", "damping")
HISTORY_COLUMNS = ("method", "lr", "iteration", "evals", "passes", "train_loss", "val_loss",
                   "val_error", "seconds")


def newton_direction(grad: Tensor, hess: Tensor, damping: float = DAMPING
                     ) -> tuple[Tensor, float]:
    """The damped Newton step ``p = -(H + mu I)^-1 g`` and its shift ``mu`` (0: pure Newton).

    ``mu`` follows Nocedal & Wright's Algorithm 3.3 (see the module docstring): the smallest of
    0, ``-min H_ii + beta``, doubled, ... for which ``H + mu I`` has a Cholesky factor whose
    pivots^2 all exceed ``n x eps x scale``.
    """
    n = grad.numel()
    diag = hess.diagonal()
    scale = float(diag.abs().max()) or 1.0
    beta = damping * scale
    floor = n * torch.finfo(hess.dtype).eps * scale
    mu = 0.0 if float(diag.min()) > 0 else -float(diag.min()) + beta
    eye = torch.eye(n, dtype=hess.dtype, device=hess.device)
    for _ in range(200):  # doubling from beta passes any finite -min eigenvalue long before
        factor, info = torch.linalg.cholesky_ex(hess + mu * eye if mu else hess)
        if int(info) == 0 and float(factor.diagonal().min()) ** 2 > floor:
            step = -torch.cholesky_solve(grad.reshape(n, 1), factor).reshape(grad.shape)
            return step, mu
        mu = max(2 * mu, beta)
    raise ValueError(f"hess: no shift up to {mu:.3g} makes it positive definite; allowed: a "
                     "finite symmetric matrix")


def _start(surface: Surface, steps: int | None, start: Point | None) -> tuple[int, Tensor]:
    if not isinstance(surface, Surface):
        raise ValueError(f"surface: got {surface!r}; allowed: a Surface (see SURFACES)")
    steps = surface.steps if steps is None else steps
    check_number("steps", steps, low=1, integer=True)
    start = surface.start if start is None else tuple(start)
    if len(start) != 2:
        raise ValueError(f"start: got {start!r}; allowed: a point (x, y)")
    for value in start:
        check_number("start", value)
    return steps, torch.tensor(start, dtype=DTYPE)


def _path_frame(surface: Surface, name: str, points: list[Tensor], evals: list[int],
                hessians: list[int], damping: list[float]) -> pd.DataFrame:
    """Rows up to the first point out of ``surface.in_range`` (``diverged`` then True)."""
    path = torch.stack(points)
    alive = torch.cumprod(surface.in_range(path).to(torch.int8), dim=0).bool()
    keep = int(alive.sum())
    path = path[:keep]
    return pd.DataFrame({
        "surface": surface.name, "optimizer": name, "lr": 1.0, "step": range(keep),
        "x": path[:, 0].numpy(), "y": path[:, 1].numpy(), "loss": surface.fn(path).numpy(),
        "distance": surface.distance(path).numpy(), "diverged": not bool(alive[-1]),
        "evals": evals[:keep], "hessians": hessians[:keep], "damping": damping[:keep],
    })[list(PATH_COLUMNS)]


def run_newton(surface: Surface, steps: int | None = None, start: Point | None = None,
               damping: float = DAMPING) -> pd.DataFrame:
    """Newton's method with the exact Hessian from ``start`` (None: ``surface.start``).

    Runs up to ``steps`` iterations (None: ``surface.steps``, the first-order budget) and stops
    early once max |gradient| < ``GRAD_TOL`` or a point leaves ``surface.in_range``.
    Returns PATH_COLUMNS rows, step 0 = the start; ``damping`` is the shift ``mu`` of the step
    that reached the row (0 = pure Newton; NaN at the start).
    """
    steps, point = _start(surface, steps, start)
    check_number("damping", damping, low=0.0, low_open=True)
    points, evals, hessians, mus = [point], [0], [0], [math.nan]
    for t in range(1, steps + 1):
        grad = surface.grad(point)
        if float(grad.abs().max()) < GRAD_TOL or not bool(surface.in_range(point)):
            break
        hess = torch.autograd.functional.hessian(surface.fn, point)
        step, mu = newton_direction(grad, hess, damping)
        point = point + step
        points.append(point)
        evals.append(t)
        hessians.append(t)
        mus.append(mu)
    return _path_frame(surface, "newton", points, evals, hessians, mus)


class CountingClosure:
    """A closure for ``torch.optim.LBFGS`` that counts distinct (loss, gradient) evaluations.

    ``evaluate()`` returns the loss with every parameter's ``.grad`` set. A call at the
    parameters of the previous call returns the cached loss and gradients, uncounted: torch's
    ``LBFGS.step`` re-evaluates its starting point, which its line search has just evaluated.
    """

    def __init__(self, params: list[Tensor], evaluate_fn) -> None:
        self.params, self.evaluate_fn = params, evaluate_fn
        self.count, self.key, self.cached = 0, None, None

    def __call__(self) -> Tensor:
        with torch.no_grad():
            key = torch.cat([p.detach().reshape(-1) for p in self.params])
        if self.key is not None and torch.equal(key, self.key):
            loss, grads = self.cached
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g.clone()
            return loss
        loss = self.evaluate_fn()
        self.count += 1
        self.key, self.cached = key, (loss.detach(), [p.grad.clone() for p in self.params])
        return loss


def make_lbfgs(params: list[Tensor], history_size: int = LBFGS_HISTORY,
               tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9
               ) -> torch.optim.LBFGS:
    """torch's L-BFGS for one iteration per ``step`` (the caller counts and records each),
    with the strong-Wolfe line search and rate 1 (the search picks the step length)."""
    check_number("history_size", history_size, low=1, integer=True)
    return torch.optim.LBFGS(params, lr=1.0, max_iter=1, max_eval=1 + LINE_SEARCH_EVALS,
                             history_size=history_size, line_search_fn="strong_wolfe",
                             tolerance_grad=tolerance_grad, tolerance_change=tolerance_change)


def run_lbfgs(surface: Surface, steps: int | None = None, start: Point | None = None,
              history_size: int = LBFGS_HISTORY) -> pd.DataFrame:
    """torch's L-BFGS (strong Wolfe) from ``start``, one row per iteration, the surface's
    hand-written gradient as its closure; stops after ``steps`` iterations (None:
    ``surface.steps``), once max |gradient| < ``GRAD_TOL``, when an iteration no longer moves,
    or out of ``surface.in_range``. Returns PATH_COLUMNS rows (``damping`` NaN)."""
    steps, start_point = _start(surface, steps, start)
    param = nn.Parameter(start_point.clone())

    def evaluate_fn() -> Tensor:
        with torch.no_grad():
            param.grad = surface.grad(param)
            return surface.fn(param)

    closure = CountingClosure([param], evaluate_fn)
    opt = make_lbfgs([param], history_size, tolerance_grad=GRAD_TOL, tolerance_change=CHANGE_TOL)
    points, evals = [start_point], [0]
    for _ in range(steps):
        before = param.detach().clone()
        if float(surface.grad(before).abs().max()) < GRAD_TOL:
            break
        opt.step(closure)
        if torch.equal(param.detach(), before):
            break
        points.append(param.detach().clone())
        evals.append(closure.count)
        if not bool(surface.in_range(points[-1])):
            break
    return _path_frame(surface, "lbfgs", points, evals, [0] * len(points),
                       [math.nan] * len(points))


def compare_second_order(surface: Surface, methods: tuple[str, ...] = METHODS,
                         steps: int | None = None) -> pd.DataFrame:
    """Each method of ``methods`` from the surface's start, at most ``steps`` iterations
    (None: the first-order race's budget ``surface.steps``). PATH_COLUMNS rows."""
    runners = {"newton": run_newton, "lbfgs": run_lbfgs}
    for name in methods:
        check_choice("methods", name, METHODS)
    return pd.concat([runners[name](surface, steps) for name in methods], ignore_index=True)


def with_evaluations(first_order_paths: pd.DataFrame) -> pd.DataFrame:
    """``surfaces.compare_on_surface``'s paths in PATH_COLUMNS: a first-order update is one
    gradient evaluation (``evals`` = step), no Hessian, no damping."""
    return first_order_paths.assign(evals=first_order_paths["step"], hessians=0,
                                    damping=math.nan)[list(PATH_COLUMNS)]


def summarize_race(paths: pd.DataFrame, success_radius: float) -> pd.DataFrame:
    """``surfaces.summarize_paths`` plus, per (surface, optimizer): iterations, evals and
    hessians at the end, and evals_to_success (the evaluations spent by ``steps_to_success``;
    NaN if it does not end within ``success_radius``)."""
    keys = ["surface", "optimizer"]
    table = summarize_paths(paths, success_radius)
    last = paths.groupby(keys, sort=False).agg(
        iterations=("step", "max"), evals=("evals", "max"), hessians=("hessians", "max"))
    table = table.merge(last.reset_index(), on=keys)
    at = paths.set_index([*keys, "step"])["evals"]
    table["evals_to_success"] = [
        at.get((s, o, int(k)), math.nan) if pd.notna(k) else math.nan
        for s, o, k in zip(table["surface"], table["optimizer"], table["steps_to_success"],
                           strict=True)]
    return table


# --- real data: full-batch L-BFGS against SGD ---

@dataclass(frozen=True)
class LBFGSConfig:
    """Full-batch L-BFGS on a training set (the model, data and seed come from a TrainConfig).

    iterations: L-BFGS iterations (updates, not passes: each costs one or more passes).
    history_size: m, the (s, y) pairs kept (curvature memory: 2 m vectors of the model's size).
    """

    iterations: int = 50
    history_size: int = LBFGS_HISTORY

    def __post_init__(self) -> None:
        check_number("lbfgs.iterations", self.iterations, low=1, integer=True)
        check_number("lbfgs.history_size", self.history_size, low=1, integer=True)


def _row(method: str, lr: float, iteration: int, evals: int, train_loss: float,
         model: nn.Module, data: Dataset, seconds: float) -> dict:
    val_loss, val_error = evaluate(model, data.val)
    return dict(method=method, lr=lr, iteration=iteration, evals=evals, passes=float(evals),
                train_loss=train_loss, val_loss=val_loss, val_error=val_error, seconds=seconds)


def run_full_batch_lbfgs(cfg: TrainConfig, data: Dataset | None = None,
                         lbfgs: LBFGSConfig = LBFGSConfig()) -> pd.DataFrame:
    """Full-batch L-BFGS on ``cfg.model`` (softmax by intent) over all of ``data.train``.

    The model is ``cfg``'s seeded one (the same initial weights as an SGD run of ``cfg``); the
    loss is ``cfg.loss`` over every training example at once, so one evaluation is one pass.
    Stops after ``lbfgs.iterations`` iterations, when an iteration no longer moves the
    weights, or at a non-finite loss. Returns HISTORY_COLUMNS rows, iteration 0 = the start:
    ``evals`` = ``passes`` = full-batch evaluations so far, train_loss over the whole training
    set (evaluated apart, uncounted), ``seconds`` = optimizer time only (no evaluation).
    """
    if not isinstance(lbfgs, LBFGSConfig):
        raise ValueError(f"lbfgs: got {lbfgs!r}; allowed: an LBFGSConfig")
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg.data, device)
    model = make_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = data.train.x, data.train.y

    def evaluate_fn() -> Tensor:
        for p in params:
            p.grad = None
        loss = batch_loss(model(x), y, cfg.loss)
        loss.backward()
        return loss.detach()

    def train_loss() -> float:
        with torch.no_grad():
            return float(batch_loss(model(x), y, cfg.loss))

    closure = CountingClosure(params, evaluate_fn)
    opt = make_lbfgs(params, lbfgs.history_size)
    rows, seconds = [_row("lbfgs", 1.0, 0, 0, train_loss(), model, data, 0.0)], 0.0
    for it in range(1, lbfgs.iterations + 1):
        before = torch.cat([p.detach().reshape(-1) for p in params])
        start = time.perf_counter()
        opt.step(closure)
        seconds += time.perf_counter() - start
        loss = train_loss()
        if torch.equal(before, torch.cat([p.detach().reshape(-1) for p in params])):
            break
        rows.append(_row("lbfgs", 1.0, it, closure.count, loss, model, data, seconds))
        if not math.isfinite(loss):
            break
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def sgd_history(cfg: TrainConfig, lr: float, passes: int,
                data: Dataset | None = None) -> pd.DataFrame:
    """Mini-batch SGD (``cfg.batch_size``) at rate ``lr`` for ``passes`` epochs through the
    engine's ``train``, in HISTORY_COLUMNS: ``iteration`` = ``evals`` = mini-batch updates,
    ``passes`` = epochs, train_loss over the whole training set, ``seconds`` = training time."""
    check_number("lr", lr, low=0.0, low_open=True)
    check_number("passes", passes, low=1, integer=True)
    data = data if data is not None else load_data(cfg.data, resolve_device(cfg.device))
    n_train = len(data.train)
    run = cfg.replace(**{"optim.name": "sgd", "optim.lr": float(lr), "epochs": passes,
                         "eval_train_size": n_train})
    hist = train(run, data).history
    updates = hist["epoch"] * -(-n_train // run.batch_size)
    return pd.DataFrame({
        "method": "sgd", "lr": float(lr), "iteration": updates, "evals": updates,
        "passes": hist["epoch"].astype(float), "train_loss": hist["train_loss"],
        "val_loss": hist["val_loss"], "val_error": hist["val_error"],
        "seconds": hist["time_s"]})[list(HISTORY_COLUMNS)]


def lbfgs_against_sgd(cfg: TrainConfig, sgd_lr: float, lbfgs: LBFGSConfig = LBFGSConfig(),
                      data: Dataset | None = None) -> pd.DataFrame:
    """Full-batch L-BFGS, then SGD at its tuned rate ``sgd_lr`` (e.g. the optimizers flow's
    searched rate) for as many passes as L-BFGS used (rounded up, at least 1); same model,
    seed and data. HISTORY_COLUMNS rows of both."""
    data = data if data is not None else load_data(cfg.data, resolve_device(cfg.device))
    lb = run_full_batch_lbfgs(cfg, data, lbfgs)
    passes = max(1, math.ceil(float(lb["passes"].max())))
    return pd.concat([lb, sgd_history(cfg, sgd_lr, passes, data)], ignore_index=True)
