"""The chat's line editor, driven through prompt_toolkit's own pipe input, and once in a real
pseudo-terminal (history recalled with Up, Ctrl-C twice to leave)."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput, Output
from prompt_toolkit.output.plain_text import PlainTextOutput
from prompt_toolkit.validation import ValidationError

from flashmem_cli.line_editor import (
    LEAVE_HINT,
    LineEditor,
    Utf8Validator,
    message_from_buffer,
    strip_controls,
    terminal_is_usable,
)

UP = "\x1b[A"
ESC_ENTER = "\x1b\r"
CTRL_C = "\x03"
CTRL_D = "\x04"
CTRL_L = "\x0c"
BACKSPACE = "\x7f"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


def read_all(
    *chunks: str | bytes, history_file: Path | None = None, output: Output | None = None
) -> list[str | None]:
    """Every message the keys type, then the None that the closed input ends with (closed, so
    that a test that expects more messages ends instead of hanging). Chunk i is typed just before
    read i: keys typed ahead in one chunk reach the next prompt before its history is loaded."""
    results: list[str | None] = []
    with (
        create_pipe_input() as pipe,
        create_app_session(input=pipe, output=output or DummyOutput()),
    ):
        editor = LineEditor(history_file, interactive=True)
        for index, chunk in enumerate(chunks):
            pipe.send_bytes(chunk if isinstance(chunk, bytes) else chunk.encode())
            if index == len(chunks) - 1:
                pipe.close()
            results.append(editor.read())
        while results[-1] is not None:
            results.append(editor.read())
    return results


def test_plain_line() -> None:
    assert read_all("hello world\r") == ["hello world", None]


def test_history_persists_across_editors(tmp_path: Path) -> None:
    history = tmp_path / "missing" / "dir" / "history"
    assert read_all("first message\r", history_file=history) == ["first message", None]
    assert history.is_file()  # created with its parents
    assert read_all(UP + "\r", history_file=history) == ["first message", None]


def test_multi_line_message_is_one_history_entry(tmp_path: Path) -> None:
    history = tmp_path / "history"
    assert read_all("one" + ESC_ENTER + "two\r", history_file=history) == ["one\ntwo", None]
    # The second Up recalls the two-line message whole, as one entry
    assert read_all("last\r", UP * 2 + "\r", history_file=history) == ["last", "one\ntwo", None]


def test_ctrl_c_clears_the_line_and_reads_the_next() -> None:
    assert read_all("half typed" + CTRL_C + "next\r") == ["next", None]


def test_ctrl_c_twice_on_an_empty_prompt_leaves_after_a_hint() -> None:
    screen = io.StringIO()
    messages = read_all(CTRL_C + CTRL_C + "never read\r", output=PlainTextOutput(screen))
    assert messages == [None]
    assert screen.getvalue().count(LEAVE_HINT) == 1


def test_ctrl_c_only_leaves_right_after_a_ctrl_c_on_an_empty_prompt() -> None:
    # Clearing a line is no first Ctrl-C, and typing between two Ctrl-C disarms the second.
    keys = "text" + CTRL_C + CTRL_C + "x" + BACKSPACE + CTRL_C + "still here\r"
    assert read_all(keys) == ["still here", None]


def test_ctrl_d_on_an_empty_prompt_leaves() -> None:
    assert read_all(CTRL_D + "never read\r") == [None]


def test_fenced_block_is_one_message() -> None:
    keys = '"""\rfirst line\r\rends with a backslash\\\r"""\r'
    assert read_all(keys) == ["first line\n\nends with a backslash\\", None]


def test_backslash_continues_the_line() -> None:
    assert read_all("one\\\rtwo\\\rthree\r") == ["one\ntwo\nthree", None]


def test_recalled_block_is_sent_the_same(tmp_path: Path) -> None:
    history = tmp_path / "history"
    assert read_all('"""\rinside\r"""\r', history_file=history) == ["inside", None]
    assert read_all(UP + "\r", history_file=history) == ["inside", None]


def test_esc_enter_inserts_a_newline() -> None:
    assert read_all("one" + ESC_ENTER + "two\r") == ["one\ntwo", None]


def test_bracketed_paste_is_one_message() -> None:
    keys = PASTE_START + "line one\r\nline two\rline three" + PASTE_END + "\r"
    assert read_all(keys) == ["line one\nline two\nline three", None]


def test_ctrl_l_does_not_reach_the_message() -> None:
    assert read_all("ab" + CTRL_L + "cd\r") == ["abcd", None]


def test_control_characters_are_dropped() -> None:
    typed = "bell\x07here\r"
    pasted = PASTE_START + "esc\x1b[31m\x07\tkept" + PASTE_END + "\r"
    assert read_all(typed + pasted) == ["bellhere", "esc[31m\tkept", None]


def test_tab_types_a_tab() -> None:
    assert read_all("\tindented\r") == ["\tindented", None]


def test_invalid_utf8_is_refused_until_deleted() -> None:
    # Enter refuses "caf\xe9" and leaves the cursor after the bad byte, which Backspace deletes.
    assert read_all(b"caf\xe9\r" + BACKSPACE.encode() + b"e\r") == ["cafe", None]


def test_validator_names_the_byte_offset() -> None:
    with pytest.raises(ValidationError, match="not UTF-8: invalid byte at offset 5"):
        Utf8Validator().validate(Document("\u00e9t\u00e9\udce9"))  # 2 + 1 + 2 bytes before it


def test_unwritable_history_still_works(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    history = blocker / "history"  # its parent cannot become a directory, even for root
    messages = read_all("kept in memory\r", UP + "\r", history_file=history)
    assert messages == ["kept in memory", "kept in memory", None]
    warning = LineEditor(history, interactive=False).history_warning
    assert warning is not None and "history not saved" in warning


def test_read_only_history_directory_still_works(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anyway: make the file itself a directory instead
        (tmp_path / "history").mkdir()
    else:
        tmp_path.chmod(0o500)
    try:
        messages = read_all("hi\r", UP + "\r", history_file=tmp_path / "history")
        assert messages == ["hi", "hi", None]
    finally:
        tmp_path.chmod(0o700)


def test_message_from_buffer_rules() -> None:
    assert message_from_buffer('"""\nA\n  """  ') == "A"
    assert message_from_buffer('"""\nopen block') == "open block"
    assert message_from_buffer('code\n    """\n    doc') == 'code\n    """\n    doc'
    assert strip_controls("a\x00b\x7fc\x9bd\te\nf\r") == "abcd\te\nf"


