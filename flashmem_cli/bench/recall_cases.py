"""Recall cases for `flashmem eval recall`: parsing, validation and gap-recovered scoring.

A recall file is JSONL, one case per line (blank lines are skipped):

    {"id": "...", "turns": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
     "probes": [{"question": "...", "answer": "..."}, ...]}

The early turns of a case state facts; later turns push them far back in the context; the
probes ask for those facts after the context has filled. Each probe is scored under the full
context ("full"), plain truncation ("truncate") and a memory policy; `gap_recovered` says how
much of the loss that truncation causes the policy wins back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashmem_cli.errors import FlashmemError

EXAMPLE_FILE = "recall.jsonl"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Probe:
    question: str
    answer: str


@dataclass(frozen=True)
class RecallCase:
    id: str
    turns: list[dict[str, str]]
    probes: list[Probe]


class RecallFileError(FlashmemError):
    """A recall file that is not valid JSONL of recall cases; the message names the line."""


class _Invalid(Exception):
    """What is wrong with one line; `parse_cases` adds the source and line number."""


def parse_cases(lines: Iterable[str], source: str = "<input>") -> list[RecallCase]:
    """Parse and validate JSONL recall cases; raise RecallFileError on the first bad line."""
    cases: list[RecallCase] = []
    seen: set[str] = set()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            case = _parse_case(line)
            if case.id in seen:
                raise _Invalid(f"duplicate id {case.id!r}")
        except _Invalid as exc:
            raise RecallFileError(f"{source}:{line_no}: {exc}") from None
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise RecallFileError(f"{source}: no cases")
    return cases


def _parse_case(line: str) -> RecallCase:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"malformed JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise _Invalid("line is not a JSON object")
    case_id = _text(obj.get("id"), "'id'")
    return RecallCase(id=case_id, turns=_turns(obj.get("turns")), probes=_probes(obj.get("probes")))


def _turns(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _Invalid("'turns' must be a non-empty list")
    turns = [_turn(item, index) for index, item in enumerate(raw)]
    _check_order(turns)
    return turns


def _turn(item: Any, index: int) -> dict[str, str]:
    if not isinstance(item, dict):
        raise _Invalid(f"turns[{index}] is not an object")
    role = item.get("role")
    if role not in ROLES:
        raise _Invalid(f"turns[{index}].role must be one of {', '.join(ROLES)}")
    content = _text(item.get("content"), f"turns[{index}].content")
    return {"role": role, "content": content}


def _check_order(turns: list[dict[str, str]]) -> None:
    """A system turn only first; then user, assistant, user, ... ending with assistant."""
    start = 1 if turns[0]["role"] == "system" else 0
    if start == len(turns):
        raise _Invalid("'turns' has no user/assistant exchange")
    for index in range(start, len(turns)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        role = turns[index]["role"]
        if role == "system":
            raise _Invalid(f"turns[{index}]: a system turn may only come first")
        if role != expected:
            raise _Invalid(f"turns[{index}].role is {role!r}, expected {expected!r}")
    if turns[-1]["role"] != "assistant":
        raise _Invalid("the last turn must be an assistant turn")


def _probes(raw: Any) -> list[Probe]:
    if not isinstance(raw, list) or not raw:
        raise _Invalid("'probes' must be a non-empty list")
    return [_probe(item, index) for index, item in enumerate(raw)]


def _probe(item: Any, index: int) -> Probe:
    if not isinstance(item, dict):
        raise _Invalid(f"probes[{index}] is not an object")
    question = _text(item.get("question"), f"probes[{index}].question")
    answer = _text(item.get("answer"), f"probes[{index}].answer")
    return Probe(question=question, answer=answer)


def _text(value: Any, what: str) -> str:
    """`value` if it is a string with something other than whitespace in it."""
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"{what} must be a non-empty string")
    return value


def gap_recovered(
    policy: float, truncate: float, full: float, min_gap: float = 0.05
) -> float | None:
    """Share of the truncation loss the policy recovers: 0 = no better than truncation, 1 = full.

    None when truncation costs less than `min_gap` (the probe was not hurt, so it says nothing).
    """
    gap = full - truncate
    if gap < min_gap:
        return None
    return (policy - truncate) / gap


def gains_and_gaps(
    scores: list[dict[str, float]], policy: str, min_gap: float = 0.05
) -> tuple[list[float], list[float]]:
    """Over the probes truncation hurt (by `min_gap` or more): what `policy` won back over
    truncation, and what truncation lost against the full context, probe by probe."""
    hurt = [probe for probe in scores if probe["full"] - probe["truncate"] >= min_gap]
    gains = [probe[policy] - probe["truncate"] for probe in hurt]
    gaps = [probe["full"] - probe["truncate"] for probe in hurt]
    return gains, gaps


def case_gains_and_gaps(
    cases: list[list[dict[str, float]]], policy: str
) -> tuple[list[float], list[float]]:
    """`gains_and_gaps` summed within each case, for the cases with a hurt probe: the unit a
    bootstrap resamples, since a case's probes share its consolidations."""
    sums = [tuple(map(sum, gains_and_gaps(probes, policy))) for probes in cases]
    hurt = [(gain, gap) for gain, gap in sums if gap > 0]
    return [gain for gain, _ in hurt], [gap for _, gap in hurt]


def pooled_gap_recovered(scores: list[dict[str, float]], policy: str) -> float | None:
    """The share of the whole truncation loss `policy` recovers: summed gains over summed gaps
    of the hurt probes. Pooled rather than a mean of per-probe ratios, which a probe barely hurt
    can swing by tens. None when no probe was hurt."""
    gains, gaps = gains_and_gaps(scores, policy)
    return sum(gains) / sum(gaps) if gaps else None


def example_path() -> Path:
    """The example recall file shipped with flashmem."""
    return Path(__file__).parent / "data" / EXAMPLE_FILE
