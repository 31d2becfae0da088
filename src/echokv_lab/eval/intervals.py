"""Error bars of the evaluation: Wilson score intervals for retrieval scores, a bootstrap for perplexity.

* :func:`wilson`: the 95 % Wilson score interval (Wilson 1927) of a proportion ``p`` observed over ``n`` samples.
  RULER's ``string_match_all`` of a single-answer task is 0 or 1 per sample, so a mean score is a binomial
  proportion; for partial-credit scores (multi-answer tasks) the interval is the same formula applied to the mean,
  an approximation (a mean of values in [0, 1] has at most the variance of a proportion, so it is conservative).
  Unlike the normal approximation it never leaves [0, 1] and is not empty at p = 0 or 1.
* :func:`bootstrap_perplexity`: a percentile bootstrap over sequences (``resamples`` draws with replacement,
  fixed seed): each draw's perplexity is ``exp(sum NLL / sum tokens)`` of the drawn sequences. With few
  sequences (the quick suite has 4) the interval is coarse: it can be no wider than the range of the per-sequence
  perplexities, and says how much the text varies, not the uncertainty of a longer text.
* :func:`half_width`: ``(high - low) / 2``, what the reports state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

#: two-sided 95 % normal quantile
Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` over ``n`` samples; ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, float(p)))
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))  # (p = 0 or 1: no rounding past it)


def pooled(rows: Sequence[dict]) -> tuple[float, int]:
    """(mean score, n) of result rows pooled by their ``n`` (rows without a score are left out)."""
    total = sum(int(r.get("n", 0)) for r in rows if r.get("score") is not None and not r.get("error"))
    if not total:
        return float("nan"), 0
    return sum(r["score"] * int(r["n"]) for r in rows if r.get("score") is not None and not r.get("error")) / total, total


def bootstrap_perplexity(nll: Sequence[float], tokens: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``exp(sum nll / sum tokens)`` over sequences (summed NLL per sequence)."""
    if len(nll) != len(tokens) or not nll:
        raise ValueError("bootstrap_perplexity needs one summed NLL and one token count per sequence")
    return _bootstrap(lambda idx: math.exp(sum(nll[i] for i in idx) / sum(tokens[i] for i in idx)), len(nll),
                      resamples, seed, level)


def _bootstrap(stat, k: int, resamples: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``resamples`` resamplings of ``k`` units with replacement."""
    rng = random.Random(seed)
    values = sorted(stat([rng.randrange(k) for _ in range(k)]) for _ in range(resamples))
    alpha = (1.0 - level) / 2
    return _quantile(values, alpha), _quantile(values, 1.0 - alpha)


def _quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation between order statistics, numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def half_width(low: float, high: float) -> float:
    return (high - low) / 2


def with_interval(row: dict) -> dict:
    """``row`` with ``ci_low`` / ``ci_high`` of its score (Wilson over its ``n``); rows without a score unchanged."""
    if row.get("error") or row.get("score") is None or "n" not in row:
        return row
    low, high = wilson(row["score"], int(row["n"]))
    return {**row, "ci_low": low, "ci_high": high, "ci": "wilson95"}


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(num) / sum(den)`` over units (e.g. mean KL per token over sequences)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("bootstrap_ratio needs one numerator and one denominator per unit")
    def ratio(idx):
        den = sum(denominators[i] for i in idx)
        return sum(numerators[i] for i in idx) / den if den else 0.0

    return _bootstrap(ratio, len(numerators), resamples, seed, level)
