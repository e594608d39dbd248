import pytest

from flashmem_cli.engine.templates import (
    GEMMA_TEMPLATE,
    ChatTemplate,
    pinned_prefix,
    reply_closing,
    select_template,
    text_after,
)
from flashmem_cli.errors import TemplateError

GEMMA = ChatTemplate("gemma", GEMMA_TEMPLATE, "<bos>", "<eos>")
SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello! "}
U2 = {"role": "user", "content": "Bye"}


def test_gemma_renders_turn_markers_and_folds_system_into_first_user_turn():
    text = GEMMA.render([SYS, U1, A1], add_generation_prompt=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello! <end_of_turn>\n"
    )


def test_delta_of_a_new_turn_is_only_its_own_text():
    delta = text_after(GEMMA, [SYS, U1, A1], [U2], add_generation_prompt=True)
    assert delta == "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"


def test_first_delta_is_the_whole_rendering():
    delta = text_after(GEMMA, [], [SYS, U1], add_generation_prompt=True)
    assert delta == GEMMA.render([SYS, U1], add_generation_prompt=True)


def test_reply_closing_is_the_end_of_turn_marker():
    assert reply_closing(GEMMA, [SYS, U1, A1]) == "<end_of_turn>\n"


def test_template_that_rewrites_history_is_refused():
    # Renders only the last message: earlier turns are not a prefix of later renderings.
    last_only = ChatTemplate("last", "{{ messages[-1]['content'] }}", "", "")
    with pytest.raises(TemplateError, match="re-renders earlier turns"):
        text_after(last_only, [U1, A1], [U2], add_generation_prompt=True)


def test_reply_closing_refuses_a_template_that_trims_replies():
    trimming = ChatTemplate(
        "trim", "{% for m in messages %}{{ m['content'] | trim }}|{% endfor %}", "", ""
    )
    with pytest.raises(TemplateError):
        reply_closing(trimming, [U1, A1])


def test_pinned_prefix_ends_after_the_system_prompt_or_at_bos():
    text = GEMMA.render([SYS, U1], add_generation_prompt=True)
    assert pinned_prefix(text, "Be brief.", "<bos>") == "<bos><start_of_turn>user\nBe brief."
    assert pinned_prefix(GEMMA.render([U1], True), None, "<bos>") == "<bos>"
    assert pinned_prefix("no bos here", None, "<bos>") == ""


def test_select_prefers_the_gguf_template_then_architecture_then_plain():
    assert select_template("{{ 'x' }}", "gemma3", "<s>", "</s>").name == "gguf"
    assert select_template(None, "gemma3", "<s>", "</s>").name.startswith("gemma3")
    plain = select_template(None, "llama", "<s>", "</s>")
    assert plain.render([U1], add_generation_prompt=True) == "<s>User: Hi\nAssistant:"


def test_template_errors_become_template_error():
    raising = ChatTemplate("r", "{{ raise_exception('roles must alternate') }}", "", "")
    with pytest.raises(TemplateError, match="roles must alternate"):
        raising.render([U1], add_generation_prompt=True)
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("broken", "{% for %}", "", "")
