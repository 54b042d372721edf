"""Choosing a learning rate: a halving search on a data subset, then a regret check.

The halving search trains a short budget from the same initial weights at start_lr,
start_lr x factor, ... until a rate is stable, then keeps halving while the loss keeps falling.
Its answer is cross-checked against the range-test suggestions (``cross_check``); the candidates
and a coarse log grid around them are then trained in full by the caller, and ``regret_table`` /
``choose_rate`` pick the candidate with the lowest validation loss, saying how far each one is
from the best rate of the grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lrpipe.config import ConfigError, TrainConfig, check_number
from lrpipe.data import Dataset, Split
from lrpipe.train import TrainResult, train

LADDER_COLUMNS = ("lr", "loss", "diverged", "reason")
REGRET_COLUMNS = ("name", "lr", "val_loss", "best_lr", "best_val_loss", "regret")
RTOL = 1e-9  # two rates closer than this (relative) are the same rate


@dataclass(frozen=True)
class HalvingResult:
    """The rungs tried (ladder: lr, loss, diverged, reason, in the order tried) and the choice.

    ``chosen_lr`` is None exactly when every rung diverged; ``reason`` says why either way.
    """

    ladder: pd.DataFrame
    chosen_lr: float | None
    reason: str


def budget_data(data: Dataset, batch_size: int, budget_epochs: int,
                max_steps: int | None) -> Dataset:
    """``data`` with its training split cut to at most ``max_steps`` updates over the budget.

    Each epoch then runs ``max_steps // budget_epochs`` batches (at least one); the cut keeps
    the split's first examples, which ``load_data`` already drew at random.
    """
    if max_steps is None:
        return data
    per_epoch = max(1, max_steps // budget_epochs)
    n = min(len(data.train), per_epoch * batch_size)
    return dataclasses.replace(data, train=Split(data.train.x[:n], data.train.y[:n]))


def rung(cfg: TrainConfig, data: Dataset, lr: float, epochs: int,
         train_fn: Callable[[TrainConfig, Dataset], TrainResult] = train) -> dict:
    """Train one rung; it diverged if train() says so or its final train loss exceeds the initial.

    Returns:
        {"lr", "loss" (final train loss; NaN if it went non-finite), "diverged", "reason"}.
    """
    result = train_fn(cfg.replace(**{"optim.lr": lr, "epochs": epochs}), data)
    losses = result.history["train_loss"]
    initial, final = float(losses.iloc[0]), float(losses.iloc[-1])
    if result.status == "diverged" or not math.isfinite(final):
        # train() stopped it: a non-finite loss or one above cfg.diverge_factor x the initial.
        return dict(lr=lr, loss=math.nan, diverged=True,
                    reason=f"training diverged in epoch {result.diverged_epoch}")
    if final > initial:
        return dict(lr=lr, loss=final, diverged=True,
                    reason=f"final train loss {final:.4g} > initial {initial:.4g}")
    return dict(lr=lr, loss=final, diverged=False,
                reason=f"train loss {initial:.4g} -> {final:.4g}")


def _check_halving_args(start_lr, factor, min_lr, budget_epochs, max_steps) -> None:
    check_number("start_lr", start_lr, low=0.0, low_open=True)
    check_number("factor", factor, low=0.0, high=1.0, low_open=True)
    if factor >= 1.0:  # a factor of 1 would retry the same rate for ever
        raise ConfigError(f"factor: got {factor!r}; allowed: a number > 0 and < 1")
    check_number("min_lr", min_lr, low=0.0, high=start_lr, low_open=True)
    check_number("budget_epochs", budget_epochs, low=1, integer=True)
    if max_steps is not None:
        check_number("max_steps", max_steps, low=1, integer=True)


def halving_search(
    cfg: TrainConfig,
    data: Dataset,
    *,
    start_lr: float = 10.0,
    factor: float = 0.5,
    min_lr: float = 1e-5,
    budget_epochs: int = 1,
    max_steps: int | None = None,
    train_fn: Callable[[TrainConfig, Dataset], TrainResult] = train,
) -> HalvingResult:
    """Halve the rate from ``start_lr`` until it is stable, then while the loss keeps falling.

    Every rung trains ``cfg`` (same seed, so the same initial weights and batch order) at its
    rate for ``budget_epochs`` epochs (at most ``max_steps`` updates) on ``data``, usually a
    subset. Rates: start_lr x factor^k down to ``min_lr``. Before the first stable rung,
    diverged rungs are skipped over; after it, the search stops at the first rung that does not
    lower the loss (or diverges). ``train_fn`` replaces ``lrpipe.train.train`` in tests.
    Returns:
        HalvingResult; chosen_lr = the rate with the lowest loss among the stable rungs.
    """
    _check_halving_args(start_lr, factor, min_lr, budget_epochs, max_steps)
    rung_data = budget_data(data, cfg.batch_size, budget_epochs, max_steps)
    rows: list[dict] = []
    stop = f"reached min_lr {min_lr:g}"
    k = 0
    while (lr := start_lr * factor**k) >= min_lr * (1 - RTOL):
        row = rung(cfg, rung_data, lr, budget_epochs, train_fn)
        rows.append(row)
        stable = [r for r in rows[:-1] if not r["diverged"]]
        if stable and (row["diverged"] or not row["loss"] < stable[-1]["loss"]):
            stop = (f"stopped at lr {lr:g}: "
                    + ("it diverged" if row["diverged"] else "the loss no longer fell"))
            break
        k += 1
    ladder = pd.DataFrame(rows, columns=list(LADDER_COLUMNS))
    return HalvingResult(ladder, *_halving_choice(ladder, stop))


def _halving_choice(ladder: pd.DataFrame, stop: str) -> tuple[float | None, str]:
    ok = ladder[~ladder["diverged"].astype(bool)]
    if ok.empty:
        return None, (f"every rung diverged ({len(ladder)} rates from "
                      f"{ladder['lr'].iloc[0]:g}); {stop}")
    best = ok.loc[ok["loss"].idxmin()]
    return float(best["lr"]), (
        f"lowest train loss {best['loss']:.4g} at lr {best['lr']:g} among {len(ok)} stable "
        f"rungs; first stable rate {ok['lr'].iloc[0]:g}; {stop}")


def cross_check(halving_lr: float, suggestions: Mapping[str, float | None]) -> pd.DataFrame:
    """How far each suggestion is from the halving rate: rule, lr, ratio_to_halving, log10_ratio.

    A None suggestion gets NaN in every number column.
    """
    check_number("halving_lr", halving_lr, low=0.0, low_open=True)
    rows = []
    for rule, lr in suggestions.items():
        ratio = math.nan if lr is None else float(lr) / halving_lr
        rows.append(dict(rule=rule, lr=math.nan if lr is None else float(lr),
                         ratio_to_halving=ratio, log10_ratio=np.log10(ratio)))
    return pd.DataFrame(rows, columns=["rule", "lr", "ratio_to_halving", "log10_ratio"])


def candidate_grid(
    candidates: Sequence[float], points_per_decade: int = 2, span_decades: float = 1
) -> list[float]:
    """Sorted rates: the candidates plus a log grid 10^(k / points_per_decade) around them.

    The grid covers [min candidate / 10^span, max candidate x 10^span]; grid points within
    a relative 1e-9 of a candidate are dropped, so each candidate appears once, exactly.
    """
    check_number("points_per_decade", points_per_decade, low=1, integer=True)
    check_number("span_decades", span_decades, low=0.0)
    if len(candidates) == 0:
        raise ValueError("candidates: got none; allowed: one or more rates > 0")
    for lr in candidates:
        check_number("candidates", lr, low=0.0, low_open=True)
    logs = np.log10(np.asarray(candidates, dtype=float))
    lo = math.ceil((logs.min() - span_decades) * points_per_decade - RTOL)
    hi = math.floor((logs.max() + span_decades) * points_per_decade + RTOL)
    rates = sorted({float(c) for c in candidates})
    for k in range(lo, hi + 1):
        point = float(10 ** (k / points_per_decade))
        if not any(math.isclose(point, r, rel_tol=RTOL) for r in rates):
            rates.append(point)
    return sorted(rates)


def _per_rate(results: pd.DataFrame) -> pd.DataFrame:
    """One row per rate: mean val_loss over its runs, inf if any run diverged or is non-finite."""
    missing = {"lr", "val_loss", "status"} - set(results.columns)
    if missing:
        raise ValueError(f"results: missing columns {sorted(missing)}; allowed: a table with "
                         "lr, val_loss, status")
    if results.empty:
        raise ValueError("results: got no rows; allowed: one or more finished runs")
    ok = (results["status"] == "ok") & np.isfinite(results["val_loss"].astype(float))
    table = results.assign(ok=ok).groupby("lr", sort=True).agg(
        val_loss=("val_loss", "mean"), ok=("ok", "all"))
    table.loc[~table["ok"], "val_loss"] = math.inf
    return table.reset_index()


def regret_table(results: pd.DataFrame, candidates: Mapping[str, float]) -> pd.DataFrame:
    """Each candidate's full-training val loss against the best rate of the grid.

    Args:
        results: one row per run: lr, val_loss, status ("ok" | "diverged"); several runs
            (seeds) of a rate are averaged; a rate with any diverged run counts as inf.
        candidates: name -> rate; every rate must be one of the results' rates.
    Returns:
        name, lr, val_loss, best_lr, best_val_loss, regret (val_loss / best_val_loss - 1; 0 for
        the best rate, inf for a diverged one), one row per candidate, in the given order.
    """
    table = _per_rate(results)
    finished = table[np.isfinite(table["val_loss"])]
    if finished.empty:
        raise ValueError("results: every run diverged; allowed: at least one finished run")
    best = finished.loc[finished["val_loss"].idxmin()]
    rows = []
    for name, lr in candidates.items():
        check_number(f"candidates[{name}]", lr, low=0.0, low_open=True)
        match = table[np.isclose(table["lr"], lr, rtol=RTOL, atol=0.0)]
        if match.empty:
            raise ValueError(f"candidates[{name}]: lr {lr:g} has no run in results; allowed: "
                             "rates of the grid (candidate_grid includes the candidates)")
        val = float(match["val_loss"].iloc[0])
        rows.append(dict(name=name, lr=float(lr), val_loss=val, best_lr=float(best["lr"]),
                         best_val_loss=float(best["val_loss"]),
                         regret=val / float(best["val_loss"]) - 1.0))
    return pd.DataFrame(rows, columns=list(REGRET_COLUMNS))


def choose_rate(regret_df: pd.DataFrame) -> tuple[float | None, str]:
    """The candidate rate whose full-training val loss is lowest, and the evidence, in words.

    Ties go to the first row. Returns (None, reason) when every candidate diverged.
    """
    missing = set(REGRET_COLUMNS) - set(regret_df.columns)
    if missing:
        raise ValueError(f"regret_df: missing columns {sorted(missing)}; allowed: regret_table "
                         "output")
    finished = regret_df[np.isfinite(regret_df["val_loss"].astype(float))]
    if finished.empty:
        return None, f"every candidate diverged ({', '.join(regret_df['name'])})"
    win = finished.loc[finished["val_loss"].idxmin()]
    names = finished[np.isclose(finished["lr"], win["lr"], rtol=RTOL, atol=0.0)]["name"]
    others = finished[~finished["name"].isin(names)].sort_values("val_loss")
    reason = (f"{' = '.join(names)} (lr {win['lr']:.3g}) has the lowest full-training val loss "
              f"of the candidates, {win['val_loss']:.4f}")
    if not others.empty:
        nxt = others.iloc[0]
        reason += (f"; next {nxt['name']} (lr {nxt['lr']:.3g}) {nxt['val_loss']:.4f} "
                   f"(+{nxt['val_loss'] / win['val_loss'] - 1:.1%})")
    reason += (f"; grid best lr {win['best_lr']:.3g} at {win['best_val_loss']:.4f}, "
               f"regret {win['regret']:.1%}")
    diverged = regret_df.loc[~regret_df.index.isin(finished.index), "name"]
    if not diverged.empty:
        reason += f"; diverged: {', '.join(diverged)}"
    return float(win["lr"]), reason
