"""Commands that need no model: parsing, the sessions and models listings, exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli
from typer.testing import CliRunner

from flashmem_cli import cli
from flashmem_cli.engine.templates import ChatTemplate
from flashmem_cli.errors import FlashmemError
from flashmem_cli.store.sessions import SessionStore


def make_session(home, name="s"):
    store = SessionStore(home / "sessions")
    with store.open(name) as session:
        session.append({"role": "user", "content": "What is *this*?"})
        session.append({"role": "assistant", "content": "A [test]."})
        session.append({"event": "reset"})
        session.append({"role": "user", "content": "Again"})


def test_export_markdown_and_json(home):
    make_session(home)
    md = run_cli("sessions", "export", "s")
    assert md.returncode == 0
    assert "## user\n\nWhat is *this*?" in md.stdout and "*conversation reset*" in md.stdout
    data = json.loads(run_cli("sessions", "export", "s", "--format", "json").stdout)
    assert [r.get("content") for r in data["transcript"]] == [
        "What is *this*?",
        "A [test].",
        None,
        "Again",
    ]


def test_export_to_a_file(home, tmp_path):
    make_session(home)
    out = tmp_path / "out.md"
    assert run_cli("sessions", "export", "s", "-o", str(out)).returncode == 0
    assert "A [test]." in out.read_text()


def test_unknown_export_format_is_one_line_error(home):
    make_session(home)
    proc = run_cli("sessions", "export", "s", "--format", "pdf")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: unknown format 'pdf': use md or json"


def test_show_list_and_rm(home):
    make_session(home, "keep")
    listing = json.loads(run_cli("sessions", "list", "--json").stdout)
    assert [(s["name"], s["messages"]) for s in listing] == [("keep", 3)]
    shown = run_cli("sessions", "show", "keep")
    # everything, in order, with the reset between (the transcript is the whole history)
    before, reset, after = shown.stdout.partition("(reset: the conversation started over)")
    assert "What is *this*?" in before and "Again" in after and reset
    removed = run_cli("sessions", "rm", "keep")
    assert removed.returncode == 0 and "trash" in removed.stdout
    assert json.loads(run_cli("sessions", "list", "--json").stdout) == []
    assert list((home / "trash").iterdir())


def test_unknown_session_is_one_line_error(home):
    for args in (["show", "nope"], ["rm", "nope"], ["export", "nope"]):
        proc = run_cli("sessions", *args)
        assert proc.returncode == 1 and "no session named 'nope'" in proc.stderr


def test_bad_flag_values_are_usage_errors(home):
    proc = run_cli("chat", "-c", "abc", "-p", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.model
def test_models_list_shows_the_default(home):
    rows = json.loads(run_cli("models", "list", "--json").stdout)
    assert "gemma-3-270m-q4_k_m" in [r["name"] for r in rows]


def test_export_to_a_directory_is_one_line_error(home, tmp_path):
    make_session(home)
    proc = run_cli("sessions", "export", "s", "-o", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: Is a directory")


def test_conflicting_or_empty_generation_flags(home):
    proc = run_cli("chat", "-s", "x", "--stateless", "--rebuild", "-p", "hi")
    assert proc.returncode == 1 and "exclude each other" in proc.stderr
    proc = run_cli("chat", "-s", "x", "-n", "0", "-p", "hi")
    assert proc.returncode == 2 and "positive number of tokens" in proc.stderr
    assert run_cli("chat", "-c", str(1 << 32), "-p", "hi").returncode == 2


def test_a_failed_start_leaves_no_empty_session(home):
    proc = run_cli("chat", "-s", "ghost", "-m", "missing-model", "-p", "hi")
    assert proc.returncode == 1
    assert not (home / "sessions" / "ghost").exists()


# -- bad input: invalid UTF-8, out-of-range numbers (issue 8) ---------------------------------


def run_bytes(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """`flashmem ARGS` with raw bytes on standard input."""
    return subprocess.run(
        [sys.executable, "-m", "flashmem_cli", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )


def test_invalid_utf8_in_a_message_is_refused_and_nothing_is_written(home):
    # argv reaches Python with the bad byte as a surrogate escape, as os.fsdecode gives it
    proc = run_cli("chat", "-s", "x", "-p", os.fsdecode(b"ab\xff"))
    assert proc.returncode == 1
    assert proc.stderr == "error: the message is not UTF-8: invalid byte at offset 2\n"
    piped = run_bytes("chat", "-s", "x", stdin=b"caf\xc3\xa9 \xe2\x82\n")
    assert piped.returncode == 1
    assert piped.stderr == b"error: standard input is not UTF-8: invalid byte at offset 6\n"
    system = run_cli("chat", "-s", "x", "-sys", os.fsdecode(b"\xc0\xaf"), "-p", "hi")
    assert system.returncode == 1
    assert system.stderr == "error: the system prompt is not UTF-8: invalid byte at offset 0\n"
    assert not (home / "sessions" / "x").exists()


def test_utf8_text_turns_escapes_back_into_bytes():
    assert cli.utf8_text("café", "m") == "café"
    assert cli.utf8_text(b"caf\xc3\xa9", "m") == "café"
    assert cli.utf8_text("\udcc3\udca9", "m") == "é"  # valid bytes kept as escapes
    for bad, offset in (("é\udcff", 2), ("ab\ud800", 2), ("\udcff\ud800", 0), (b"\xed\xa0\x80", 0)):
        with pytest.raises(
            FlashmemError, match=f"^m is not UTF-8: invalid byte at offset {offset}$"
        ):
            cli.utf8_text(bad, "m")


def test_files_that_are_not_utf8_name_the_offset(tmp_path):
    bad = tmp_path / "cases.jsonl"
    bad.write_bytes(b'{"id": "a"}\n\xff')
    with pytest.raises(FlashmemError, match="cases.jsonl is not UTF-8: invalid byte at offset 12$"):
        cli.read_text_file(bad)
    good = tmp_path / "corpus.txt"
    good.write_bytes("line\r\nnext\rcafé".encode())
    assert cli.read_text_file(good) == "line\nnext\ncafé"


def invoke(*args: str):
    """A command run in this process: for flag checks that end before any model loads."""
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200"})


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "-t", "100000"],
        ["chat", "-t", "513"],
        ["run", "x.jsonl", "-t", "100000"],
        ["chat", "-n", "-2"],
        ["chat", "-n", "0"],
        ["run", "x.jsonl", "-n", "0"],
        ["run", "x.jsonl", "-n", "-5"],
        ["chat", "--temp", "inf"],
        ["chat", "--temp", "nan"],
        ["chat", "--tau", "nan"],
        ["chat", "--tau", "-inf"],
        ["chat", "--tau-percentile", "nan"],
        ["chat", "--top-p", "nan"],
        ["chat", "--min-p", "nan"],
        ["chat", "--budget", "nan"],
        ["chat", "--keep-ratio", "nan"],
        ["run", "x.jsonl", "--temp", "inf"],
        ["run", "x.jsonl", "--top-p", "nan"],
        ["calibrate", "--percentile", "nan"],
        ["eval", "recall", "x.jsonl", "-c", "128", "--budget", "inf"],
        ["eval", "recall", "x.jsonl", "-c", "128", "--keep-ratio", "nan"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(home, args):
    result = invoke(*args, *(["-p", "hi"] if args[0] == "chat" else []))
    assert result.exit_code == 2 and "Invalid value for" in result.output, result.output


def test_the_messages_of_the_new_checks(home):
    assert "less than or equal to 512" in invoke("chat", "-t", "100000", "-p", "hi").output
    n = invoke("chat", "-n", "-2", "-p", "hi").output
    assert "'-n' / '--n-predict'" in n and "positive number of tokens" in n
    assert "must be a finite number, not nan" in invoke("chat", "--tau", "nan", "-p", "hi").output
    budget = " ".join(invoke("chat", "--budget", "inf", "-p", "hi").output.split())
    assert "'--budget': must be a fraction of -c (up to 1) or a number of tokens, not inf" in budget


def test_n_minus_one_and_the_thread_cap_are_accepted(home):
    # the flags pass; the run then stops at the missing model, a one-line error (exit 1)
    for args in (["-n", "-1", "-t", "512"], ["-n", "1"]):
        proc = invoke("chat", "-s", "x", "-m", "missing-model", *args, "-p", "hi")
        assert proc.exit_code == 1 and isinstance(proc.exception, FlashmemError), proc.output


def test_a_failing_chat_template_is_one_line(home, monkeypatch, capsys):
    def open_with_a_bad_template(*args, **kwargs):
        ChatTemplate("gguf", "{{ 1/0 }}", "", "").render([], add_generation_prompt=True)

    monkeypatch.setattr(cli, "open_conversation", open_with_a_bad_template)
    monkeypatch.setattr(sys, "argv", ["flashmem", "chat", "-s", "x", "-p", "hi"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "error: chat template 'gguf' failed: ZeroDivisionError: division by zero\n"
    )


def test_show_and_export_work_with_a_damaged_meta_json(home):
    make_session(home)
    meta = home / "sessions" / "s" / "meta.json"
    meta.write_text("{ not json")
    shown = run_cli("sessions", "show", "s")
    assert shown.returncode == 0 and "Again" in shown.stdout
    assert "unreadable meta.json" in shown.stderr
    exported = run_cli("sessions", "export", "s", "--format", "md")
    assert exported.returncode == 0 and "What is *this*?" in exported.stdout
    assert meta.read_text() == "{ not json"  # reading changes nothing
