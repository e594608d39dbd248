"""What memory did to a conversation's cache: one typed event, one reader, one writer.

Events go to the transcript as `{"event": "memory", ...}` lines, to a turn's `--json` and to
`/memory`; this module is the only place that knows their fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONSOLIDATION_KINDS = ("turns", "memory")  # whole turns folded at the budget, or older memory
INSERTION = "monitor"  # latents the monitor inserted into a reply


@dataclass(frozen=True)
class MemoryEvent:
    kind: str
    latents: int
    ms: float
    span: tuple[int, int] = (0, 0)  # consolidations: the positions folded
    kept: int = 0
    after_tokens: int = 0
    turns: int = 0
    step: int = 0  # insertions: the reply token where the monitor fired
    position: int = 0  # insertions: where the latents went
    ts: str = ""  # when the transcript recorded it

    @property
    def span_tokens(self) -> int:
        return self.span[1] - self.span[0]

    def to_dict(self) -> dict[str, Any]:
        """The event as `--json` and the transcript show it (without `ts`)."""
        if self.kind == INSERTION:
            return {
                "kind": self.kind,
                "step": self.step,
                "position": self.position,
                "latents": self.latents,
                "ms": self.ms,
            }
        return {
            "kind": self.kind,
            "turns": self.turns,
            "span": list(self.span),
            "span_tokens": self.span_tokens,
            "kept": self.kept,
            "latents": self.latents,
            "after_tokens": self.after_tokens,
            "ms": self.ms,
        }

    def to_record(self) -> dict[str, Any]:
        return {"event": "memory", **self.to_dict()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MemoryEvent:
        """A transcript's memory event (fields it lacks take their defaults)."""
        span = record.get("span") or (0, 0)
        return cls(
            kind=str(record.get("kind", "turns")),
            latents=int(record.get("latents", 0)),
            ms=float(record.get("ms", 0.0)),
            span=(int(span[0]), int(span[1])),
            kept=int(record.get("kept", 0)),
            after_tokens=int(record.get("after_tokens", 0)),
            turns=int(record.get("turns", 0)),
            step=int(record.get("step", 0)),
            position=int(record.get("position", 0)),
            ts=str(record.get("ts", "")),
        )

    def describe(self) -> str:
        """One line in plain words, for people."""
        if self.kind == INSERTION:
            return (
                f"attention entropy passed τ at reply token {self.step}: "
                f"{self.latents} latents inserted ({self.ms:.0f} ms)"
            )
        what = f"{self.turns} oldest turn(s)" if self.turns else "older memory"
        return (
            f"context at budget: consolidated {what}, {self.span_tokens} tokens -> "
            f"{self.kept} kept + {self.latents} latents ({self.ms:.0f} ms; "
            "the transcript keeps everything)"
        )

    def headline(self) -> str:
        """The event in one sentence for someone who knows nothing of KV caches."""
        if self.kind == INSERTION:
            return f"memory: recalled {self.latents} memory tokens at reply token {self.step}"
        kept = self.kept + self.latents
        what = (
            "older memory"
            if not self.turns
            else ("your oldest turn" if self.turns == 1 else f"your {self.turns} oldest turns")
        )
        return (
            f"context full: {what} ({self.span_tokens} tokens) "
            f"{'was' if self.turns <= 1 else 'were'} compressed to {kept} tokens of memory"
        )


def memory_events(records: list[dict[str, Any]]) -> list[MemoryEvent]:
    return [MemoryEvent.from_record(r) for r in records if r.get("event") == "memory"]
