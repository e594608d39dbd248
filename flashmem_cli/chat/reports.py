"""What a conversation reports about itself: /stats, /memory and a turn's memory (typed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from flashmem_cli.chat.events import MemoryEvent
from flashmem_cli.engine.sequence import LATENT


@dataclass(frozen=True)
class ChatStats:
    """What the KV cache holds (/stats)."""

    session: str
    model: str
    n_ctx: int
    kv_tokens: int
    pinned_tokens: int
    turns_in_kv: int
    turns_dropped: int
    turns_consolidated: int
    memory_tokens: int
    messages: int
    template: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TurnMemory:
    """What memory did during one turn."""

    consolidations: list[MemoryEvent]
    entropy: list[float]  # the monitor's attention entropy of each reply token
    triggers: list[int]  # reply tokens where it passed τ

    def to_dict(self) -> dict[str, Any]:
        return {
            "consolidations": [event.to_dict() for event in self.consolidations],
            "entropy": self.entropy,
            "triggers": self.triggers,
        }


@dataclass(frozen=True)
class RoomMade:
    """What left the cache to make room for a turn, before its reply."""

    consolidations: list[MemoryEvent]
    dropped_turns: int
    dropped_tokens: int

    def lines(self) -> list[str]:
        """One line per thing that happened, in words for people."""
        lines = [event.headline() for event in self.consolidations]
        if self.dropped_turns:
            turns = _turns(self.dropped_turns)
            lines.append(
                f"context full: {turns} ({self.dropped_tokens} tokens) no longer fit and "
                "left the model's view; the transcript keeps them"
            )
        elif self.dropped_tokens:
            lines.append(
                f"context full: {self.dropped_tokens} tokens of memory no longer fit and left "
                "the model's view; the transcript keeps what they came from"
            )
        return lines


def _turns(n: int) -> str:
    return "your oldest turn" if n == 1 else f"your {n} oldest turns"


@dataclass(frozen=True)
class LatentBlock:
    index: int
    start: int  # first position
    length: int


@dataclass(frozen=True)
class MemoryReport:
    """/memory: settings, the latent blocks in the cache, every memory event."""

    settings: dict[str, Any]
    latent_blocks: list[LatentBlock]
    events: list[MemoryEvent]


def latent_blocks(tokens: list[int]) -> list[LatentBlock]:
    """Runs of latent cells in the cache."""
    blocks: list[LatentBlock] = []
    for position, token in enumerate(tokens):
        if token != LATENT:
            continue
        if blocks and blocks[-1].start + blocks[-1].length == position:
            last = blocks[-1]
            blocks[-1] = LatentBlock(last.index, last.start, last.length + 1)
        else:
            blocks.append(LatentBlock(len(blocks), position, 1))
    return blocks
