"""Choosing a learning rate: a halving search on a data subset, then a regret check.

The halving search trains a short budget from the same initial weights at start_lr,
start_lr x factor, ... until a rate is stable, then keeps halving while the loss keeps falling.
The rungs share one seed, so several upcoming ones can train as one batched computation
(``window``; ``halving_window`` says whether, by the declared batching policy) with the same
ladder.
Its answer is cross-checked against the range-test suggestions (``cross_check``); the candidates
and a coarse log grid around them are then trained in full by the caller, and ``regret_table`` /
``choose_rate`` pick the candidate with the lowest validation loss, saying how far each one is
from the best rate of the grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lrpipe.engine.config import ConfigError, TrainConfig, check_number
from lrpipe.engine.data import Dataset, Split
from lrpipe.engine.many import train_many, trains_batched
from lrpipe.engine.train import TrainResult, train
from lrpipe.search.suggest import log_median

TrainFn = Callable[[TrainConfig, Dataset], TrainResult]
TrainManyFn = Callable[[list[TrainConfig], Dataset], list[TrainResult]]

LADDER_COLUMNS = ("lr", "loss", "diverged", "reason")
REGRET_COLUMNS = ("name", "lr", "val_loss", "best_lr", "best_val_loss", "regret")
RTOL = 1e-9  # two rates closer than this (relative) are the same rate


@dataclass(frozen=True)
class HalvingResult:
    """The rungs tried (ladder: lr, loss, diverged, reason, in the order tried) and the choice.

    ``chosen_lr`` is None exactly when every rung diverged; ``reason`` says why either way.
    ``rungs_trained - len(ladder)`` rungs were trained past the stop and discarded.
    """

    ladder: pd.DataFrame
    chosen_lr: float | None
    reason: str
    window: int = 1  # rungs trained per call (halving_search's window, "auto" resolved)
    rungs_trained: int = 0  # rungs trained, including those a window trained past the stop


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


def judge_rung(lr: float, result: TrainResult) -> dict:
    """One ladder row from a rung's TrainResult: it diverged if train says so, or if its final
    train loss exceeds the initial one.

    Returns:
        {"lr", "loss" (final train loss; NaN if it went non-finite), "diverged", "reason"}.
    """
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


def rung(cfg: TrainConfig, data: Dataset, lr: float, epochs: int,
         train_fn: TrainFn = train) -> dict:
    """Train one rung and judge it (``judge_rung``): the row the ladder gets."""
    return judge_rung(lr, train_fn(_rung_cfg(cfg, lr, epochs), data))


def _rung_cfg(cfg: TrainConfig, lr: float, epochs: int) -> TrainConfig:
    # Only the rate and the budget change: every rung keeps cfg.seed (same init, batch order).
    return cfg.replace(**{"optim.lr": lr, "epochs": epochs})


def halving_rates(start_lr: float, factor: float, min_lr: float) -> list[float]:
    """The ladder's rates, in the order tried: start_lr x factor^k while >= min_lr."""
    rates, k = [], 0
    while (lr := start_lr * factor**k) >= min_lr * (1 - RTOL):
        rates.append(lr)
        k += 1
    return rates


def _stop_reason(rows: list[dict]) -> str | None:
    """Why the search stops at the last row, or None to go on: after the first stable rung,
    a rung that diverges or does not lower the loss of the last stable one ends it."""
    row, stable = rows[-1], [r for r in rows[:-1] if not r["diverged"]]
    if stable and (row["diverged"] or not row["loss"] < stable[-1]["loss"]):
        return (f"stopped at lr {row['lr']:g}: "
                + ("it diverged" if row["diverged"] else "the loss no longer fell"))
    return None


def _check_halving_args(start_lr, factor, min_lr, budget_epochs, max_steps, window) -> None:
    check_number("start_lr", start_lr, low=0.0, low_open=True)
    check_number("factor", factor, low=0.0, high=1.0, low_open=True)
    if factor >= 1.0:  # a factor of 1 would retry the same rate for ever
        raise ConfigError(f"factor: got {factor!r}; allowed: a number > 0 and < 1")
    check_number("min_lr", min_lr, low=0.0, high=start_lr, low_open=True)
    check_number("budget_epochs", budget_epochs, low=1, integer=True)
    if max_steps is not None:
        check_number("max_steps", max_steps, low=1, integer=True)
    if window != "auto" and (isinstance(window, bool) or not isinstance(window, int)
                             or window < 1):
        raise ConfigError(f"window: got {window!r}; allowed: an integer >= 1 (rungs trained "
                          "together) or 'auto' (halving_window decides)")


