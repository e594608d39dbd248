"""meta.json: a session's description, typed, with one reader and one writer.

Format 2 (this one): the KV record names the generation's state files with their sizes and
CRC32s. Format 1 had a single unverified state.bin: its record reads as unusable, so the KV
state is rebuilt from the transcript. A newer format is refused, never rewritten.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flashmem_cli.errors import SessionCorrupt
from flashmem_cli.store.files import atomic_write_json

FORMAT_VERSION = 2
META = "meta.json"
KV_FILE = re.compile(r"(state|memory)(\.\d+)?\.(bin|npz)")


class SessionFromNewerVersion(SessionCorrupt):
    """meta.json of a format this flashmem does not know: left alone, never renewed."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StoredFile:
    """A file of the KV record: checked against its size and CRC32 before anything reads it."""

    name: str
    size: int
    crc32: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.name, "bytes": self.size, "crc32": self.crc32}

    @classmethod
    def from_dict(cls, data: Any) -> StoredFile:
        name = str(data["file"])
        if not KV_FILE.fullmatch(name):
            raise ValueError(f"not a state file name: {name!r}")
        return cls(name, int(data["bytes"]), int(data["crc32"]))


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: str
    fingerprint: str


@dataclass(frozen=True)
class KVContents:
    """What a saved KV state holds: made by which model at which -c, which tokens, laid out how
    (the layout is the chat's own bookkeeping, stored as it gives it)."""

    model: ModelRef
    n_ctx: int
    n_tokens: int
    digest: str
    layout: dict[str, Any]
    template: str = ""  # the chat template's digest ("": saved before flashmem recorded it)
    fed: str = ""  # digest of the messages the cache took in ("": saved before it was recorded)


@dataclass(frozen=True)
class KVRecord:
    contents: KVContents
    generation: int
    state: StoredFile
    memory: StoredFile | None

    def to_dict(self) -> dict[str, Any]:
        c = self.contents
        return {
            "model": c.model.name,
            "fingerprint": c.model.fingerprint,
            "n_ctx": c.n_ctx,
            "n_tokens": c.n_tokens,
            "digest": c.digest,
            "layout": c.layout,
            "template": c.template,
            "fed": c.fed,
            "generation": self.generation,
            "state": self.state.to_dict(),
            "memory": self.memory.to_dict() if self.memory else None,
        }

    @classmethod
    def from_dict(cls, data: Any, model: ModelRef | None) -> KVRecord:
        """Raises KeyError, TypeError or ValueError for a record of another shape or format."""
        ref = ModelRef(str(data["model"]), model.path if model else "", str(data["fingerprint"]))
        layout = data["layout"]
        if not isinstance(layout, dict):
            raise TypeError("layout is not an object")
        contents = KVContents(
            ref,
            int(data["n_ctx"]),
            int(data["n_tokens"]),
            str(data["digest"]),
            layout,
            str(data.get("template", "")),
            str(data.get("fed", "")),
        )
        memory = StoredFile.from_dict(data["memory"]) if data.get("memory") else None
        return cls(contents, int(data["generation"]), StoredFile.from_dict(data["state"]), memory)


@dataclass
class SessionMeta:
    name: str
    created: str = field(default_factory=now_iso)
    updated: str = ""
    model: ModelRef | None = None
    n_ctx: int | None = None
    kv: KVRecord | None = None
    kv_unusable: bool = False  # a KV record was there but damaged or of format 1

    def with_kv(self, kv: KVRecord) -> SessionMeta:
        c = kv.contents
        return replace(self, model=c.model, n_ctx=c.n_ctx, kv=kv, kv_unusable=False)

    def to_dict(self) -> dict[str, Any]:
        model = self.model
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "created": self.created,
            "updated": self.updated or self.created,
            "model": None
            if model is None
            else {"name": model.name, "path": model.path, "fingerprint": model.fingerprint},
            "n_ctx": self.n_ctx,
            "kv": self.kv.to_dict() if self.kv else None,
        }


def write_meta(directory: Path, meta: SessionMeta) -> None:
    meta.updated = now_iso()
    atomic_write_json(directory / META, meta.to_dict())


def read_meta(directory: Path) -> SessionMeta:
    """meta.json as written by `write_meta`; SessionCorrupt for anything else."""
    data = _read_json(directory)
    if data["format"] > FORMAT_VERSION:
        raise SessionFromNewerVersion(
            f"session {directory.name!r} was written by a newer flashmem (format "
            f"{data['format']}; this one reads up to {FORMAT_VERSION})"
        )
    try:
        model = _model_ref(data.get("model"))
        meta = SessionMeta(
            name=directory.name,
            created=str(data.get("created", "")),
            updated=str(data.get("updated", "")),
            model=model,
            n_ctx=int(data["n_ctx"]) if data.get("n_ctx") is not None else None,
        )
    except (KeyError, TypeError, ValueError):
        raise SessionCorrupt(
            f"session {directory.name!r} has a meta.json of the wrong shape"
        ) from None
    if data.get("kv") is not None:
        try:
            meta.kv = KVRecord.from_dict(data["kv"], model)
        except (KeyError, TypeError, ValueError):
            meta.kv_unusable = True
    return meta


def _read_json(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / META).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise SessionCorrupt(
            f"session {directory.name!r} has an unreadable meta.json: {exc}"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("format"), int):
        raise SessionCorrupt(f"session {directory.name!r} has a meta.json of the wrong shape")
    return data


def _model_ref(data: Any) -> ModelRef | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise TypeError("model is not an object")
    return ModelRef(str(data["name"]), str(data.get("path", "")), str(data.get("fingerprint", "")))
