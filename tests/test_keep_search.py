"""The keep-score comparison's arithmetic (pure): pooled gap, paired difference, the table."""

from __future__ import annotations

import argparse

import pytest

from flashmem_cli.bench.keep_search import compare, markdown, parse_variant


def record(scores, ms=(10.0,), span=400, left=100):
    return {
        "probes": scores,
        "consolidation_ms": list(ms),
        "span_tokens": span,
        "left_tokens": left,
    }


def runs_of(**columns):
    """Two cases of two probes each; each column lists the four probe scores."""
    return {name: [record(scores[:2]), record(scores[2:])] for name, scores in columns.items()}


def results_of(runs):
    return [
        {"id": str(i), "policies": {name: records[i] for name, records in runs.items()}}
        for i in range(2)
    ]


def test_compare_pools_the_gap_and_pairs_the_difference():
    runs = runs_of(
        full=[-1.0, -1.0, -2.0, -1.0],
        truncate=[-3.0, -2.0, -2.0, -5.0],  # probe 3 not hurt: counted nowhere
        first=[-2.0, -2.0, -9.0, -3.0],
        second=[-1.0, -1.5, -9.0, -3.0],
    )
    summary = compare(runs, results_of(runs))
    assert summary["probes"] == 4 and summary["hurt"] == 3
    first, second = summary["variants"]["first"], summary["variants"]["second"]
    assert first["gap_recovered"] == pytest.approx(3.0 / 7.0, abs=1e-3)  # gains 1, 0, 2
    assert second["gap_recovered"] == pytest.approx(4.5 / 7.0, abs=1e-3)
    assert first["minus_first"] == 0.0 and first["minus_first_ci"] == [0.0, 0.0]
    assert second["minus_first"] == pytest.approx(1.5 / 7.0, abs=1e-3)
    low, high = second["minus_first_ci"]
    assert 0.0 <= low <= high  # never worse in any case: every resample is >= 0
    assert first["compression"] == 4.0 and first["consolidation_ms_median"] == 10.0


def test_markdown_has_a_row_per_variant():
    runs = runs_of(
        full=[-1.0, -1.0, -1.0, -1.0],
        truncate=[-3.0, -3.0, -3.0, -3.0],
        **{"attention:7": [-2.0] * 4, "reconstruction:3": [-1.5] * 4},
    )
    table = markdown(compare(runs, results_of(runs)), "recall-dev", 512)
    assert "recall-dev, -c 512: 4 of 4 probes hurt" in table
    assert "| attention:7 | 0.50 (0.50 to 0.50) | +0.00" in table
    assert (
        "| reconstruction:3 | 0.75 (0.75 to 0.75) | +0.25 (+0.25 to +0.25) | 4.0x | 10.0 |" in table
    )


def test_no_hurt_probe_gives_no_ratio_rather_than_an_error():
    runs = runs_of(full=[-1.0] * 4, truncate=[-1.0] * 4, first=[-2.0] * 4)
    summary = compare(runs, results_of(runs))
    assert summary["hurt"] == 0 and summary["variants"]["first"]["gap_recovered"] is None
    assert "| first | n/a (n/a) |" in markdown(summary, "recall-dev", 512)


def test_variants_are_score_and_pool():
    assert parse_variant("reconstruction:3") == ("reconstruction", 3)
    for bad in ("reconstruction", "magic:3", "attention:0", "attention:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)
