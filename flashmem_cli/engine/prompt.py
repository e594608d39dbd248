"""Rendered chat text that knows which parts are the template's markup and which are messages.

Message text reaches the model as text: a user who types `<end_of_turn>` gets those characters,
never the control token. A conversation is rendered with a placeholder in place of each
message's content (with the content's own leading and trailing whitespace around it, so that
a template's `trim` works), so the template sees every content as an opaque string; its own
text between placeholders is the only text whose special-token spellings become control tokens.
Tokenization splits the text at those control tokens, as llama.cpp does for a whole text, so a
conversation whose messages hold no such spelling gets exactly the tokens it always had.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.templates import ChatTemplate
from flashmem_cli.errors import TemplateError

Message = dict[str, str]

_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Piece:
    text: str
    message: int | None  # index of the message whose content this is; None for markup


@dataclass(frozen=True)
class Rendered:
    """Rendered text as pieces of markup and of message content, in order."""

    pieces: tuple[Piece, ...] = ()

    @property
    def text(self) -> str:
        return "".join(piece.text for piece in self.pieces)

    def split_at(self, offset: int) -> tuple[Rendered, Rendered]:
        """The pieces before and after character `offset` (a piece across it is cut in two)."""
        head: list[Piece] = []
        tail: list[Piece] = []
        position = 0
        for piece in self.pieces:
            end = position + len(piece.text)
            if end <= offset:
                head.append(piece)
            elif position >= offset:
                tail.append(piece)
            else:
                cut = offset - position
                head.append(Piece(piece.text[:cut], piece.message))
                tail.append(Piece(piece.text[cut:], piece.message))
            position = end
        return Rendered(tuple(head)), Rendered(tuple(tail))

    def start_of_message(self, index: int) -> int | None:
        """Character offset where message `index`'s content first begins, if it is rendered."""
        position = 0
        for piece in self.pieces:
            if piece.message == index:
                return position
            position += len(piece.text)
        return None

    def end_of_message(self, index: int) -> int | None:
        """Character offset where message `index`'s content first ends, if it is rendered."""
        position = 0
        for piece in self.pieces:
            position += len(piece.text)
            if piece.message == index:
                return position
        return None


def render(
    template: ChatTemplate, messages: list[Message], add_generation_prompt: bool
) -> Rendered:
    """The template's rendering of `messages`, each content an opaque placeholder filled in.
    A placeholder carries its content's leading and trailing whitespace, so a template that
    trims contents (Llama 3, Mistral) trims them here as it would the real text."""
    placeholders = [{**m, "content": _wrapped(i, m["content"])} for i, m in enumerate(messages)]
    parts = _PLACEHOLDER_RE.split(template.render(placeholders, add_generation_prompt))
    contents: dict[int, str] = {}
    for i in range(1, len(parts), 2):
        index = int(parts[i])
        if index >= len(messages):
            raise TemplateError(f"chat template '{template.name}' renders an unknown message")
        lead, core, trail = _edges(messages[index]["content"])
        lead = lead if parts[i - 1].endswith(lead) else ""
        trail = trail if parts[i + 1].startswith(trail) else ""
        parts[i - 1] = parts[i - 1][: len(parts[i - 1]) - len(lead)]
        parts[i + 1] = parts[i + 1][len(trail) :]
        contents[i] = lead + core + trail
    pieces = [
        Piece(contents[i], int(part)) if i % 2 else Piece(part, None)
        for i, part in enumerate(parts)
        if (contents[i] if i % 2 else part)
    ]
    return Rendered(tuple(pieces))


def _wrapped(index: int, content: str) -> str:
    lead, _, trail = _edges(content)
    return lead + _PLACEHOLDER.format(index) + trail


def _edges(text: str) -> tuple[str, str, str]:
    """(leading whitespace, the rest stripped, trailing whitespace) of `text`."""
    core = text.strip()
    if not core:
        return text, "", ""
    start = len(text) - len(text.lstrip())
    return text[:start], core, text[start + len(core) :]


def delta(
    template: ChatTemplate, fed: list[Message], new: list[Message], add_generation_prompt: bool
) -> Rendered:
    """What to feed after `fed` (already in the KV cache) so the model has seen `fed + new`;
    with `add_generation_prompt`, ending where the assistant's reply begins."""
    before = render(template, fed, add_generation_prompt=False).text if fed else ""
    full = render(template, fed + new, add_generation_prompt)
    if not full.text.startswith(before):
        raise TemplateError(
            f"chat template '{template.name}' re-renders earlier turns, so flashmem cannot feed "
            "only the new one"
        )
    return full.split_at(len(before))[1]


