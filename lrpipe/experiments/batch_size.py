"""The best learning rate against the batch size: the plan and the analysis, as pure functions.

For each optimizer and batch size, a small grid of rates is trained over several seeds. The grid
is centred (geometrically) on the square-root rule's prediction from a reference rate at a
reference batch size, ``lr(b) = lr_ref * sqrt(b / b_ref)``, and spans the linear rule's
prediction ``lr_ref * b / b_ref`` too, so the data can side with either (Goyal et al. 2017,
https://arxiv.org/abs/1706.02677, for the linear rule; Krizhevsky 2014,
https://arxiv.org/abs/1404.5997, for the square root). Every run has the same number of epochs
(passes over the data, not updates): a larger batch takes fewer, larger steps, the setting in
which both rules are stated.

The analysis reads one row per run (``RESULT_COLUMNS``): the best rate per (optimizer, batch
size) from the mean final validation loss over seeds, the rates tied with it within the seed
spread, a least-squares line through log(best rate) against log(batch size) with the slope's
standard error, both rules anchored at the reference batch size, and a verdict sentence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lrpipe.engine.config import (
    OPTIMIZERS,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_number,
    merge,
)
from lrpipe.experiments.decay import require_columns

DEFAULT_BATCH_SIZES = (32, 64, 128, 256, 512, 1024)  # examples per update
DEFAULT_OPTIMIZERS = ("sgd", "adam")
# Measured best rates of the default softmax at batch 128 (3 epochs of the 10,000-example
# subset, 3 seeds, mean final validation loss): sgd 0.01 (0.645; 0.003: 0.789, 0.03: 0.724),
# adam 0.001 (0.523; 0.0003: 0.632, 0.003: 0.544). Per update, for a mean loss over the batch.
DEFAULT_REFERENCE_RATES = {"sgd": 0.01, "adam": 0.001}
DEFAULT_REFERENCE_BATCH = 128  # examples per update at which the reference rates were measured
# x the square-root rule's rate: factor-2 steps, two each side. At b / b_ref from 1/4 to 8 the
# linear rule's rate is 0.5x to 2.83x the square-root one, so both lie inside with a rate beyond.
DEFAULT_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_SEEDS = (0, 1, 2)  # the house minimum for a band over seeds
DEFAULT_EPOCHS = 3  # passes over the subset, the same for every batch size
# Fashion-MNIST training examples. The default plan's 180 softmax runs (batched 7-8 per task,
# 2 tasks at a time) took 59 s in the flow, 87 s with Prefect's start, on 2 shared CPU cores.
DEFAULT_SUBSET = 10_000
RULES = {"linear": 1.0, "square-root": 0.5}  # name -> slope of log(rate) against log(batch)
RESULT_COLUMNS = ("optimizer", "batch_size", "lr", "seed", "status", "val_loss")
Z = 2.0  # a rule is consistent with the data when within Z standard errors of the slope


def _checked_values(name: str, values, *, low: float, integer: bool) -> tuple:
    """``values`` as a sorted tuple: non-empty, distinct, each >= ``low`` (integers) or > ``low``
    (numbers); a ConfigError naming ``name`` otherwise."""
    allowed = f"integers >= {low:g}" if integer else f"finite numbers > {low:g}"
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or len(values) == 0:
        raise ConfigError(f"{name}: got {values!r}; allowed: a non-empty list of {allowed}")
    for v in values:
        check_number(name, v, low=low, low_open=not integer, integer=integer)
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: got {list(values)}; allowed: distinct {allowed}")
    return tuple(sorted(values))


@dataclass(frozen=True)
class BatchSizePlan:
    """What the experiment trains, validated on construction (errors name the field).

    batch_sizes: examples per update, at least 2 distinct (a slope needs two points).
    optimizers: names from ``lrpipe.engine.config.OPTIMIZERS``.
    reference_rates: optimizer -> its good rate at ``reference_batch`` (per update); every
        optimizer needs one.
    reference_batch: the batch size the reference rates belong to; one of ``batch_sizes``
        (the rules are anchored at its measured best rate).
    grid: multiples of the square-root rule's rate trained at each batch size; it must span
        both rules' predictions at every batch size.
    seeds: seeds per rate (weights and batch order); >= 3 to judge ties.
    epochs: passes over the training data of every run (epochs, not steps).
    """

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    reference_rates: tuple[tuple[str, float], ...] = field(
        default_factory=lambda: tuple(DEFAULT_REFERENCE_RATES.items()))
    reference_batch: int = DEFAULT_REFERENCE_BATCH
    grid: tuple[float, ...] = DEFAULT_GRID
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    epochs: int = DEFAULT_EPOCHS

    def __post_init__(self) -> None:
        sizes = _checked_values("batch_sizes", self.batch_sizes, low=1, integer=True)
        if len(sizes) < 2:
            raise ConfigError(f"batch_sizes: got {list(sizes)}; allowed: at least 2 distinct "
                              "sizes (the slope needs two points)")
        object.__setattr__(self, "batch_sizes", sizes)
        object.__setattr__(self, "grid", _checked_values("grid", self.grid, low=0.0,
                                                         integer=False))
        object.__setattr__(self, "optimizers", self._checked_optimizers())
        object.__setattr__(self, "reference_rates", self._checked_rates())
        check_number("reference_batch", self.reference_batch, low=1, integer=True)
        if self.reference_batch not in sizes:
            raise ConfigError(f"reference_batch: got {self.reference_batch!r}; allowed: one of "
                              f"batch_sizes {list(sizes)}")
        object.__setattr__(self, "seeds", _checked_values("seeds", self.seeds, low=0,
                                                          integer=True))
        check_number("epochs", self.epochs, low=1, integer=True)
        check_grid_spans_rules(self)

    def _checked_optimizers(self) -> tuple[str, ...]:
        opts = self.optimizers
        if isinstance(opts, str) or not hasattr(opts, "__iter__") or len(opts) == 0 or any(
                o not in OPTIMIZERS for o in opts) or len(set(opts)) != len(opts):
            raise ConfigError(f"optimizers: got {opts!r}; allowed: distinct names from "
                              f"{', '.join(OPTIMIZERS)}")
        return tuple(opts)

    def _checked_rates(self) -> tuple[tuple[str, float], ...]:
        rates = self.reference_rates
        pairs = dict(rates.items() if isinstance(rates, Mapping) else rates)
        for name in self.optimizers:
            if name not in pairs:
                raise ConfigError(f"reference_rates: got none for {name!r}; allowed: a rate > 0 "
                                  f"for every optimizer ({', '.join(self.optimizers)}), e.g. "
                                  f"{name}=0.01")
            check_number(f"reference_rates[{name}]", pairs[name], low=0.0, low_open=True)
        return tuple((name, float(pairs[name])) for name in self.optimizers)

    def reference_rate(self, optimizer: str) -> float:
        return dict(self.reference_rates)[optimizer]


def rule_rate(reference_rate: float, reference_batch: int, batch_size: int,
              slope: float) -> float:
    """``reference_rate * (batch_size / reference_batch) ** slope``: slope 1 is the linear
    rule, 0.5 the square-root rule."""
    return reference_rate * (batch_size / reference_batch) ** slope


def rate_grid(plan: BatchSizePlan, optimizer: str, batch_size: int) -> tuple[float, ...]:
    """The rates trained at ``batch_size``: ``plan.grid`` x the square-root rule's rate,
    ascending, rounded to 6 significant digits (readable names, stable config hashes)."""
    centre = rule_rate(plan.reference_rate(optimizer), plan.reference_batch, batch_size,
                       RULES["square-root"])
    return tuple(float(f"{centre * g:.6g}") for g in plan.grid)


def check_grid_spans_rules(plan: BatchSizePlan) -> None:
    """ConfigError naming ``grid`` unless, at every batch size, the grid's smallest and
    largest multiples enclose both rules' predictions (so neither is favoured by the range)."""
    low, high = min(plan.grid), max(plan.grid)
    for b in plan.batch_sizes:
        for name, slope in RULES.items():
            # the rule's rate as a multiple of the square-root rate at b
            ratio = (b / plan.reference_batch) ** (slope - RULES["square-root"])
            if not low * (1 - 1e-9) <= ratio <= high * (1 + 1e-9):
                raise ConfigError(
                    f"grid: got {list(plan.grid)}; allowed: multiples spanning both rules at "
                    f"every batch size; the {name} rule at batch {b} needs {ratio:.3g}x the "
                    "square-root rate")


