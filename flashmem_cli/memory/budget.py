"""Bounded context: which span to consolidate when the budget is reached, and what of it to keep
(pure bookkeeping over token counts and attention mass)."""

from __future__ import annotations

import numpy as np

DEFAULT_BUDGET = 0.85
DEFAULT_KEEP_RATIO = 0.25
PROTECTED_TURNS = 2  # the last turns are never consolidated
POOL = 3  # kept positions come in runs (SnapKV's max-pooling): chosen on the dev split
KEEP_SCORES = ("reconstruction", "attention", "attention-per-query", "mix")


def budget_tokens(budget: float, n_ctx: int) -> int:
    """`--budget`: a fraction of n_ctx when <= 1, else a token count (at most n_ctx)."""
    if budget <= 0:
        raise ValueError(f"budget {budget} must be positive")
    tokens = int(budget * n_ctx) if budget <= 1 else int(budget)
    return min(tokens, n_ctx)


def kept_count(span: int, keep_ratio: float, n_latents: int) -> int:
    """Positions kept of a consolidated span: `keep_ratio` of it stays in the cache, latents
    included, so a span shrinks by 1/keep_ratio however its share is split."""
    return max(0, int(span * keep_ratio) - n_latents)


def compressed_size(span: int, keep_ratio: float, n_latents: int) -> int:
    return kept_count(span, keep_ratio, n_latents) + n_latents


def turns_to_consolidate(
    head: int,
    turns: list[int],
    needed: int,
    budget: int,
    keep_ratio: float,
    n_latents: int,
    protected: int = PROTECTED_TURNS,
) -> int:
    """How many of the oldest turns to fold into memory so that the cache (`head` tokens
    before the turns, then the turns) plus `needed` tokens fits `budget`. 0 when it fits
    already or folding cannot shrink anything; the most that may be folded when even that
    is not enough. The last `protected` turns are never folded."""
    total = head + sum(turns)
    if total + needed <= budget:
        return 0
    foldable = max(0, len(turns) - protected)
    for count in range(1, foldable + 1):
        span = sum(turns[:count])
        if total - span + compressed_size(span, keep_ratio, n_latents) + needed <= budget:
            return count
    span = sum(turns[:foldable])
    return foldable if compressed_size(span, keep_ratio, n_latents) < span else 0


def positions_to_keep(
    score: np.ndarray, start: int, end: int, n_keep: int, pool: int = POOL
) -> np.ndarray:
    """The `n_keep` positions in [start, end) with the highest pooled score, ascending."""
    if n_keep <= 0:
        return np.empty(0, dtype=np.int64)
    raw = np.asarray(score[start:end], dtype=np.float64)
    best = np.lexsort((-raw, -pooled(raw, pool)))[:n_keep]  # ties: the peak itself first
    return np.sort(best) + start


def per_query(mass: np.ndarray) -> np.ndarray:
    """Accumulated attention divided by the queries that could give it: position p of n has
    been seen by the n - p tokens from itself on (older tokens have had more chances)."""
    seen_by = np.arange(len(mass), 0, -1, dtype=np.float64)
    return np.asarray(mass, dtype=np.float64) / seen_by


def mixed(first: np.ndarray, second: np.ndarray, start: int, end: int) -> np.ndarray:
    """Two scores over [start, end), each made a share of its own total there, summed."""
    out = np.zeros(len(first))
    for score in (first, second):
        span = np.asarray(score[start:end], dtype=np.float64)
        total = span.sum()
        if total > 0:
            out[start:end] += span / total
    return out


def pooled(mass: np.ndarray, width: int) -> np.ndarray:
    """Each position scored by the best-scored position within width/2 of it, so a kept
    token keeps its neighbours (SnapKV's clustering by max-pooling the scores)."""
    if width <= 1 or len(mass) == 0:
        return mass
    padded = np.pad(mass, width // 2, mode="edge")
    result: np.ndarray = np.lib.stride_tricks.sliding_window_view(padded, width).max(axis=1)
    return result


def dropped_runs(start: int, end: int, kept: np.ndarray) -> list[tuple[int, int]]:
    """The [a, b) runs of [start, end) not in `kept`, last run first (so removing them in
    order leaves the earlier runs' positions valid)."""
    keep = np.zeros(end - start, dtype=bool)
    keep[np.asarray(kept, dtype=np.int64) - start] = True
    runs = []
    position = start
    while position < end:
        if keep[position - start]:
            position += 1
            continue
        run_start = position
        while position < end and not keep[position - start]:
            position += 1
        runs.append((run_start, position))
    return runs[::-1]
