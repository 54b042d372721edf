"""Learning-rate suggestions read off a range-test curve: pure, named functions.

Every rule has the signature ``(lrs, losses, *, min_points=5) -> Suggestion``. It drops the
points where the rate or the loss is not finite (or the rate is not positive) before it looks
at the curve, and when it cannot suggest a rate it returns ``lr=None`` with the reason, never a
silent guess. The rules read whatever curve they are given; callers pass the smoothed curve of
``lrpipe.search.rangetest`` (raw range-test losses are too noisy for a gradient).

Rules (``RULES`` maps their names to them):
    steepest     the rate where the loss falls fastest per decade of rate (the LR range test
                 of Smith 2017, https://arxiv.org/abs/1506.01186, section 3.3; torch-lr-finder's
                 suggestion, there taken against the step index).
    valley       a point two thirds of the way down the longest strictly descending stretch.
    min_over_10  the rate at the minimum loss, divided by 10 (fastai's ``lr_min``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lrpipe.engine.config import check_number

DEFAULT_MIN_POINTS = 5
VALLEY_FRACTION = 2.0 / 3.0  # how far down the descending stretch the valley rule picks


@dataclass(frozen=True)
class Suggestion:
    """A rule's answer: ``lr`` is None exactly when the rule could not suggest one (see reason)."""

    rule: str
    lr: float | None
    reason: str


def finite_curve(
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The points with a finite positive rate and a finite loss, and why they are unusable.

    Returns:
        (lrs, losses, problem): ``problem`` is None when at least ``min_points`` points remain,
        else a sentence saying what is wrong (all non-finite, too few points).
    Raises:
        ValueError: ``lrs`` and ``losses`` are not 1-D of equal length, ``min_points`` < 2, or
            the remaining rates are not strictly increasing.
    """
    check_number("min_points", min_points, low=2, integer=True)
    x = np.asarray(lrs, dtype=float)
    y = np.asarray(losses, dtype=float)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"lrs/losses: got shapes {x.shape} and {y.shape}; allowed: two 1-D "
                         "sequences of equal length")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if np.any(np.diff(x) <= 0):
        raise ValueError("lrs: got rates that do not increase; allowed: strictly increasing "
                         "rates, as a range test records them")
    if len(x) == 0:
        return x, y, f"all {len(keep)} points are non-finite (or have a rate <= 0)"
    if len(x) < min_points:
        return x, y, (f"too few finite points: {len(x)} of {len(keep)}, need at least "
                      f"{min_points}")
    return x, y, None


def suggest_steepest(
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS
) -> Suggestion:
    """The rate where d loss / d log10(lr) is most negative.

    The gradient is taken against log10 of the rate with ``np.gradient`` (central differences,
    one-sided at the ends), not against the step index, so a linear ramp and an exponential
    ramp over the same curve give the same answer.
    """
    x, y, problem = finite_curve(lrs, losses, min_points=min_points)
    if problem:
        return Suggestion("steepest", None, problem)
    slope = np.gradient(y, np.log10(x))
    i = int(np.argmin(slope))
    if slope[i] >= 0:
        return Suggestion("steepest", None, "the loss never decreases (no negative slope)")
    return Suggestion("steepest", float(x[i]),
                      f"steepest descent {slope[i]:.3g} loss/decade at point {i} of {len(x)}")


def longest_descent(y: np.ndarray) -> tuple[int, int] | None:
    """(start, end) indices of the first longest run with y[i+1] < y[i] throughout, or None."""
    best: tuple[int, int] | None = None
    start = 0
    for i in range(1, len(y) + 1):
        if i < len(y) and y[i] < y[i - 1]:
            continue
        end = i - 1  # the run start..end is strictly descending
        if end > start and (best is None or end - start > best[1] - best[0]):
            best = (start, end)
        start = i
    return best


def suggest_valley(
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS
) -> Suggestion:
    """A point two thirds of the way down the longest strictly descending stretch.

    Why two thirds: the stretch's top is where the rate starts to matter and its bottom is the
    edge of instability; two thirds of the way down (in points, which are evenly spaced in
    log rate for an exponential ramp) is still falling fast but a safe margin below the
    minimum. Ties between equally long stretches go to the first (lowest rates).
    """
    x, y, problem = finite_curve(lrs, losses, min_points=min_points)
    if problem:
        return Suggestion("valley", None, problem)
    run = longest_descent(y)
    if run is None:
        return Suggestion("valley", None, "no descending stretch: the loss never decreases")
    start, end = run
    i = start + int(round(VALLEY_FRACTION * (end - start)))
    return Suggestion("valley", float(x[i]),
                      f"point {i}, 2/3 down the descending stretch {start}..{end} of {len(x)}")


def suggest_min_over_10(
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS
) -> Suggestion:
    """The rate at the lowest loss, divided by 10 (the minimum sits at the edge of instability).

    None when the minimum is the first point: the loss never went down, so the minimum says
    nothing about a good rate.
    """
    x, y, problem = finite_curve(lrs, losses, min_points=min_points)
    if problem:
        return Suggestion("min_over_10", None, problem)
    i = int(np.argmin(y))
    if i == 0:
        return Suggestion("min_over_10", None,
                          "the minimum is at the first rate: the loss never decreases")
    return Suggestion("min_over_10", float(x[i] / 10.0),
                      f"minimum loss {y[i]:.4g} at lr {x[i]:.3g} (point {i} of {len(x)}), / 10")


RULES: dict[str, Callable[..., Suggestion]] = {
    "steepest": suggest_steepest,
    "valley": suggest_valley,
    "min_over_10": suggest_min_over_10,
}


def log_median(rates: Sequence[float]) -> float:
    """The median of positive ``rates`` taken in log rate, inside [min, max] by construction.

    An odd count returns the middle rate itself (not ``10 ** log10(rate)``, which can land an
    ulp away from it, either side, depending on the libm); an even count returns the geometric
    mean of the middle two, clipped into their interval for the same reason.

    Raises:
        ValueError: no rates, or a rate that is not finite and > 0.
    """
    ordered = sorted(float(r) for r in rates)
    if not ordered:
        raise ValueError("rates: got none; allowed: one or more finite rates > 0")
    for r in ordered:
        check_number("rates", r, low=0.0, low_open=True)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    lo, hi = ordered[mid - 1], ordered[mid]
    return min(max(math.sqrt(lo) * math.sqrt(hi), lo), hi)


def get_rule(name: str) -> Callable[..., Suggestion]:
    """The rule called ``name``; an unknown name is a ValueError listing the rules."""
    if name not in RULES:
        raise ValueError(f"rule: got {name!r}; allowed: {', '.join(RULES)}")
    return RULES[name]
