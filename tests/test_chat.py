"""Chat sessions end to end on the real default model: resume, bad input, a full context."""

from __future__ import annotations

import json

import pytest
from conftest import own_turn_tokens, run_cli, run_json

from flashmem_cli.chat.conversation import ChatOptions, open_conversation
from flashmem_cli.config import sessions_dir
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.store.sessions import SessionStore

FLAGS = ["--temp", "0", "-n", "12", "-c", "512", "-t", "2"]
TURNS = ["Tell me about cats.", "And dogs?", "Which is better?"]


def transcript(home, name):
    path = home / "sessions" / name / "transcript.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.model
def test_resumed_in_new_processes_equals_one_process(home, model_path):
    options = ChatOptions(n_ctx=512, n_threads=2, n_predict=12, sampling=SamplingParams(0))
    with open_conversation(SessionStore(sessions_dir()), "one", options) as conversation:
        in_process = [conversation.send(text).reply for text in TURNS]

    results = [run_json("chat", "-s", "many", *FLAGS, "-p", text) for text in TURNS]
    assert [r["reply"] for r in results] == in_process
    for text, result in zip(TURNS[1:], results[1:], strict=True):
        assert result["tokens"]["new_prompt"] == own_turn_tokens(model_path, text)
        assert result["tokens"]["cached"] > 0
    assert results[2]["tokens"]["cached"] > results[1]["tokens"]["cached"]
    assert [r["content"] for r in transcript(home, "many")] == [
        part for text, r in zip(TURNS, results, strict=True) for part in (text, r["reply"])
    ]


@pytest.mark.model
def test_json_output_has_the_documented_fields(home, model_path):
    result = run_json("chat", "-s", "j", *FLAGS, "-p", "Hi")
    assert set(result) >= {"session", "reply", "prompt_text", "tokens", "timings_ms"}
    assert set(result["tokens"]) == {"new_prompt", "cached", "generated", "reprocessed"}
    assert result["tokens"]["reprocessed"] == 0  # a plain transcript never rewrites
    assert set(result["timings_ms"]) >= {"load_model", "restore", "prefill", "ttft", "total"}
    assert result["prompt_text"].startswith("<bos>User: Hi\nAssistant:")


@pytest.mark.model
def test_stdin_is_one_message_and_system_prompt_leads(home, model_path):
    proc = run_cli("chat", "-s", "in", *FLAGS, "-sys", "Be brief.", stdin="line one\nline two\n")
    assert proc.returncode == 0, proc.stderr
    records = transcript(home, "in")
    assert records[0] == {**records[0], "role": "system", "content": "Be brief."}
    assert records[1]["content"] == "line one\nline two"


@pytest.mark.model
def test_stateless_reprocesses_everything_and_keeps_appending(home, model_path):
    first = run_json("chat", "-s", "st", *FLAGS, "-p", "One")
    second = run_json("chat", "-s", "st", *FLAGS, "-p", "Two", "--stateless")
    assert second["tokens"]["cached"] == 0
    assert second["tokens"]["new_prompt"] > first["tokens"]["new_prompt"]
    third = run_json("chat", "-s", "st", *FLAGS, "-p", "Three")  # catches up on "Two"
    assert third["tokens"]["cached"] > 0
    assert [r["content"] for r in transcript(home, "st") if r["role"] == "user"] == [
        "One",
        "Two",
        "Three",
    ]


# -- bad input: one line, non-zero exit, transcript intact ------------------------------------


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.model
def test_missing_model_lists_models_dir(home, model_path):
    proc = run_cli("chat", "-s", "m", "-m", "no-such-model", "-p", "hi")
    assert_one_line_error(proc, "not found")
    assert "gemma-3-270m-q4_k_m" in proc.stderr