def base_config(overrides: Mapping | None = None) -> TrainConfig:
    """The config every run shares: softmax regression on 10,000 Fashion-MNIST examples
    (convex and quick, so 180 runs fit in minutes on two cores, batched; the rules are about
    the optimizer, not the network). The plan sets optim.name, optim.lr, batch_size, seed
    and epochs; overriding one of them is a ConfigError naming it."""
    overrides = dict(overrides or {})
    for key in ("optim.name", "optim.lr", "batch_size", "seed", "epochs"):
        section, _, sub = key.partition(".")
        nested = overrides.get(section) if sub else None
        if key in overrides or (isinstance(nested, Mapping) and sub in nested):
            raise ConfigError(f"{key}: set by this experiment (--optimizers, --reference-rates, "
                              "--batch-sizes, --seeds, --epochs); allowed: other fields")
    base = TrainConfig(data=DataConfig(subset=DEFAULT_SUBSET), model=ModelConfig(name="softmax"))
    return merge(base, overrides)


def plan_configs(base: TrainConfig, plan: BatchSizePlan) -> list[TrainConfig]:
    """One config per (optimizer, batch size, rate, seed), in that order.

    Raises:
        ConfigError: a batch size exceeds ``base.data.subset`` (named ``batch_size``).
    """
    cfgs = []
    for opt in plan.optimizers:
        for b in plan.batch_sizes:
            for lr in rate_grid(plan, opt, b):
                for seed in plan.seeds:
                    cfgs.append(merge(base, {"optim.name": opt, "optim.lr": lr,
                                             "batch_size": b, "seed": seed,
                                             "epochs": plan.epochs}))
    return cfgs


