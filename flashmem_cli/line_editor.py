"""The line editor of `flashmem chat`: history, multi-line messages, Ctrl-C/Ctrl-D to leave.

On a terminal it is a prompt_toolkit prompt whose whole buffer is one message: Enter sends it,
unless a `\"\"\"` block is still open or the line ends with `\\` (then Enter starts a new line,
as before), and Alt-Enter / Esc-Enter always starts a new line. Without a terminal (a pipe, a
file, TERM=dumb) prompt_toolkit cannot run, so plain `input()` reads the same rules line by line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.document import Document
from prompt_toolkit.filters import has_focus
from prompt_toolkit.formatted_text import FormattedText, StyleAndTextTuples
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout.processors import TabsProcessor
from prompt_toolkit.utils import get_cwidth
from prompt_toolkit.validation import ValidationError, Validator

FENCE = '"""'
LEAVE_HINT = "(Ctrl-C again or Ctrl-D to leave)"
PROMPT_STYLE = "bold fg:ansigreen"
CONTINUATION_STYLE = "fg:ansibrightblack"
HINT_STYLE = "fg:ansibrightblack"
KEPT_CONTROLS = frozenset("\n\t")


def strip_controls(text: str) -> str:
    """`text` without control characters (C0, DEL, C1) other than newline and tab: a pasted
    escape sequence, bell or form feed would otherwise reach the model and the transcript."""
    return "".join(
        char for char in text if char in KEPT_CONTROLS or unicodedata.category(char) != "Cc"
    )


def first_undecodable(text: str) -> int | None:
    """Index of the first character that stands for a byte that was not UTF-8, or None.
    Terminal input is decoded with surrogateescape, so such a byte arrives as a lone
    surrogate, which cannot be encoded again (not to the history file, not to the model)."""
    for index, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            return index
    return None


def not_utf8_error(what: str, text: str, index: int) -> str:
    """The one-line refusal, worded as cli.py words it, with the offset counted in bytes as
    the user's terminal sent them (everything before `index` is valid UTF-8)."""
    offset = len(text[:index].encode("utf-8"))
    return f"{what} is not UTF-8: invalid byte at offset {offset}"


def is_fence(line: str) -> bool:
    """A line of `\"\"\"` alone (spaces around it allowed, as before) opens or closes a block."""
    return line.strip() == FENCE


def block_is_open(document: Document) -> bool:
    """Whether Enter must go on inside a `\"\"\"` block: the buffer starts with a fence and the
    cursor is not on a closing fence that ends the buffer. Only the first line opens a block, so
    that pasted code with `\"\"\"` docstrings inside a block is left alone."""
    lines = document.lines
    if not is_fence(lines[0]):
        return False
    on_last_line = document.cursor_position_row == len(lines) - 1
    closed = len(lines) > 1 and on_last_line and is_fence(lines[-1])
    return not closed


def continues_line(document: Document) -> bool:
    """Whether Enter at the cursor is a `\\` continuation: the cursor ends a line ending in `\\`."""
    return document.is_cursor_at_the_end_of_line and document.current_line.endswith("\\")


def message_from_buffer(text: str) -> str:
    """The message a submitted buffer stands for: a `\"\"\"` block loses its fences. The buffer
    itself (fences included) is what the history keeps, so a recalled block is sent alike."""
    lines = text.split("\n")
    if is_fence(lines[0]):
        closed = len(lines) > 1 and is_fence(lines[-1])
        lines = lines[1:-1] if closed else lines[1:]
    return strip_controls("\n".join(lines))