@pytest.mark.model
def test_a_file_that_is_not_gguf_is_refused(home, model_path, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    assert_one_line_error(run_cli("chat", "-s", "m", "-m", str(fake), "-p", "hi"), "not a GGUF")


def test_invalid_session_name(home):
    assert_one_line_error(run_cli("chat", "-s", "no/slashes", "-p", "hi"), "invalid session name")


@pytest.mark.model
def test_session_in_use(home, model_path):
    run_json("chat", "-s", "busy", *FLAGS, "-p", "first")
    before = transcript(home, "busy")
    with SessionStore(sessions_dir()).open("busy"):
        proc = run_cli("chat", "-s", "busy", *FLAGS, "-p", "second")
    assert_one_line_error(proc, "session busy is in use")
    assert transcript(home, "busy") == before


def state_file(session_dir):
    (path,) = session_dir.glob("state.*.bin")  # one generation on disk, the one meta.json names
    return path


def damage_session(session_dir, damage):
    meta_path = session_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    state = state_file(session_dir)
    data = state.read_bytes()
    if damage == "fingerprint":
        meta["kv"]["fingerprint"] = "0" * 16
    elif damage == "truncate":
        state.write_bytes(data[:-1])
    elif damage == "flip":  # a byte inside the KV data: same size, different content
        middle = len(data) // 2
        state.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif damage == "missing":
        state.unlink()
    elif damage == "tokens":
        meta["kv"]["n_tokens"] += 1
    elif damage == "older":  # format 1: a record without the state file's size and CRC32
        del meta["kv"]["state"]
    if damage == "meta":
        meta_path.write_text('{"format": 2, "kv": ')
    else:
        meta_path.write_text(json.dumps(meta))


@pytest.mark.model
@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("fingerprint", "made by model"),
        ("n_ctx", "made with -c 512, not -c 1024"),
        ("truncate", "missing or damaged"),
        ("flip", "missing or damaged"),
        ("missing", "missing or damaged"),
        ("tokens", "does not hold the tokens"),
        ("older", "older KV record"),
        ("meta", "unreadable meta.json"),
    ],
)
def test_a_damaged_or_stale_state_is_rebuilt_from_the_transcript(
    home, model_path, damage, fragment
):
    run_json("chat", "-s", "d", *FLAGS, "-p", "Remember the word apple.")
    session_dir = home / "sessions" / "d"
    flags = list(FLAGS)
    if damage == "n_ctx":
        flags[flags.index("-c") + 1] = "1024"
    else:
        damage_session(session_dir, damage)
    before = transcript(home, "d")

    healed = run_json("chat", "-s", "d", *flags, "-p", "What word?")
    assert len(healed["notices"]) == 1 and fragment in healed["notices"][0]
    assert healed["tokens"]["cached"] > 0  # the transcript was re-processed into the cache
    assert transcript(home, "d")[: len(before)] == before
    assert len(transcript(home, "d")) == len(before) + 2
    state_file(session_dir)  # the damaged generation is gone, the new one is there
    again = run_json("chat", "-s", "d", *flags, "-p", "Thanks.")
    assert again["notices"] == []
    assert again["tokens"]["new_prompt"] == own_turn_tokens(model_path, "Thanks.")


@pytest.mark.model
def test_rebuild_forces_a_rebuild_without_a_notice(home, model_path):
    run_json("chat", "-s", "r", *FLAGS, "-p", "Remember the word apple.")
    rebuilt = run_json("chat", "-s", "r", *FLAGS, "-p", "What word?", "--rebuild")
    assert rebuilt["notices"] == []
    assert rebuilt["tokens"]["cached"] > 0


@pytest.mark.model
@pytest.mark.parametrize("memory", [False, True])
def test_a_full_context_drops_or_consolidates_and_keeps_the_transcript(home, model_path, memory):
    flags = ["--temp", "0", "-n", "24", "-c", "256", "-t", "2", "-sys", "You are a bot."]
    flags += [] if memory else ["--no-memory"]
    message = "Here is a fairly long message about gardening, tomatoes and the weather. " * 2
    dropped, consolidated = [], []
    for i in range(6):
        result = run_json("chat", "-s", "full", *flags, "-p", f"{i}: {message}")
        dropped.append(result["dropped_turns"])
        consolidated += result["memory"]["consolidations"]
        assert result["tokens"]["cached"] + result["tokens"]["new_prompt"] <= 256
    if memory:
        assert consolidated and sum(dropped) == 0
    else:
        assert sum(dropped) > 0 and not consolidated
    records = transcript(home, "full")
    assert [r["content"] for r in records if r.get("role") == "user"] == [
        f"{i}: {message}" for i in range(6)
    ]
    assert sum(r.get("event") == "memory" for r in records) == len(consolidated)
    proc = run_cli("chat", "-s", "full", *flags, "-p", "short")
    assert proc.returncode == 0, proc.stderr
    assert "dropped" in proc.stderr or "new prompt tokens" in proc.stderr


