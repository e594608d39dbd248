from flashmem_cli.chat.layout import KVLayout, conversation_messages, split_turns, tokens_digest

S = {"role": "system", "content": "s"}
U = {"role": "user", "content": "u"}
A = {"role": "assistant", "content": "a"}


def test_turns_start_at_user_messages_and_system_joins_the_first():
    assert split_turns([S, U, A, U, A, U]) == [[S, U, A], [U, A], [U]]
    assert split_turns([U, A]) == [[U, A]]
    assert split_turns([S]) == [[S]]
    assert split_turns([]) == []


def test_conversation_starts_after_the_last_reset():
    records = [
        {**S, "ts": "t"},
        {**U, "ts": "t"},
        {"event": "reset", "ts": "t"},
        {"role": "user", "content": "again", "ts": "t"},
    ]
    assert conversation_messages(records) == [{"role": "user", "content": "again"}]


def test_layout_round_trips_and_counts_tokens():
    layout = KVLayout(pinned=3, turns=[10, 20], messages=5, dropped=1)
    assert KVLayout.from_dict(layout.to_dict()) == layout
    assert layout.n_tokens == 33
    assert layout.oldest_turn_span() == (3, 13)


def test_digest_depends_on_every_token():
    assert tokens_digest([1, 2, 3]) != tokens_digest([1, 2, 4])
    assert tokens_digest([12, 3]) != tokens_digest([1, 23])


def test_an_unanswered_user_message_is_left_out_when_another_follows():
    records = [{**U, "content": "lost"}, {**U, "content": "asked again"}, A]
    assert conversation_messages(records) == [{**U, "content": "asked again"}, A]
