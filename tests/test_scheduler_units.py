"""The batch scheduler's pure helpers, without a model: where a stop string cuts a reply, how
many tokens lie before the cut, a session turn an earlier run already answered, and the cache
of shared prompt heads."""

from __future__ import annotations

from typing import cast

from flashmem_cli.batch.results import Completion
from flashmem_cli.batch.scheduler import PrefixCache, answered_turn
from flashmem_cli.engine.stops import stop_index, tokens_before

# -- stop_index ---------------------------------------------------------------------------------


def test_stop_index_is_none_without_stops_or_matches():
    assert stop_index("hello world", ()) is None
    assert stop_index("hello world", ("bye", "\n\n")) is None


def test_stop_index_is_where_the_earliest_stop_starts_whatever_their_order():
    text = "one. END two STOP three"
    assert stop_index(text, ("STOP", "END")) == text.index("END")
    assert stop_index(text, ("END", "STOP")) == text.index("END")
    assert stop_index(text, ("missing", "STOP")) == text.index("STOP")


def test_a_stop_at_the_very_start_cuts_everything():
    assert stop_index("STOP and more", ("more", "STOP")) == 0


# -- tokens_before ------------------------------------------------------------------------------

PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xc3", 6: b"\xa9", 7: b"!"}


def test_tokens_before_counts_only_tokens_wholly_inside_the_text():
    tokens = [1, 2, 3, 4]
    assert tokens_before(PIECES.__getitem__, tokens, "Hello") == 2  # "Hel" + "lo"
    assert tokens_before(PIECES.__getitem__, tokens, "Hello w") == 2  # " wor" is cut
    assert tokens_before(PIECES.__getitem__, tokens, "Hel") == 1
    assert tokens_before(PIECES.__getitem__, tokens, "") == 0


def test_tokens_before_is_every_token_when_the_text_is_the_whole_reply():
    tokens = [1, 2, 3, 4]
    assert tokens_before(PIECES.__getitem__, tokens, "Hello world") == 4
    assert tokens_before(PIECES.__getitem__, [], "anything") == 0


def test_tokens_before_measures_the_text_in_utf8_bytes():
    tokens = [5, 6, 7]  # "é" is split over two tokens, then "!"
    assert tokens_before(PIECES.__getitem__, tokens, "é") == 2
    assert tokens_before(PIECES.__getitem__, tokens, "é!") == 3


# -- answered_turn ------------------------------------------------------------------------------


def test_answered_turn_is_the_assistant_record_of_that_batch_id():
    records: list[dict] = [
        {"role": "user", "content": "Hi", "batch_id": "a"},
        {"role": "assistant", "content": "Hello!", "batch_id": "other"},
        {
            "role": "assistant",
            "content": "Hello there.",
            "batch_id": "a",
            "finish_reason": "length",
            "usage": {"prompt_tokens": 12, "completion_tokens": 3},
        },
    ]
    assert answered_turn(records, "a") == Completion(
        text="Hello there.",
        finish_reason="length",
        prompt_tokens=12,
        completion_tokens=3,
        extra={"recovered_from_session": True},
    )


def test_a_user_record_alone_is_not_an_answer():
    records = [
        {"role": "user", "content": "Hi", "batch_id": "a"},
        {"role": "assistant", "content": "Hello!"},  # a chat turn, not from a batch
        {"role": "assistant", "content": "Yes.", "batch_id": "b"},
    ]
    assert answered_turn(records, "a") is None
    assert answered_turn([], "a") is None


def test_answered_turn_defaults_a_missing_finish_reason_and_usage():
    records: list[dict] = [{"role": "assistant", "content": "Ok.", "batch_id": "a", "usage": None}]
    result = answered_turn(records, "a")
    assert result is not None
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == ("stop", 0, 0)
    usage = {"prompt_tokens": 7}
    records = [{"role": "assistant", "content": "Ok.", "batch_id": "a", "usage": usage}]
    result = answered_turn(records, "a")
    assert result is not None and (result.prompt_tokens, result.completion_tokens) == (7, 0)


# -- PrefixCache --------------------------------------------------------------------------------


class FakeSequence:
    """What PrefixCache touches of a KVSequence: feed and clear, logged."""

    def __init__(self, name: str):
        self.name = name
        self.tokens: list[int] = []
        self.log: list[tuple] = []

    def feed(self, tokens: list[int]) -> None:
        self.log.append(("feed", tuple(tokens)))
        self.tokens.extend(tokens)

    def clear(self) -> None:
        self.log.append(("clear",))
        self.tokens = []


def cache_of(n: int) -> tuple[PrefixCache, list[FakeSequence]]:
    sequences = [FakeSequence(f"s{i}") for i in range(n)]
    return PrefixCache(sequences), sequences  # type: ignore[arg-type]


def get(cache: PrefixCache, tokens: list[int]) -> FakeSequence:
    return cast(FakeSequence, cache.get(tokens))


def test_a_head_is_decoded_once_and_then_shared():
    cache, _ = cache_of(2)
    first = get(cache, [1, 2, 3, 4])
    assert first.tokens == [1, 2, 3, 4] and (cache.builds, cache.hits) == (1, 0)
    again = get(cache, [1, 2, 3, 4])
    assert again is first
    assert (cache.builds, cache.hits) == (1, 1)
    assert first.log == [("feed", (1, 2, 3, 4))]  # not fed a second time


def test_different_heads_take_different_free_sequences():
    cache, sequences = cache_of(2)
    a = get(cache, [1, 2, 3, 4])
    b = get(cache, [1, 2, 3, 5])
    assert a is not b and {a, b} == set(sequences)
    assert (a.tokens, b.tokens) == ([1, 2, 3, 4], [1, 2, 3, 5])
    assert cache.free == [] and (cache.builds, cache.hits) == (2, 0)


def test_a_full_cache_evicts_the_least_recently_used_head():
    cache, _ = cache_of(2)
    a = get(cache, [1, 1, 1, 1])
    b = get(cache, [2, 2, 2, 2])
    assert get(cache, [1, 1, 1, 1]) is a  # a is now the most recently used
    c = get(cache, [3, 3, 3, 3])
    assert c is b  # b's sequence is reused: cleared, then fed the new head
    assert b.log == [("feed", (2, 2, 2, 2)), ("clear",), ("feed", (3, 3, 3, 3))]
    assert b.tokens == [3, 3, 3, 3]
    assert list(cache.entries) == [(1, 1, 1, 1), (3, 3, 3, 3)]
    assert get(cache, [1, 1, 1, 1]) is a and a.log == [("feed", (1, 1, 1, 1))]
    assert (cache.builds, cache.hits) == (3, 2)


def test_an_evicted_head_is_built_again():
    cache, _ = cache_of(1)
    only = get(cache, [1, 2, 3, 4])
    assert get(cache, [5, 6, 7, 8]) is only
    assert get(cache, [1, 2, 3, 4]) is only and only.tokens == [1, 2, 3, 4]
    assert (cache.builds, cache.hits) == (3, 0)
    assert only.log.count(("clear",)) == 2