@pytest.mark.model
def test_a_message_longer_than_the_context_is_refused_and_not_recorded(home, model_path):
    run_json("chat", "-s", "long", *FLAGS, "-p", "hello")
    before = transcript(home, "long")
    proc = run_cli("chat", "-s", "long", *FLAGS, "-p", "word " * 600)
    assert_one_line_error(proc, "leaves room for")
    assert transcript(home, "long") == before


@pytest.mark.model
def test_a_system_prompt_alone_waits_and_stays_pinned(home, model_path):
    options = ChatOptions(n_ctx=512, n_threads=2, n_predict=4, sampling=SamplingParams(0))
    store = SessionStore(sessions_dir())
    with open_conversation(store, "sys", options) as conversation:
        conversation.set_system_prompt("You are a careful assistant.")
    with open_conversation(store, "sys", options) as conversation:
        result = conversation.send("Hi")
        assert result.prompt_text.startswith("<bos>You are a careful assistant.\n\nUser: Hi")
        pinned = conversation.stats().pinned_tokens
    with Model(model_path, n_gpu_layers=0) as model:
        assert pinned == len(
            model.tokenize("<bos>You are a careful assistant.", parse_special=True)
        )


@pytest.mark.model
def test_ctrl_c_keeps_the_partial_reply_and_the_session_goes_on(home, model_path):
    import signal
    import subprocess
    import sys
    import time

    command = [
        sys.executable,
        "-m",
        "flashmem_cli",
        "chat",
        "-s",
        "int",
        "--json",
        "--temp",
        "0",
        "-n",
        "3000",
        "-c",
        "4096",
        "-t",
        "2",
        "-p",
        "Count from 1 to 1000: 1, 2, 3, 4,",  # a base model counts on and on
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = home / "sessions" / "int" / "transcript.jsonl"
    deadline = time.time() + 60  # the user's message is recorded just before its prefill
    while not (started.exists() and started.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # well into the reply
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never left running if the test fails
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "interrupted"
    assert 0 < result["tokens"]["generated"] < 3000
    assert transcript(home, "int")[-1]["content"] == result["reply"]
    again = run_json("chat", "-s", "int", "--temp", "0", "-n", "4", "-p", "Go on.")
    assert again["tokens"]["new_prompt"] == own_turn_tokens(model_path, "Go on.")


@pytest.mark.model
def test_a_system_prompt_too_long_for_the_context_is_refused(home, model_path):
    proc = run_cli("chat", "-s", "big", "-c", "256", "-sys", "word " * 300, "-p", "hi")
    assert_one_line_error(proc, "the system prompt is")
    assert not (home / "sessions" / "big").exists()


@pytest.mark.model
def test_a_save_that_fails_after_the_turn_is_a_notice_and_the_next_start_catches_up(
    home, model_path, monkeypatch
):
    store = SessionStore(sessions_dir())
    options = ChatOptions(n_ctx=512, n_predict=4, sampling=SamplingParams(temperature=0))
    with open_conversation(store, "full", options) as conversation:
        conversation.send("Remember the word apple.")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with open_conversation(store, "full", options) as conversation:
        monkeypatch.setattr(conversation.session, "commit_kv", disk_full)
        result = conversation.send("What word?")
    assert len(result.notices) == 1 and "No space left on device" in result.notices[0]
    assert transcript(home, "full")[-1]["content"] == result.reply  # the turn happened, once
    with open_conversation(store, "full", options) as conversation:
        caught_up = conversation.send("Thanks.")
    assert caught_up.notices == []
    assert caught_up.new_prompt_tokens > own_turn_tokens(model_path, "Thanks.")  # fed the lost turn
