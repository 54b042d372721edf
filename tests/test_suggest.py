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
    # round(4/3) = 1 -> 1e-2; min at 1.0 -> 0.1.
    ("min_points_3", L6, [2.0, math.nan, 1.0, math.inf, 0.5, math.nan], {"min_points": 3},
     {"steepest": 1e-4, "valley": 1e-2, "min_over_10": 0.1}, None),
    ("rising", L6, UP, {}, dict.fromkeys(RULES), "never decreases"),
    ("flat", L6, FLAT, {}, dict.fromkeys(RULES), None),
    # Two descending stretches of 2 steps (0..2 and 3..5): the first wins; 2/3 of 2 -> 1.
    ("valley_tie", L6, [3.0, 2.0, 1.0, 5.0, 4.0, 3.5], {},
     {"valley": 1e-3, "min_over_10": 1e-3}, None),
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
    for lrs in (exp_lrs, lin_lrs):
        got = suggest_steepest(lrs, curve(lrs)).lr
        assert got == pytest.approx(0.01, rel=0.01)
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
    got = suggest_min_over_10(L6, [0.1, 0.5, 0.4, 0.3, 0.6, 0.9])
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
