"""Durable, private file writes (atomic replace, fsync'd appends) and cross-platform locks.

The operating-system-specific calls of the store live here and nowhere else.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from filelock import BaseFileLock, FileLock, Timeout

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def temp_path_beside(path: Path) -> Path:
    """A fresh name next to `path` for writers that need a path rather than bytes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit_temp(tmp: Path, path: Path) -> None:
    """fsync a finished temp file and rename it over `path`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one whole line and fsync it before returning; a new file is private."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _BINARY, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def touch_private(path: Path) -> None:
    """Create `path` empty and readable by its owner alone (whatever the umask)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | _BINARY, PRIVATE_FILE))
    os.chmod(path, PRIVATE_FILE)


def make_private_dir(path: Path) -> None:
    """Create `path` (and its parents) with the last one readable by its owner alone."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)


def try_lock(path: Path) -> BaseFileLock | None:
    """An exclusive lock held through the file `path` until `.release()`; None when another
    process (or another open of it in this one) holds it. fcntl on Unix, msvcrt on Windows."""
    lock = FileLock(path, timeout=0, thread_local=False, mode=PRIVATE_FILE)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (Windows has no directory handles to sync)."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_BINARY = getattr(os, "O_BINARY", 0)
