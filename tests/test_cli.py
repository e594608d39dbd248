"""Commands that need no model: parsing, the sessions and models listings, exports."""

from __future__ import annotations

import json

from conftest import run_cli

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
    assert "Again" in shown.stdout and "What is *this*?" not in shown.stdout  # after the reset
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
    assert proc.returncode == 1 and "-n must be" in proc.stderr
    assert run_cli("chat", "-c", str(1 << 32), "-p", "hi").returncode == 2


def test_a_failed_start_leaves_no_empty_session(home):
    proc = run_cli("chat", "-s", "ghost", "-m", "missing-model", "-p", "hi")
    assert proc.returncode == 1
    assert not (home / "sessions" / "ghost").exists()
