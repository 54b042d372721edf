"""What one optimizer step costs against the number of parameters: SGD, L-BFGS and Newton.

Measured on the real networks (softmax regression, MLPs 784-h-10) at one batch of
``examples`` inputs. The inputs are seeded random images and labels: a step's time and
memory depend on the shapes, not the values.

* SGD: one loss and gradient, one update.
* L-BFGS: one ``torch.optim.LBFGS`` iteration with history m (strong-Wolfe line search,
  several evaluations: ``evals_per_step``), timed once its history is full (m + 1 warm-up
  iterations).
* Newton: the dense Hessian (``torch.func.hessian``: forward-over-reverse, n Hessian-vector
  products) and the damped solve of ``second_order.newton_direction`` (a Cholesky
  factorization, O(n^3)). Measured up to ``newton_max_params`` parameters. EXTRAPOLATED at
  every size, never built whole: time = n / k x the measured time to build k columns of the
  Hessian at that size (the same vmapped Hessian-vector products ``torch.func.hessian`` uses)
  + the solve time of the largest measured Hessian x (n / n_ref)^3; bytes = the formula. The
  MLP's dense Hessian alone, 203,530^2 float32 numbers, is 165.7 GB: it is never allocated.
  The extrapolation is an optimistic floor: a block of k columns stays in cache, the whole
  Hessian moves n^2 numbers several times (measured on 2 loaded CPU cores, batch 1,000: the
  measured step took 1.3x the extrapolated one for softmax, 2.6-4x for the small MLPs).

``bytes_per_step`` counts the tensors a method keeps or builds for one step beyond the model
and its activations, from the live tensors (measured) or their sizes (extrapolated): SGD the
gradient; L-BFGS the gradient plus its history and direction (every tensor of the optimizer's
state after the step); Newton the gradient, the dense Hessian, its Cholesky factor (as large)
and the step. It is not the process's resident memory, which the allocator blurs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lrpipe.engine.config import ModelConfig, check_number
from lrpipe.engine.members import batch_loss
from lrpipe.engine.models import build_model, make_model
from lrpipe.experiments.second_order import (
    DAMPING,
    LBFGS_HISTORY,
    CountingClosure,
    make_lbfgs,
    newton_direction,
)

INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST's images: 784 inputs
CLASSES = 10
# softmax (7,850 parameters), then MLPs 784-h-10 of 1,600 .. 203,530 (the default MLP: h=256)
COST_MODELS: tuple[ModelConfig, ...] = (
    ModelConfig(name="softmax"),
    *(ModelConfig(name="mlp", hidden=(h,)) for h in (2, 4, 8, 32, 256)))
NEWTON_MAX_PARAMS = 8_000  # largest dense Hessian built: 8,000^2 float32 = 256 MB
HESSIAN_COLUMNS = 64  # columns built to time the Hessian of a size (64 x n floats: 52 MB at n=203k)
COST_COLUMNS = ("method", "model", "n_params", "seconds_per_step", "bytes_per_step",
                "evals_per_step", "source", "dense_hessian_bytes")


def dense_hessian_bytes(n_params: int, itemsize: int = 4) -> int:
    """Bytes of a dense n x n Hessian: n^2 x itemsize (4 for float32)."""
    check_number("n_params", n_params, low=1, integer=True)
    check_number("itemsize", itemsize, low=1, integer=True)
    return n_params * n_params * itemsize


def newton_bytes(n_params: int, itemsize: int = 4) -> int:
    """Bytes of one Newton step's tensors: Hessian and Cholesky factor (n^2 each), gradient
    and step (n each)."""
    return 2 * dense_hessian_bytes(n_params, itemsize) + 2 * n_params * itemsize


def model_label(cfg: ModelConfig) -> str:
    """``softmax`` or ``mlp 784-256-10``."""
    if cfg.name != "mlp":
        return cfg.name
    widths = [INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2], *cfg.hidden, CLASSES]
    return "mlp " + "-".join(str(w) for w in widths)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tensor_bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _flat_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Callable]:
    """The model's parameters as one vector and loss(vector) through ``functional_call``."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = vector[start:start + size].view(shape)
            start += size
        return batch_loss(functional_call(model, params, (x,)), y, "cross_entropy")
    return flat, loss


