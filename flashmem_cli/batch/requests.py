"""Batch input lines: OpenAI's batch format or a simple one, parsed and checked (pure).

Every line becomes either a `BatchRequest` or a `LineError`; nothing here raises.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from flashmem_cli.errors import InvalidSessionName
from flashmem_cli.store.sessions import validate_name

Message = dict[str, str]
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
ROLES = ("system", "user", "assistant")
MAX_NUMBER = 2**31 - 1


@dataclass(frozen=True)
class BatchRequest:
    line: int
    id: str
    kind: str  # "chat" or "completion"
    messages: list[Message] = field(default_factory=list)
    prompt: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    session: str | None = None
    requested_model: str | None = None


@dataclass(frozen=True)
class LineError:
    line: int
    id: str
    code: str
    message: str


class _Invalid(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def parse_lines(data: bytes) -> list[BatchRequest | LineError]:
    """Each non-blank line, in order; a repeated id is an error on its later lines."""
    parsed: list[BatchRequest | LineError] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        item = parse_line(number, raw)
        if item.id in seen and not (isinstance(item, LineError) and item.code == "duplicate_id"):
            item = LineError(number, item.id, "duplicate_id", f"id {item.id!r} appears earlier")
        seen.add(item.id)
        parsed.append(item)
    return parsed


def parse_line(number: int, raw: bytes) -> BatchRequest | LineError:
    fallback_id = f"line-{number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return LineError(
            number, fallback_id, "invalid_encoding", f"line is not UTF-8 ({exc.reason})"
        )
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return LineError(number, fallback_id, "invalid_json", f"malformed JSON: {exc.msg}")
    except (RecursionError, ValueError) as exc:
        return LineError(number, fallback_id, "invalid_json", f"malformed JSON: {exc}")
    if not _encodable(obj):
        return LineError(
            number, fallback_id, "invalid_encoding", "line has an unpaired surrogate escape"
        )
    if not isinstance(obj, dict):
        return LineError(number, fallback_id, "invalid_request", "line is not a JSON object")
    request_id = _id_of(obj, fallback_id)
    try:
        if "body" in obj or "url" in obj or "custom_id" in obj:
            return _openai_request(number, request_id, obj)
        return _simple_request(number, request_id, obj)
    except _Invalid as exc:
        return LineError(number, request_id, exc.code, exc.message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _encodable(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def shard_of(request_id: str, n_shards: int) -> int:
    """Which of `n_shards` shards an id belongs to: stable across machines and runs."""
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


def _id_of(obj: dict[str, Any], fallback: str) -> str:
    value = obj.get("custom_id", obj.get("id"))
    return value if isinstance(value, str) and value else fallback


def _openai_request(number: int, request_id: str, obj: dict[str, Any]) -> BatchRequest:
    if not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
        raise _Invalid("invalid_request", "custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise _Invalid("invalid_request", f"method must be POST, not {obj.get('method')!r}")
    url = obj.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise _Invalid("unknown_url", f"url must be {CHAT_URL} or {COMPLETIONS_URL}, not {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Invalid("invalid_request", "body must be a JSON object")
    kind = "chat" if url == CHAT_URL else "completion"
    return _request(number, request_id, kind, body)


def _simple_request(number: int, request_id: str, obj: dict[str, Any]) -> BatchRequest:
    if "messages" in obj:
        return _request(number, request_id, "chat", obj)
    if "prompt" in obj:
        return _request(number, request_id, "completion", obj)
    raise _Invalid("invalid_request", "line needs a 'prompt' or 'messages' field")


def _request(number: int, request_id: str, kind: str, body: dict[str, Any]) -> BatchRequest:
    if body.get("n", 1) != 1:
        raise _Invalid("invalid_request", "only n = 1 is supported")
    return BatchRequest(
        line=number,
        id=request_id,
        kind=kind,
        messages=_messages(body) if kind == "chat" else [],
        prompt=_prompt(body) if kind == "completion" else "",
        max_tokens=_first_set(
            _max_tokens(body, "max_completion_tokens"), _max_tokens(body, "max_tokens")
        ),
        temperature=_number(body, "temperature", float),
        top_p=_number(body, "top_p", float),
        seed=_number(body, "seed", int),
        stop=_stop(body.get("stop")),
        session=_session(body.get("session")),
        requested_model=body.get("model") if isinstance(body.get("model"), str) else None,
    )


def _messages(body: dict[str, Any]) -> list[Message]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("invalid_request", "messages must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _Invalid("invalid_request", f"messages[{i}] needs a role of {', '.join(ROLES)}")
        parsed.append({"role": message["role"], "content": _content(message.get("content"), i)})
    if all(m["role"] == "system" for m in parsed):
        raise _Invalid("invalid_request", "messages need a user (or assistant) message")
    if body.get("session") is not None and parsed[-1]["role"] != "user":
        raise _Invalid("invalid_request", "a session line's last message must be the user's")
    return parsed


def _content(content: Any, index: int) -> str:
    """A string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _Invalid("invalid_request", f"messages[{index}].content must be text")


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _Invalid("invalid_request", "prompt must be a string")
    return prompt


def _number(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("invalid_request", f"{key} must be a number")
    if not math.isfinite(value) or abs(value) > MAX_NUMBER:
        raise _Invalid("invalid_request", f"{key} is out of range")
    if kind is int and value != int(value):
        raise _Invalid("invalid_request", f"{key} must be an integer")
    if value < 0:
        raise _Invalid("invalid_request", f"{key} must not be negative")
    return kind(value)


def _max_tokens(body: dict[str, Any], key: str) -> int | None:
    """A positive integer, or None: the line takes -n (`-n -1` is how a run has no limit)."""
    value = body.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise _Invalid("invalid_request", f"{key} must be a positive integer, not {value}")
    result: int | None = _number(body, key, int)
    return result


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _Invalid("invalid_request", "stop must be a string or a list of strings")
    return tuple(stop)


def _session(name: Any) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise _Invalid("invalid_session", "session must be a string")
    try:
        return validate_name(name)
    except InvalidSessionName as exc:
        raise _Invalid("invalid_session", str(exc)) from None
