"""Templates that rewrite earlier text (issue 12): real ones (tests/data/templates/) on tiny
models. After every turn the cache holds what the template renders for the conversation, and
a rewrite costs only the tokens after it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_gguf

from flashmem_cli.chat.conversation import (
    ChatOptions,
    Conversation,
    TurnResult,
    open_conversation,
)
from flashmem_cli.chat.layout import split_turns
from flashmem_cli.chat.memory import MemoryOptions
from flashmem_cli.config import sessions_dir
from flashmem_cli.engine import prompt
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.engine.templates import ChatTemplate
from flashmem_cli.store.sessions import SessionStore

TEMPLATES = Path(__file__).parent / "data" / "templates"
TURNS = ["Turn one: rain by the sea.", "Turn two: snow in the hills.", "Turn three: sun."]
# template file, tiny model kind, whether any turn re-processes cached tokens: only Mistral,
# which renders a reply given without a leading space (as in `send`) with one
CASES = [
    ("llama-3.1-instruct.jinja", "llama", False),
    ("qwen2.5-instruct.jinja", "qwen2", False),
    ("mistral-7b-instruct-v0.3.jinja", "llama", True),
    ("phi-3-mini-instruct.jinja", "phi3", False),
    ("qwen3.jinja", "qwen3", False),
]


def rendered_tokens(conversation: Conversation) -> list[int]:
    """The tokens of the template's rendering of the whole conversation, turn by turn, as the
    next turn renders it (a template may render a conversation that ends in a reply otherwise:
    Qwen3's think block, Phi-3's EOS, Mistral's system prompt)."""
    then = [*conversation.messages(), prompt.NEXT_TURN]
    chunks = conversation._turn_chunks(then, prompt=False)[:-1]
    return chunks[0].pinned + [token for chunk in chunks for token in chunk.tokens]


def send(conversation: Conversation, text: str) -> TurnResult:
    """A turn whose reply is given, not generated: a random model's reply need not be the
    tokens its own text tokenizes to, which would hide what these tests compare."""
    turn = conversation.begin_turn(text)
    reply = conversation.model.tokenize("Sunny and warm.")
    return conversation.finish_turn(turn, "stop", 0.0, reply=reply)


def options(model: Path, memory: bool = False, n_ctx: int = 1024) -> ChatOptions:
    return ChatOptions(
        model=str(model),
        n_ctx=n_ctx,
        n_threads=1,
        n_predict=8,
        sampling=SamplingParams(temperature=0),
        memory=MemoryOptions(enabled=memory),
    )


@pytest.mark.parametrize("system", [None, "Be brief."])
@pytest.mark.parametrize("name, kind, rewrites", CASES)
def test_the_cache_holds_the_templates_rendering_after_every_turn(
    home, tmp_path, name, kind, rewrites, system
):
    model = write_tiny_gguf(tmp_path / "m.gguf", kind, (TEMPLATES / name).read_text())
    store = SessionStore(sessions_dir())
    reprocessed = []
    with open_conversation(store, "s", options(model), system=system) as conversation:
        for text in TURNS[:2]:
            result = send(conversation, text)
            assert conversation.seq.tokens == rendered_tokens(conversation)
            reprocessed.append(result.reprocessed_tokens)
    with open_conversation(store, "s", options(model)) as conversation:  # resumed
        result = send(conversation, TURNS[2])
        assert conversation.seq.tokens == rendered_tokens(conversation)
        assert result.cached_tokens > 0
        reprocessed.append(result.reprocessed_tokens)
    if not rewrites:
        assert reprocessed == [0, 0, 0]
    else:
        assert sum(reprocessed) > 0


def test_a_rewrite_costs_only_the_tokens_after_it(home, tmp_path):
    """Mistral renders a reply as ' ' + reply: a reply generated without its own space is fed
    again from its first token at the end of the turn - the reply, not the conversation - and
    the next turn then reuses everything."""
    template = (TEMPLATES / "mistral-7b-instruct-v0.3.jinja").read_text()
    model = write_tiny_gguf(tmp_path / "m.gguf", "llama", template)
    with open_conversation(SessionStore(sessions_dir()), "s", options(model)) as conversation:
        first = send(conversation, TURNS[0])
        second = send(conversation, TURNS[1])
        reply = len(conversation.model.tokenize("Sunny and warm."))
        held = len(conversation.seq)
    assert first.reprocessed_tokens == second.reprocessed_tokens == reply
    assert reply < held // 4


def test_rewrites_inside_consolidated_history_are_left_as_they_were(home, tmp_path):
    """Mistral moves the system prompt into the last user message, a rewrite of the first
    turn every turn. Once turns are consolidated into memory the pinned head and memory stay
    as first rendered; the turns still in the cache are brought in line."""
    template = (TEMPLATES / "mistral-7b-instruct-v0.3.jinja").read_text()
    model = write_tiny_gguf(tmp_path / "m.gguf", "llama", template)
    store = SessionStore(sessions_dir())
    memory = options(model, memory=True, n_ctx=256)
    with open_conversation(store, "s", memory, system="Be brief.") as conversation:
        for i in range(7):
            result = send(conversation, f"Turn {i}: rain by the sea.")
        layout = conversation.layout
        assert layout.consolidated > 0 and layout.memory > 0
        cached_turns = split_turns(conversation.messages())[-len(layout.turns) :]
        expected = conversation._turn_chunks(conversation.messages(), prompt=False)
        tail = [t for chunk in expected[-len(cached_turns) :] for t in chunk.tokens]
        assert conversation.seq.tokens[layout.pinned + layout.memory :] == tail
        assert result.reprocessed_tokens <= sum(layout.turns)


def test_turn_texts_cut_where_delta_cuts_for_a_template_that_never_rewrites():
    template = ChatTemplate(
        "llama3",
        (TEMPLATES / "llama-3.1-instruct.jinja").read_text(),
        "<|begin_of_text|>",
        "<|eot_id|>",
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    texts = prompt.turn_texts(template, messages, [3, 1], add_generation_prompt=True)
    first = prompt.render(template, messages[:3], add_generation_prompt=False).text
    assert texts[0].text == first
    assert texts[1].text == prompt.delta(template, messages[:3], messages[3:], True).text


@pytest.mark.parametrize("name, kind, rewrites", CASES)
def test_turn_texts_never_cut_a_special_token(name, kind, rewrites):
    """Phi-3's `<|end|>\\n<|endoftext|>` and `<|end|>\\n<|user|>` begin alike: a cut at their
    common prefix would split `<|user|>` into text. Every marker stays whole in one turn."""
    template = ChatTemplate(name, (TEMPLATES / name).read_text(), "<s>", "<|endoftext|>")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Rain?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Bye"},
    ]
    texts = [t.text for t in prompt.turn_texts(template, messages, [3, 2, 1], True)]
    full = prompt.render(template, messages, add_generation_prompt=True).text
    assert "".join(texts) == full
    for marker in ("<|user|>", "<|end|>", "<|im_start|>", "[INST]", "<|start_header_id|>"):
        assert sum(text.count(marker) for text in texts) == full.count(marker)


@pytest.mark.parametrize(
    "name, kind", [("phi-3-mini-instruct.jinja", "phi3"), ("qwen3.jinja", "qwen3")]
)
def test_a_rebuild_of_a_rewriting_templates_session_works(home, tmp_path, name, kind):
    """--rebuild (and any restore that falls back to the transcript) replays every turn from
    one rendering when the template rewrites earlier text."""
    model = write_tiny_gguf(tmp_path / "m.gguf", kind, (TEMPLATES / name).read_text())
    store = SessionStore(sessions_dir())
    with open_conversation(store, "s", options(model)) as conversation:
        for text in TURNS[:2]:
            send(conversation, text)
    rebuild = replace(options(model), rebuild=True)
    with open_conversation(store, "s", rebuild) as conversation:
        assert conversation.seq.tokens == rendered_tokens(conversation)
        send(conversation, TURNS[2])
        assert conversation.seq.tokens == rendered_tokens(conversation)


def test_turn_texts_cut_beside_empty_contents():
    """An empty reply is not rendered as a piece: the cut falls after the nearest content
    that is, never before the turn's own start."""
    template = ChatTemplate(
        "mistral",
        (TEMPLATES / "mistral-7b-instruct-v0.3.jinja").read_text(),
        "<s>",
        "</s>",
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Bye"},
    ]
    first, second = prompt.turn_texts(template, messages, [3, 1], add_generation_prompt=True)
    assert "Hi" in first.text and "Bye" in second.text and "Hi" not in second.text


def test_a_turn_that_fails_half_way_leaves_the_session_usable(home, tmp_path):
    """Ctrl-C while a turn is fed: the transcript keeps the unanswered message, the next turn
    leaves it out (roles must alternate for Mistral) and the cache follows the transcript."""
    template = (TEMPLATES / "mistral-7b-instruct-v0.3.jinja").read_text()
    model = write_tiny_gguf(tmp_path / "m.gguf", "llama", template)
    store = SessionStore(sessions_dir())
    with open_conversation(store, "s", options(model), system="Be brief.") as conversation:
        send(conversation, TURNS[0])
        decode = conversation.ctx.decode

        def interrupted(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        conversation.ctx.decode = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            send(conversation, TURNS[1])
        conversation.ctx.decode = decode  # type: ignore[method-assign]
        send(conversation, TURNS[2])
        assert [m["content"] for m in conversation.messages() if m["role"] == "user"] == [
            TURNS[0],
            TURNS[2],
        ]
        assert conversation.seq.tokens == rendered_tokens(conversation)
    records = [r for r in store.open("s").records() if r.get("role") == "user"]
    assert [r["content"] for r in records] == TURNS  # nothing lost


def test_turn_texts_never_cut_inside_markup_after_empty_contents():
    template = ChatTemplate(
        "phi", (TEMPLATES / "phi-3-mini-instruct.jinja").read_text(), "<s>", "<|endoftext|>"
    )
    messages = [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "hi"},
    ]
    first, second = prompt.turn_texts(template, messages, [2, 1], add_generation_prompt=True)
    assert "<|user|>" in second.text and not first.text.endswith("<|")