@pytest.fixture
def piped_stdin(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    stdin = io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    yield stdin


def test_without_a_terminal_the_same_rules_apply(
    piped_stdin: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    piped_stdin.write('plain\n"""\nblock\\\n"""\nab\\\ncd\nbad \udce9\nbel\x07l\nunfinished\\\n')
    piped_stdin.seek(0)
    editor = LineEditor(None)
    assert not editor.interactive
    messages = [editor.read() for _ in range(6)]
    assert messages == ["plain", "block\\", "ab\ncd", "bell", "unfinished", None]
    captured = capsys.readouterr()
    assert "error: the line is not UTF-8: invalid byte at offset 4" in captured.err
    assert captured.out.startswith("you> ") and "...  " in captured.out
    assert captured.out.endswith("\n")  # the last prompt is not left dangling


def test_dumb_terminal_is_no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    assert not terminal_is_usable()


CHILD = """
from flashmem_cli.line_editor import LineEditor
editor = LineEditor(None)
print("interactive", editor.interactive, flush=True)
while (message := editor.read()) is not None:
    print(repr(message), flush=True)
"""


def spawn_child(tmp_path: Path) -> pexpect.spawn:
    """The editor in a real pseudo-terminal, as a user's shell runs it."""
    env = {**os.environ, "TERM": "xterm", "HOME": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    child = pexpect.spawn(
        sys.executable, ["-c", CHILD], cwd=root, env=env, dimensions=(24, 80), timeout=10
    )
    child.expect_exact("interactive True")
    return child


def expect_prompt(child: pexpect.spawn) -> None:
    """Wait for the prompt, answering its cursor position request as a terminal does (without an
    answer prompt_toolkit waits for it and warns about the terminal)."""
    child.expect_exact("\x1b[6n")
    child.send("\x1b[1;1R")
    child.expect_exact("you> ")


def test_real_terminal_recalls_with_up_and_leaves_with_ctrl_c_twice(tmp_path: Path) -> None:
    child = spawn_child(tmp_path)
    expect_prompt(child)
    child.send("hello pty\r")
    child.expect_exact("'hello pty'\r\n")
    expect_prompt(child)
    child.send(UP)
    child.expect_exact("hello pty")  # shown in the buffer before it is sent
    child.send("\r")
    child.expect_exact("'hello pty'\r\n")
    expect_prompt(child)
    child.send(CTRL_C)
    child.expect_exact(LEAVE_HINT)
    expect_prompt(child)
    child.send(CTRL_C)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", child.before).endswith(b"\n")


def test_real_terminal_refuses_invalid_utf8_without_a_traceback(tmp_path: Path) -> None:
    child = spawn_child(tmp_path)
    expect_prompt(child)
    child.send(b"caf\xe9\r")
    child.expect_exact("not UTF-8: invalid byte at offset 3")
    child.send(BACKSPACE + "e\r")
    child.expect_exact("'cafe'\r\n")
    expect_prompt(child)
    child.send(CTRL_D)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert b"Traceback" not in child.before
