"""What a conversation's KV cache holds, turn by turn: pure bookkeeping, no model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass
class KVLayout:
    """The KV cache holds `pinned` tokens (BOS, system prompt), then `memory` tokens (latents
    and kept positions of consolidated turns), then one block per turn.

    `messages` counts the conversation's messages whose text the cache has taken in, including
    those of turns since dropped or consolidated to make room.
    """

    pinned: int = 0
    turns: list[int] = field(default_factory=list)
    messages: int = 0
    dropped: int = 0
    memory: int = 0
    consolidated: int = 0

    @property
    def n_tokens(self) -> int:
        return self.pinned + self.memory + sum(self.turns)

    def oldest_turn_span(self) -> tuple[int, int]:
        start = self.pinned + self.memory
        return start, start + self.turns[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        return cls(
            pinned=int(data["pinned"]),
            turns=[int(n) for n in data["turns"]],
            messages=int(data["messages"]),
            dropped=int(data.get("dropped", 0)),
            memory=int(data.get("memory", 0)),
            consolidated=int(data.get("consolidated", 0)),
        )


def split_turns(messages: list[Message]) -> list[list[Message]]:
    """Group messages into turns: each user message starts one; a leading system prompt joins
    the first."""
    groups: list[list[Message]] = []
    for message in messages:
        starts_turn = message["role"] == "user" and not (
            len(groups) == 1 and [m["role"] for m in groups[0]] == ["system"]
        )
        if not groups or starts_turn:
            groups.append([message])
        else:
            groups[-1].append(message)
    return groups


def conversation_messages(records: list[dict[str, Any]]) -> list[Message]:
    """The messages since the last reset, as the template sees them. A user message that got
    no reply (a turn interrupted before its reply was recorded) is left out when another user
    message follows, so roles still alternate; the transcript keeps it. An `undo` takes back
    the last user message and what followed it; a `system` event sets the system prompt."""
    messages: list[Message] = []
    for record in records:
        event = record.get("event")
        if event == "reset":
            messages = []
        elif event == "undo":
            undone = last_user_index(messages)
            messages = messages if undone is None else messages[:undone]
        elif event == "system":
            messages = with_system_prompt(messages, str(record.get("content", "")))
        elif "role" in record:
            if record["role"] == "user" and messages and messages[-1]["role"] == "user":
                messages.pop()
            messages.append({"role": record["role"], "content": record["content"]})
    return messages


def last_user_index(messages: list[Message]) -> int | None:
    return next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None
    )


def with_system_prompt(messages: list[Message], system: str) -> list[Message]:
    """`messages` with `system` as their system prompt (none when it is empty)."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return ([{"role": "system", "content": system}] if system else []) + rest


def messages_digest(messages: list[Message]) -> str:
    """Identifies the messages a cache took in: an undo or a new system prompt changes them."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokens_digest(tokens: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:16]