def results_table(cfgs: Sequence[TrainConfig], finals: Sequence[Mapping]) -> pd.DataFrame:
    """One row per run: ``RESULT_COLUMNS`` plus val_error and run_id where ``finals`` (one
    dict per config, e.g. a training task's result) have them. A diverged run keeps its
    status; its val_loss is read as infinite by the analysis."""
    if len(cfgs) != len(finals):
        raise ValueError(f"finals: got {len(finals)} for {len(cfgs)} configs; allowed: one each")
    rows = [{"optimizer": c.optim.name, "batch_size": c.batch_size, "lr": c.optim.lr,
             "seed": c.seed, "status": f["status"], "val_loss": f.get("val_loss", math.nan),
             "val_error": f.get("val_error", math.nan), "run_id": f.get("run_id", "")}
            for c, f in zip(cfgs, finals, strict=True)]
    return pd.DataFrame(rows)


# --- the analysis ---


def rate_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds of the final validation loss, per (optimizer, batch size,
    rate).

    A run that did not end ``ok`` (diverged) or whose loss is not finite counts as an infinite
    loss: one diverged seed makes its rate's mean infinite, so it is never the best.
    Returns:
        DataFrame(optimizer, batch_size, lr, n_seeds, n_diverged, val_loss_mean, val_loss_std),
        sorted; std over seeds with ddof 1 (NaN for one seed or an infinite mean).
    """
    require_columns(results, RESULT_COLUMNS, "results")  # results_table's columns
    df = results.copy()
    bad = (df["status"] != "ok") | ~np.isfinite(df["val_loss"].astype(float))
    df["loss"] = df["val_loss"].astype(float).where(~bad, math.inf)
    df["bad"] = bad
    g = df.groupby(["optimizer", "batch_size", "lr"])
    out = pd.DataFrame({"n_seeds": g["seed"].nunique(), "n_diverged": g["bad"].sum(),
                        "val_loss_mean": g["loss"].mean(),
                        "val_loss_std": g["loss"].std(ddof=1)})
    out.loc[out["n_diverged"] > 0, "val_loss_std"] = math.nan
    out["n_diverged"] = out["n_diverged"].astype(int)
    return out.reset_index().sort_values(["optimizer", "batch_size", "lr"],
                                         ignore_index=True)


def _best_of(rates: pd.DataFrame) -> dict:
    """The best rate of one (optimizer, batch size) and the rates tied with it."""
    lrs = rates["lr"].to_numpy(float)
    row = {"n_rates": len(lrs), "grid_step": float(np.exp(np.median(np.diff(np.log(lrs)))))
           if len(lrs) > 1 else math.nan}
    ok = rates[np.isfinite(rates["val_loss_mean"])]
    if ok.empty:
        return {**row, "best_lr": math.nan, "val_loss_mean": math.nan, "val_loss_std": math.nan,
                "tied_low": math.nan, "tied_high": math.nan, "n_tied": 0, "at_edge": False}
    best = ok.loc[ok["val_loss_mean"].idxmin()]
    spread = ok["val_loss_std"].fillna(0.0).clip(lower=float(np.nan_to_num(best["val_loss_std"])))
    tied = ok[ok["val_loss_mean"] - best["val_loss_mean"] <= spread]
    return {**row, "best_lr": float(best["lr"]), "val_loss_mean": float(best["val_loss_mean"]),
            "val_loss_std": float(best["val_loss_std"]), "tied_low": float(tied["lr"].min()),
            "tied_high": float(tied["lr"].max()), "n_tied": len(tied),
            "at_edge": bool(len(lrs) > 1 and best["lr"] in (lrs.min(), lrs.max()))}


def best_rates(rates: pd.DataFrame) -> pd.DataFrame:
    """The best rate per (optimizer, batch size): the lowest mean final validation loss.

    Tie band: a rate is tied with the best when its mean is within one standard deviation over
    seeds of the best's mean, the larger of the two rates' deviations (one seed: no band, only
    an exact tie). ``tied_low``/``tied_high`` span the tied rates (the best included).
    ``at_edge``: the best is the grid's smallest or largest rate, so the true best may lie
    beyond it. All rates diverged: best_lr NaN.
    Args:
        rates: ``rate_summary``'s table.
    Returns:
        DataFrame(optimizer, batch_size, best_lr, val_loss_mean, val_loss_std, tied_low,
        tied_high, n_tied, at_edge, n_rates, grid_step).
    """
    rows = [{"optimizer": opt, "batch_size": int(b), **_best_of(group.sort_values("lr"))}
            for (opt, b), group in rates.groupby(["optimizer", "batch_size"], sort=True)]
    cols = ["optimizer", "batch_size", "best_lr", "val_loss_mean", "val_loss_std", "tied_low",
            "tied_high", "n_tied", "at_edge", "n_rates", "grid_step"]
    return pd.DataFrame(rows, columns=cols)


def fit_slope(batch_sizes, best_lrs, tied_low, tied_high, grid_step) -> dict:
    """Least squares of log(best rate) on log(batch size), and the slope's standard error.

    Two estimates of the error, the larger reported as ``slope_se``: ``se_scatter`` from the
    residuals (needs 3 points), and ``se_grid`` propagating each point's own uncertainty, the
    half-width of its tied range in log and the grid's rounding (a uniform error over one grid
    step: log(step) / sqrt(12)). Points with a NaN rate are left out.
    Returns:
        {"n", "slope", "intercept" (log rate at batch size 1), "slope_se", "se_scatter",
        "se_grid"}; slope NaN below 2 points.
    """
    x, y = np.log(np.asarray(batch_sizes, float)), np.log(np.asarray(best_lrs, float))
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    nan = {"n": int(keep.sum()), "slope": math.nan, "intercept": math.nan,
           "slope_se": math.nan, "se_scatter": math.nan, "se_grid": math.nan}
    if len(x) < 2 or np.ptp(x) == 0:
        return nan
    dx = x - x.mean()
    sxx = float(dx @ dx)
    slope = float(dx @ (y - y.mean()) / sxx)
    intercept = float(y.mean() - slope * x.mean())
    resid = y - (intercept + slope * x)
    se_scatter = math.sqrt(float(resid @ resid) / (len(x) - 2) / sxx) if len(x) > 2 else math.nan
    half = (np.log(np.asarray(tied_high, float)) - np.log(np.asarray(tied_low, float)))[keep] / 2
    rounding = np.nan_to_num(np.log(np.asarray(grid_step, float))[keep]) / math.sqrt(12)
    se_grid = math.sqrt(float((dx**2) @ (half**2 + rounding**2))) / sxx
    return {**nan, "slope": slope, "intercept": intercept, "se_scatter": se_scatter,
            "se_grid": se_grid, "slope_se": float(np.nanmax([se_scatter, se_grid]))}


def fit_slopes(best: pd.DataFrame) -> pd.DataFrame:
    """``fit_slope`` per optimizer of ``best_rates``' table: DataFrame(optimizer, n, slope,
    slope_se, se_scatter, se_grid, intercept, n_edge)."""
    rows = []
    for opt, g in best.groupby("optimizer", sort=True):
        fit = fit_slope(g["batch_size"], g["best_lr"], g["tied_low"], g["tied_high"],
                        g["grid_step"])
        rows.append({"optimizer": opt, **fit, "n_edge": int(g["at_edge"].sum())})
    return pd.DataFrame(rows, columns=["optimizer", "n", "slope", "slope_se", "se_scatter",
                                       "se_grid", "intercept", "n_edge"])


def verdict(optimizer: str, fit: Mapping, z: float = Z) -> str:
    """One sentence: which rule ``fit`` (a ``fit_slopes`` row) follows. A rule is consistent
    when its slope is within ``z`` standard errors of the fitted one; one consistent rule is
    followed, two cannot be told apart, none is a slope of the data's own."""
    slope, se = fit["slope"], fit["slope_se"]
    if not math.isfinite(slope):
        return f"{optimizer}: too few batch sizes with a best rate to fit a slope."
    measured = f"slope {slope:.2f} ± {se:.2f}" if math.isfinite(se) else f"slope {slope:.2f}"
    near = [name for name, s in RULES.items() if math.isfinite(se) and abs(slope - s) <= z * se]
    if len(near) == 1:
        text = f"{optimizer} follows the {near[0]} rule ({measured})"
    elif near:
        text = f"{optimizer} cannot tell the linear and square-root rules apart ({measured})"
    elif slope < RULES["square-root"]:
        text = (f"{optimizer} follows neither rule: its best rate grows more slowly than the "
                f"square root of the batch size ({measured})")
    elif slope > RULES["linear"]:
        text = (f"{optimizer} follows neither rule: its best rate grows faster than the batch "
                f"size ({measured})")
    else:
        text = (f"{optimizer} follows neither rule: its slope lies between the square-root and "
                f"linear rules ({measured})")
    if fit.get("n_edge", 0):
        text += (f"; {fit['n_edge']} best rate(s) at the grid's edge, so the slope may be "
                 "steeper or flatter")
    return text + "."


