import json

import pytest

from flashmem_cli.errors import InvalidSessionName, SessionCorrupt, SessionInUse, SessionNotFound
from flashmem_cli.store.files import atomic_write_json
from flashmem_cli.store.sessions import SessionStore, read_transcript, validate_name


@pytest.mark.parametrize("name", ["work", "a.b_c-1", "x" * 64])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a/b", "..", "with space", "ünï"])
def test_invalid_names(name):
    with pytest.raises(InvalidSessionName):
        validate_name(name)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_transcript_appends_and_skips_a_torn_last_line(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.append({"role": "user", "content": "one"})
        session.append({"role": "assistant", "content": "two"})
    path = tmp_path / "s" / "transcript.jsonl"
    with open(path, "a") as f:
        f.write('{"role": "user", "cont')  # a crash mid-append
    records = read_transcript(tmp_path / "s")
    assert [r["content"] for r in records] == ["one", "two"]
    assert path.read_text().endswith('"cont')  # nothing was removed


def test_a_corrupt_middle_line_is_reported_not_rewritten(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.append({"role": "user", "content": "one"})
    path = tmp_path / "s" / "transcript.jsonl"
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(SessionCorrupt, match="line 1"):
        read_transcript(tmp_path / "s")


def test_a_session_is_locked_while_open(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("s"), pytest.raises(SessionInUse, match="session s is in use"):
        store.open("s")
    store.open("s").close()  # released


def test_remove_moves_to_trash_and_keeps_the_transcript(tmp_path):
    store = SessionStore(tmp_path / "sessions")
    with store.open("s") as session:
        session.append({"role": "user", "content": "keep me"})
    target = store.remove("s")
    assert not store.exists("s")
    assert "keep me" in (target / "transcript.jsonl").read_text()
    with pytest.raises(SessionNotFound):
        store.remove("s")


def test_list_summarizes_sessions(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("b") as session:
        session.append({"role": "user", "content": "x"})
    store.open("a").close()
    assert [(s.name, s.messages) for s in store.list()] == [("a", 0), ("b", 1)]


def test_new_names_do_not_collide(tmp_path):
    store = SessionStore(tmp_path)
    first = store.new_name()
    store.open(first).close()
    second = store.new_name()
    assert second != first and not store.path(second).exists()


def test_a_torn_tail_is_set_aside_before_the_next_append(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.append({"role": "user", "content": "one"})
    path = tmp_path / "s" / "transcript.jsonl"
    with open(path, "a") as f:
        f.write('{"role": "user", "cont')
    with store.open("s") as session:
        session.append({"role": "user", "content": "two"})
        assert [r["content"] for r in session.records()] == ["one", "two"]
    aside = list(tmp_path.glob("s/transcript.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"role": "user", "cont'


@pytest.mark.parametrize(
    "meta",
    ["[]", '{"format": 1, "model": "x"}', '{"format": 1, "n_ctx": "abc"}', '{"format": 99}'],
)
def test_a_meta_json_of_the_wrong_shape_is_corrupt(tmp_path, meta):
    store = SessionStore(tmp_path)
    store.open("s").close()
    (tmp_path / "s" / "meta.json").write_text(meta)
    with pytest.raises(SessionCorrupt):
        store.open("s")
    assert store.list()[0].model.startswith("(unreadable")


@pytest.mark.parametrize("line", ['{"role": "user"}', "5", '{"role": "robot", "content": "x"}'])
def test_a_transcript_record_of_the_wrong_shape_is_corrupt(tmp_path, line):
    store = SessionStore(tmp_path)
    store.open("s").close()
    (tmp_path / "s" / "transcript.jsonl").write_text(line + "\n")
    with pytest.raises(SessionCorrupt, match="line 1"):
        read_transcript(tmp_path / "s")
