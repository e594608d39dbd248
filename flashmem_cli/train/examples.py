"""Training examples built the way chat consolidates: [head | span | recent turns | target].

A conversation is tokenized turn by turn as chat feeds it (the pinned head: BOS and the system
prompt; then each exchange). The span is one to three whole exchanges, the oldest after the head
(what `turns_to_consolidate` folds at the budget) and holding at least one fact; the recent turns
that follow push the target away from the span, as in use. Targets, each scored after the
recent turns:
- `answer`: a probe's question, then its answer (scored), for each fact the span alone holds;
- `restate`: a request to repeat what was said earlier, then the span's messages (scored);
- `continue`: the conversation's next turn (scored), so latents learn not to get in its way.

Conversations come from the recall generator's *train* share (bench/recall_gen.py), whose word
lists, values and distractor topics never occur in the dev or test splits; `--data` takes any
file of recall cases instead.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flashmem_cli.bench.recall_cases import RecallCase, parse_cases
from flashmem_cli.bench.recall_gen import make_split
from flashmem_cli.chat.layout import split_turns
from flashmem_cli.chat.memory import RECONSTRUCT_PROMPT
from flashmem_cli.engine import prompt as rendering
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.templates import ChatTemplate
from flashmem_cli.memory.monitor import DEFAULT_SINKS

Message = dict[str, str]
MAX_CONTEXT = 400  # head + span + recent: with latents and a target, under Gemma's 512 window
MAX_SPAN_EXCHANGES = 3
LONG_SHARE = 0.5  # examples whose span lies beyond the sliding window, as in chat at -c 4096
MAX_TARGET = 32  # tokens scored per restate or continue target: the output matrix is 262k wide
RESTATE_REQUESTS = (
    "Repeat what I told you earlier in this conversation, word for word.",
    "What did we say at the start? Repeat it exactly.",
    "Quote back the earlier part of our conversation.",
)
KINDS = ("answer", "restate", "continue")


@dataclass
class Target:
    kind: str  # one of KINDS
    prompt: list[int]  # fed, not scored
    scored: list[int]  # each predicted from everything before it


@dataclass
class Example:
    context: list[int]  # head + span + recent
    start: int  # the span is context[start:end]
    end: int
    targets: list[Target] = field(default_factory=list)
    gap: int = 0  # empty positions before the recent turns: a long conversation's distance
    reconstruct_prompt: list[int] = field(default_factory=list)  # chat's keep-score prompt


@dataclass
class TokenizedConversation:
    messages: list[Message]
    groups: list[list[Message]]
    head: list[int]  # BOS and the system prompt: never consolidated
    turns: list[list[int]]  # one per group, the head taken out of the first


def tokenize_conversation(
    model: Model, template: ChatTemplate, messages: list[Message]
) -> TokenizedConversation:
    """Each turn's tokens as chat feeds them: the rendering's delta after the turns before."""
    groups = split_turns(messages)
    fed: list[Message] = []
    head: list[int] = []
    turns: list[list[int]] = []
    for i, group in enumerate(groups):
        text = rendering.delta(template, fed, group, add_generation_prompt=False)
        if i == 0:
            system = 0 if group[0]["role"] == "system" else None
            head, rest = rendering.tokenize_head(model, text, system, template.bos_token)
            turns.append(rest)
        else:
            turns.append(rendering.tokenize(model, text))
        fed = fed + group
    return TokenizedConversation(messages, groups, head, turns)


def build_example(
    model: Model,
    template: ChatTemplate,
    case: RecallCase,
    rng: random.Random,
    kinds: tuple[str, ...] = KINDS,
    window: int = 0,
) -> Example | None:
    """One example from `case`, or None when no span of it holds a fact that fits. With a
    sliding `window`, LONG_SHARE of the examples get a gap that puts the span beyond it."""
    conv = tokenize_conversation(model, template, case.turns)
    text_of = ["\n".join(m["content"] for m in g) for g in conv.groups]
    facts = [i for i, text in enumerate(text_of) if _answers_in(case, text)]
    if not facts:
        return None
    fact = rng.choice(facts)
    first = max(0, fact - rng.randrange(MAX_SPAN_EXCHANGES))
    last = min(len(conv.turns), fact + 1 + rng.randrange(2))
    last = min(last, first + MAX_SPAN_EXCHANGES)
    span = [t for turn in conv.turns[first:last] for t in turn]
    budget = MAX_CONTEXT - len(conv.head) - len(span)
    if budget < 40:
        return None
    want = rng.randint(min(80, budget), budget)
    recent: list[int] = []
    n_recent = 0
    for turn in conv.turns[last:]:
        if len(recent) + len(turn) > budget or len(recent) >= want:
            break
        recent += turn
        n_recent += 1
    if n_recent == 0:
        return None
    start = max(len(conv.head), DEFAULT_SINKS)  # the first positions stay, as in chat
    example = Example(conv.head + span + recent, start, len(conv.head) + len(span))
    example.reconstruct_prompt = model.tokenize(RECONSTRUCT_PROMPT)
    if window and rng.random() < LONG_SHARE:
        example.gap = rng.randint(window, 3 * window)
    before = [m for g in conv.groups[: last + n_recent] for m in g]
    recent_text = " ".join(text_of[last : last + n_recent])
    span_text = " ".join(text_of[first:last])
    if "answer" in kinds:
        for probe in case.probes:
            answer = probe.answer.lower()
            if answer in span_text.lower() and answer not in recent_text.lower():
                example.targets.append(
                    _reply_target(model, template, before, "answer", probe.question, probe.answer)
                )
    if "restate" in kinds:
        said = "\n".join(
            m["content"] for g in conv.groups[first:last] for m in g if m["role"] != "system"
        )
        request = rng.choice(RESTATE_REQUESTS)
        example.targets.append(_reply_target(model, template, before, "restate", request, said))
    if "continue" in kinds and last + n_recent < len(conv.turns):
        following = conv.turns[last + n_recent]
        example.targets.append(Target("continue", [], following[:MAX_TARGET]))
    return example if any(t.kind == "answer" for t in example.targets) else None


def _reply_target(
    model: Model,
    template: ChatTemplate,
    before: list[Message],
    kind: str,
    question: str,
    answer: str,
) -> Target:
    """As `eval recall` scores a probe: the question's turn and generation prompt, then the
    answer's tokens."""
    asked = {"role": "user", "content": question}
    text = rendering.delta(template, before, [asked], add_generation_prompt=True)
    return Target(kind, rendering.tokenize(model, text), model.tokenize(answer)[:MAX_TARGET])


def _answers_in(case: RecallCase, text: str) -> bool:
    return any(probe.answer.lower() in text.lower() for probe in case.probes)


def generated_cases(seed: int, per_batch: int = 16) -> Iterator[RecallCase]:
    """Endless train-share conversations from the recall generator, a batch per seed."""
    while True:
        yield from _as_cases(make_split("train", seed, per_batch))
        seed += 1


def _as_cases(raw: list[dict[str, Any]]) -> list[RecallCase]:
    return parse_cases((json.dumps(case) for case in raw), "generator")


def examples(
    model: Model,
    template: ChatTemplate,
    cases: Iterator[RecallCase],
    rng: random.Random,
    kinds: tuple[str, ...] = KINDS,
    window: int = 0,
) -> Iterator[Example]:
    for case in cases:
        example = build_example(model, template, case, rng, kinds, window)
        if example is not None:
            yield example