def turn_texts(
    template: ChatTemplate, messages: list[Message], sizes: list[int], add_generation_prompt: bool
) -> list[Rendered]:
    """The whole conversation rendered once and cut into one text per turn (`sizes`: messages
    per turn), for templates that rewrite earlier text. A cut falls where the rendering of the
    turns before it ends when the whole one begins with it (exactly where `delta` cuts), else
    right after the last content before it; never after the first content that follows, never
    before the previous cut."""
    full = render(template, messages, add_generation_prompt)
    cuts: list[int] = []
    count = 0
    for size in sizes[:-1]:
        count += size
        alone = render(template, messages[:count], add_generation_prompt=False).text
        low = _nearest(full.end_of_message(i) for i in reversed(range(count)))
        high = _nearest(full.start_of_message(i) for i in range(count, len(messages)))
        if full.text.startswith(alone):
            cut = len(alone)
        else:  # not inside markup the two renderings only begin alike (`<|end|>` / `<|user|>`)
            cut = low if low is not None else (cuts[-1] if cuts else 0)
        cut = min(cut, high) if high is not None else cut
        cuts.append(max(cut, cuts[-1] if cuts else 0))
    texts, rest, done = [], full, 0
    for cut in cuts:
        head, rest = rest.split_at(cut - done)
        texts.append(head)
        done = cut
    return texts + [rest]


def _nearest(offsets: Iterable[int | None]) -> int | None:
    """The first offset of a message that is rendered (empty contents are not)."""
    return next((offset for offset in offsets if offset is not None), None)


NEXT_TURN: Message = {"role": "user", "content": "."}  # stands for whatever is said next


def reply_closing(template: ChatTemplate, messages: list[Message]) -> Rendered:
    """Markup the template puts after the last (assistant) message's content. TemplateError
    when the reply is not rendered as generated, or when the next turn's rendering would not
    keep this one (Phi-3 ends a conversation with EOS and drops it once another turn follows)."""
    expected = render(template, messages[:-1], add_generation_prompt=True).text
    expected += messages[-1]["content"]
    full = render(template, messages, add_generation_prompt=False)
    if not full.text.startswith(expected):
        raise TemplateError(f"chat template '{template.name}' rewrites the assistant's reply")
    following = render(template, [*messages, NEXT_TURN], add_generation_prompt=False)
    if not following.text.startswith(full.text):
        raise TemplateError(f"chat template '{template.name}' re-renders the reply's turn")
    return full.split_at(len(expected))[1]


def pinned_end(rendered: Rendered, system: int | None, bos_token: str) -> int:
    """Where the never-dropped head of a conversation's first text ends: after the system
    prompt's content, or after the BOS marker when there is none."""
    if system is not None:
        end = rendered.end_of_message(system)
        if end is not None:
            return end
    text = rendered.text
    return len(bos_token) if bos_token and text.startswith(bos_token) else 0


def tokenize(model: Model, rendered: Rendered) -> list[int]:
    """Tokens of `rendered`: markup's special-token spellings as control tokens, all other
    text (message content and the markup around it, joined) as text."""
    tokens: list[int] = []
    for text, special in _runs(model, rendered):
        tokens += model.tokenize(text, parse_special=special)
    return tokens


def tokenize_head(
    model: Model, rendered: Rendered, system: int | None, bos_token: str
) -> tuple[list[int], list[int]]:
    """(the pinned head, the rest) of a conversation's first text, BOS first when the model
    wants one."""
    head, rest = rendered.split_at(pinned_end(rendered, system, bos_token))
    pinned, tokens = tokenize(model, head), tokenize(model, rest)
    if model.add_bos and (pinned or tokens)[:1] != [model.bos]:
        pinned = [model.bos] + pinned
    return pinned, tokens


def _runs(model: Model, rendered: Rendered) -> list[tuple[str, bool]]:
    """(text, is one special token) runs; neighbouring plain text is joined, as llama.cpp
    joins the text between two special tokens."""
    runs: list[tuple[str, bool]] = []
    for piece in rendered.pieces:
        is_content = piece.message is not None
        for text, special in (
            [(piece.text, False)] if is_content else _split_specials(model, piece.text)
        ):
            if not text:
                continue
            if not special and runs and not runs[-1][1]:
                runs[-1] = (runs[-1][0] + text, False)
            else:
                runs.append((text, special))
    return runs


def _split_specials(model: Model, markup: str) -> list[tuple[str, bool]]:
    """Markup cut at the spellings of the control tokens it holds."""
    parts: list[tuple[str, bool]] = []
    cursor = 0
    for token in model.tokenize(markup, parse_special=True):
        if not model.is_control(token):
            continue
        spelling = model.token_text(token)
        found = markup.find(spelling, cursor) if spelling else -1
        if found < 0:
            return [(markup, True)]  # cannot place it: let llama.cpp parse the markup whole
        parts += [(markup[cursor:found], False), (spelling, True)]
        cursor = found + len(spelling)
    return parts + [(markup[cursor:], False)]