def terminal_is_usable() -> bool:
    """prompt_toolkit needs a terminal on both ends (it fails on a pipe, and would write escape
    sequences into a redirected stdout), and one that understands them (not TERM=dumb)."""
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(sys.stdin and sys.stdin.isatty() and sys.stdout and sys.stdout.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def history_warning(path: Path) -> str | None:
    """Why `path` cannot keep this session's messages, or None: the parent directory is created
    if missing and the file opened for appending, once, so that the user can be told up front."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return f"history not saved ({path}: {reason}); it is kept for this session only"
    return None


class TolerantFileHistory(FileHistory):
    """FileHistory that never ends the chat: an unreadable file is an empty history and a failed
    write is dropped. prompt_toolkit keeps every entry in memory as well, so Up still walks this
    session's messages when the file cannot be written."""

    def load_history_strings(self) -> Iterable[str]:
        try:
            return list(super().load_history_strings())
        except OSError:
            return []

    def store_string(self, string: str) -> None:
        with contextlib.suppress(OSError):
            super().store_string(string)


class Utf8Validator(Validator):
    """Refuses to send a buffer holding bytes that were not UTF-8: the error shows on one line
    below the prompt with the cursor after the bad byte (Backspace deletes it), and the user edits and sends again."""

    def validate(self, document: Document) -> None:
        index = first_undecodable(document.text)
        if index is not None:
            error = not_utf8_error("the message", document.text, index)
            raise ValidationError(
                cursor_position=index + 1, message=f"{error} (Backspace deletes it)"
            )


def on_enter(event: KeyPressEvent) -> None:
    """Enter sends the message, except inside an open `\"\"\"` block (a new line) or after a
    trailing `\\` (which becomes the new line: the buffer shows the message as it is sent)."""
    buffer = event.current_buffer
    if block_is_open(buffer.document):
        buffer.insert_text("\n")
    elif continues_line(buffer.document):
        buffer.delete_before_cursor(1)
        buffer.insert_text("\n")
    else:
        clean = strip_controls(buffer.text)  # Ctrl-Q (quoted insert) can type any control
        if clean != buffer.text:
            buffer.document = Document(clean, min(buffer.cursor_position, len(clean)))
        buffer.validate_and_handle()


def on_newline(event: KeyPressEvent) -> None:
    """Alt-Enter / Esc-Enter: a new line inside the message, whatever the rules above say."""
    event.current_buffer.insert_text("\n")


def on_tab(event: KeyPressEvent) -> None:
    """Tab types a tab (there is nothing to complete), so that code can be indented by hand."""
    event.current_buffer.insert_text("\t")


def on_paste(event: KeyPressEvent) -> None:
    """A bracketed paste goes into the buffer as it is, newlines included (one message), but
    without control characters; the line endings are made `\\n` as prompt_toolkit does."""
    data = event.data.replace("\r\n", "\n").replace("\r", "\n")
    event.current_buffer.insert_text(strip_controls(data))


def editor_key_bindings() -> KeyBindings:
    """The bindings that differ from prompt_toolkit's (Ctrl-C, Ctrl-D, Ctrl-L, Ctrl-R, arrows
    are its own). They apply to the message buffer only, so that Enter still ends a Ctrl-R
    search."""
    bindings = KeyBindings()
    in_message = has_focus("DEFAULT_BUFFER")
    bindings.add("enter", filter=in_message)(on_enter)
    bindings.add("escape", "enter", filter=in_message)(on_newline)
    bindings.add("tab", filter=in_message)(on_tab)
    bindings.add(Keys.BracketedPaste)(on_paste)
    return bindings


class LineEditor:
    """Reads chat messages: `read()` returns one message, or None when the user leaves (Ctrl-D
    on an empty prompt, or Ctrl-C on an empty prompt right after a Ctrl-C on an empty prompt).

    `interactive` None chooses by itself: prompt_toolkit on a terminal, `input()` otherwise.
    `history_warning` says, when not None, that the history file cannot be written."""

    def __init__(
        self,
        history_file: Path | None,
        prompt: str = "you> ",
        continuation: str = "... ",
        *,
        interactive: bool | None = None,
    ) -> None:
        self.prompt = prompt
        self.continuation = continuation
        self.history_warning = history_warning(history_file) if history_file else None
        self.interactive = terminal_is_usable() if interactive is None else interactive
        self._armed = False  # the last read ended with Ctrl-C on an empty, untouched prompt
        self._edited = False  # the buffer changed during the current prompt
        self._session: PromptSession[str] | None = None
        if self.interactive:
            self._session = self._new_session(history_file)

    def read(self) -> str | None:
        """One message, without its `\"\"\"` fences or control characters; None to leave."""
        return self._read_terminal() if self._session else self._read_plain()

    def _new_session(self, history_file: Path | None) -> PromptSession[str]:
        """A multi-line prompt whose own input and output are those of the current prompt_toolkit
        app session (the terminal, or the pipe and dummy output of a test)."""
        session: PromptSession[str] = PromptSession(
            message=FormattedText([(PROMPT_STYLE, self.prompt)]),
            multiline=True,
            prompt_continuation=self._continuation_prompt,
            history=TolerantFileHistory(history_file) if history_file else None,
            key_bindings=editor_key_bindings(),
            validator=Utf8Validator(),
            validate_while_typing=False,
            input_processors=[TabsProcessor(char1=" ", char2=" ")],
        )
        session.default_buffer.on_text_changed += self._mark_edited
        return session

    def _continuation_prompt(
        self, width: int, line_number: int, wrap_count: int
    ) -> StyleAndTextTuples:
        """`... ` padded to the width of the main prompt, so that the lines of a message start
        in one column; a line wrapped by the terminal gets blanks only."""
        text = self.continuation if wrap_count == 0 else ""
        return [(CONTINUATION_STYLE, text + " " * max(0, width - get_cwidth(text)))]

    def _mark_edited(self, _buffer: object) -> None:
        """Typing between two Ctrl-C is no longer "right after": the next Ctrl-C only warns."""
        self._edited = True

    def _read_terminal(self) -> str | None:
        """prompt() until a message is sent or the user leaves; Ctrl-C clears what was typed."""
        assert self._session is not None
        while True:
            try:
                text = self._session.prompt(pre_run=self._forget_edits)
            except KeyboardInterrupt:
                if self._interrupted(bool(self._session.default_buffer.text)):
                    return None
                continue
            except EOFError:
                return None
            self._armed = False
            return message_from_buffer(text)

    def _forget_edits(self) -> None:
        """Runs once the new prompt has reset its buffer, which counts as no edit."""
        self._edited = False

    def _interrupted(self, had_text: bool) -> bool:
        """Whether a Ctrl-C means leave: on a prompt with text it only clears it; on an empty one
        it warns first, and leaves only when pressed again right away."""
        if had_text:
            self._armed = False
            return False
        if self._armed and not self._edited:
            return True
        self._armed = True
        self._show_hint()
        return False

    def _show_hint(self) -> None:
        """The hint on its own line; prompt_toolkit has already ended the aborted prompt's line,
        the plain reader ends it itself."""
        if self._session is not None:
            print_formatted_text(FormattedText([(HINT_STYLE, LEAVE_HINT)]))
        else:
            print(LEAVE_HINT, flush=True)

    def _read_plain(self) -> str | None:
        """The same rules with `input()`, one line at a time: a first line of `\"\"\"` opens a
        block that a line of `\"\"\"` closes, and outside one a line ending in `\\` goes on."""
        lines: list[str] = []
        in_block = False
        while True:
            self._edited = False
            line = self._plain_line(self.prompt if not (lines or in_block) else self._plain_more())
            if line is None:  # end of input: what was typed so far is sent, as before
                return "\n".join(lines) if lines else None
            if isinstance(line, KeyboardInterrupt):
                if self._interrupted(bool(lines) or in_block):
                    return None
                lines, in_block = [], False
                continue
            self._armed = False
            if not lines and not in_block and is_fence(line):
                in_block = True
            elif in_block and is_fence(line):
                return "\n".join(lines)
            elif not in_block and line.endswith("\\"):
                lines.append(line[:-1])
            else:
                lines.append(line)
                if not in_block:
                    return "\n".join(lines)

    def _plain_more(self) -> str:
        """The continuation prompt as wide as the main prompt, as on a terminal."""
        pad = max(0, get_cwidth(self.prompt) - get_cwidth(self.continuation))
        return self.continuation + " " * pad

    def _plain_line(self, prompt: str) -> str | KeyboardInterrupt | None:
        """One line from `input()` without control characters; None at the end of input. A line
        that is not UTF-8 is refused on stderr and read again; the newline that a terminal
        did not echo (end of input, Ctrl-C) is written so that nothing is left dangling."""
        while True:
            try:
                line = input(prompt)
            except EOFError:
                print(flush=True)
                return None
            except KeyboardInterrupt as exc:
                print(flush=True)
                return exc
            except UnicodeDecodeError as exc:  # stdin decoding strictly
                print(
                    f"error: the line is not UTF-8: invalid byte at offset {exc.start}",
                    file=sys.stderr,
                )
                continue
            index = first_undecodable(line)
            if index is None:
                return strip_controls(line)
            print(f"error: {not_utf8_error('the line', line, index)}", file=sys.stderr)
