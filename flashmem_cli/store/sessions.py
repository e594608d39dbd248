"""Sessions on disk: one directory per conversation, written atomically, locked while in use.

<sessions dir>/<name>/
  meta.json         format version, model, n_ctx, settings, what the KV state holds
  transcript.jsonl  every message, append-only and fsync'd: the source of truth
  state.bin         the KV cache of the conversation (llama_state_seq_save_file)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flashmem_cli.errors import InvalidSessionName, SessionCorrupt, SessionInUse, SessionNotFound
from flashmem_cli.store.files import append_jsonl, atomic_write_json, commit_temp, temp_path_beside

FORMAT_VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
META = "meta.json"
TRANSCRIPT = "transcript.jsonl"
STATE = "state.bin"
MEMORY = "memory.npz"
LOCK = ".lock"
ROLES = ("system", "user", "assistant")


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidSessionName(
            f"invalid session name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return name


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SessionSummary:
    name: str
    messages: int
    updated: str
    model: str
    state_bytes: int


def replace_with(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp_path)` writes a file that replaces `path` only once complete."""
    tmp = temp_path_beside(path)
    try:
        write(tmp)
        commit_temp(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Session:
    """An open, locked session directory."""

    def __init__(self, directory: Path, lock_fd: int):
        self.dir = directory
        self.name = directory.name
        self._lock_fd: int | None = lock_fd
        self.meta: dict[str, Any] = read_meta(directory)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE

    @property
    def transcript_path(self) -> Path:
        return self.dir / TRANSCRIPT

    def records(self) -> list[dict[str, Any]]:
        return read_transcript(self.dir)

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.transcript_path, {**record, "ts": now_iso()})

    def save_meta(self) -> None:
        self.meta["updated"] = now_iso()
        atomic_write_json(self.dir / META, self.meta)

    @property
    def memory_path(self) -> Path:
        return self.dir / MEMORY

    def save_state(self, write: Callable[[Path], object]) -> None:
        """`write(tmp_path)` writes the state; it replaces state.bin only once complete."""
        replace_with(self.state_path, write)

    def save_memory(self, write: Callable[[Path], object]) -> None:
        replace_with(self.memory_path, write)

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / META).is_file()

    def new_name(self) -> str:
        """A name for a new session, from the time, that no session has yet."""
        base = datetime.now().strftime("chat-%Y%m%d-%H%M%S")
        name, n = base, 1
        while self.path(name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def open(self, name: str, create: bool = True) -> Session:
        """Lock and open a session, creating it when `create` is set."""
        directory = self.path(name)
        if not (directory / META).is_file():
            if not create:
                raise SessionNotFound(f"no session named {name!r} (flashmem sessions list)")
            directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory, name)
        try:
            if not (directory / META).is_file():
                atomic_write_json(directory / META, new_meta(name))
                (directory / TRANSCRIPT).touch()
            set_aside_torn_tail(directory / TRANSCRIPT)
            return Session(directory, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def list(self) -> list[SessionSummary]:
        if not self.root.is_dir():
            return []
        return [summarize(d) for d in sorted(self.root.iterdir()) if (d / META).is_file()]

    def remove(self, name: str) -> Path:
        """Move a session to the trash (the transcript is never destroyed); returns where."""
        with self.open(name, create=False) as session:
            trash = self.root.parent / "trash"
            trash.mkdir(parents=True, exist_ok=True)
            target = trash / f"{name}-{int(time.time())}"
            shutil.move(str(session.dir), target)
        return target


def new_meta(name: str) -> dict[str, Any]:
    stamp = now_iso()
    return {
        "format": FORMAT_VERSION,
        "name": name,
        "created": stamp,
        "updated": stamp,
        "model": None,
        "n_ctx": None,
        "kv": None,
    }


def read_meta(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SessionCorrupt(
            f"session {directory.name!r} has an unreadable meta.json: {exc}"
        ) from exc
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("model") or {}, dict)
        and isinstance(meta.get("kv") or {}, dict)
        and isinstance(meta.get("n_ctx") or 0, int)
    ):
        raise SessionCorrupt(f"session {directory.name!r} has a meta.json of the wrong shape")
    if meta.get("format") != FORMAT_VERSION:
        raise SessionCorrupt(
            f"session {directory.name!r} has format {meta.get('format')}, expected {FORMAT_VERSION}"
        )
    return meta


def read_transcript(directory: Path) -> list[dict[str, Any]]:
    """Every whole record; a torn last line (a crash mid-append) is skipped, not removed."""
    path = directory / TRANSCRIPT
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise SessionCorrupt(
                f"{path} line {number} is not valid JSON; fix or remove that line by hand"
            ) from None
        if not is_record(record):
            raise SessionCorrupt(f"{path} line {number} is not a message or an event")
        records.append(record)
    return records


def is_record(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    if "event" in record:
        return isinstance(record["event"], str)
    return record.get("role") in ROLES and isinstance(record.get("content"), str)


def set_aside_torn_tail(path: Path) -> None:
    """A last line cut short by a crash is copied beside the transcript and cut off it, so the
    next append starts a line of its own."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return
    tail_start = data.rfind(b"\n") + 1
    aside = path.with_name(f"{path.name}.torn-{int(time.time())}")
    aside.write_bytes(data[tail_start:])
    with open(path, "r+b") as f:
        f.truncate(tail_start)
        os.fsync(f.fileno())


def summarize(directory: Path) -> SessionSummary:
    try:
        meta = read_meta(directory)
        records = read_transcript(directory)
    except SessionCorrupt:
        return SessionSummary(directory.name, 0, "", "(unreadable: sessions show NAME)", 0)
    state = directory / STATE
    return SessionSummary(
        name=directory.name,
        messages=sum(1 for r in records if "role" in r),
        updated=meta.get("updated", ""),
        model=(meta.get("model") or {}).get("name", "-"),
        state_bytes=state.stat().st_size if state.exists() else 0,
    )


def _lock(directory: Path, name: str) -> int:
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SessionInUse(f"session {name} is in use by another flashmem process") from None
    return fd