def halving_window(cfg: TrainConfig, max_window: int = 4) -> int:
    """How many rungs of ``cfg``'s ladder to train together: ``max_window`` or 1, declared.

    ``max_window`` rungs (one shared seed, so one batch order) when the declared batching policy
    trains them batched (``lrpipe.engine.many.trains_batched``: ``cfg.batching``; for auto, on for
    CUDA and for softmax regression on the CPU), else 1. A window trains rungs the sequential
    search never pays for (those after the stop; diverging ones, which train() ends within a
    few steps), so it needs a clearly faster step, which is what the rule batches: windows of 4
    on the shared 2-core CPU made the search 1.1-1.2x faster for Fashion-MNIST softmax (a 2.0x
    faster step) and 0.84-1.02x as fast for the digits MLP (a 1.2-1.3x faster step).
    Returns:
        ``max_window`` if the policy batches the rungs, else 1 (always 1 for a config that
        cannot be batched: rprop, gains, plateau).
    """
    check_number("max_window", max_window, low=1, integer=True)
    cfgs = [_rung_cfg(cfg, cfg.optim.lr * 0.5**k, cfg.epochs) for k in range(max_window)]
    return max_window if trains_batched(cfgs) else 1


def _rung_results(cfgs: list[TrainConfig], data: Dataset, window: int,
                  train_fn: TrainFn, train_many_fn: TrainManyFn) -> Iterator[TrainResult]:
    """Each rung's TrainResult in ladder order; a window of rungs is trained only when its
    first rung is asked for, so a search that stops never trains the windows after it."""
    for first in range(0, len(cfgs), window):
        chunk = cfgs[first:first + window]
        results = [train_fn(chunk[0], data)] if window == 1 else train_many_fn(chunk, data)
        if len(results) != len(chunk):
            raise ValueError(f"train_many_fn: returned {len(results)} results for "
                             f"{len(chunk)} configs; allowed: one TrainResult per config")
        yield from results