def sgd_cost(model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        batch_loss(model(x), y, "cross_entropy").backward()
        opt.step()
    seconds = _timed(step, x.device, repeats)
    return dict(method="sgd", seconds_per_step=seconds, evals_per_step=1.0,
                bytes_per_step=sum(p.grad.nbytes for p in model.parameters()))


def lbfgs_cost(model: nn.Module, x: Tensor, y: Tensor, repeats: int,
               history_size: int = LBFGS_HISTORY) -> dict:
    params = list(model.parameters())

    def evaluate_fn() -> Tensor:
        for p in params:
            p.grad = None
        loss = batch_loss(model(x), y, "cross_entropy")
        loss.backward()
        return loss.detach()
    closure = CountingClosure(params, evaluate_fn)
    opt = make_lbfgs(params, history_size, tolerance_grad=0.0, tolerance_change=0.0)
    for _ in range(history_size + 1):  # fill the history: a full-memory step is what repeats
        opt.step(closure)
    evals = closure.count
    seconds = _timed(lambda: opt.step(closure), x.device, repeats)
    state = opt.state[params[0]]
    return dict(method="lbfgs", seconds_per_step=seconds,
                evals_per_step=(closure.count - evals) / (repeats + 1),
                bytes_per_step=sum(_tensor_bytes(v) for v in state.values())
                + sum(p.grad.nbytes for p in params))


def newton_cost(model: nn.Module, x: Tensor, y: Tensor) -> tuple[dict, float]:
    """One measured Newton step (no warm-up: it is the expensive one); also returns the
    seconds of its solve alone, the reference of the O(n^3) extrapolation."""
    flat, loss = _flat_loss(model, x, y)
    _sync(x.device)
    start = time.perf_counter()
    grad = torch.func.grad(loss)(flat)
    hess = torch.func.hessian(loss)(flat)
    _sync(x.device)
    built = time.perf_counter()
    step, _ = newton_direction(grad, hess, DAMPING)
    _sync(x.device)
    done = time.perf_counter()
    n = flat.numel()
    measured = grad.nbytes + 2 * hess.nbytes + step.nbytes  # the factor is as large as hess
    return dict(method="newton", seconds_per_step=done - start, evals_per_step=float(n),
                bytes_per_step=measured), done - built


def hessian_columns_seconds(model: nn.Module, x: Tensor, y: Tensor, columns: int,
                            repeats: int) -> tuple[int, float]:
    """(k, median seconds) to build k = min(columns, n) columns of the model's Hessian as
    ``torch.func.hessian`` builds all n: vmapped forward-over-reverse Hessian-vector products
    with unit vectors. n / k times this is the whole Hessian's build time."""
    flat, loss = _flat_loss(model, x, y)
    k = min(columns, flat.numel())
    units = torch.eye(k, flat.numel(), dtype=flat.dtype, device=flat.device)

    def hvp(vector: Tensor) -> Tensor:
        return torch.func.jvp(torch.func.grad(loss), (flat,), (vector,))[1]
    return k, _timed(lambda: torch.func.vmap(hvp)(units), x.device, repeats)


def _batch(examples: int, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((examples, *INPUT_SHAPE), generator=gen)
    y = torch.randint(0, CLASSES, (examples,), generator=gen)
    return x.to(device), y.to(device)


def measure_step_costs(models: Sequence[ModelConfig] = COST_MODELS, examples: int = 1000,
                       newton_max_params: int = NEWTON_MAX_PARAMS, repeats: int = 3,
                       columns: int = HESSIAN_COLUMNS, device: str = "cpu",
                       seed: int = 0) -> pd.DataFrame:
    """Per model and method, the seconds and bytes of one step (COST_COLUMNS, long form).

    Args:
        models: the networks (softmax, mlp); sizes are the parameter counts they have.
        examples: inputs per step (the same batch for every method).
        newton_max_params: models up to this many parameters get a measured Newton step.
            EVERY model also gets an extrapolated one (``source``), so where both exist the
            figure shows how far the extrapolation is from the measurement.
        repeats: timed repeats of SGD and L-BFGS steps and of the Hessian-column block
            (median, after a warm-up); a measured Newton step runs once.
        columns: Hessian columns built per model to extrapolate the whole build (n / columns).
    Returns:
        Rows sorted by method, source, then n_params; ``dense_hessian_bytes`` = n^2 x 4.
    """
    check_number("examples", examples, low=1, integer=True)
    check_number("newton_max_params", newton_max_params, low=1, integer=True)
    check_number("repeats", repeats, low=1, integer=True)
    check_number("columns", columns, low=1, integer=True)
    dev = torch.device(device)
    x, y = _batch(examples, dev, seed)
    rows, solve_ref = [], None
    ordered = sorted(models, key=_param_count)
    for cfg in ordered:
        n = _param_count(cfg)
        common = dict(model=model_label(cfg), n_params=n, source="measured",
                      dense_hessian_bytes=dense_hessian_bytes(n))
        rows.append({**common, **sgd_cost(_fresh(cfg, dev, seed), x, y, repeats)})
        rows.append({**common, **lbfgs_cost(_fresh(cfg, dev, seed), x, y, repeats)})
        if n <= newton_max_params:
            cost, solve = newton_cost(_fresh(cfg, dev, seed), x, y)
            rows.append({**common, **cost})
            solve_ref = (n, solve)
    for cfg in ordered:
        n = _param_count(cfg)
        rows.append(dict(model=model_label(cfg), n_params=n,
                         dense_hessian_bytes=dense_hessian_bytes(n),
                         **_newton_extrapolated(cfg, x, y, repeats, solve_ref, dev, seed,
                                                columns)))
    table = pd.DataFrame(rows)[list(COST_COLUMNS)]
    return table.sort_values(["method", "source", "n_params"], kind="stable",
                             ignore_index=True)


def _newton_extrapolated(cfg: ModelConfig, x: Tensor, y: Tensor, repeats: int,
                         solve_ref: tuple[int, float] | None, device: torch.device,
                         seed: int, columns: int) -> dict:
    n = _param_count(cfg)
    if solve_ref is None:  # no Hessian measured: time the solve on a small SPD matrix
        solve_ref = _reference_solve(min(n, 1000), device)
    n_ref, solve = solve_ref
    k, block = hessian_columns_seconds(_fresh(cfg, device, seed), x, y, columns, repeats)
    return dict(method="newton", seconds_per_step=block * n / k + solve * (n / n_ref) ** 3,
                evals_per_step=float(n), bytes_per_step=newton_bytes(n),
                source="extrapolated")


def _reference_solve(n: int, device: torch.device) -> tuple[int, float]:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device)
    hess, grad = a @ a.T / n + torch.eye(n, device=device), torch.ones(n, device=device)
    return n, _timed(lambda: newton_direction(grad, hess, DAMPING), device, 1)


def _param_count(cfg: ModelConfig) -> int:
    """Parameters of ``cfg``'s network, built on the meta device (no memory, no weights)."""
    _check_model(cfg)
    with torch.device("meta"):
        model = build_model(cfg, INPUT_SHAPE, CLASSES)
    return sum(p.numel() for p in model.parameters())


def _check_model(cfg: ModelConfig) -> None:
    if not isinstance(cfg, ModelConfig) or cfg.name not in ("softmax", "mlp"):
        raise ValueError(f"models: got {cfg!r}; allowed: ModelConfigs named softmax or mlp")


def _fresh(cfg: ModelConfig, device: torch.device, seed: int) -> nn.Module:
    return make_model(cfg, INPUT_SHAPE, CLASSES, seed, device)
