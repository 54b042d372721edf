"""Learning-rate suggestions read off a range-test curve: pure, named functions.

Every rule has the signature
``(lrs, losses, *, min_points=5, skip_start=0.10, skip_end=0.05) -> Suggestion``. It drops the
points where the rate or the loss is not finite (or the rate is not positive), then skips the
first and last points of what is left (``skip_counts``; the reason says how many) and reads
only the points in between, so it never picks an edge of the curve. When it cannot suggest a
rate (too few points left, or the loss never falls below its first kept value) it returns
``lr=None`` with the reason, never a silent guess. The rules read whatever curve they are
given; callers pass the smoothed curve of ``lrpipe.search.rangetest`` (raw range-test losses
are too noisy for a gradient).

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
from typing import NamedTuple

import numpy as np

from lrpipe.engine.config import check_number

DEFAULT_MIN_POINTS = 5
VALLEY_FRACTION = 2.0 / 3.0  # how far down the descending stretch the valley rule picks

# How much of the curve every rule skips, as fractions of its finite points (see skip_counts).
# The anchors skip fixed counts tuned to their 100-step default: fastai's lr_find hands its
# suggestion functions (steep, valley, minimum, slide) recorder.lrs[num_it // 10:-5], 10 and 5
# of 100; torch-lr-finder's plot(skip_start=10, skip_end=5) and Lightning's
# suggestion(skip_begin=10, skip_end=1) the same at the start, 5 and 1 at the end. A fixed
# count is wrong for short curves (torch-lr-finder refuses fewer than 17 points; a test that
# diverged at step 20 would lose 75% of itself), so we keep the anchors' proportions, 10% and
# 5%, rounded down as fastai's num_it // 10 is, and at least one point at each end: 10 and 5
# of 100 points (the anchors' counts), 8 and 4 of an 88-point test that stopped early, 1 and 1
# of 10. Why the start: the smoothed curve is a bias-corrected moving average whose point k is
# the mean of only k + 1 batches, so its first points move with one batch's noise, at rates
# too small to train (the softmax seed-2 curve's steepest slope was its point 0, 1e-05). Why
# the end: a test that diverged ends in its blow-up, one that completed ends at max_lr, an edge
# the user chose, not one the curve found.
SKIP_START = 0.10  # fraction of the finite points skipped at the low-rate end
SKIP_END = 0.05  # fraction of the finite points skipped at the high-rate end
MAX_SKIP = 0.5  # a larger fraction at one end would skip the middle of the curve


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


def skip_counts(
    n: int, skip_start: float = SKIP_START, skip_end: float = SKIP_END
) -> tuple[int, int]:
    """How many of ``n`` points a rule skips at the start and at the end of the curve.

    Each count is floor(fraction x n), as fastai's ``num_it // 10``, raised to 1 when its
    fraction is > 0 so that neither edge point can be picked; a fraction of 0 skips nothing.

    Args:
        n: how many finite points the curve has.
        skip_start, skip_end: fractions of ``n``, each in [0, 0.5].
    Returns:
        (first, last): points skipped at the low-rate and at the high-rate end.
    Raises:
        ConfigError: a fraction outside [0, 0.5] (names the argument).
    """
    counts = []
    for name, frac in (("skip_start", skip_start), ("skip_end", skip_end)):
        check_number(name, frac, low=0.0, high=MAX_SKIP)
        # + 1e-9: 0.29 x 100 is 28.999999999999996 in floats, and must count 29
        counts.append(max(1, math.floor(frac * n + 1e-9)) if frac > 0 and n > 0 else 0)
    return counts[0], counts[1]


class KeptCurve(NamedTuple):
    """The points a rule reads: ``lrs``/``losses`` are the points ``first`` .. ``first +
    len(lrs) - 1`` of the ``n`` finite points; ``skipped`` says how many were skipped ("skipped
    first 8 and last 4 of 88 points"); ``problem`` is None, or why no rate can be read off."""

    lrs: np.ndarray
    losses: np.ndarray
    first: int
    n: int
    skipped: str
    problem: str | None


def kept_curve(
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS,
    skip_start: float = SKIP_START, skip_end: float = SKIP_END,
) -> KeptCurve:
    """The finite curve (``finite_curve``) less its ``skip_counts`` edge points.

    ``problem`` is set when the finite curve is unusable, when fewer than ``min_points`` points
    are left after skipping, or when the loss never falls below its first kept value (no
    descent: no rule can read a good rate off a flat or rising curve).

    Raises:
        ValueError: as ``finite_curve`` and ``skip_counts``.
    """
    x, y, problem = finite_curve(lrs, losses, min_points=min_points)
    n = len(x)
    a, b = skip_counts(n, skip_start, skip_end)
    skipped = f"skipped first {a} and last {b} of {n} points"
    if problem:
        return KeptCurve(x, y, 0, n, skipped, problem)
    x, y = x[a:n - b], y[a:n - b]
    if len(x) < min_points:
        problem = f"too few points left: {skipped}, {len(x)} left, need at least {min_points}"
    elif y.min() >= y[0]:
        problem = f"the loss never decreases below its first kept value {y[0]:.4g} ({skipped})"
    return KeptCurve(x, y, a, n, skipped, problem)


def suggest_steepest(
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS,
    skip_start: float = SKIP_START, skip_end: float = SKIP_END,
) -> Suggestion:
    """The rate where d loss / d log10(lr) is most negative, over the kept points.

    The gradient is taken against log10 of the rate with ``np.gradient`` (central differences,
    one-sided at the ends of the kept points), not against the step index, so a linear ramp
    and an exponential ramp over the same curve give the same answer. The edges matter most
    here: the moving average's warm-up can make point 0 the steepest, and a one-sided
    difference can make the last point the steepest; the default skips (module comment above
    SKIP_START) rule both out. Skips count points (steps), as the anchors do: on a linear ramp
    the first 10% of the steps span the rates up to a tenth of max_lr.

    Args:
        min_points: the fewest points the rule reads after skipping (>= 2).
        skip_start, skip_end: fractions of the finite points skipped at each end (``skip_counts``;
            0 reads the edge too).
    """
    c = kept_curve(lrs, losses, min_points=min_points, skip_start=skip_start,
                   skip_end=skip_end)
    if c.problem:
        return Suggestion("steepest", None, c.problem)
    slope = np.gradient(c.losses, np.log10(c.lrs))
    i = int(np.argmin(slope))
    if slope[i] >= 0:
        return Suggestion("steepest", None,
                          f"the loss never decreases (no negative slope; {c.skipped})")
    return Suggestion("steepest", float(c.lrs[i]),
                      f"steepest descent {slope[i]:.3g} loss/decade at point {c.first + i} of "
                      f"{c.n}; {c.skipped}")


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
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS,
    skip_start: float = SKIP_START, skip_end: float = SKIP_END,
) -> Suggestion:
    """A point two thirds of the way down the longest strictly descending stretch of the kept
    points.

    Why two thirds: the stretch's top is where the rate starts to matter and its bottom is the
    edge of instability; two thirds of the way down (in points, which are evenly spaced in
    log rate for an exponential ramp) is still falling fast but a safe margin below the
    minimum. Ties between equally long stretches go to the first (lowest rates). Why skip: the
    pick can never be a stretch's first point, but a stretch that starts in the moving
    average's warm-up starts too early and drags the pick down, and a one-step stretch at the
    end would pick the last point; fastai skips the same points before its valley.

    Args:
        min_points, skip_start, skip_end: as ``suggest_steepest``.
    """
    c = kept_curve(lrs, losses, min_points=min_points, skip_start=skip_start,
                   skip_end=skip_end)
    if c.problem:
        return Suggestion("valley", None, c.problem)
    run = longest_descent(c.losses)
    if run is None:  # kept_curve found a fall, so there is a stretch; kept for the type
        return Suggestion("valley", None,
                          f"no descending stretch: the loss never decreases ({c.skipped})")
    start, end = run
    i = start + int(round(VALLEY_FRACTION * (end - start)))
    f = c.first
    return Suggestion("valley", float(c.lrs[i]),
                      f"point {f + i}, 2/3 down the descending stretch {f + start}..{f + end} "
                      f"of {c.n}; {c.skipped}")


