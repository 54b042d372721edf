"""Suggestion rules on hand-made curves: values worked out by hand, NaN/inf, too few points."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lrpipe.engine.config import ConfigError
from lrpipe.search.suggest import (
    RULES,
    Suggestion,
    get_rule,
    longest_descent,
    skip_counts,
    suggest_min_over_10,
    suggest_steepest,
    suggest_valley,
)

# Curve A: 11 rates, half a decade apart (log10 lr = -5, -4.5, ..., 0).
# Central differences over a 1.0-decade span: the steepest is point 5 (0.70 - 1.90 = -1.2),
# log10 lr = -2.5. The strictly descending stretch is points 1..9 (2.30 -> 0.40): 2/3 of its
# 8 steps is 5.33 -> point 1 + 5 = 6, log10 lr = -2. The minimum 0.40 is point 9 (lr 10^-0.5),
# / 10 = 10^-1.5.
A_LRS = [10.0 ** (-5 + 0.5 * i) for i in range(11)]
A_LOSS = [2.30, 2.30, 2.28, 2.20, 1.90, 1.20, 0.70, 0.50, 0.45, 0.40, 5.0]
A_WANT = {"steepest": 10 ** -2.5, "valley": 10 ** -2.0, "min_over_10": 10 ** -1.5}

# The same curve riddled with points every rule must drop: NaN and +-inf losses, NaN, inf,
# zero and negative rates. The remaining points are curve A, so the answers are curve A's.
_JUNK = [(10 ** -4.75, math.nan), (10 ** -3.2, math.inf), (10 ** -2.25, -math.inf),
         (math.nan, 0.1), (math.inf, 0.0), (0.0, 0.0), (-1.0, 0.0), (10 ** -0.25, math.nan)]
R_LRS = A_LRS[:1] + [j[0] for j in _JUNK[:4]] + A_LRS[1:] + [j[0] for j in _JUNK[4:]]
R_LOSS = A_LOSS[:1] + [j[1] for j in _JUNK[:4]] + A_LOSS[1:] + [j[1] for j in _JUNK[4:]]

NAN6 = [math.nan] * 6
UP = [1.0, 1.1, 1.2, 1.5, 2.0, 3.0]
FLAT = [1.0] * 6
L6 = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
# The rules skip at least one point at each end (skip_counts), which leaves 4 of 6 points, fewer
# than min_points = 5 (case six_points_default_skips). The six-point cases below check the
# rule itself on a curve small enough to work by hand, so they turn skipping off; skipping is
# checked on the longer curves at the end of this file.
NO_SKIP = {"skip_start": 0.0, "skip_end": 0.0}

# (case, lrs, losses, kwargs, expected rate per rule (None = no suggestion), reason fragment)
CASES = [
    ("curve_a", A_LRS, A_LOSS, {}, A_WANT, None),
    ("nan_inf_riddled", R_LRS, R_LOSS, {}, A_WANT, None),
    ("all_nonfinite", L6, NAN6, {}, dict.fromkeys(RULES), "non-finite"),
    ("all_inf", L6, [math.inf, -math.inf] * 3, {}, dict.fromkeys(RULES), "non-finite"),
    ("too_few", L6[:4], [2.0, 1.0, 0.5, 3.0], {}, dict.fromkeys(RULES), "too few"),
    ("too_few_after_drop", L6, [2.0, math.nan, 1.0, math.inf, 0.5, math.nan], {},
     dict.fromkeys(RULES), "too few"),
    # With min_points=3 the same 3 finite points (2.0, 1.0, 0.5 at 1e-4, 1e-2, 1) suffice:
    # slopes vs log10 lr: -0.5, -0.375, -0.25 -> steepest at 1e-4; stretch 0..2 -> point
    # round(4/3) = 1 -> 1e-2; min at 1.0 -> 0.1. (No skip: see NO_SKIP.)
    ("min_points_3", L6, [2.0, math.nan, 1.0, math.inf, 0.5, math.nan],
     {"min_points": 3, **NO_SKIP}, {"steepest": 1e-4, "valley": 1e-2, "min_over_10": 0.1}, None),
    ("rising", L6, UP, NO_SKIP, dict.fromkeys(RULES), "never decreases"),
    ("flat", L6, FLAT, NO_SKIP, dict.fromkeys(RULES), "never decreases"),
    # Two descending stretches of 2 steps (0..2 and 3..5): the first wins; 2/3 of 2 -> 1.
    ("valley_tie", L6, [3.0, 2.0, 1.0, 5.0, 4.0, 3.5], NO_SKIP,
     {"valley": 1e-3, "min_over_10": 1e-3}, None),
    # The same curve with the default skips: points 1..4 are left, fewer than min_points.
    ("six_points_default_skips", L6, [3.0, 2.0, 1.0, 5.0, 4.0, 3.5], {}, dict.fromkeys(RULES),
     "too few points left: skipped first 1 and last 1 of 6 points, 4 left, need at least 5"),
]


@pytest.mark.parametrize(("case", "lrs", "losses", "kwargs", "want", "fragment"), CASES,
                         ids=[c[0] for c in CASES])
def test_rules_on_hand_made_curves(case, lrs, losses, kwargs, want, fragment):
    for rule, expected in want.items():
        got = RULES[rule](lrs, losses, **kwargs)
        assert isinstance(got, Suggestion) and got.rule == rule
        assert got.reason, f"{case}/{rule}: empty reason"
        if expected is None:
            assert got.lr is None, f"{case}/{rule}: {got}"
            if fragment:
                assert fragment in got.reason, f"{case}/{rule}: {got.reason}"
        else:
            assert got.lr == pytest.approx(expected, rel=1e-12), f"{case}/{rule}: {got}"


def test_steepest_reads_log_rate_not_step_index():
    # L(u) = 1 - tanh(2 (u + 2)), u = log10 lr: steepest at u = -2 (lr 0.01) by construction.
    def curve(lrs):
        return 1.0 - np.tanh(2.0 * (np.log10(lrs) + 2.0))

    exp_lrs = np.logspace(-4, 0, 401)
    lin_lrs = np.linspace(1e-4, 1.0, 10_001)
    # Skips count points: the linear ramp's first 10% of points (1,000) are the rates below
    # 0.1, so with the default skips its answer is its first kept point; this test is about
    # the slope's x axis, so the linear ramp is read whole.
    for lrs, skips in ((exp_lrs, {}), (lin_lrs, NO_SKIP)):
        got = suggest_steepest(lrs, curve(lrs), **skips).lr
        assert got == pytest.approx(0.01, rel=0.01)
    assert suggest_steepest(lin_lrs, curve(lin_lrs)).lr == lin_lrs[1000]
    # Against the step index the linear ramp's steepest point sits at about 0.0047, half the
    # rate: the rule must not be doing that.
    by_index = lin_lrs[np.argmin(np.gradient(curve(lin_lrs)))]
    assert by_index < 0.006


def test_valley_picks_two_thirds_down_the_stretch():
    lrs = np.logspace(-3, 0, 10)
    losses = [5, 5, 4, 3, 2, 1, 0.5, 0.4, 0.3, 0.9]  # stretch 1..8 (7 steps): 1 + round(4.67)
    assert suggest_valley(lrs, losses).lr == pytest.approx(lrs[6])
    assert longest_descent(np.array(losses, dtype=float)) == (1, 8)
    assert longest_descent(np.array([1.0, 1.0, 1.0])) is None


def test_min_over_10_none_when_minimum_is_first_point():
    got = suggest_min_over_10(L6, [0.1, 0.5, 0.4, 0.3, 0.6, 0.9], **NO_SKIP)
    assert got.lr is None and "first" in got.reason


def test_rules_are_pure():
    lrs, losses = np.array(R_LRS), np.array(R_LOSS)
    before = (lrs.copy(), losses.copy())
    for fn in RULES.values():
        assert fn(lrs, losses) == fn(lrs, losses)
    np.testing.assert_array_equal(lrs, before[0])
    np.testing.assert_array_equal(losses, before[1])


@pytest.mark.parametrize(("lrs", "losses", "kwargs", "match"), [
    (L6, [1.0] * 5, {}, "lrs/losses"),
    ([[1e-3, 1e-2]], [[1.0, 2.0]], {}, "lrs/losses"),
    (L6[::-1], UP, {}, "strictly increasing"),
    ([1e-3, 1e-3, 1e-2, 1e-1, 1.0], [1, 2, 3, 4, 5], {}, "strictly increasing"),
    (L6, UP, {"min_points": 1}, "min_points"),
    (L6, UP, {"min_points": 2.5}, "min_points"),
    (L6, UP, {"skip_start": -0.1}, "skip_start"),
    (L6, UP, {"skip_start": 0.6}, "skip_start"),
    (L6, UP, {"skip_end": 0.51}, "skip_end"),
    (L6, UP, {"skip_end": math.nan}, "skip_end"),
])
def test_bad_input_raises_naming_the_field(lrs, losses, kwargs, match):
    for fn in RULES.values():
        with pytest.raises(ValueError, match=match):
            fn(lrs, losses, **kwargs)


def test_rule_registry():
    assert set(RULES) == {"steepest", "valley", "min_over_10"}
    assert get_rule("valley") is suggest_valley
    with pytest.raises(ValueError, match="rule: got 'fastest'; allowed: steepest, valley"):
        get_rule("fastest")
    with pytest.raises(ConfigError):
        suggest_steepest(L6, UP, min_points=0)


# Ten rates half a decade apart (log10 lr = -5, -4.5, ..., -0.5). The default skips keep
# points 1..8: floor(10% of 10) = 1 at the start, floor(5% of 10) = 0, raised to 1, at the end.
E_LRS = [10.0 ** (-5 + 0.5 * i) for i in range(10)]


def test_steepest_does_not_pick_the_first_point():
    # A fall at the very start (4.0 -> 2.0 over half a decade: -4.0/decade at point 0, the
    # moving average's warm-up in a real range test). Read over all points the steepest is
    # point 0; over the kept points 1..8 (slopes: -0.2 one-sided, then central -0.2, -0.4,
    # -0.8, -0.7, -0.3, -0.15, and -0.1 one-sided at 8) it is point 4, lr 10^-3.
    losses = [4.0, 2.0, 1.9, 1.8, 1.5, 1.0, 0.8, 0.7, 0.65, 0.6]
    got = suggest_steepest(E_LRS, losses)
    assert got.lr != E_LRS[0], got
    assert got.lr == pytest.approx(1e-3, rel=1e-12), got
    assert "point 4 of 10" in got.reason and "skipped first 1 and last 1 of 10 points" in \
        got.reason, got.reason


def test_steepest_does_not_pick_the_last_point():
    # A drop at the very end (0.6 -> 0.1: -1.0/decade one-sided at point 9). Over the kept
    # points 1..8 (slopes -0.4 one-sided, -0.5, -0.7, -0.6, -0.3, -0.15, -0.1, -0.1) the
    # steepest is point 3, lr 10^-3.5.
    losses = [2.0, 1.9, 1.7, 1.4, 1.0, 0.8, 0.7, 0.65, 0.6, 0.1]
    got = suggest_steepest(E_LRS, losses)
    assert got.lr != E_LRS[-1], got
    assert got.lr == pytest.approx(10 ** -3.5, rel=1e-12), got
    assert "skipped first 1 and last 1 of 10 points" in got.reason, got.reason


def test_skipping_is_what_keeps_the_edges_out():
    # With skipping off the rule reads point 0 again: the default skips do the protecting.
    losses = [4.0, 2.0, 1.9, 1.8, 1.5, 1.0, 0.8, 0.7, 0.65, 0.6]
    assert suggest_steepest(E_LRS, losses, **NO_SKIP).lr == E_LRS[0]


@pytest.mark.parametrize(("n", "want"), [
    (0, (0, 0)), (1, (1, 1)), (6, (1, 1)), (10, (1, 1)), (19, (1, 1)), (20, (2, 1)),
    (40, (4, 2)), (88, (8, 4)), (100, (10, 5)), (1000, (100, 50)),
])
def test_skip_counts_scale_with_the_curve(n, want):
    # 10% and 5% rounded down, at least 1 each: 10 and 5 of 100 are the anchors' counts
    # (fastai's num_it // 10 and 5, torch-lr-finder's skip_start=10, skip_end=5).
    assert skip_counts(n) == want


def test_skip_counts_explicit_fractions():
    assert skip_counts(100, 0.0, 0.0) == (0, 0)
    assert skip_counts(100, 0.29, 0.5) == (29, 50)  # 0.29 x 100 is 28.999999999999996
    assert skip_counts(7, 0.01, 0.01) == (1, 1)


# Twenty rates a quarter decade apart (log10 lr = -5, -4.75, ..., -0.25); the default skips
# keep points 2..18 (floor(2.0) = 2 at the start, floor(1.0) = 1 at the end). The curve falls
# fast in the warm-up (points 0..6, the longest strictly descending stretch of the whole
# curve: 6 steps), bumps up at 7..8, falls for real at 8..13 (5 steps) and rises after.
W_LRS = [10.0 ** (-5 + 0.25 * i) for i in range(20)]
W_LOSS = [5.0, 4.0, 3.5, 3.4, 3.3, 3.2, 3.1, 3.3, 3.4, 2.5, 1.5, 0.8, 0.5, 0.4, 0.6, 0.9,
          1.5, 2.5, 4.0, 8.0]


def test_warm_up_curve_hand_computed():
    # steepest: over all points point 0 ((4.0 - 5.0) / 0.25 = -4.0/decade); over 2..18 the
    # central slopes peak at point 9, (1.5 - 3.4) / 0.5 = -3.8 (point 10: -3.4, 11: -2.0).
    # valley: over all points the warm-up stretch 0..6 is the longest (0 + round(4) = point 4,
    # 10^-4); over 2..18 it is cut to 2..6 (4 steps) and 8..13 (5 steps) wins:
    # 8 + round(10/3) = point 11, 10^-2.25.
    # min_over_10: the minimum 0.4 is point 13, 10^-1.75 / 10.
    want = {"steepest": 10 ** -2.75, "valley": 10 ** -2.25, "min_over_10": 10 ** -2.75}
    for rule, lr in want.items():
        got = RULES[rule](W_LRS, W_LOSS)
        assert got.lr == pytest.approx(lr, rel=1e-12), got
        assert "skipped first 2 and last 1 of 20 points" in got.reason, got.reason
    assert "point 9 of 20" in suggest_steepest(W_LRS, W_LOSS).reason
    assert "point 11, 2/3 down the descending stretch 8..13 of 20" in \
        suggest_valley(W_LRS, W_LOSS).reason
    assert suggest_steepest(W_LRS, W_LOSS, **NO_SKIP).lr == W_LRS[0]
    assert suggest_valley(W_LRS, W_LOSS, **NO_SKIP).lr == pytest.approx(1e-4, rel=1e-12)


def test_valley_and_min_over_10_on_the_edge_curves():
    # Both ten-point curves above are strictly descending over the kept points 1..8, so the
    # valley is 1 + round(2/3 x 7) = point 6 (10^-2); their minimum there is point 8 (10^-1),
    # / 10 = 10^-2. The first curve's true minimum, 0.6, is point 9, in the skipped end: the
    # rule reads the last kept point instead (as fastai's minimum does after its own skip).
    for losses in ([4.0, 2.0, 1.9, 1.8, 1.5, 1.0, 0.8, 0.7, 0.65, 0.6],
                   [2.0, 1.9, 1.7, 1.4, 1.0, 0.8, 0.7, 0.65, 0.6, 0.1]):
        assert suggest_valley(E_LRS, losses).lr == pytest.approx(1e-2, rel=1e-12)
        got = suggest_min_over_10(E_LRS, losses)
        assert got.lr == pytest.approx(1e-2, rel=1e-12)
        assert "(point 8 of 10, the last kept point: the minimum may lie in the skipped end)" \
            in got.reason, got.reason
    assert "(point 13 of 20), / 10" in suggest_min_over_10(W_LRS, W_LOSS).reason


@pytest.mark.parametrize("losses", [
    [1.0 + 0.1 * i for i in range(20)],  # rising
    [1.0] * 20,  # flat
    [5.0, 3.0] + [2.0 + 0.1 * i for i in range(18)],  # falls only in the skipped start
    [2.0 + 0.1 * i for i in range(19)] + [0.5],  # falls only at the skipped last point
    # dips (1.8 -> 1.75) but never below the first kept value, 1.7 at point 2
    [2.0, 1.5, 1.7, 1.8, 1.75] + [1.9 + 0.1 * i for i in range(15)],
], ids=["rising", "flat", "falls_in_start", "falls_at_end", "never_below_first_kept"])
def test_no_descent_is_none_with_reason(losses):
    for rule, fn in RULES.items():
        got = fn(W_LRS, losses)
        assert got.lr is None, f"{rule}: {got}"
        assert "never decreases" in got.reason, f"{rule}: {got.reason}"
        assert "skipped first 2 and last 1 of 20 points" in got.reason, f"{rule}: {got.reason}"


def test_too_few_left_after_skipping_is_none_with_reason():
    # 7 points keep 5 (enough); min_points=6 asks for more than is left.
    lrs, losses = W_LRS[:7], W_LOSS[:7]
    assert all(fn(lrs, losses).lr is not None for fn in RULES.values())
    for fn in RULES.values():
        got = fn(lrs, losses, min_points=6)
        assert got.lr is None
        assert got.reason == ("too few points left: skipped first 1 and last 1 of 7 points, "
                              "5 left, need at least 6"), got.reason


def test_skipped_counts_on_a_range_test_length_curve():
    # 88 points, as the softmax seed-2 range test that stopped early: 8 and 4 are skipped, and
    # the counts are of the finite points (a NaN does not count).
    lrs = np.logspace(-6, 1, 89)
    u = np.log10(lrs)
    losses = 2.3 - np.tanh(u + 3.0) + np.where(u > -0.5, 10.0 * (u + 0.5) ** 2, 0.0)
    losses[0] = 4.0  # a steep warm-up at point 0, as seed 2's
    losses[50] = np.nan
    for rule, fn in RULES.items():
        got = fn(lrs, losses)
        assert got.lr is not None and got.lr > lrs[8], f"{rule}: {got}"
        assert "skipped first 8 and last 4 of 88 points" in got.reason, f"{rule}: {got.reason}"
