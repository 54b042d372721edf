"""Out-of-sample confirmation: an answer re-run on seeds that did not choose it.

A choice made on some runs (the search's candidates, a schedule ranking, a strategy race) is
in-sample on those runs: its margin is measured on the noise that picked it. Confirmation
trains the chosen arm and its closest rival again on fresh seeds and states the chosen arm's
figure with its band (min..max over the fresh seeds), the margin to the rival, and one verdict:

- ``confirmed``: the chosen arm is the lower, and the two seed bands do not overlap;
- ``tie``: the bands (min..max over the fresh seeds) overlap: a change of seed alone moves the
  figures as far as the margin, so the data cannot tell the arms apart;
- ``not confirmed``: the rival is the lower, and the bands do not overlap.

The tie rule is ``lrpipe.experiments.bands``' (one rule for every comparison over seeds). A
diverged or non-finite run counts as infinitely bad for its arm. Pure functions, tested
without Prefect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lrpipe.engine.config import ConfigError
from lrpipe.experiments.bands import band, check_seed_list

VERDICTS = ("confirmed", "tie", "not confirmed")
SUMMARY_COLUMNS = ("arm", "role", "n", "mean", "lo", "hi", "spread", "diverged")


def check_fresh_seeds(seeds: Sequence[int], used: Sequence[int], field: str = "confirm_seeds"
                      ) -> tuple[int, ...]:
    """``seeds`` as a tuple of distinct integers >= 0, none of them in ``used`` (the seeds that
    made the choice); an empty tuple turns the confirmation off."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise ConfigError(f"{field}: got {seeds!r}; allowed: a list of integers >= 0, none of "
                          f"{sorted(set(used))} (the seeds the choice was made on), or empty")
    if not len(seeds):
        return ()
    seeds = check_seed_list(field, seeds)
    if set(seeds) & set(used):
        raise ConfigError(f"{field}: got {list(seeds)}; allowed: distinct integers >= 0, none of "
                          f"{sorted(set(used))} (the seeds the choice was made on)")
    if len(seeds) == 1:
        raise ConfigError(f"{field}: got {list(seeds)}; allowed: at least 2 seeds (a band needs "
                          "two), or empty to skip the confirmation")
    return seeds


def fresh_seeds(used: Sequence[int], n: int, start: int) -> tuple[int, ...]:
    """``n`` consecutive seeds none of ``used`` holds: from ``start`` (a flow's usual fresh
    seeds, e.g. ``search.plan.DEFAULT_CONFIRM_SEEDS[0]``) when every used seed is below it,
    else from the largest used seed + 1. For a flow that has no confirmation seeds of its own
    to give (the optimizers' test runs)."""
    check_seed_list("used", used)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n: got {n!r}; allowed: an integer >= 1")
    first = max(int(start), max(used) + 1)
    return tuple(range(first, first + n))


def summarize_arms(runs: pd.DataFrame, value: str, chosen, rival) -> pd.DataFrame:
    """Per arm (``chosen`` then ``rival``): n, mean, lo, hi, spread ((hi - lo) / mean) and
    diverged (runs that did not finish) of ``value``; ``runs`` has columns arm, status, value.
    An arm with a diverged or non-finite run has mean, lo and hi inf."""
    missing = {"arm", "status", value} - set(runs.columns)
    if missing:
        raise ValueError(f"runs: missing columns {sorted(missing)}; allowed: arm, status, "
                         f"{value}")
    rows = []
    for arm, role in ((chosen, "chosen"), (rival, "rival")):
        mine = runs[runs["arm"] == arm]
        if mine.empty:
            raise ValueError(f"runs: no run of arm {arm!r}; allowed: runs of both arms")
        vals = mine[value].astype(float).to_numpy()
        bad = int(((mine["status"] == "diverged") | ~np.isfinite(vals)).sum())
        mean, lo, hi = band([math.inf] if bad else vals)
        spread = (hi - lo) / abs(mean) if math.isfinite(mean) and mean else math.inf
        rows.append({"arm": arm, "role": role, "n": len(mine), "mean": mean, "lo": lo,
                     "hi": hi, "spread": spread, "diverged": bad})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def verdict(summary: pd.DataFrame) -> dict:
    """{verdict, margin, band, text} from ``summarize_arms``' two rows (lower is better).

    margin: the rival's mean / the chosen arm's mean - 1 (positive: the chosen arm is better);
    band: the wider relative spread of the two arms, (max - min) / mean, for the reader; the
    verdict is ``bands.compare_over_seeds``' (a tie when the min..max bands overlap)."""
    chosen = summary[summary["role"] == "chosen"].iloc[0]
    rival = summary[summary["role"] == "rival"].iloc[0]
    c, r = float(chosen["mean"]), float(rival["mean"])
    if math.isinf(c) and math.isinf(r):
        return {"verdict": "tie", "margin": math.nan, "band": math.inf,
                "text": "both arms diverged on a fresh seed"}
    if math.isinf(c) or math.isinf(r):
        better = "confirmed" if math.isinf(r) else "not confirmed"
        loser = rival if math.isinf(r) else chosen
        return {"verdict": better, "margin": math.inf if math.isinf(r) else -math.inf,
                "band": math.nan, "text": f"{loser['arm']} diverged on a fresh seed"}
    margin = r / c - 1.0
    spread = max(float(chosen["spread"]), float(rival["spread"]))
    overlap = chosen["lo"] <= rival["hi"] and rival["lo"] <= chosen["hi"]
    if overlap:
        word = "tie"
        text = f"tie: the seed bands overlap (margin {margin:+.1%}, seed spread {spread:.1%})"
    elif margin > 0:
        word = "confirmed"
        text = f"confirmed: better by {margin:.1%}, the seed bands apart"
    else:
        word = "not confirmed"
        text = (f"not confirmed: {rival['arm']} is better by {-margin / (1 + margin):.1%} of "
                "its own figure, the seed bands apart")
    return {"verdict": word, "margin": margin, "band": spread, "text": text}


def confirmation_line(summary: pd.DataFrame, result: dict, what: str, seeds: Sequence[int],
                      metric: str) -> str:
    """One sentence for a report: the chosen arm's figure on the fresh seeds with its band,
    the rival's, and the verdict; labelled out of sample."""
    chosen = summary[summary["role"] == "chosen"].iloc[0]
    rival = summary[summary["role"] == "rival"].iloc[0]

    def fig(row) -> str:
        if math.isinf(row["mean"]):
            return f"{row['arm']}: diverged"
        return f"{row['arm']}: {row['mean']:.4f} [{row['lo']:.4f}..{row['hi']:.4f}]"

    return (f"{what}, out of sample (fresh seeds {', '.join(map(str, seeds))}, {metric}, mean "
            f"[min..max]): {fig(chosen)} against {fig(rival)}: {result['text']}")


def confirm(runs: pd.DataFrame, value: str, chosen, rival, *, what: str, seeds: Sequence[int],
            metric: str, names: Sequence[str] | None = None) -> dict:
    """``summarize_arms``, ``verdict`` and ``confirmation_line`` in one record: summary (the
    table), seeds, verdict, margin, band, text, line (arms shown as ``names`` when given) and
    the chosen arm's mean, lo and hi."""
    summary = summarize_arms(runs, value, chosen, rival)
    result = verdict(summary)
    shown = summary if names is None else summary.assign(arm=list(names))
    head = summary.iloc[0]
    return {"summary": summary, "seeds": list(seeds), **result,
            "line": confirmation_line(shown, result, what, seeds, metric),
            "mean": float(head["mean"]), "lo": float(head["lo"]), "hi": float(head["hi"])}
