"""`flashmem eval recall`: how much of a conversation's early facts survive a full context.

Each case's turns are fed into a fresh session under each policy, then every probe question is
asked and the reference answer scored teacher-forced (mean log-probability per token):
- full: a context large enough for everything (the ceiling);
- truncate: at the budget the oldest turns are dropped (what other local CLIs do);
- flashmem: at the budget the oldest turns are consolidated (default settings);
- keep-only / latents-only: the ablations (kept positions without latents, latents alone).
gap_recovered = (flashmem - truncate) / (full - truncate), over probes truncation hurt.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flashmem_cli.bench.recall_cases import RecallCase, mean_gap_recovered
from flashmem_cli.chat.conversation import ChatOptions, Conversation, LoadedModel
from flashmem_cli.chat.memory import MemoryOptions
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.errors import ContextOverflow
from flashmem_cli.memory.consolidator import DEFAULT_LATENTS
from flashmem_cli.store.sessions import SessionStore

POLICIES = ("full", "truncate", "flashmem", "keep-only", "latents-only")
PROBE_ROOM = 64  # tokens beyond a case's turns and its longest probe that `full` leaves


@dataclass(frozen=True)
class RecallSettings:
    n_ctx: int
    memory: MemoryOptions  # the flashmem policy's settings; the others derive from it
    policies: tuple[str, ...] = POLICIES


def policy_memory(policy: str, memory: MemoryOptions) -> MemoryOptions:
    """The flashmem policy always writes latents (DEFAULT_LATENTS unless told otherwise), even
    where chat's default writes none for an untrained consolidator: it is the method on test."""
    k = DEFAULT_LATENTS if memory.n_latents is None else memory.n_latents
    if policy == "full":
        return replace(memory, enabled=False)
    if policy == "truncate":
        return replace(memory, enabled=True, keep_ratio=0.0, n_latents=0)
    if policy == "keep-only":
        return replace(memory, enabled=True, n_latents=0)
    if policy == "latents-only":
        return replace(memory, enabled=True, keep_ratio=0.0, n_latents=k)
    return replace(memory, enabled=True, n_latents=k)


def run_recall(
    loaded: LoadedModel,
    cases: list[RecallCase],
    settings: RecallSettings,
    progress: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    results = []
    for case in cases:
        policies = {}
        for policy in settings.policies:
            if progress:
                progress(case.id, policy)
            policies[policy] = run_policy(loaded, case, policy, settings)
        results.append({"id": case.id, "policies": policies})
    return {
        "ctx_size": settings.n_ctx,
        "budget": settings.memory.budget,
        "keep_ratio": settings.memory.keep_ratio,
        "latents": policy_memory("flashmem", settings.memory).n_latents,
        "cases": results,
        "summary": summarize(results, settings.policies),
    }


def run_policy(
    loaded: LoadedModel, case: RecallCase, policy: str, settings: RecallSettings
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flashmem-recall-") as tmp:
        session = SessionStore(Path(tmp)).open("case")
        for turn in case.turns:
            session.append(dict(turn))
        n_ctx = settings.n_ctx
        if policy == "full":
            n_ctx = max(n_ctx, case_tokens(loaded, case) + PROBE_ROOM)
        options = ChatOptions(
            n_ctx=n_ctx,
            n_predict=1,
            sampling=SamplingParams(temperature=0),
            memory=policy_memory(policy, settings.memory),
        )
        with Conversation(session, loaded, options) as conversation:
            scores = [score_probe(conversation, p.question, p.answer) for p in case.probes]
            scored = [s for s in scores if s is not None]
            events = conversation.memory.events if conversation.memory else []
            layout = conversation.layout
            return {
                "probes": [None if s is None else round(s, 4) for s in scores],
                "mean": round(statistics.fmean(scored), 4) if scored else None,
                "n_ctx": conversation.n_ctx,
                "kv_tokens": len(conversation.seq),
                "consolidations": len(events),
                "turns_consolidated": layout.consolidated,
                "turns_dropped": layout.dropped,
                "consolidation_ms": [e["ms"] for e in events],
                "compression": compression(events),
            }


def score_probe(conversation: Conversation, question: str, answer: str) -> float | None:
    """Mean log-prob per answer token; None when the probe does not fit beside the cache."""
    try:
        return statistics.fmean(conversation.score_reply(question, answer))
    except ContextOverflow:
        return None


def case_tokens(loaded: LoadedModel, case: RecallCase) -> int:
    """An upper estimate of the tokens `full` needs: turns, markers, the longest probe."""
    text = "".join(turn["content"] for turn in case.turns)
    longest = max(len(loaded.model.tokenize(p.question + p.answer)) for p in case.probes)
    return len(loaded.model.tokenize(text)) + 8 * len(case.turns) + longest


def compression(events: list[dict[str, Any]]) -> float | None:
    """Consolidated span tokens per token they left in the cache."""
    spans = sum(e["span_tokens"] for e in events)
    left = sum(e["kept"] + e["latents"] for e in events)
    return round(spans / left, 2) if left else None


def summarize(results: list[dict[str, Any]], policies: tuple[str, ...]) -> dict[str, Any]:
    per_probe: list[dict[str, float]] = []
    skipped = 0
    for case in results:
        n_probes = len(next(iter(case["policies"].values()))["probes"])
        for i in range(n_probes):
            probe = {p: case["policies"][p]["probes"][i] for p in policies}
            if any(score is None for score in probe.values()):
                skipped += 1  # did not fit under some policy: compared nowhere
            else:
                per_probe.append(probe)
    if not per_probe:
        return {"probes": 0, "probes_skipped": skipped}
    summary: dict[str, Any] = {
        "mean_logprob": {
            p: round(statistics.fmean(probe[p] for probe in per_probe), 4) for p in policies
        },
        "probes": len(per_probe),
        "probes_skipped": skipped,
    }
    if {"full", "truncate"} <= set(policies):
        hurt = [probe for probe in per_probe if probe["full"] - probe["truncate"] >= 0.05]
        summary["probes_hurt_by_truncation"] = len(hurt)
        for policy in ("flashmem", "keep-only", "latents-only"):
            if policy in policies:
                value = mean_gap_recovered(per_probe, policy)
                key = "gap_recovered" if policy == "flashmem" else f"gap_recovered_{policy}"
                summary[key] = None if value is None else round(value, 3)
    return summary
