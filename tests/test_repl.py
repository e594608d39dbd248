"""The interactive chat in a real pseudo-terminal on the default model: history, Ctrl-C, /retry,
/undo, /system, /set, /verbose, and memory events said before the reply."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

ROOT = Path(__file__).resolve().parents[1]
UP, CTRL_C, CTRL_D = "\x1b[A", "\x03", "\x04"
FLAGS = ["--temp", "0", "-n", "16", "-c", "512", "-t", "2"]


def spawn_chat(home: Path, *args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "xterm", "FLASHMEM_HOME": str(home), "COLUMNS": "120"}
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"  # no cursor position requests for the test to answer
    env.pop("FLASHMEM_MODEL", None)
    return pexpect.spawn(
        sys.executable,
        ["-m", "flashmem_cli", "chat", *args],
        cwd=ROOT,
        env=env,
        dimensions=(40, 120),
        timeout=120,
        encoding="utf-8",
    )


def expect_prompt(child: pexpect.spawn) -> None:
    child.expect_exact("you> ")


def say(child: pexpect.spawn, text: str, until: str) -> str:
    """Send a line; returns what the screen showed until `until` (what the command prints)
    and the next prompt after it (the sent line is drawn again with the prompt first)."""
    child.send(text + "\r")
    child.expect_exact(until)
    shown = child.before + until
    expect_prompt(child)
    return plain(shown + child.before)


def plain(screen: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)


def leave(child: pexpect.spawn) -> None:
    child.send(CTRL_D)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, plain(child.before)
    assert "Traceback" not in plain(child.before)


def transcript(home: Path, name: str) -> list[dict]:
    path = home / "sessions" / name / "transcript.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.model
def test_history_recalls_across_processes_and_ctrl_c_twice_leaves(tmp_path):
    home = tmp_path / "home"
    child = spawn_chat(home, "-s", "h", *FLAGS)
    expect_prompt(child)
    shown = say(child, "What do bees make?", "model>")
    assert "model>" in shown
    child.send(CTRL_C)
    expect_prompt(child)
    child.send(CTRL_C)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert plain(child.before).endswith("\n")

    child = spawn_chat(home, "-s", "h", *FLAGS)  # resumed: Up recalls the last message
    expect_prompt(child)
    child.send(UP)
    child.expect_exact("What do bees make?")
    child.send("\r")
    child.expect_exact("model>")
    expect_prompt(child)
    leave(child)
    asked = [r["content"] for r in transcript(home, "h") if r.get("role") == "user"]
    assert asked == ["What do bees make?", "What do bees make?"]


@pytest.mark.model
def test_slash_commands_change_the_conversation_and_work_after_a_resume(tmp_path):
    home = tmp_path / "home"
    child = spawn_chat(home, "-s", "c", *FLAGS)
    expect_prompt(child)
    assert "temp = 0.2" in say(child, "/set temp 0.2", "temp = ")
    assert "/set temp: 'hot' is not a number" in say(child, "/set temp hot", "error")
    settings = say(child, "/set", "seed")
    assert re.search(r"temp\s+0\.2", settings) and re.search(r"n_predict\s+16", settings)
    assert "verbose on" in say(child, "/verbose", "verbose ")
    shown = say(child, "Hi, I am Ada.", "first token after")
    assert "model>" in shown and "tok/s" in shown and "cached" in shown
    assert "system prompt set" in say(child, "/system Be brief.", "re-processed")
    assert "Be brief." in say(child, "/system", "Be brief.")
    leave(child)

    child = spawn_chat(home, "-s", "c", *FLAGS)
    expect_prompt(child)
    retried = say(child, "/retry", "model>")
    assert "model>" in retried and "error" not in retried
    assert "took back: Hi, I am Ada." in say(child, "/undo", "took back")
    assert "nothing to undo" in say(child, "/undo", "error")
    assert "unknown command /frobnicate" in say(child, "/frobnicate", "unknown command")
    leave(child)

    records = transcript(home, "c")
    events = [r["event"] for r in records if "event" in r]
    assert events == ["system", "undo", "undo"]
    assert [r.get("for") for r in records if r.get("event") == "undo"] == ["retry", "undo"]
    assert [r["role"] for r in records if "role" in r] == ["user", "assistant"] * 2


@pytest.mark.model
def test_a_stopped_reply_says_interrupted_and_the_chat_goes_on(tmp_path):
    home = tmp_path / "home"
    child = spawn_chat(home, "-s", "i", "--temp", "0", "-n", "3000", "-c", "4096", "-t", "2")
    expect_prompt(child)
    child.send("Count from 1 to 1000: 1, 2, 3, 4,\r")
    child.expect_exact("model>")
    child.expect_exact(", 20,")  # well into the reply
    child.send(CTRL_C)
    child.expect_exact("(interrupted)")
    expect_prompt(child)
    leave(child)
    reply = [r for r in transcript(home, "i") if r.get("role") == "assistant"][-1]
    assert reply["finish_reason"] == "interrupted"


@pytest.mark.model
def test_memory_events_come_before_the_reply(tmp_path):
    from test_chat_controls import LONG

    home = tmp_path / "home"
    child = spawn_chat(home, "-s", "m", "--temp", "0", "-n", "64", "-c", "256", "-t", "2")
    expect_prompt(child)
    before_replies = []
    for fact in LONG[:4]:
        child.send(fact + "\r")
        child.expect_exact("model>")
        before_replies.append(plain(child.before))
        expect_prompt(child)
    leave(child)
    said = [line for text in before_replies for line in text.splitlines() if "context full" in line]
    assert said and all("compressed to" in line for line in said)