def suggest_min_over_10(
    lrs: Sequence[float], losses: Sequence[float], *, min_points: int = DEFAULT_MIN_POINTS,
    skip_start: float = SKIP_START, skip_end: float = SKIP_END,
) -> Suggestion:
    """The rate at the lowest kept loss, divided by 10 (the minimum sits at the edge of
    instability).

    None when the lowest kept loss is the first kept point: the loss never went down, so the
    minimum says nothing about a good rate. Why skip the start: a lucky first batch is no
    descent. The end skip changes little here and is kept so that the three rules read the
    same points (fastai's minimum reads the same slice as its steep and valley): a test that
    diverged never has its minimum at its last point (that point is recorded above
    stop_factor x best), so the skip costs at most a minimum hidden in the last 5%, read at
    the last kept point instead (at most 0.35 decade lower on the default 100-step ramp over
    7 decades). The reason says when the minimum is the last kept point.

    Args:
        min_points, skip_start, skip_end: as ``suggest_steepest``.
    """
    c = kept_curve(lrs, losses, min_points=min_points, skip_start=skip_start,
                   skip_end=skip_end)
    if c.problem:
        return Suggestion("min_over_10", None, c.problem)
    i = int(np.argmin(c.losses))  # > 0: kept_curve checked that the loss falls
    edge = (", the last kept point: the minimum may lie in the skipped end"
            if i == len(c.losses) - 1 and c.first + i < c.n - 1 else "")
    return Suggestion("min_over_10", float(c.lrs[i] / 10.0),
                      f"minimum loss {c.losses[i]:.4g} at lr {c.lrs[i]:.3g} (point {c.first + i} "
                      f"of {c.n}{edge}), / 10; {c.skipped}")


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
