"""kill -9 at many points of a chat turn and of a batch run: every completed turn is in the
transcript once, the session goes on with no manual step, every batch id is reported once.

Kills land at named points of the save (FLASHMEM_TEST_KILL_AT: the process kills itself
there) and at random moments (a SIGKILL from outside after a random delay)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import own_turn_tokens, run_json

pytestmark = pytest.mark.model

FLAGS = ["--temp", "0", "-n", "6", "-c", "512", "-t", "2", "--json"]
KILL_POINTS = [
    "after-append-user",
    "after-append-assistant",
    "before-meta",
    "after-meta",
]


def start(*args: str, kill_at: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200"}
    if kill_at:
        env["FLASHMEM_TEST_KILL_AT"] = kill_at
    return subprocess.Popen(
        [sys.executable, "-m", "flashmem_cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill_after(proc: subprocess.Popen[str], delay: float) -> None:
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)


def records(session_dir: Path) -> list[dict]:
    lines = (session_dir / "transcript.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_chat_survives_kills_in_and_around_the_save(home, model_path):
    rng = random.Random(7)
    run_json("chat", "-s", "k", *FLAGS[:-1], "-p", "Remember the word apple.")
    plan = [(point, None) for point in KILL_POINTS] + [
        (None, rng.uniform(0.5, 3.0)) for _ in range(4)
    ]
    for i, (point, delay) in enumerate(plan):
        proc = start("chat", "-s", "k", *FLAGS, "-p", f"message {i}", kill_at=point)
        if delay is None:
            proc.communicate(timeout=120)
            assert proc.returncode == -signal.SIGKILL, (point, proc.stderr)
        else:
            kill_after(proc, delay)

    final = run_json("chat", "-s", "k", *FLAGS[:-1], "-p", "And now?")
    session_dir = home / "sessions" / "k"
    users = [r["content"] for r in records(session_dir) if r.get("role") == "user"]
    assert len(users) == len(set(users)), "a turn was recorded twice"
    replies = [r for r in records(session_dir) if r.get("role") == "assistant"]
    assert replies[-1]["content"] == final["reply"]
    assert not [p.name for p in session_dir.iterdir() if p.name.endswith(".tmp")]
    # what the last turn saved holds the whole conversation: the next turn feeds only itself
    after = run_json("chat", "-s", "k", *FLAGS[:-1], "-p", "Thanks.")
    assert after["notices"] == []
    assert after["tokens"]["new_prompt"] == own_turn_tokens(model_path, "Thanks.")


def batch_lines(n: int) -> str:
    lines = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 6}
        if i % 2:
            body["session"] = f"b{i % 3}"
        line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
        lines.append(json.dumps({**line, "body": body}))
    return "\n".join(lines) + "\n"


def test_batch_reports_every_id_once_across_kills_and_resumes(home, model_path, tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text(batch_lines(10))
    out, err = tmp_path / "batch.out.jsonl", tmp_path / "batch.errors.jsonl"
    args = ["run", str(source), "-o", str(out), "--errors", str(err), "-q", "--temp", "0"]
    args += ["-c", "512", "-t", "2", "--parallel", "3"]
    kill_after(start(*args, kill_at="after-meta"), 120)
    rng = random.Random(3)
    for _ in range(2):
        kill_after(start(*args, "--resume"), rng.uniform(1.0, 3.0))
    deadline = time.monotonic() + 120
    while True:
        proc = start(*args, "--resume")
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode in (0, 2) or time.monotonic() > deadline:
            break
    assert proc.returncode == 0, stderr
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10))  # each once, none failed
    assert not err.exists() or err.read_text() == ""
    for name in ("b0", "b1", "b2"):
        session_dir = home / "sessions" / name
        if session_dir.exists():
            tagged = [r["batch_id"] for r in records(session_dir) if r.get("role") == "assistant"]
            assert len(tagged) == len(set(tagged)), f"session {name} answered a line twice"
