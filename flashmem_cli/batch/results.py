"""Batch output: OpenAI's batch output lines, written whole and flushed; resume bookkeeping."""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flashmem_cli.batch.requests import BatchRequest, LineError


@dataclass
class Completion:
    """What the scheduler produced for one request."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def success_line(request: BatchRequest, result: Completion, model: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": request.id,
        "response": {
            "status_code": 200,
            "request_id": uuid.uuid4().hex,
            "body": response_body(request, result, model),
        },
        "error": None,
    }


def error_line(error: LineError) -> dict[str, Any]:
    """A failed line. --resume matches it by `flashmem.line`, not by `custom_id` (a
    duplicate_id line shares its id with the line that ran, and a line that is not JSON has only
    its fallback `line-N`); `error.code` says whether --resume runs it again."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": error.id,
        "response": None,
        "error": {"code": error.code, "message": error.message},
        "flashmem": {"line": error.line},
    }


def response_body(request: BatchRequest, result: Completion, model: str) -> dict[str, Any]:
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
    flashmem = {
        "line": request.line,
        "requested_model": request.requested_model,
        "timings_ms": result.timings_ms,
        "memory_events": [],
        **result.extra,
    }
    created = int(time.time())
    finish = "length" if result.finish_reason == "length" else "stop"
    if request.kind == "chat":
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
            "flashmem": flashmem,
        }
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
        "flashmem": flashmem,
    }


class JsonlWriter:
    """Appends whole lines, each flushed to the OS before the next request is reported done."""

    def __init__(self, stream: IO[str], durable: bool):
        self.stream = stream
        # fsync is for files: on /dev/null or a pipe it fails (EINVAL)
        self.durable = durable and stat.S_ISREG(os.fstat(stream.fileno()).st_mode)

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
        if self.durable:
            os.fsync(self.stream.fileno())


RETRIED_ON_RESUME = frozenset({"session_in_use", "request_failed"})
"""Error codes of a passing condition (a session busy in another process, a decode or other
failure of the moment): --resume runs these lines again instead of counting them done."""


@dataclass(frozen=True)
class DoneSet:
    """What an earlier run already wrote: ids that succeeded, lines that failed for good."""

    ids: frozenset[str]
    error_lines: frozenset[int]  # without lines whose code is in RETRIED_ON_RESUME

    def has(self, item: BatchRequest | LineError) -> bool:
        return item.line in self.error_lines or (
            isinstance(item, BatchRequest) and item.id in self.ids
        )


def scan_done(out_path: Path, err_path: Path) -> DoneSet:
    """Read earlier results, first cutting a torn last line (a kill mid-write) from each file."""
    ids = {record.get("custom_id") for record in read_repaired(out_path)}
    lines = {
        _field(record, "flashmem", "line")
        for record in read_repaired(err_path)
        if _field(record, "error", "code") not in RETRIED_ON_RESUME
    }
    return DoneSet(
        frozenset(i for i in ids if isinstance(i, str)),
        frozenset(n for n in lines if isinstance(n, int)),
    )


def _field(record: dict[str, Any], outer: str, inner: str) -> object:
    """record[outer][inner] when record[outer] is an object holding a string or number."""
    value = record.get(outer)
    found = value.get(inner) if isinstance(value, dict) else None
    return found if isinstance(found, (str, int)) else None


def read_repaired(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    records = []
    for raw in whole.splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
