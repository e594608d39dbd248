"""The recall evaluation's statistics: bootstrap intervals, the generation check, summaries."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flashmem_cli.bench.recall import summarize
from flashmem_cli.bench.stats import (
    bootstrap_ci,
    bootstrap_ratio_ci,
    contains,
    mean,
    ratio,
    rounded,
)


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible() -> None:
    values = np.random.default_rng(1).normal(0.6, 0.3, size=80)
    low, high = bootstrap_ci(values)  # type: ignore[misc]
    assert low < values.mean() < high
    assert bootstrap_ci(values) == (low, high)  # a fixed seed
    assert bootstrap_ci(values, seed=7) != (low, high)
    # about 2 standard errors either side
    se = values.std() / np.sqrt(values.size)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_ci_narrows_with_more_values() -> None:
    rng = np.random.default_rng(2)
    small = bootstrap_ci(rng.normal(size=20))
    large = bootstrap_ci(rng.normal(size=2000))
    assert small is not None and large is not None
    assert large[1] - large[0] < (small[1] - small[0]) / 4


def test_bootstrap_ci_of_constant_and_empty_values() -> None:
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_ci([1.0]) == (1.0, 1.0)
    assert bootstrap_ci([]) is None


def test_bootstrap_ci_of_a_rate_stays_in_zero_one() -> None:
    hits = [1.0] * 9 + [0.0]
    low, high = bootstrap_ci(hits, level=0.9)  # type: ignore[misc]
    assert 0.0 <= low < 0.9 < high <= 1.0


def test_bootstrap_ci_coverage_is_about_the_level() -> None:
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(200):
        sample = rng.exponential(1.0, size=40)
        low, high = bootstrap_ci(sample, resamples=1000, seed=trial)  # type: ignore[misc]
        covered += low <= 1.0 <= high
    assert 0.85 <= covered / 200 <= 0.99


def test_bootstrap_ratio_ci_brackets_the_pooled_ratio() -> None:
    rng = np.random.default_rng(4)
    gaps = rng.uniform(0.1, 3.0, size=60)
    gains = gaps * 0.6 + rng.normal(0, 0.3, size=60)
    low, high = bootstrap_ratio_ci(gains, gaps)  # type: ignore[misc]
    assert low < gains.sum() / gaps.sum() < high
    assert high - low < 0.3
    assert bootstrap_ratio_ci(gains, gaps) == (low, high)


def test_bootstrap_ratio_ci_resamples_pairs_together() -> None:
    # every pair recovers exactly 40%: any resample of whole pairs says 0.4
    gaps = [0.2, 1.0, 3.0, 0.5]
    low, high = bootstrap_ratio_ci([0.4 * g for g in gaps], gaps)  # type: ignore[misc]
    assert low == pytest.approx(0.4) and high == pytest.approx(0.4)
    assert bootstrap_ratio_ci([], []) is None


@pytest.mark.parametrize(
    "reply, expected, found",
    [
        ("It is Ysolde, I think.", "Ysolde", True),
        ("ysolde", "Ysolde", True),
        ("The ferry leaves at 06:40 sharp", "06:40", True),
        ("Penhallow\n  Cross", "Penhallow Cross", True),
        ("Penhallow", "Penhallow Cross", False),
        ("", "47", False),
        ("My nameとは mendatang", "Anselm", False),
    ],
)
def test_contains_ignores_case_and_spacing(reply: str, expected: str, found: bool) -> None:
    assert contains(reply, expected) is found


def test_small_helpers() -> None:
    assert mean([]) is None and mean([1.0, 2.0]) == 1.5
    assert ratio(10, 4) == 2.5 and ratio(3, 0) is None
    assert rounded(None) is None and rounded((0.12345, 0.98765)) == [0.123, 0.988]


def _case(**policies: tuple[list[float | None], list[bool | None], int, int]) -> dict[str, Any]:
    return {
        "policies": {
            name.replace("_", "-"): {
                "probes": scores,
                "hits": hits,
                "span_tokens": span,
                "left_tokens": left,
            }
            for name, (scores, hits, span, left) in policies.items()
        }
    }


POLICIES = ("full", "truncate", "keep-only")


def test_summary_reports_intervals_accuracy_and_compression() -> None:
    results = [
        _case(
            full=([-1.0, -1.0], [True, True], 0, 0),
            truncate=([-3.0, -3.0], [False, False], 300, 0),
            keep_only=([-2.0, -1.5], [True, False], 300, 75),
        ),
        _case(
            full=([-1.0], [True], 0, 0),
            truncate=([-1.01], [True], 200, 0),  # not hurt: no gap, still an answer
            keep_only=([-1.0], [None], 200, 50),  # did not fit: compared for log-prob only
        ),
    ]
    summary = summarize(results, POLICIES)
    assert summary["probes"] == 3 and summary["probes_hurt_by_truncation"] == 2
    assert summary["gap_recovered_keep-only"] == pytest.approx(0.625)
    low, high = summary["gap_recovered_ci"]["keep-only"]
    assert 0.5 <= low <= 0.625 <= high <= 0.75
    assert summary["probes_answered"] == 2
    assert summary["accuracy"] == {"full": 1.0, "truncate": 0.0, "keep-only": 0.5}
    assert summary["accuracy_ci"]["full"] == [1.0, 1.0]
    assert summary["compression"] == {"full": None, "truncate": None, "keep-only": 4.0}


def test_summary_without_answers_has_no_accuracy() -> None:
    results = [
        _case(
            full=([-1.0], [None], 0, 0),
            truncate=([-3.0], [None], 10, 0),
            keep_only=([-2.0], [None], 10, 5),
        )
    ]
    summary = summarize(results, POLICIES)
    assert summary["gap_recovered_keep-only"] == 0.5
    assert summary["gap_recovered_ci"]["keep-only"] == [0.5, 0.5]
    assert "accuracy" not in summary
