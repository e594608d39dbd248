"""Recall cases: the shipped example, line-numbered validation errors, gap-recovered maths."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flashmem_cli.bench.recall_cases import (
    Probe,
    RecallCase,
    RecallFileError,
    case_gains_and_gaps,
    example_path,
    gains_and_gaps,
    gap_recovered,
    parse_cases,
    pooled_gap_recovered,
)
from flashmem_cli.errors import FlashmemError


def _case(**overrides: Any) -> dict[str, Any]:
    case: dict[str, Any] = {
        "id": "c1",
        "turns": [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": "My dog is called Brisket."},
            {"role": "assistant", "content": "Noted: Brisket."},
        ],
        "probes": [{"question": "What is my dog called?", "answer": "Brisket"}],
    }
    case.update(overrides)
    return case


def _line(**overrides: Any) -> str:
    return json.dumps(_case(**overrides))


def _turns(*roles: str) -> list[dict[str, str]]:
    return [{"role": role, "content": f"{role} text"} for role in roles]


def test_example_file_parses() -> None:
    path = example_path()
    cases = parse_cases(path.read_text(encoding="utf-8").splitlines(), source=str(path))
    assert len(cases) == 8
    assert len({case.id for case in cases}) == 8
    for case in cases:
        assert len(case.probes) >= 2
        assert sum(len(turn["content"]) for turn in case.turns) > 3000


def test_example_answers_are_stated_early_and_not_in_filler() -> None:
    path = example_path()
    for case in parse_cases(path.read_text(encoding="utf-8").splitlines()):
        first_user = next(i for i, turn in enumerate(case.turns) if turn["role"] == "user")
        early = " ".join(turn["content"] for turn in case.turns[: first_user + 6])
        late = " ".join(turn["content"] for turn in case.turns[first_user + 6 :]).lower()
        for probe in case.probes:
            assert probe.answer in early, (case.id, probe.answer)
            assert probe.answer.lower() not in late, (case.id, probe.answer)


def test_parses_a_valid_case() -> None:
    lines = ["", _line(extra="ignored"), "   ", _line(id="c2", turns=_turns("user", "assistant"))]
    cases = parse_cases(lines)
    assert [case.id for case in cases] == ["c1", "c2"]
    assert cases[0] == RecallCase(
        id="c1",
        turns=_case()["turns"],
        probes=[Probe(question="What is my dog called?", answer="Brisket")],
    )
    assert cases[1].turns[0] == {"role": "user", "content": "user text"}


def test_unknown_keys_inside_turns_and_probes_are_dropped() -> None:
    turns = [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]
    probes = [{"question": "q", "answer": "a", "weight": 2}]
    (case,) = parse_cases([_line(turns=turns, probes=probes)])
    assert case.turns[0] == {"role": "user", "content": "hi"}
    assert case.probes == [Probe("q", "a")]


BAD_LINES = {
    "bad json": ("{not json", "malformed JSON"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "missing id": (json.dumps({k: v for k, v in _case().items() if k != "id"}), "'id'"),
    "empty id": (_line(id=""), "'id'"),
    "numeric id": (_line(id=7), "'id'"),
    "no turns": (_line(turns=[]), "'turns'"),
    "turns not a list": (_line(turns="hello"), "'turns'"),
    "only a system turn": (_line(turns=_turns("system")), "no user/assistant"),
    "unknown role": (_line(turns=_turns("user", "bot")), "turns[1].role"),
    "late system turn": (_line(turns=_turns("user", "system", "assistant")), "system turn"),
    "assistant first": (_line(turns=_turns("assistant", "user")), "expected 'user'"),
    "two users in a row": (
        _line(turns=_turns("user", "user", "assistant")),
        "expected 'assistant'",
    ),
    "ends with user": (_line(turns=_turns("user", "assistant", "user")), "last turn"),
    "empty content": (_line(turns=[{"role": "user", "content": ""}]), "turns[0].content"),
    "content not a string": (_line(turns=[{"role": "user", "content": 3}]), "turns[0].content"),
    "turn not an object": (_line(turns=["user: hi"]), "turns[0] is not an object"),
    "no probes": (_line(probes=[]), "'probes'"),
    "probes missing": (json.dumps({k: v for k, v in _case().items() if k != "probes"}), "'probes'"),
    "empty answer": (_line(probes=[{"question": "q", "answer": ""}]), "probes[0].answer"),
    "missing question": (_line(probes=[{"answer": "a"}]), "probes[0].question"),
    "probe not an object": (_line(probes=["q"]), "probes[0] is not an object"),
}


@pytest.mark.parametrize("line, expected", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_gives_one_line_numbered_error(line: str, expected: str) -> None:
    lines = [_line(id="good"), "", line]
    with pytest.raises(RecallFileError) as info:
        parse_cases(lines, source="cases.jsonl")
    message = str(info.value)
    assert message.startswith("cases.jsonl:3: ")
    assert expected in message
    assert "\n" not in message
    assert isinstance(info.value, FlashmemError)


def test_duplicate_id_names_the_second_line() -> None:
    with pytest.raises(RecallFileError, match=r"^f\.jsonl:2: duplicate id 'c1'$"):
        parse_cases([_line(), _line()], source="f.jsonl")


@pytest.mark.parametrize("lines", [[], ["", "  ", "\n"]])
def test_empty_file_has_no_cases(lines: list[str]) -> None:
    with pytest.raises(RecallFileError, match=r"^empty\.jsonl: no cases$"):
        parse_cases(lines, source="empty.jsonl")


@pytest.mark.parametrize(
    "policy, truncate, full, expected",
    [
        (0.5, 0.0, 1.0, 0.5),
        (1.0, 0.2, 1.0, 1.0),
        (0.2, 0.2, 1.0, 0.0),
        (0.1, 0.2, 1.0, -0.125),
        (0.9, 0.4, 0.6, 2.5),
    ],
)
def test_gap_recovered(policy: float, truncate: float, full: float, expected: float) -> None:
    assert gap_recovered(policy, truncate, full) == pytest.approx(expected)


@pytest.mark.parametrize("truncate, full", [(0.5, 0.5), (0.8, 0.84), (0.9, 0.3)])
def test_gap_recovered_is_none_when_truncation_did_not_hurt(truncate: float, full: float) -> None:
    assert gap_recovered(0.7, truncate, full) is None


def test_gap_recovered_min_gap_is_configurable() -> None:
    assert gap_recovered(0.82, 0.8, 0.84, min_gap=0.01) == pytest.approx(0.5)
    assert gap_recovered(0.5, 0.0, 1.0, min_gap=2.0) is None


def test_pooled_gap_recovered_skips_unhurt_probes() -> None:
    scores = [
        {"full": 1.0, "truncate": 0.0, "flashmem": 0.5},
        {"full": 1.0, "truncate": 0.5, "flashmem": 1.0},
        {"full": 0.9, "truncate": 0.9, "flashmem": 0.1},
    ]
    # gains 0.5 + 0.5 over gaps 1.0 + 0.5; the unhurt probe's -0.8 counts nowhere
    assert pooled_gap_recovered(scores, "flashmem") == pytest.approx(1.0 / 1.5)


def test_pooled_gap_recovered_is_not_swung_by_a_barely_hurt_probe() -> None:
    scores = [
        {"full": 2.0, "truncate": 0.0, "flashmem": 1.0},
        {"full": 0.06, "truncate": 0.0, "flashmem": 1.0},  # a mean of ratios: (0.5 + 16.7) / 2
    ]
    assert pooled_gap_recovered(scores, "flashmem") == pytest.approx(2.0 / 2.06)


def test_gains_and_gaps_are_the_hurt_probes_own() -> None:
    scores = [
        {"full": 1.0, "truncate": 0.0, "flashmem": 0.25},
        {"full": 0.9, "truncate": 0.9, "flashmem": 0.1},
        {"full": 2.0, "truncate": 1.0, "flashmem": 0.5},
    ]
    gains, gaps = gains_and_gaps(scores, "flashmem")
    assert gains == pytest.approx([0.25, -0.5])
    assert gaps == pytest.approx([1.0, 1.0])
    assert gains_and_gaps([], "flashmem") == ([], [])


def test_case_gains_and_gaps_sum_within_a_case_and_skip_unhurt_cases() -> None:
    hurt = [
        {"full": 1.0, "truncate": 0.0, "flashmem": 0.5},
        {"full": 2.0, "truncate": 1.0, "flashmem": 1.25},
    ]
    unhurt = [{"full": 0.9, "truncate": 0.9, "flashmem": 0.1}]
    gains, gaps = case_gains_and_gaps([hurt, unhurt, hurt[:1]], "flashmem")
    assert gains == pytest.approx([0.75, 0.5])
    assert gaps == pytest.approx([2.0, 1.0])


def test_pooled_gap_recovered_is_none_without_hurt_probes() -> None:
    assert pooled_gap_recovered([], "flashmem") is None
    assert (
        pooled_gap_recovered([{"full": 0.3, "truncate": 0.3, "flashmem": 0.3}], "flashmem") is None
    )


def test_probes_that_did_not_fit_somewhere_are_compared_nowhere():
    from flashmem_cli.bench.recall import summarize

    def case(full, truncate, flashmem):
        names = ("full", "truncate", "flashmem")
        return {
            "policies": {
                n: {"probes": v} for n, v in zip(names, (full, truncate, flashmem), strict=True)
            }
        }

    results = [case([-1.0, -1.0], [-3.0, -3.0], [-2.0, None])]
    summary = summarize(results, ("full", "truncate", "flashmem"))
    assert summary["probes"] == 1 and summary["probes_skipped"] == 1
    assert summary["gap_recovered"] == 0.5
    empty = summarize([case([None], [-3.0], [-2.0])], ("full", "truncate", "flashmem"))
    assert empty == {"probes": 0, "probes_skipped": 1}


@pytest.mark.model
def test_greedy_reply_leaves_the_cache_as_it_was(model_path, tmp_path) -> None:
    from flashmem_cli import models
    from flashmem_cli.bench.recall import greedy_reply
    from flashmem_cli.chat.conversation import ChatOptions, Conversation
    from flashmem_cli.engine.sampling import SamplingParams
    from flashmem_cli.store.sessions import SessionStore

    loaded = models.load_model(models.resolve(str(model_path)), 0)
    session = SessionStore(tmp_path).open("case")
    for turn in _case()["turns"]:
        session.append(dict(turn))
    options = ChatOptions(n_ctx=256, n_predict=1, sampling=SamplingParams(temperature=0))
    try:
        with Conversation(session, loaded, options) as conversation:
            before = list(conversation.seq.tokens)
            score = conversation.score_reply("What is my dog called?", "Brisket")
            reply = greedy_reply(conversation, "What is my dog called?", 8)
            assert isinstance(reply, str) and reply
            assert conversation.seq.tokens == before
            assert conversation.score_reply("What is my dog called?", "Brisket") == pytest.approx(
                score, abs=1e-3
            )
            assert greedy_reply(conversation, "What is my dog called?", 8) == reply
            assert greedy_reply(conversation, "What is my dog called?", 10_000) is None
    finally:
        loaded.model.close()