def scaling_table(best: pd.DataFrame, fits: pd.DataFrame, reference_batch: int) -> pd.DataFrame:
    """Everything the figure draws, long-form: per optimizer the best rates (kind ``best``,
    lr_low/lr_high the tied range), the fitted line (``fit``) and both rules (``linear rule``,
    ``square-root rule``) anchored at the best rate at ``reference_batch``.

    Returns:
        DataFrame(optimizer, kind, label, batch_size, lr, lr_low, lr_high, at_edge), one row
        per (kind, batch size); rule rows are absent where the reference batch has no best
        rate, fit rows where the slope is NaN.
    """
    rows = []
    for opt, g in best.groupby("optimizer", sort=True):
        g = g.sort_values("batch_size")
        for r in g.itertuples():
            if math.isfinite(r.best_lr):
                rows.append({"optimizer": opt, "kind": "best", "label": "best rate (tied range)",
                             "batch_size": r.batch_size, "lr": r.best_lr, "lr_low": r.tied_low,
                             "lr_high": r.tied_high, "at_edge": r.at_edge})
        fit = fits.set_index("optimizer").loc[opt]
        sizes = g["batch_size"].to_numpy(float)
        if math.isfinite(fit["slope"]):
            label = f"fit: slope {fit['slope']:.2f} ± {fit['slope_se']:.2f}"
            rows += [_line(opt, "fit", label, b, math.exp(fit["intercept"] + fit["slope"]
                                                          * math.log(b))) for b in sizes]
        anchor = g.loc[g["batch_size"] == reference_batch, "best_lr"]
        if len(anchor) and math.isfinite(anchor.iloc[0]):
            for name, slope in RULES.items():
                label = f"{name} rule (slope {slope:g}) from batch {reference_batch}"
                rows += [_line(opt, f"{name} rule", label, b,
                               rule_rate(float(anchor.iloc[0]), reference_batch, b, slope))
                         for b in sizes]
    return pd.DataFrame(rows, columns=["optimizer", "kind", "label", "batch_size", "lr",
                                       "lr_low", "lr_high", "at_edge"])


