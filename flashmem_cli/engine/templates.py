"""Chat templates: the GGUF's own Jinja template, or a fallback chosen by architecture,
rendered in a sandbox bounded in time and output size.

How a rendering becomes the tokens of a turn (its delta, its markup) is engine/prompt.py's.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import date
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator, Frame
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

# For base models and models with no known markers: a plain transcript, which a base model
# continues the way it continues any text it read in pre-training. A reply follows `Assistant:`
# exactly as generated (its own leading space), so a rendered reply is what the cache holds
# after the generation prompt; the model's next `User:` line is where the reply stops.
PLAIN_TEMPLATE = """{{ bos_token }}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}
  {%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\n' }}
  {%- else -%}{{ 'Assistant:' + message['content'] + '\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"""

PLAIN_STOP = ("\nUser:",)

FALLBACKS = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


# Limits on one rendering: a GGUF's template is code from the model file, and a loop or a
# recursion in it must end in an error, not a hang or a traceback.
RENDER_SECONDS = 2.0
MAX_RENDER_CHARS = 8 << 20  # or 4 characters per character of input, when that is more
MAX_POWER_BITS = 1 << 20  # `a ** b` results in a template, at most


class _Refused(Exception):
    """A rendering stopped at one of the limits; the message completes "chat template '...' "."""


class _CodeGenerator(CodeGenerator):
    """Jinja's compiler, with a deadline check at the start of every scope of the compiled
    code: each loop iteration (an empty body included), macro call and block."""

    def enter_frame(self, frame: Frame) -> None:
        super().enter_frame(frame)
        self.writeline("environment.check_deadline()")


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with a per-thread render deadline, and `*` and `**` checked before they
    run: one such operation in C (`'x' * 10**10`, `9 ** (9 ** 9)`) could take memory or time
    that no check between steps can stop."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.deadline = threading.local()

    def check_deadline(self) -> None:
        at = getattr(self.deadline, "at", None)
        if at is not None and time.monotonic() > at:
            raise _Refused(f"took more than {RENDER_SECONDS:g} s to render")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (
                    isinstance(sequence, (str, bytes, list, tuple))
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_RENDER_CHARS
                ):
                    raise _Refused(f"builds a sequence of more than {MAX_RENDER_CHARS} items")
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * left.bit_length() > MAX_POWER_BITS
        ):
            raise _Refused(f"computes a number of more than {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


@dataclass
class ChatTemplate:
    name: str
    source: str
    bos_token: str
    eos_token: str
    stop: tuple[str, ...] = ()  # text that ends a reply where the model has no end token for it
    base_model: bool = False  # chosen for a model that was never tuned to chat

    @property
    def digest(self) -> str:
        """Identifies the rendering: a KV cache made with another one must be rebuilt."""
        parts = (self.source, self.bos_token, self.eos_token)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        self._env = _Environment(trim_blocks=True, lstrip_blocks=True)
        del self._env.globals["lipsum"]  # lipsum(10**9) loops where no deadline check runs
        self._env.globals["raise_exception"] = _raise_exception
        self._env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
        try:
            self._template = self._env.from_string(self.source)
        except Exception as exc:  # a syntax error, or RecursionError on deep nesting
            raise TemplateError(
                f"chat template '{self.name}' does not parse: {_one_line(exc)}"
            ) from exc

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The template's text for `messages`; TemplateError when the template fails, runs
        past RENDER_SECONDS or writes more than MAX_RENDER_CHARS (or 4x its input)."""
        given = len(self.bos_token) + len(self.eos_token) + sum(len(m["content"]) for m in messages)
        limit = max(MAX_RENDER_CHARS, 4 * given)
        parts: list[str] = []
        written = 0
        deadline = self._env.deadline
        previous = getattr(deadline, "at", None)
        deadline.at = time.monotonic() + RENDER_SECONDS
        chunks = self._template.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            for chunk in chunks:
                written += len(chunk)
                if written > limit:
                    raise _Refused(f"renders more than {limit} characters")
                parts.append(chunk)
        except _Refused as exc:
            raise TemplateError(f"chat template '{self.name}' {exc}") from None
        except Exception as exc:  # the template's own code: ZeroDivisionError, RecursionError...
            raise TemplateError(f"chat template '{self.name}' failed: {_one_line(exc)}") from exc
        finally:
            deadline.at = previous
        return "".join(parts)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, jinja2.TemplateError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def select_template(
    gguf_template: str | None,
    architecture: str,
    bos_token: str,
    eos_token: str,
    base_model: bool = False,
) -> ChatTemplate:
    """The model's own template when it has one; else, for a base model, a plain transcript
    that stops at the next `User:` line (a base model never learned any turn markers, and
    given them it wanders); else a fallback for its architecture."""
    if gguf_template:
        return ChatTemplate("gguf", gguf_template, bos_token, eos_token)
    if base_model:
        return ChatTemplate(
            "plain transcript (built-in, base model)",
            PLAIN_TEMPLATE,
            bos_token,
            eos_token,
            PLAIN_STOP,
            base_model=True,
        )
    if architecture in FALLBACKS:
        return ChatTemplate(
            f"{architecture} (built-in)", FALLBACKS[architecture], bos_token, eos_token
        )
    return ChatTemplate("plain (built-in)", PLAIN_TEMPLATE, bos_token, eos_token, PLAIN_STOP)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)
