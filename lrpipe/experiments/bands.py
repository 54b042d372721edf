"""Two arms compared over seeds: the margin of their means and whether it is a tie.

The band of an arm is min..max of its per-seed values (the house's band over >= 3 seeds). Two
arms tie when their bands overlap: the better arm's worst seed is no better than the other
arm's best seed, so the margin of the means is inside what a change of seed moves. A
non-finite value (a diverged run) makes its arm infinitely bad, never a winner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lrpipe.engine.config import ConfigError, check_number


def check_seed_list(field: str, seeds) -> tuple[int, ...]:
    """``seeds`` as a tuple of distinct integers >= 0, at least one, in the given order; else a
    ConfigError naming ``field``. Each flow adds its own rules (which seeds it may not reuse)."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__") or len(seeds) == 0:
        raise ConfigError(f"{field}: got {seeds!r}; allowed: a non-empty list of integers >= 0")
    for seed in seeds:
        check_number(field, seed, low=0, integer=True)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{field}: got {list(seeds)}; allowed: distinct integers >= 0")
    return tuple(seeds)


def band(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, min, max) of ``values``; a non-finite value makes all three infinite.

    Raises:
        ValueError: no values.
    """
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        raise ValueError("values: got none; allowed: at least one value per arm")
    if not np.isfinite(arr).all():
        return math.inf, math.inf, math.inf
    return float(arr.mean()), float(arr.min()), float(arr.max())


def compare_over_seeds(a: Sequence[float], b: Sequence[float]) -> dict:
    """Arm ``a`` against arm ``b`` on a lower-is-better metric, one value per seed each.

    Returns:
        {"a": (mean, min, max), "b": (mean, min, max), "margin": mean(b) - mean(a) (positive:
        a is lower), "tie": the bands overlap, "winner": "a", "b" or "tie"}. Both arms
        infinite: a tie with a NaN margin.
    """
    ta, tb = band(a), band(b)
    margin = tb[0] - ta[0] if math.isfinite(ta[0]) or math.isfinite(tb[0]) else math.nan
    tie = bool(math.isnan(margin) or (ta[1] <= tb[2] and tb[1] <= ta[2]))
    winner = "tie" if tie else ("a" if margin > 0 else "b")
    return {"a": ta, "b": tb, "margin": margin, "tie": tie, "winner": winner}


def band_text(stats: tuple[float, float, float], digits: int = 4) -> str:
    """``0.1234 [0.1200..0.1300]`` (mean [min..max]); ``diverged`` when infinite."""
    mean, lo, hi = stats
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}]"