def halving_search(
    cfg: TrainConfig,
    data: Dataset,
    *,
    start_lr: float = 10.0,
    factor: float = 0.5,
    min_lr: float = 1e-5,
    budget_epochs: int = 1,
    max_steps: int | None = None,
    train_fn: TrainFn = train,
    window: int | str = 1,
    train_many_fn: TrainManyFn | None = None,
) -> HalvingResult:
    """Halve the rate from ``start_lr`` until it is stable, then while the loss keeps falling.

    Every rung trains ``cfg`` (same seed, so the same initial weights and batch order) at its
    rate for ``budget_epochs`` epochs (at most ``max_steps`` updates) on ``data``, usually a
    subset. Rates: start_lr x factor^k down to ``min_lr``. Before the first stable rung,
    diverged rungs are skipped over; after it, the search stops at the first rung that does not
    lower the loss (or diverges).

    With ``window`` W > 1 the next W rates are trained in one call of ``train_many_fn(cfgs,
    data)`` (default ``engine.many.train_many``: batched where the policy says so), then judged
    one by one in order exactly as with W = 1; rungs after the stop are discarded. The ladder
    and choice are W = 1's, losses to ~1e-15 in float64. In float32 the rungs near the edge of
    stability are chaotic: a batched GEMM sums in another order and can flip a judgement there,
    as 2 torch threads instead of 1 do for the sequential search (both measured on a 5,000
    example Fashion-MNIST softmax ladder). ``window="auto"`` is ``halving_window(cfg)``.
    ``train_fn`` (W = 1 only) replaces train() in tests.
    Returns:
        HalvingResult; chosen_lr = the rate with the lowest loss among the stable rungs.
    Raises:
        ConfigError: a bad argument (the message names it); ValueError: a custom ``train_fn``
        with W != 1 and no ``train_many_fn``.
    """
    _check_halving_args(start_lr, factor, min_lr, budget_epochs, max_steps, window)
    if window != 1 and train_fn is not train and train_many_fn is None:
        raise ValueError("train_fn: a custom train_fn trains window=1 only; allowed with "
                         "window != 1: train_many_fn(cfgs, data) as well")
    rung_data = budget_data(data, cfg.batch_size, budget_epochs, max_steps)
    window = halving_window(cfg) if window == "auto" else window
    rates = halving_rates(start_lr, factor, min_lr)
    cfgs = [_rung_cfg(cfg, lr, budget_epochs) for lr in rates]
    results = _rung_results(cfgs, rung_data, window, train_fn, train_many_fn or train_many)
    rows: list[dict] = []
    stop = f"reached min_lr {min_lr:g}"
    for lr, result in zip(rates, results, strict=True):
        rows.append(judge_rung(lr, result))
        if why := _stop_reason(rows):
            stop = why
            break
    ladder = pd.DataFrame(rows, columns=list(LADDER_COLUMNS))
    trained = min(len(rates), -(-len(rows) // window) * window)
    return HalvingResult(ladder, *_halving_choice(ladder, stop), window=window,
                         rungs_trained=trained)


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
    """One row per rate: mean val_loss over its runs, inf if any run diverged or is non-finite
    (a no_progress run trained to its last epoch: its loss is real and ranks it)."""
    missing = {"lr", "val_loss", "status"} - set(results.columns)
    if missing:
        raise ValueError(f"results: missing columns {sorted(missing)}; allowed: a table with "
                         "lr, val_loss, status")
    if results.empty:
        raise ValueError("results: got no rows; allowed: one or more finished runs")
    ok = (results["status"] != "diverged") & np.isfinite(results["val_loss"].astype(float))
    table = results.assign(ok=ok).groupby("lr", sort=True).agg(
        val_loss=("val_loss", "mean"), ok=("ok", "all"))
    table.loc[~table["ok"], "val_loss"] = math.inf
    return table.reset_index()


def regret_table(results: pd.DataFrame, candidates: Mapping[str, float]) -> pd.DataFrame:
    """Each candidate's full-training val loss against the best rate of the grid.

    Args:
        results: one row per run: lr, val_loss, status (ok | no_progress | diverged); several runs
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


# --- from the evidence to one rate: what the search flow and lrpipe.choose_lr both do ---

def log_median_band(rates: Sequence[float | None]) -> tuple[float | None, ...]:
    """(median, lo, hi) of the rates that are not None; the median is ``log_median``'s (as
    ``suggest_band``: an odd count gives the middle rate itself, an even count the geometric
    mean of the middle two), so lo <= median <= hi whatever the float rounding.
    All three are None when every rate is None."""
    found = [float(r) for r in rates if r is not None]
    if not found:
        return None, None, None
    return log_median(found), min(found), max(found)


def candidate_rates(bands: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """name -> median rate of every band with a median, in the bands' order.

    Raises:
        ValueError: no band has a median (every seed of every method failed).
    """
    out = {name: float(band[0]) for name, band in bands.items() if band[0] is not None}
    if not out:
        raise ValueError(f"candidates: none of {', '.join(bands)} suggested a rate on any seed; "
                         "allowed: a search with at least one stable rung or usable curve "
                         "(lower the rates or raise the subset)")
    return out


def chosen_band(lr: float, candidates: Mapping[str, float],
                bands: Mapping[str, Sequence[float | None]]) -> tuple[float, float]:
    """min lo .. max hi over the bands of the candidates at rate ``lr`` (their spread over
    seeds); (lr, lr) when no candidate sits at ``lr``."""
    at = [bands[n] for n, r in candidates.items() if math.isclose(r, lr, rel_tol=RTOL)]
    if not at:
        return lr, lr
    return min(b[1] for b in at), max(b[2] for b in at)


def decide_rate(regret_df: pd.DataFrame) -> tuple[float, str, str]:
    """(rate, chosen_by, reason): ``choose_rate``'s candidate; when every candidate diverged,
    the grid's best rate (regret_table guarantees one finished), saying so."""
    lr, reason = choose_rate(regret_df)
    if lr is None:
        best = float(regret_df["best_lr"].iloc[0])
        return best, "grid best", f"{reason}; fell back to the grid's best rate {best:.3g}"
    at = np.isclose(regret_df["lr"], lr, rtol=RTOL, atol=0.0)
    return lr, " = ".join(regret_df.loc[at, "name"]), reason


def neighbour_rates(grid: Sequence[float], candidates: Sequence[float], chosen: float,
                    best_lr: float | None = None) -> list[float]:
    """Rates for full training around a choice: ``chosen``, the nearest coarse-grid rate below
    and above it (grid rates that are not candidates, so a half decade away rather than a
    near-twin candidate) and the grid's best rate. Sorted, each once."""
    coarse = [g for g in grid if not any(math.isclose(g, c, rel_tol=RTOL) for c in candidates)]
    below = [g for g in coarse if g < chosen * (1 - RTOL)]
    above = [g for g in coarse if g > chosen * (1 + RTOL)]
    rates = [chosen] + below[-1:] + above[:1] + ([best_lr] if best_lr is not None else [])
    out: list[float] = []
    for r in sorted(rates):
        if not any(math.isclose(r, o, rel_tol=RTOL) for o in out):
            out.append(float(r))
    return out
