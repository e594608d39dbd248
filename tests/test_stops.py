"""Stop strings in a stream (pure), and which template a model without one gets."""

from __future__ import annotations

import pytest
from tiny_gguf import write_tiny_gguf

from flashmem_cli.chat.layout import conversation_messages
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.stops import StopFilter
from flashmem_cli.models import chat_template_for, is_base_model

STOP = ("\nUser:",)


def stream(pieces: list[str], stops: tuple[str, ...] = STOP) -> tuple[str, StopFilter]:
    stop = StopFilter(stops)
    shown = "".join(stop.push(piece) for piece in pieces)
    return shown + ("" if stop.stopped else stop.flush()), stop


def test_text_before_a_stop_string_is_shown_and_the_stop_never_is():
    shown, stop = stream([" Bees", " make", " honey.", "\n", "User", ":", " and more"])
    assert shown == " Bees make honey."
    assert stop.stopped and stop.text == " Bees make honey."


def test_a_partial_stop_is_held_back_until_it_is_not_one():
    stop = StopFilter(STOP)
    assert stop.push("Hi.\n") == "Hi."
    assert stop.push("Us") == ""
    assert stop.push("ually") == "\nUsually"
    assert not stop.stopped


def test_a_reply_that_ends_on_half_a_stop_string_keeps_it():
    shown, stop = stream(["Done.", "\nUs"])
    assert shown == "Done.\nUs" and not stop.stopped


def test_a_stop_string_inside_one_piece_and_the_earliest_of_several():
    shown, _ = stream(["a\nUser: b\nAssistant: c"], ("\nAssistant:", "\nUser:"))
    assert shown == "a"


def test_no_stop_strings_shows_everything_at_once():
    stop = StopFilter(())
    assert stop.push("a\n") == "a\n" and stop.push("User:") == "User:"


def test_undo_and_system_events_shape_the_conversation():
    records = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
        {"event": "undo", "for": "undo"},
        {"event": "system", "content": "Be kind."},
        {"role": "user", "content": "Again"},
        {"event": "undo", "for": "retry"},  # a message that got no reply is taken back too
    ]
    assert conversation_messages(records) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    cleared = conversation_messages([*records, {"event": "system", "content": ""}])
    assert cleared[0] == {"role": "user", "content": "Hi"}
    only_system = [{"role": "system", "content": "S"}, {"event": "undo"}]
    assert conversation_messages(only_system) == [{"role": "system", "content": "S"}]


@pytest.mark.parametrize(
    ("kind", "name", "base", "template"),
    [
        ("gemma3", "tiny-gemma3", True, "plain transcript"),
        ("gemma3", "tiny-gemma3-it", False, "gemma3 (built-in)"),
        ("llama", "Tiny Llama 3.2 1B", True, "plain transcript"),
        ("llama", "Tiny Llama 3.2 1B Instruct", False, "plain (built-in)"),
    ],
)
def test_a_model_without_a_template_gets_one_by_its_tuning(tmp_path, kind, name, base, template):
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", kind, name=name)
    with Model(path, n_gpu_layers=0) as model:
        assert is_base_model(model) is base
        chosen = chat_template_for(model)
    assert chosen.name.startswith(template) and chosen.base_model is base
    assert chosen.stop == (() if template.startswith("gemma3") else STOP)


def test_a_model_with_a_template_is_never_a_base_model(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", "llama", chat_template="{{ messages }}")
    with Model(path, n_gpu_layers=0) as model:
        assert not is_base_model(model)
        assert chat_template_for(model).name == "gguf"
