"""`flashmem eval recall`: how much of a conversation's early facts survive a full context.

Each case's turns are fed into a fresh session under each policy, then every probe question is
asked and the reference answer scored teacher-forced (mean log-probability per token):
- full: a context large enough for everything (the ceiling);
- truncate: at the budget the oldest turns are dropped (what other local CLIs do);
- flashmem: at the budget the oldest turns are consolidated (default settings);
- keep-only / latents-only: the ablations (kept positions without latents, latents alone).
gap_recovered = sum(flashmem - truncate) / sum(full - truncate) over the probes truncation hurt
(by 0.05 nats or more), with a bootstrap 95% interval over cases. Each probe is also answered greedily (ANSWER_EXTRA
tokens more than its answer): `accuracy` is the share of replies that contain the expected answer,
ignoring case. `compression` is the consolidated span tokens per token they left in the cache.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flashmem_cli.bench import stats
from flashmem_cli.bench.recall_cases import (
    Probe,
    RecallCase,
    case_gains_and_gaps,
    gains_and_gaps,
    pooled_gap_recovered,
)
from flashmem_cli.chat.conversation import ChatOptions, Conversation
from flashmem_cli.chat.events import MemoryEvent
from flashmem_cli.chat.memory import MemoryOptions
from flashmem_cli.engine import prompt as rendering
from flashmem_cli.engine.generate import generate
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.errors import ContextOverflow
from flashmem_cli.memory.consolidator import DEFAULT_LATENTS
from flashmem_cli.models import LoadedModel
from flashmem_cli.store.sessions import SessionStore

POLICIES = ("full", "truncate", "flashmem", "keep-only", "latents-only")
PROBE_ROOM = 64  # tokens beyond a case's turns and its longest probe that `full` leaves
ANSWER_EXTRA = 12  # greedy tokens beyond the answer's: a base model restates the question first


@dataclass(frozen=True)
class RecallSettings:
    n_ctx: int
    memory: MemoryOptions  # the flashmem policy's settings; the others derive from it
    policies: tuple[str, ...] = POLICIES
    generate: bool = True  # the generation check (greedy answers); off: likelihoods only


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
        "keep_score": settings.memory.keep_score,
        "keep_pool": settings.memory.keep_pool,
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
            asked = [ask(conversation, probe, settings.generate) for probe in case.probes]
            return policy_record(conversation, case.probes, asked)


def policy_record(
    conversation: Conversation, probes: list[Probe], asked: list[tuple[float | None, str | None]]
) -> dict[str, Any]:
    events = conversation.memory.events if conversation.memory else []
    scores = [score for score, _ in asked]
    scored = [s for s in scores if s is not None]
    replies = [reply for _, reply in asked]
    return {
        "probes": [None if s is None else round(s, 4) for s in scores],
        "replies": replies,
        "hits": [
            None if r is None else stats.contains(r, p.answer)
            for r, p in zip(replies, probes, strict=True)
        ],
        "mean": round(statistics.fmean(scored), 4) if scored else None,
        "n_ctx": conversation.n_ctx,
        "kv_tokens": len(conversation.seq),
        "consolidations": len(events),
        "turns_consolidated": conversation.layout.consolidated,
        "turns_dropped": conversation.layout.dropped,
        "consolidation_ms": [e.ms for e in events],
        "span_tokens": sum(e.span_tokens for e in events),
        "left_tokens": sum(e.kept + e.latents for e in events),
        "compression": compression(events),
    }


def ask(conversation: Conversation, probe: Probe, answer: bool) -> tuple[float | None, str | None]:
    """The probe's teacher-forced score and (with `answer`) its greedy reply."""
    score = score_probe(conversation, probe.question, probe.answer)
    if not answer or score is None:
        return score, None
    n_tokens = len(conversation.model.tokenize(probe.answer)) + ANSWER_EXTRA
    return score, greedy_reply(conversation, probe.question, n_tokens)


def score_probe(conversation: Conversation, question: str, answer: str) -> float | None:
    """Mean log-prob per answer token; None when the probe does not fit beside the cache."""
    try:
        return statistics.fmean(conversation.score_reply(question, answer))
    except ContextOverflow:
        return None


def greedy_reply(conversation: Conversation, question: str, n_tokens: int) -> str | None:
    """Up to `n_tokens` of the greedy reply to `question`; the cache is left as it was (as
    `Conversation.score_reply` leaves it). None when the reply does not fit beside the cache."""
    asked = {"role": "user", "content": question}
    text = rendering.delta(
        conversation.template, conversation.messages(), [asked], add_generation_prompt=True
    )
    prompt = rendering.tokenize(conversation.model, text)
    seq = conversation.seq
    if len(prompt) + n_tokens > seq.free:
        return None
    mark = len(seq)
    try:
        seq.feed(prompt)
        with Sampler(SamplingParams(temperature=0)) as sampler:
            reply, _ = generate(seq, sampler, n_tokens)
    finally:
        conversation.window.remove_tail(mark)
    return reply


