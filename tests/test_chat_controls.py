"""The chat a newcomer meets, on the real default model: a base model's plain transcript and its
stop string, /undo, /retry's undo, /system, and what the screen says when the context fills."""

from __future__ import annotations

import json

import pytest
from conftest import own_turn_tokens, run_cli

from flashmem_cli.chat.conversation import ChatOptions, open_conversation
from flashmem_cli.chat.memory import MemoryOptions
from flashmem_cli.config import sessions_dir
from flashmem_cli.engine import prompt as rendering
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.errors import FlashmemError
from flashmem_cli.models import chat_template_for, is_base_model
from flashmem_cli.store.sessions import SessionStore

GREEDY = ChatOptions(n_ctx=1024, n_threads=2, n_predict=48, sampling=SamplingParams(0))


def transcript(home, name):
    path = home / "sessions" / name / "transcript.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def cache_holds_the_rendering(conversation) -> bool:
    """The KV cache holds exactly the template's rendering of the conversation, closed."""
    messages = conversation.messages()
    text = rendering.render(conversation.template, messages, add_generation_prompt=False)
    return conversation.seq.tokens == rendering.tokenize(conversation.model, text)


# -- a base model's template ------------------------------------------------------------------


@pytest.mark.model
def test_the_default_model_is_a_base_model_and_gets_a_plain_transcript(model_path):
    with Model(model_path, n_gpu_layers=0) as model:
        assert is_base_model(model)
        template = chat_template_for(model)
    assert template.base_model and template.stop == ("\nUser:",)
    rendered = template.render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello."}],
        add_generation_prompt=False,
    )
    assert rendered == "<bos>User: Hi\nAssistant: Hello.\n"


@pytest.mark.model
def test_a_reply_stops_at_the_next_user_line_and_the_cache_holds_the_transcript(home):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "base", GREEDY, "You are a helpful assistant.") as conversation:
        first = conversation.send("My name is Ada and I keep bees. What do bees make?")
        assert "User:" not in first.reply and "honey" in first.reply.lower()
        assert first.finish_reason == "stop"
        assert cache_holds_the_rendering(conversation)
    with open_conversation(store, "base", GREEDY) as conversation:
        second = conversation.send("What is my name?")
        assert second.new_prompt_tokens == own_turn_tokens(
            conversation.loaded.file.path, "What is my name?"
        )
        assert "Ada" in second.reply
        assert cache_holds_the_rendering(conversation)


@pytest.mark.model
def test_a_session_made_with_another_template_is_rebuilt_once(home):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "old", GREEDY) as conversation:
        conversation.send("Hi")
    meta_path = home / "sessions" / "old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["kv"]["template"] = "0" * 16  # as if saved with Gemma's markers by an older flashmem
    meta_path.write_text(json.dumps(meta))
    with open_conversation(store, "old", GREEDY) as conversation:
        assert any("another chat template" in notice for notice in conversation.notices)
        assert cache_holds_the_rendering(conversation)
    with open_conversation(store, "old", GREEDY) as conversation:
        assert conversation.notices == []


# -- undo and retry ---------------------------------------------------------------------------


@pytest.mark.model
def test_undo_rolls_the_cache_back_and_the_transcript_keeps_the_exchange(home, model_path):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "u", GREEDY) as conversation:
        conversation.send("Tell me about cats.")
        after_first = list(conversation.seq.tokens)
        conversation.send("And dogs?")
        undone = conversation.undo()
        assert undone == {"role": "user", "content": "And dogs?"}
        assert conversation.seq.tokens == after_first
        assert [m["role"] for m in conversation.messages()] == ["user", "assistant"]
        assert conversation.notices == []  # rolled back, nothing re-processed
    records = transcript(home, "u")
    assert [r.get("content") for r in records if r.get("role") == "user"] == [
        "Tell me about cats.",
        "And dogs?",
    ]
    assert records[-1]["event"] == "undo"
    with open_conversation(store, "u", GREEDY) as conversation:  # resumed: as if never said
        assert conversation.notices == []
        result = conversation.send("And birds?")
        assert result.new_prompt_tokens == own_turn_tokens(model_path, "And birds?")
        assert cache_holds_the_rendering(conversation)


@pytest.mark.model
def test_undo_of_the_first_exchange_keeps_the_system_prompt(home):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "u1", GREEDY, "Be brief.") as conversation:
        conversation.send("Hi")
        conversation.undo()
        assert conversation.messages() == [{"role": "system", "content": "Be brief."}]
        conversation.send("Hello")
        assert cache_holds_the_rendering(conversation)
        conversation.undo()
        with pytest.raises(FlashmemError, match="nothing to undo"):
            conversation.undo()


@pytest.mark.model
def test_retry_is_an_undo_then_the_same_message(home):
    store = SessionStore(sessions_dir())
    sampled = ChatOptions(n_ctx=1024, n_threads=2, n_predict=24, sampling=SamplingParams(seed=7))
    with open_conversation(store, "r", sampled) as conversation:
        conversation.send("Name a colour.")
        message = conversation.undo("retry")
        conversation.send(message["content"])
        assert [m["content"] for m in conversation.messages() if m["role"] == "user"] == [
            "Name a colour."
        ]
        assert cache_holds_the_rendering(conversation)
    records = transcript(home, "r")
    assert [r["role"] for r in records if "role" in r] == ["user", "assistant"] * 2
    assert {"event": "undo", "for": "retry"}.items() <= records[2].items()


# -- /system ----------------------------------------------------------------------------------


