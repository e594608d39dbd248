"""Sessions on disk: one private directory per conversation, locked while in use.

<sessions dir>/<name>/
  transcript.jsonl  every message, append-only and fsync'd: the source of truth
  meta.json         format version, model, n_ctx, and the KV record: which state files hold
                    the cache, with their sizes and CRC32s
  state.<g>.bin     the KV cache of the conversation (llama_state_seq_save_file), generation g
  memory.<g>.npz    the memory beside it (latents, attention mass), when memory is on

A save writes the generation's files first and renames meta.json over the old one last: that
rename is the one commit point, so a kill leaves either the old KV record or the new one, each
with its own files. Files no record points to (and temp files of killed writes) are removed
whenever the session is opened or saved. The transcript is never rewritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import BaseFileLock

from flashmem_cli.errors import InvalidSessionName, SessionCorrupt, SessionInUse, SessionNotFound
from flashmem_cli.store.files import (
    append_jsonl,
    atomic_write_bytes,
    commit_temp,
    make_private_dir,
    temp_path_beside,
    touch_private,
    try_lock,
)
from flashmem_cli.store.meta import (
    KV_FILE,
    META,
    KVContents,
    KVRecord,
    SessionFromNewerVersion,
    SessionMeta,
    StoredFile,
    now_iso,
    read_meta,
    write_meta,
)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TRANSCRIPT = "transcript.jsonl"
LOCK = ".lock"
ROLES = ("system", "user", "assistant")
PREVIEW_CHARS = 60


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidSessionName(
            f"invalid session name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return name


@dataclass(frozen=True)
class SessionSummary:
    name: str
    messages: int
    updated: str
    model: str
    state_bytes: int
    preview: str = ""  # the first user message, on one line, cut to PREVIEW_CHARS


def describe(path: Path) -> StoredFile:
    """Size and CRC32 of a file as it is on disk."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return StoredFile(path.name, size, crc)