def _line(optimizer: str, kind: str, label: str, batch_size: float, lr: float) -> dict:
    return {"optimizer": optimizer, "kind": kind, "label": label, "batch_size": int(batch_size),
            "lr": lr, "lr_low": math.nan, "lr_high": math.nan, "at_edge": False}


@dataclass(frozen=True)
class BatchSizeAnalysis:
    """What the experiment found: per-rate means (``rates``), best rates (``best``), slopes
    (``fits``), the figure's table (``lines``) and one verdict sentence per optimizer."""

    rates: pd.DataFrame
    best: pd.DataFrame
    fits: pd.DataFrame
    lines: pd.DataFrame
    verdicts: dict[str, str]

    @property
    def answer(self) -> str:
        return " ".join(self.verdicts.values())


def analyze(results: pd.DataFrame, reference_batch: int) -> BatchSizeAnalysis:
    """``rate_summary``, ``best_rates``, ``fit_slopes``, ``scaling_table`` and ``verdict`` of
    one table of runs (``RESULT_COLUMNS``)."""
    rates = rate_summary(results)
    best = best_rates(rates)
    fits = fit_slopes(best)
    verdicts = {r["optimizer"]: verdict(r["optimizer"], r) for r in fits.to_dict("records")}
    return BatchSizeAnalysis(rates, best, fits, scaling_table(best, fits, reference_batch),
                             verdicts)