@pytest.mark.model
def test_a_new_system_prompt_mid_conversation_rebuilds_the_pinned_head(home, model_path):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "s", GREEDY, "Be brief.") as conversation:
        conversation.send("Hi")
        reprocessed = conversation.change_system_prompt("Answer in French.")
        assert reprocessed == len(conversation.seq) > 0
        assert conversation.messages()[0] == {"role": "system", "content": "Answer in French."}
        assert cache_holds_the_rendering(conversation)
        with Model(model_path, n_gpu_layers=0) as model:
            head = model.tokenize("<bos>Answer in French.", parse_special=True)
        assert conversation.stats().pinned_tokens == len(head)
        assert conversation.change_system_prompt("Answer in French.") == 0
        conversation.change_system_prompt("")
        assert conversation.messages()[0]["role"] == "user"
        conversation.send("Thanks")
        assert cache_holds_the_rendering(conversation)
    events = [r for r in transcript(home, "s") if r.get("event") == "system"]
    assert [e["content"] for e in events] == ["Answer in French.", ""]


# -- a full context ---------------------------------------------------------------------------

FACTS = [
    "The lighthouse on Corven Point was built in 1887 by a stonemason named Elias Brandt, who "
    "carried every block up the cliff path himself over eleven summers.",
    "Its lamp burned whale oil until 1921, then paraffin, and the keeper's logbooks record "
    "ninety-three shipwrecks avoided in the great storm of 1903.",
    "The last keeper, Maren Holt, left in 1979 when the light was automated, and she took the "
    "brass telescope with her to a cottage in the village below.",
    "Today the tower is a museum with a cafe, and every August the village holds a festival "
    "where children climb the one hundred and twelve steps at dawn.",
    "Visitors can see the original Fresnel lens, which weighs nearly two tonnes and floats on a "
    "bath of mercury so that a child's hand could turn it.",
    "In winter the museum closes, and only the gulls and the caretaker's dog, a grey lurcher "
    "called Pilot, keep watch over the empty gallery.",
]


# Two facts a message: long turns, so that the last two (protected from folding at the budget)
# and a reply cannot fit -c 256 beside each other.
LONG = [f"{FACTS[i]} {FACTS[(i + 1) % len(FACTS)]}" for i in range(len(FACTS))]


@pytest.mark.model
def test_a_full_context_with_memory_consolidates_instead_of_dropping(home):
    """Before, the protected turns were dropped once folding older ones was not enough (and a
    reply that filled the context took memory with it): with -c 256 every turn from the third
    on was dropped, none consolidated."""
    options = ChatOptions(
        n_ctx=256,
        n_threads=2,
        n_predict=64,
        sampling=SamplingParams(0),
        memory=MemoryOptions(enabled=True, keep_score="attention"),
    )
    store = SessionStore(sessions_dir())
    folded_turns = 0
    with open_conversation(store, "full", options) as conversation:
        for message in LONG:
            turn = conversation.begin_turn(message)
            room = conversation.room_made(turn)
            finish, ttft = conversation.generate(turn)
            result = conversation.finish_turn(turn, finish, ttft)
            assert result.dropped_turns == 0 and room.dropped_turns == 0
            folded_turns += sum(event.turns for event in room.consolidations)
            for event, line in zip(room.consolidations, room.lines(), strict=True):
                what = "your oldest turn" if event.turns == 1 else "older memory"
                assert line.startswith(f"context full: {what} ({event.span_tokens} tokens)")
                assert f"compressed to {event.kept + event.latents} tokens of memory" in line
        assert folded_turns >= 4
        assert conversation.stats().turns_dropped == 0
        assert conversation.layout.n_tokens == len(conversation.seq)


@pytest.mark.model
def test_the_event_is_said_in_plain_words_and_sessions_show_lists_it(home):
    flags = ["--temp", "0", "-n", "64", "-c", "256", "-t", "2", "--keep-score", "attention"]
    said = []
    for message in LONG[:4]:
        proc = run_cli("chat", "-s", "words", *flags, "-p", message)
        assert proc.returncode == 0, proc.stderr
        said.append(proc.stderr)
    events = [line for text in said for line in text.splitlines() if "context full" in line]
    assert len(events) >= 2, said
    assert all("compressed to" in line and "tokens of memory" in line for line in events)
    assert not any("left the model's view" in text for text in said)
    show = run_cli("sessions", "show", "words")
    assert show.stdout.count("context full") == len(events)


@pytest.mark.model
def test_a_saved_state_that_missed_an_undo_is_rebuilt(home):
    """A --stateless run never saves: its undo and turn must not leave the old state trusted."""
    store = SessionStore(sessions_dir())
    with open_conversation(store, "miss", GREEDY) as conversation:
        conversation.send("A cat.")
        conversation.send("A dog.")
    stateless = ChatOptions(
        n_ctx=1024, n_threads=2, n_predict=8, sampling=SamplingParams(0), stateless=True
    )
    with open_conversation(store, "miss", stateless) as conversation:
        conversation.undo()
        conversation.send("A bird.")
    with open_conversation(store, "miss", GREEDY) as conversation:
        assert any("other messages than the transcript" in n for n in conversation.notices)
        assert cache_holds_the_rendering(conversation)
        assert "A dog." not in [m["content"] for m in conversation.messages()]


@pytest.mark.model
def test_undo_of_a_message_that_never_got_its_reply_costs_nothing(home):
    store = SessionStore(sessions_dir())
    with open_conversation(store, "half", GREEDY) as conversation:
        conversation.send("A cat.")
        before = list(conversation.seq.tokens)
    with store.open("half") as session:  # a reply killed mid-way: only the message is recorded
        session.append({"role": "user", "content": "cut off"})
    with open_conversation(store, "half", GREEDY) as conversation:
        assert conversation.undo() == {"role": "user", "content": "cut off"}
        assert conversation.notices == [] and conversation.seq.tokens == before
