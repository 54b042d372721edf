"""The learning-rate search's report tables and warnings: pure functions of the search's
tables (bands, cross-check, regret, grid), written for a reader and for MLflow's markdown view.

Each table comes back as a DataFrame of display cells (rates to 3 significant digits, regret as
a percentage, a diverged run as 'diverged'), ready for ``lrpipe.report.build_report``'s
``tables``, which writes them as GFM pipe tables. Nothing here logs, prints or reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lrpipe.report import (
    DIVERGED_CELL,
    close_call,
    close_call_note,
    final_metrics,
    percent,
)


def _rate(x) -> str:
    return "-" if x is None or not math.isfinite(float(x)) else f"{float(x):.3g}"


def suggestion_table(bands: Mapping[str, Sequence[float | None]]) -> pd.DataFrame:
    """rule | median lr | min..max over seeds | spread (hi / lo, 'x'); a rule that suggested
    nothing on any seed reads 'no suggestion'."""
    rows = []
    for rule, band in bands.items():
        median, lo, hi = band[0], band[1], band[2]
        rows.append({"rule": rule,
                     "median lr": "no suggestion" if median is None else _rate(median),
                     "min..max over seeds": "-" if median is None else
                     f"{_rate(lo)}..{_rate(hi)}",
                     "spread": "-" if median is None or not lo else f"{hi / lo:.1f}x"})
    return pd.DataFrame(rows, columns=["rule", "median lr", "min..max over seeds", "spread"])


def cross_check_table(cross_check: pd.DataFrame) -> pd.DataFrame:
    """``choose.cross_check`` output for a reader: rule | lr | x halving median."""
    return pd.DataFrame({
        "rule": cross_check["rule"],
        "lr": cross_check["lr"].map(_rate),
        "x halving median": cross_check["ratio_to_halving"].map(
            lambda r: "-" if not np.isfinite(r) else f"{r:.2g}x"),
    })


def regret_display(regret: pd.DataFrame) -> pd.DataFrame:
    """``choose.regret_table`` output for a reader: candidate | lr | val loss | grid best |
    regret as a signed percentage ('diverged' for a candidate that blew up)."""
    return pd.DataFrame({
        "candidate": regret["name"],
        "lr": regret["lr"].map(_rate),
        "val loss": regret["val_loss"].map(
            lambda v: DIVERGED_CELL if not np.isfinite(v) else f"{v:.4f}"),
        "grid best": [f"{_rate(lr)} ({v:.4f})" for lr, v in
                      zip(regret["best_lr"], regret["best_val_loss"], strict=True)],
        "regret": regret["regret"].map(percent),
    })


def grid_display(grid: pd.DataFrame) -> pd.DataFrame:
    """The regret grid's runs (lr, status, val_loss, val_error, diverged_epoch) with the one
    convention for a run that diverged: 'diverged' for its final metrics, the epoch that blew
    up as an integer."""
    table = final_metrics(grid.sort_values("lr"))
    stopped = table["status"] == "diverged"

    def cells(column: str) -> list:
        return [DIVERGED_CELL if s else f"{v:.4f}"
                for s, v in zip(stopped, table[column], strict=True)]

    return pd.DataFrame({"lr": table["lr"].map(_rate), "status": table["status"],
                         "val loss": cells("val_loss"), "val error": cells("val_error"),
                         "diverged at epoch": table["diverged_epoch"]}).reset_index(drop=True)


def search_tables(bands: Mapping, cross_check: pd.DataFrame, regret: pd.DataFrame,
                  grid: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every table of the search's report, by section heading, in reading order."""
    return {"Range-test suggestions (median and min..max over seeds)": suggestion_table(bands),
            "Cross-check against the halving median": cross_check_table(cross_check),
            "Regret of each candidate against the grid's best": regret_display(regret),
            "Grid (full-data training)": grid_display(grid)}


def _per_rate(grid: pd.DataFrame) -> pd.DataFrame:
    """Finished rates: mean val loss and min..max over the runs (seeds) of each rate."""
    ok = grid[(grid["status"] == "ok") & np.isfinite(grid["val_loss"].astype(float))]
    stats = ok.groupby("lr")["val_loss"].agg(["mean", "min", "max", "size"])
    return stats.rename(columns={"mean": "val_loss", "min": "val_loss_lo",
                                 "max": "val_loss_hi", "size": "runs"})


def search_notes(regret: pd.DataFrame, grid: pd.DataFrame, chosen_lr: float | None) -> list[str]:
    """Warnings for the search's choice: a close call where the chosen rate beats the next
    best finished rate of the grid by a margin inside the seed band (min..max over a rate's
    runs, when the grid has several a rate) or within 2% (one run a rate)."""
    if chosen_lr is None:
        return []
    rates = _per_rate(grid)
    chosen = rates[np.isclose(rates.index, chosen_lr, rtol=1e-9, atol=0.0)]
    others = rates.drop(index=chosen.index).sort_values("val_loss")
    if chosen.empty or others.empty:
        return []
    best, second = chosen.iloc[0].to_dict(), others.iloc[0].to_dict()
    if (rates["runs"] < 2).any():  # one run a rate: no band, the relative margin decides
        for row in (best, second):
            row.pop("val_loss_lo"), row.pop("val_loss_hi")
    names = [f"the chosen lr={chosen_lr:.3g}", f"lr={others.index[0]:.3g}"]
    pair = [(names[0], best), (names[1], second)]
    pair.sort(key=lambda item: item[1]["val_loss"])  # the grid's best may not be a candidate
    (first_name, first), (other_name, other) = pair
    if not close_call(first, other):
        return []
    return [close_call_note(first_name, other_name, first, other)]