def case_tokens(loaded: LoadedModel, case: RecallCase) -> int:
    """An upper estimate of the tokens `full` needs: turns, markers, the longest probe."""
    text = "".join(turn["content"] for turn in case.turns)
    longest = max(len(loaded.model.tokenize(p.question + p.answer)) for p in case.probes)
    return len(loaded.model.tokenize(text)) + 8 * len(case.turns) + longest


def compression(events: list[MemoryEvent]) -> float | None:
    """Consolidated span tokens per token they left in the cache."""
    spans = sum(e.span_tokens for e in events)
    left = sum(e.kept + e.latents for e in events)
    return round(spans / left, 2) if left else None


def summarize(results: list[dict[str, Any]], policies: tuple[str, ...]) -> dict[str, Any]:
    """Over the probes every policy scored: mean log-prob, gap recovered with its bootstrap
    interval, the generation check's accuracy with its interval, the compression reached."""
    by_case, skipped = compared_by_case(results, policies)
    per_probe = [probe for probes in by_case for probe in probes]
    if not per_probe:
        return {"probes": 0, "probes_skipped": skipped}
    summary: dict[str, Any] = {
        "mean_logprob": {
            p: round(statistics.fmean(probe[p] for probe in per_probe), 4) for p in policies
        },
        "probes": len(per_probe),
        "probes_skipped": skipped,
        "compression": compression_by_policy(results, policies),
    }
    if {"full", "truncate"} <= set(policies):
        summary.update(gap_summary(by_case, policies))
    summary.update(accuracy_summary(results, policies))
    return summary


def compared_by_case(
    results: list[dict[str, Any]], policies: tuple[str, ...]
) -> tuple[list[list[dict[str, float]]], int]:
    """Each case's probe scores per policy, for the probes that fit under every policy; and
    how many did not (compared nowhere)."""
    by_case: list[list[dict[str, float]]] = []
    skipped = 0
    for case in results:
        n_probes = len(next(iter(case["policies"].values()))["probes"])
        compared = []
        for i in range(n_probes):
            probe = {p: case["policies"][p]["probes"][i] for p in policies}
            if any(score is None for score in probe.values()):
                skipped += 1
            else:
                compared.append(probe)
        by_case.append(compared)
    return by_case, skipped


def gap_summary(by_case: list[list[dict[str, float]]], policies: tuple[str, ...]) -> dict[str, Any]:
    """Gap recovered per memory policy, pooled over the hurt probes, with a bootstrap interval
    over cases (a case's probes share its consolidations: they are not independent)."""
    per_probe = [probe for probes in by_case for probe in probes]
    _, gaps = gains_and_gaps(per_probe, "truncate")
    summary: dict[str, Any] = {"probes_hurt_by_truncation": len(gaps), "gap_recovered_ci": {}}
    for policy in ("flashmem", "keep-only", "latents-only"):
        if policy in policies:
            value = pooled_gap_recovered(per_probe, policy)
            key = "gap_recovered" if policy == "flashmem" else f"gap_recovered_{policy}"
            summary[key] = None if value is None else round(value, 3)
            ci = stats.bootstrap_ratio_ci(*case_gains_and_gaps(by_case, policy))
            summary["gap_recovered_ci"][policy] = stats.rounded(ci)
    return summary


def accuracy_summary(results: list[dict[str, Any]], policies: tuple[str, ...]) -> dict[str, Any]:
    """The generation check per policy, over the probes answered under every policy."""
    hits: dict[str, list[float]] = {p: [] for p in policies}
    for case in results:
        rows = zip(*(case["policies"][p].get("hits", []) for p in policies), strict=True)
        for row in rows:
            if all(hit is not None for hit in row):
                for policy, hit in zip(policies, row, strict=True):
                    hits[policy].append(float(hit))
    if not hits[policies[0]]:
        return {}
    return {
        "probes_answered": len(hits[policies[0]]),
        "accuracy": {p: round(float(sum(h) / len(h)), 3) for p, h in hits.items()},
        "accuracy_ci": {p: stats.rounded(stats.bootstrap_ci(h)) for p, h in hits.items()},
    }


def compression_by_policy(
    results: list[dict[str, Any]], policies: tuple[str, ...]
) -> dict[str, float | None]:
    """Span tokens consolidated per token left in the cache, over all cases of a policy."""
    out: dict[str, float | None] = {}
    for policy in policies:
        spans = sum(case["policies"][policy].get("span_tokens", 0) for case in results)
        left = sum(case["policies"][policy].get("left_tokens", 0) for case in results)
        value = stats.ratio(spans, left)
        out[policy] = None if value is None else round(value, 2)
    return out
