"""Error bars (echokv_lab.eval.intervals) against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from echokv_lab.eval.intervals import (
    bootstrap_perplexity,
    bootstrap_ratio,
    half_width,
    pooled,
    wilson,
    with_interval,
)


def test_wilson_hand_computed():
    # p = 0.5, n = 10: centre 0.5, half = 1.96 * sqrt(0.025 + 1.96^2 / 400) / (1 + 1.96^2 / 10) = 0.2634
    low, high = wilson(0.5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # p = 0.9, n = 100 (the textbook case): (0.8256, 0.9448)
    assert wilson(0.9, 100) == pytest.approx((0.8256, 0.9448), abs=1e-4)
    # p = 0, n = 10: the lower end is 0, the upper end z^2 / (n + z^2) = 3.8415 / 13.8415
    low, high = wilson(0.0, 10)
    assert low == 0.0 and high == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    # p = 1 mirrors p = 0
    assert wilson(1.0, 10) == pytest.approx((1 - high, 1.0), abs=1e-12)
    # no samples: nothing is known
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_wilson_half_width_of_the_quick_suite():
    """n = 100: a score near 50 has a half-width of about 10 points, so a 10-point gap is at the edge."""
    assert 100 * half_width(*wilson(0.5, 100)) == pytest.approx(9.6, abs=0.1)
    assert 100 * half_width(*wilson(0.9, 100)) == pytest.approx(6.0, abs=0.1)


def test_pooled_and_row_interval():
    rows = [{"score": 1.0, "n": 3}, {"score": 0.0, "n": 1}, {"error": "x", "n": 0}]
    assert pooled(rows) == (0.75, 4)
    row = with_interval({"score": 0.5, "n": 10})
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert with_interval({"error": "boom"}) == {"error": "boom"}


def test_bootstrap_two_sequences_hand_computed():
    """Two sequences of 100 tokens with NLL 100 and 200: a draw is AA, AB, BA or BB, so the perplexity is e^1,
    e^1.5 or e^2 with probabilities 1/4, 1/2, 1/4: the 2.5 % and 97.5 % quantiles are e^1 and e^2."""
    low, high = bootstrap_perplexity([100.0, 200.0], [100, 100])
    assert low == pytest.approx(math.e) and high == pytest.approx(math.e**2)


def test_bootstrap_constant_and_fixed_seed():
    assert bootstrap_perplexity([50.0] * 4, [25] * 4) == pytest.approx((math.e**2, math.e**2))
    a = bootstrap_perplexity([10.0, 20.0, 35.0], [10, 10, 12])
    assert a == bootstrap_perplexity([10.0, 20.0, 35.0], [10, 10, 12])  # fixed seed: reproducible
    low, high = a
    assert math.exp(1.0) <= low <= high <= math.exp(35 / 12)
    assert bootstrap_ratio([0.0, 0.0], [5, 5]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_perplexity([], [])


def test_wilson_contains_the_proportion_exactly_at_the_ends():
    from echokv_lab.eval.intervals import wilson

    for n in (1, 7, 100, 1000):
        assert wilson(0.0, n)[0] == 0.0 and wilson(1.0, n)[1] == 1.0
        low, high = wilson(0.0, n)
        assert low <= 0.0 <= high
