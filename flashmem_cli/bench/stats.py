"""Statistics for the recall evaluation (pure numpy): bootstrap intervals, rates, ratios."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def bootstrap_ci(
    values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean: `values` resampled with replacement
    `resamples` times (a fixed seed, so a result is reproducible). None without values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ratio_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), the pairs
    resampled together. None without pairs."""
    a = np.asarray(numerators, dtype=np.float64)
    b = np.asarray(denominators, dtype=np.float64)
    if a.size == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = a[picks].sum(axis=1) / b[picks].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def contains(text: str, expected: str) -> bool:
    """The generation check: `expected` occurs in `text`, ignoring case and spacing."""
    return " ".join(expected.split()).casefold() in " ".join(text.split()).casefold()


def rounded(pair: tuple[float, float] | None, digits: int = 3) -> list[float] | None:
    return None if pair is None else [round(pair[0], digits), round(pair[1], digits)]
