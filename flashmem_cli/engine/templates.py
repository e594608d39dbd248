"""Chat templates: the GGUF's own Jinja template, or a fallback chosen by architecture.

A turn is fed to the model as a *delta*: the text that the whole conversation's rendering adds
to what the KV cache already holds. That needs a template whose rendering of a conversation is
a prefix of the rendering of any longer one; `text_after` checks this and raises otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flashmem_cli.errors import TemplateError

Message = dict[str, str]

# Gemma's turn markers, with the system prompt folded into the first user turn as Gemma's own
# template does; contents are not trimmed, so every rendering is a prefix of the next.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
  {{- message['content'] + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""

# For models that carry no template and have no known markers: plain role-prefixed lines.
PLAIN_TEMPLATE = """{{ bos_token }}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}
  {%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\n' }}
  {%- else -%}{{ 'Assistant: ' + message['content'] + '\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"""

FALLBACKS = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


@dataclass
class ChatTemplate:
    name: str
    source: str
    bos_token: str
    eos_token: str

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template '{self.name}' does not parse: {exc}") from exc

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template '{self.name}' failed: {exc}") from exc


def select_template(
    gguf_template: str | None, architecture: str, bos_token: str, eos_token: str
) -> ChatTemplate:
    """The model's own template when it has one, else a fallback for its architecture."""
    if gguf_template:
        return ChatTemplate("gguf", gguf_template, bos_token, eos_token)
    if architecture in FALLBACKS:
        return ChatTemplate(
            f"{architecture} (built-in)", FALLBACKS[architecture], bos_token, eos_token
        )
    return ChatTemplate("plain (built-in)", PLAIN_TEMPLATE, bos_token, eos_token)


def text_after(
    template: ChatTemplate, fed: list[Message], new: list[Message], add_generation_prompt: bool
) -> str:
    """Text to feed after `fed` (already in the KV cache) so the model has seen `fed + new`;
    with `add_generation_prompt`, ending where the assistant's reply begins."""
    before = template.render(fed, add_generation_prompt=False) if fed else ""
    full = template.render(fed + new, add_generation_prompt=add_generation_prompt)
    if not full.startswith(before):
        raise TemplateError(
            f"chat template '{template.name}' re-renders earlier turns, so flashmem cannot feed "
            "only the new one"
        )
    return full[len(before) :]


def reply_closing(template: ChatTemplate, messages: list[Message]) -> str:
    """Text the template puts after the last (assistant) message's content, e.g. `<end_of_turn>\\n`."""
    prompt = template.render(messages[:-1], add_generation_prompt=True)
    full = template.render(messages, add_generation_prompt=False)
    expected = prompt + messages[-1]["content"]
    if not full.startswith(expected):
        raise TemplateError(f"chat template '{template.name}' rewrites the assistant's reply")
    return full[len(expected) :]


def pinned_prefix(text: str, system: str | None, bos_token: str) -> str:
    """The start of a conversation's first text that is never dropped from the KV cache:
    everything up to the end of the system prompt, or the BOS marker when there is none."""
    if system:
        end = text.find(system)
        if end >= 0:
            return text[: end + len(system)]
    return bos_token if bos_token and text.startswith(bos_token) else ""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)
