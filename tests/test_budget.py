"""Bounded context's bookkeeping (pure): which turns to fold, what to keep, what to remove."""

from __future__ import annotations

import numpy as np
import pytest

from flashmem_cli.memory.budget import (
    budget_tokens,
    compressed_size,
    dropped_runs,
    kept_count,
    mixed,
    per_query,
    pooled,
    positions_to_keep,
    turns_to_consolidate,
)


def test_budget_is_a_fraction_or_tokens():
    assert budget_tokens(0.85, 1000) == 850
    assert budget_tokens(600, 1000) == 600
    assert budget_tokens(5000, 1000) == 1000
    with pytest.raises(ValueError):
        budget_tokens(0, 1000)


def test_the_keep_ratio_bounds_kept_positions_and_latents_together():
    assert kept_count(400, 0.25, 8) == 92
    assert compressed_size(400, 0.25, 8) == 100  # 4x
    assert kept_count(20, 0.25, 8) == 0 and compressed_size(20, 0.25, 8) == 8
    assert compressed_size(400, 0.0, 0) == 0  # truncation


def test_nothing_is_folded_while_it_fits():
    assert (
        turns_to_consolidate(10, [100, 100, 100], 50, budget=400, keep_ratio=0.25, n_latents=8) == 0
    )


def test_the_fewest_oldest_turns_that_make_room_are_folded():
    turns = [100, 100, 100, 100]
    # 410 + 60 > 400; folding one turn saves 75 -> 335 + 60 fits
    assert turns_to_consolidate(10, turns, 60, budget=400, keep_ratio=0.25, n_latents=0) == 1
    assert turns_to_consolidate(10, turns, 130, budget=400, keep_ratio=0.25, n_latents=0) == 2


def test_the_last_two_turns_are_never_folded():
    turns = [100, 100, 100]
    assert turns_to_consolidate(10, turns, 300, budget=400, keep_ratio=0.25, n_latents=0) == 1
    assert turns_to_consolidate(10, [100, 100], 300, budget=400, keep_ratio=0.25, n_latents=0) == 0


def test_a_span_too_small_to_shrink_is_not_folded():
    assert (
        turns_to_consolidate(10, [6, 100, 100], 300, budget=200, keep_ratio=0.25, n_latents=8) == 0
    )


def test_the_most_attended_positions_are_kept_with_their_neighbours():
    mass = np.zeros(40)
    mass[12] = 5.0
    mass[30] = 1.0
    assert list(positions_to_keep(mass, 10, 40, 1)) == [12]
    kept = positions_to_keep(mass, 10, 40, 3)
    assert 12 in kept and all(abs(k - 12) <= 3 for k in kept)  # the peak's cluster, not 30
    assert list(pooled(np.array([0.0, 3.0, 0.0, 0.0, 0.0]), 3)) == [3.0, 3.0, 3.0, 0.0, 0.0]
    assert positions_to_keep(mass, 10, 40, 0).size == 0


def test_the_pool_width_decides_how_many_neighbours_come_along():
    mass = np.zeros(40)
    mass[12], mass[30], mass[31] = 5.0, 1.0, 0.9
    assert list(positions_to_keep(mass, 10, 40, 3, pool=1)) == [12, 30, 31]
    assert list(positions_to_keep(mass, 10, 40, 3, pool=3)) == [11, 12, 13]


def test_per_query_divides_by_the_tokens_that_could_see_a_position():
    mass = np.array([8.0, 6.0, 2.0, 1.0])  # 4, 3, 2 and 1 queries saw them
    np.testing.assert_allclose(per_query(mass), [2.0, 2.0, 1.0, 1.0])


def test_mixed_adds_each_scores_share_of_the_span():
    first = np.array([100.0, 2.0, 6.0, 50.0])
    second = np.array([0.0, 3.0, 1.0, 9.0])
    out = mixed(first, second, 1, 3)
    np.testing.assert_allclose(out, [0.0, 0.25 + 0.75, 0.75 + 0.25, 0.0])
    np.testing.assert_allclose(mixed(first, np.zeros(4), 1, 3)[1:3], [0.25, 0.75])


def test_dropped_runs_cover_the_rest_last_first():
    assert dropped_runs(10, 20, np.array([12, 13, 17])) == [(18, 20), (14, 17), (10, 12)]
    assert dropped_runs(0, 3, np.array([0, 1, 2])) == []
    assert dropped_runs(0, 3, np.array([], dtype=np.int64)) == [(0, 3)]