def replace_with(path: Path, write: Callable[[Path], object]) -> StoredFile:
    """`write(tmp_path)` writes a file that replaces `path` only once complete; returns what
    was written, read back from the disk."""
    tmp = temp_path_beside(path)
    try:
        write(tmp)
        stored = describe(tmp)
        commit_temp(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return StoredFile(path.name, stored.size, stored.crc32)


class Session:
    """An open, locked session directory. `notices` says what was repaired when it opened."""

    def __init__(
        self,
        directory: Path,
        lock: BaseFileLock,
        meta: SessionMeta,
        notices: list[str] | None = None,
    ):
        self.dir = directory
        self.name = directory.name
        self._lock: BaseFileLock | None = lock
        self.meta = meta
        self.notices = notices or []

    @property
    def transcript_path(self) -> Path:
        return self.dir / TRANSCRIPT

    def records(self) -> list[dict[str, Any]]:
        return read_transcript(self.dir)

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.transcript_path, {**record, "ts": now_iso()})
        pause_for_tests(f"after-append-{record.get('role') or record.get('event')}")

    def commit_kv(
        self,
        contents: KVContents,
        write_state: Callable[[Path], object],
        write_memory: Callable[[Path], object] | None,
    ) -> None:
        """Save a new KV record: its files under a new generation's names, then meta.json
        (the commit point), then the old generation's files go."""
        generation = (self.meta.kv.generation if self.meta.kv else 0) + 1
        state = replace_with(self.dir / f"state.{generation}.bin", write_state)
        memory = None
        if write_memory is not None:
            memory = replace_with(self.dir / f"memory.{generation}.npz", write_memory)
        meta = self.meta.with_kv(KVRecord(contents, generation, state, memory))
        pause_for_tests("before-meta")
        write_meta(self.dir, meta)
        self.meta = meta
        pause_for_tests("after-meta")
        self.remove_unreferenced()

    def verified(self, stored: StoredFile) -> Path | None:
        """The path of a KV record's file when it is there whole, as recorded; else None."""
        path = self.dir / stored.name
        try:
            return path if describe(path) == stored else None
        except OSError:
            return None

    def input_history(self) -> Path:
        """The chat's line-editor history, private as the transcript it repeats."""
        path = self.dir / "input_history"
        with contextlib.suppress(OSError):  # the editor says it cannot keep one; chat goes on
            touch_private(path)
        return path

    def remove_unreferenced(self) -> None:
        """State files that no KV record points to, and temp files of writes a kill cut short."""
        kv = self.meta.kv
        keep = {kv.state.name, kv.memory.name if kv.memory else ""} if kv else set()
        for path in self.dir.iterdir():
            stale = KV_FILE.fullmatch(path.name) and path.name not in keep
            if stale or (path.name.startswith(".") and path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
        return is_session_dir(self.path(name))

    def new_name(self) -> str:
        """A name for a new session, from the time, that no session has yet."""
        base = datetime.now().strftime("chat-%Y%m%d-%H%M%S")
        name, n = base, 1
        while self.path(name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def open(self, name: str, create: bool = True) -> Session:
        """Lock and open a session, creating it when `create` is set. A damaged meta.json is
        set aside and started afresh (the transcript rebuilds the rest)."""
        directory = self.path(name)
        if not is_session_dir(directory):
            if not create:
                raise SessionNotFound(f"no session named {name!r} (flashmem sessions list)")
            self.root.mkdir(parents=True, exist_ok=True)
            make_private_dir(directory)
        lock = try_lock(directory / LOCK)
        if lock is None:
            raise SessionInUse(f"session {name} is in use by another flashmem process")
        try:
            if not (directory / TRANSCRIPT).is_file():
                touch_private(directory / TRANSCRIPT)
            set_aside_torn_tail(directory / TRANSCRIPT)
            meta, notices = read_or_renew_meta(directory)
            session = Session(directory, lock, meta, notices)
            session.remove_unreferenced()
            return session
        except BaseException:
            lock.release()
            raise

    def list(self) -> list[SessionSummary]:
        if not self.root.is_dir():
            return []
        return [summarize(d) for d in sorted(self.root.iterdir()) if is_session_dir(d)]

    def remove(self, name: str) -> Path:
        """Move a session to the trash (the transcript is never destroyed); returns where."""
        with self.open(name, create=False) as session:
            trash = self.root.parent / "trash"
            make_private_dir(trash)
            stamp = int(time.time())
            target, n = trash / f"{name}-{stamp}", 1
            while target.exists():  # the same name removed twice within a second
                n += 1
                target = trash / f"{name}-{stamp}-{n}"
            session.dir.rename(target)
        return target


def is_session_dir(directory: Path) -> bool:
    return (directory / META).is_file() or (directory / TRANSCRIPT).is_file()


def read_or_renew_meta(directory: Path) -> tuple[SessionMeta, list[str]]:
    """meta.json, or a new one when it is missing or damaged (the damaged one set aside)."""
    path = directory / META
    if not path.exists():
        meta = SessionMeta(directory.name)
        write_meta(directory, meta)
        return meta, []
    try:
        return read_meta(directory), []
    except SessionFromNewerVersion:
        raise
    except SessionCorrupt as exc:
        aside = path.with_name(f"{META}.damaged-{int(time.time())}")
        path.rename(aside)
        meta = SessionMeta(directory.name)
        write_meta(directory, meta)
        return meta, [f"{exc}; set it aside as {aside.name} and started a new one"]


def read_transcript(directory: Path) -> list[dict[str, Any]]:
    """Every whole record; a torn last line (a crash mid-append) is skipped, not removed."""
    path = directory / TRANSCRIPT
    if not path.exists():
        return []
    records = []
    # bytes that are not UTF-8 (written by another program) read as U+FFFD; the file keeps them
    lines = path.read_bytes().decode("utf-8", "replace").splitlines()
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
    atomic_write_bytes(aside, data[tail_start:])
    with open(path, "r+b") as f:
        f.truncate(tail_start)
        os.fsync(f.fileno())


def summarize(directory: Path) -> SessionSummary:
    try:
        meta = read_meta(directory)
        records = read_transcript(directory)
    except SessionCorrupt:
        return SessionSummary(directory.name, 0, "", "(unreadable: sessions show NAME)", 0)
    return SessionSummary(
        name=directory.name,
        messages=sum(1 for r in records if "role" in r),
        updated=meta.updated,
        model=meta.model.name if meta.model else "-",
        state_bytes=meta.kv.state.size if meta.kv else 0,
        preview=preview(records),
    )


def preview(records: list[dict[str, Any]]) -> str:
    """The first user message as one line of at most PREVIEW_CHARS, an ellipsis marking a cut:
    what tells sessions with generated names apart in a listing."""
    first = next((r["content"] for r in records if r.get("role") == "user"), "")
    line = " ".join(first.split())
    return line if len(line) <= PREVIEW_CHARS else line[: PREVIEW_CHARS - 1] + "…"


def pause_for_tests(point: str) -> None:
    """The kill test's hook: with FLASHMEM_TEST_KILL_AT=point the process kills itself there,
    as a power cut or `kill -9` would at that moment."""
    if os.environ.get("FLASHMEM_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
