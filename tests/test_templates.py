import threading
import time

import pytest

from flashmem_cli.engine import templates
from flashmem_cli.engine.templates import (
    GEMMA_TEMPLATE,
    MAX_RENDER_CHARS,
    RENDER_SECONDS,
    ChatTemplate,
    select_template,
)
from flashmem_cli.errors import TemplateError

GEMMA = ChatTemplate("gemma", GEMMA_TEMPLATE, "<bos>", "<eos>")
SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello! "}


def test_gemma_renders_turn_markers_and_folds_system_into_first_user_turn():
    text = GEMMA.render([SYS, U1, A1], add_generation_prompt=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello! <end_of_turn>\n"
    )


def test_select_prefers_the_gguf_template_then_architecture_then_plain():
    assert select_template("{{ 'x' }}", "gemma3", "<s>", "</s>").name == "gguf"
    assert select_template(None, "gemma3", "<s>", "</s>").name.startswith("gemma3")
    plain = select_template(None, "llama", "<s>", "</s>")
    assert plain.render([U1], add_generation_prompt=True) == "<s>User: Hi\nAssistant:"


@pytest.mark.parametrize("reply", [" Bees make honey.", "Bees.", "  two spaces", "\nA new line"])
def test_plain_template_renders_a_reply_exactly_as_generated(reply):
    """The cache holds the generation prompt, then the reply's tokens as generated: rendering
    the reply must extend that text whatever the reply starts with (issue 12)."""
    from flashmem_cli.engine.prompt import reply_closing

    plain = select_template(None, "llama", "<s>", "</s>")
    asked = [SYS, U1]
    answered = [*asked, {"role": "assistant", "content": reply}]
    prompt = plain.render(asked, add_generation_prompt=True)
    assert plain.render(answered, add_generation_prompt=False).startswith(prompt + reply)
    assert reply_closing(plain, answered).text == "\n"


def test_template_errors_become_template_error():
    raising = ChatTemplate("r", "{{ raise_exception('roles must alternate') }}", "", "")
    with pytest.raises(TemplateError, match="roles must alternate"):
        raising.render([U1], add_generation_prompt=True)
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("broken", "{% for %}", "", "")


# -- templates that fail, never end or never stop writing (issue 8) -------------------------


def failure(source, messages=(U1,)):
    """The TemplateError of rendering `source` as a GGUF's template, and the seconds it took."""
    template = ChatTemplate("gguf", source, "<s>", "</s>")
    start = time.monotonic()
    with pytest.raises(TemplateError) as error:
        template.render(list(messages), add_generation_prompt=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith("chat template 'gguf' ")
    return message, time.monotonic() - start


@pytest.mark.parametrize(
    "source, expected",
    [
        ("{{ 1/0 }}", "failed: ZeroDivisionError: division by zero"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "failed: RecursionError"),
        ("{{ 1 + 'a' }}", "failed: TypeError: unsupported operand"),
        ("{{ messages[5]['content'] }}", "failed: "),
        ("{{ raise_exception('roles\nmust alternate') }}", "failed: roles must alternate"),
        ("{{ lipsum(10**9) }}", "failed: 'lipsum' is undefined"),
    ],
    ids=["division", "recursion", "type", "undefined", "raise_exception", "lipsum"],
)
def test_any_error_in_a_template_is_one_line_naming_it(source, expected):
    message, _ = failure(source)
    assert expected in message


def test_nested_loops_stop_at_the_time_bound():
    nested = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    message, seconds = failure(nested)
    assert message == f"chat template 'gguf' took more than {RENDER_SECONDS:g} s to render"
    assert RENDER_SECONDS <= seconds < RENDER_SECONDS + 1.5


@pytest.mark.parametrize(
    "source",
    [
        # a pre-built list, loops with an empty body: no call at all per iteration
        "{% set xs = range(100000) | list %}{% for a in xs %}{% for b in xs %}{% endfor %}"
        "{% endfor %}",
        "{% set xs = range(100000) | list %}{% for a in xs %}{% for b in xs if b < 0 %}"
        "{% endfor %}{% endfor %}",
        # 2**40 calls, none of them deep
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% with c = a %}{% endwith %}"
        "{% endfor %}{% endfor %}",
    ],
    ids=["prebuilt-list", "filtered-loop", "branching-macro", "with-block"],
)
def test_every_kind_of_endless_template_stops(monkeypatch, source):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.2)
    message, seconds = failure(source)
    assert "took more than 0.2 s" in message and seconds < 1.5


def test_the_time_bound_holds_off_the_main_thread_and_then_resets(monkeypatch):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.2)
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    outcome = []

    def render():
        try:
            ChatTemplate("gguf", endless, "", "").render([U1], add_generation_prompt=True)
        except TemplateError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=render)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive() and "took more than" in outcome[0]
    # the deadline belongs to one rendering: the next ones, however slow, get their own
    slow = ChatTemplate("slow", "{% for i in range(3000) %}{{ i }}{% endfor %}", "", "")
    for _ in range(3):
        assert slow.render([], add_generation_prompt=False).endswith("2999")


def test_output_is_bounded():
    message, _ = failure("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}")
    assert message == f"chat template 'gguf' renders more than {MAX_RENDER_CHARS} characters"
    # ... but a long conversation renders whole: the bound grows with the input
    long = {"role": "user", "content": "y" * (MAX_RENDER_CHARS + 1)}
    plain = select_template(None, "llama", "<s>", "</s>")
    assert len(plain.render([long], add_generation_prompt=True)) > MAX_RENDER_CHARS


def test_one_huge_operation_is_refused_before_it_runs():
    message, seconds = failure("{{ 'x' * 10**10 }}")
    assert "builds a sequence of more than" in message and seconds < 1
    message, seconds = failure("{{ 9 ** (9 ** 9) }}")
    assert "computes a number of more than" in message and seconds < 1
    fine = ChatTemplate("ok", "{{ '-' * 3 }}{{ 2 ** 10 }}{{ [0] * 2 }}", "", "")
    assert fine.render([], add_generation_prompt=False) == "---1024[0, 0]"


def test_a_template_nested_too_deep_to_parse_is_a_template_error():
    with pytest.raises(TemplateError, match="^chat template 'deep' does not parse: RecursionError"):
        ChatTemplate("deep", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "", "")
