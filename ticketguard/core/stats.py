"""The statistics every piece of evidence rests on, in one place: exact binomial tails and a Bernstein bound.

Each function states its null (what chance alone would do); the schemes decide what "chance" is for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binom


def binomial_p_value(successes: int, trials: int, chance: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, chance): how often chance alone would score this well."""
    if trials <= 0:
        return 1.0
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"chance must lie in [0, 1], got {chance}")
    return float(binom.sf(successes - 1, trials, chance))


def binomial_log_p_value(successes: int, trials: int, chance: float) -> float:
    """log P(X >= successes) for X ~ Binomial(trials, chance), finite far below what a float p-value holds."""
    if trials <= 0 or successes <= 0:
        return 0.0
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"chance must lie in [0, 1], got {chance}")
    return float(binom.logsf(successes - 1, trials, chance))


def required_matches(trials: int, chance: float, alpha: float, log_tests: float = 0.0) -> int:
    """The fewest agreements whose binomial p-value is <= alpha (trials + 1 when none suffices); with
    ``log_tests``, the p-value is that of the best of exp(log_tests) such tests (union bound)."""
    log_tails = binom.logsf(np.arange(trials + 1) - 1, trials, chance)
    passing = np.flatnonzero(log_tests + log_tails <= math.log(alpha))
    return int(passing[0]) if passing.size else trials + 1


def match_p_value(
    matches: int, dark: Sequence[int], light: Sequence[int], densities: Sequence[float]
) -> tuple[float, np.ndarray]:
    """P(matches >= observed) when every cell matches on its own: per group, its ``dark`` cells with chance q
    (a random mask's density there) and its ``light`` cells with 1 - q; also the tail P(X >= m) for every m."""
    pmf = np.ones(1)
    for n_dark, n_light, q in zip(dark, light, densities):
        pmf = np.convolve(pmf, binom.pmf(np.arange(n_dark + 1), n_dark, q))
        pmf = np.convolve(pmf, binom.pmf(np.arange(n_light + 1), n_light, 1 - q))
    tail = np.minimum(np.cumsum(pmf[::-1])[::-1], 1.0)
    return float(tail[matches]), tail


def bernstein_tail(excess: float, variance: float) -> float:
    """P(X - E X >= excess) <= exp(-excess^2 / (2 (variance + excess / 3))) for independent Bernoullis."""
    if excess <= 0:
        return 1.0
    return math.exp(-excess * excess / (2 * (variance + excess / 3)))


def needed_excess(variance: float, level: float) -> float:
    """The smallest excess whose Bernstein bound is at most ``level``."""
    log_inverse = -math.log(level)
    return log_inverse / 3 + math.sqrt((log_inverse / 3) ** 2 + 2 * log_inverse * variance)
