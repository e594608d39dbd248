import json
import os
import stat
import zlib

import pytest

from flashmem_cli.errors import InvalidSessionName, SessionCorrupt, SessionInUse, SessionNotFound
from flashmem_cli.store.files import atomic_write_json
from flashmem_cli.store.meta import KVContents, ModelRef, StoredFile, read_meta
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
    ["[]", '{"format": 2, "model": "x"}', '{"format": 2, "n_ctx": "abc"}', "{", "\xff\xfe"],
)
def test_a_damaged_meta_json_is_set_aside_and_renewed(tmp_path, meta):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.append({"role": "user", "content": "kept"})
    (tmp_path / "s" / "meta.json").write_bytes(meta.encode("latin-1"))
    assert store.list()[0].model.startswith("(unreadable")
    with store.open("s") as session:
        assert len(session.notices) == 1 and "set it aside" in session.notices[0]
        assert session.meta.kv is None
        assert [r["content"] for r in session.records()] == ["kept"]
    (aside,) = tmp_path.glob("s/meta.json.damaged-*")
    assert aside.read_bytes() == meta.encode("latin-1")  # nothing is lost
    assert store.open("s", create=False).notices == []


def test_a_meta_json_from_a_newer_flashmem_is_refused_and_left_alone(tmp_path):
    store = SessionStore(tmp_path)
    store.open("s").close()
    (tmp_path / "s" / "meta.json").write_text('{"format": 99}')
    with pytest.raises(SessionCorrupt, match="newer flashmem"):
        store.open("s")
    assert (tmp_path / "s" / "meta.json").read_text() == '{"format": 99}'


def write_bytes_to(data):
    return lambda path: path.write_bytes(data)


def contents(n_tokens=1):
    model = ModelRef("m", "/m.gguf", "f" * 16)
    return KVContents(model, 512, n_tokens, "d" * 16, {"pinned": 1})


def test_commit_kv_replaces_a_whole_generation_and_removes_the_old(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.commit_kv(contents(1), write_bytes_to(b"one"), write_bytes_to(b"mem one"))
        session.commit_kv(contents(2), write_bytes_to(b"two"), None)
        kv = session.meta.kv
    assert read_meta(tmp_path / "s").kv == kv
    assert (kv.contents.n_tokens, kv.generation, kv.memory) == (2, 2, None)
    assert kv.state == StoredFile("state.2.bin", 3, zlib.crc32(b"two"))
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [".lock", "meta.json", "state.2.bin", "transcript.jsonl"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "grow", "missing"])
def test_verified_refuses_a_state_file_that_differs_from_its_record(tmp_path, damage):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.commit_kv(contents(), write_bytes_to(b"kv data " * 100), None)
        stored = session.meta.kv.state
        path = tmp_path / "s" / stored.name
        assert session.verified(stored) == path
        data = path.read_bytes()
        if damage == "missing":
            path.unlink()
        else:
            changed = {"truncate": data[:-1], "flip": data[:-1] + b"X", "grow": data + b"\0"}
            path.write_bytes(changed[damage])
        assert session.verified(stored) is None


def test_state_record_names_only_files_of_the_session(tmp_path):
    with pytest.raises(ValueError):
        StoredFile.from_dict({"file": "../other/state.1.bin", "bytes": 1, "crc32": 0})


def test_opening_removes_temp_files_and_unreferenced_state(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.commit_kv(contents(), write_bytes_to(b"kept"), None)
    leftovers = [".state.3.bin.abc.tmp", "state.3.bin", "memory.3.npz", "state.bin"]
    for name in leftovers:  # what kills mid-save and format-1 sessions leave
        (tmp_path / "s" / name).write_bytes(b"x")
    store.open("s").close()
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [".lock", "meta.json", "state.1.bin", "transcript.jsonl"]


def test_session_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = SessionStore(tmp_path / "sessions")
        with store.open("s") as session:
            session.append({"role": "user", "content": "secret"})
            session.commit_kv(contents(), write_bytes_to(b"kv"), write_bytes_to(b"mem"))
        store.remove("s")
    finally:
        os.umask(old)
    (moved,) = (tmp_path / "trash").iterdir()
    for path in [tmp_path / "trash", moved, *moved.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path.name, oct(mode))


def test_removing_the_same_name_twice_in_a_second_does_not_nest(tmp_path):
    store = SessionStore(tmp_path / "sessions")
    targets = []
    for content in ("first", "second"):
        with store.open("s") as session:
            session.append({"role": "user", "content": content})
        targets.append(store.remove("s"))
    assert targets[0] != targets[1]
    for target, content in zip(targets, ("first", "second"), strict=True):
        assert [r["content"] for r in read_transcript(target)] == [content]


def test_a_transcript_with_bytes_that_are_not_utf8_still_reads(tmp_path):
    store = SessionStore(tmp_path)
    with store.open("s") as session:
        session.append({"role": "user", "content": "ok"})
    path = tmp_path / "s" / "transcript.jsonl"
    raw = path.read_bytes() + b'{"role": "assistant", "content": "caf\xe9"}\n'
    path.write_bytes(raw)
    assert [r["content"] for r in read_transcript(tmp_path / "s")] == ["ok", "caf\ufffd"]
    assert path.read_bytes() == raw  # the file keeps its bytes


@pytest.mark.parametrize("line", ['{"role": "user"}', "5", '{"role": "robot", "content": "x"}'])
def test_a_transcript_record_of_the_wrong_shape_is_corrupt(tmp_path, line):
    store = SessionStore(tmp_path)
    store.open("s").close()
    (tmp_path / "s" / "transcript.jsonl").write_text(line + "\n")
    with pytest.raises(SessionCorrupt, match="line 1"):
        read_transcript(tmp_path / "s")
