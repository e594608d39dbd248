"""The recall benchmark generator: valid cases, disjoint splits, facts far from the probes."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from flashmem_cli.bench import recall_gen
from flashmem_cli.bench.recall_cases import parse_cases
from flashmem_cli.bench.recall_gen import (
    QUESTIONS,
    SHIPPED_CASES,
    SHIPPED_SEED,
    SPLITS,
    TAIL_CHARS,
    make_split,
    shipped_path,
)

N_CASES = 40


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, Any]]]:
    return {split: make_split(split, seed=5, n_cases=N_CASES) for split in SPLITS}


def _text(case: dict[str, Any], start: int = 0, end: int | None = None) -> str:
    return "\n".join(turn["content"] for turn in case["turns"][start:end])


def _mentions(text: str, value: str) -> bool:
    """`value` as a whole word (or words) of `text`, ignoring case."""
    text, value = text.lower(), value.lower()
    if value not in text:
        return False
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


def test_cases_parse_and_have_two_to_four_probes(splits: dict[str, list[dict[str, Any]]]) -> None:
    for split, cases in splits.items():
        parsed = parse_cases([json.dumps(case) for case in cases], source=split)
        assert len(parsed) == N_CASES
        assert all(2 <= len(case.probes) <= 4 for case in parsed)
        assert all(case["split"] == split for case in cases)


def test_same_seed_same_cases_other_seed_other_cases() -> None:
    assert make_split("dev", 3, 5) == make_split("dev", 3, 5)
    assert make_split("dev", 3, 5) != make_split("dev", 4, 5)
    assert make_split("dev", 3, 5)[0] != make_split("test", 3, 5)[0]


def test_word_lists_are_dealt_out_without_overlap() -> None:
    lists = [
        value
        for name, value in vars(recall_gen).items()
        if name.isupper() and isinstance(value, tuple) and value and isinstance(value[0], str)
    ]
    assert len(lists) > 40
    for items in lists:
        assert len(set(items)) == len(items), items[:3]
        assert len(items) >= 3, items


def test_splits_share_no_value_or_question_phrasing(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    def values(split: str) -> set[str]:
        return {v.lower() for case in splits[split] for v in case["values"]}

    def answers(split: str) -> set[str]:
        return {p["answer"] for case in splits[split] for p in case["probes"]}

    def frames(split: str) -> set[str]:
        return {_frame(p["question"]) for case in splits[split] for p in case["probes"]}

    for a, b in itertools.combinations(SPLITS, 2):
        assert not values(a) & values(b), (a, b)
        assert not frames(a) & frames(b), (a, b)
        text_a, text_b = ("\n".join(_text(case) for case in splits[s]) for s in (a, b))
        assert not [v for v in answers(a) if _mentions(text_b, v)], (a, b)
        assert not [v for v in answers(b) if _mentions(text_a, v)], (b, a)


def _frame(question: str) -> str:
    """The question template a probe was made from."""
    matches = [q for q in QUESTIONS if re.fullmatch(_pattern(q), question)]
    assert len(matches) == 1, question
    return matches[0]


def _pattern(template: str) -> str:
    return re.escape(template).replace(re.escape("{desc}"), ".+")


def test_every_split_uses_its_own_third_of_the_questions(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    for part, split in enumerate(SPLITS):
        used = {_frame(p["question"]) for case in splits[split] for p in case["probes"]}
        assert used == set(QUESTIONS[part::3])


def test_facts_are_stated_early_and_never_in_the_tail(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    for case in itertools.chain(*splits.values()):
        end = case["facts_end"]
        early, tail = _text(case, 0, end), _text(case, end)
        assert len(tail) >= TAIL_CHARS
        for probe in case["probes"]:
            assert probe["answer"] in early, (case["id"], probe)
            assert not _mentions(tail, probe["answer"]), (case["id"], probe)


def test_corrections_state_the_answer_after_the_old_value(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    corrected = 0
    for case in itertools.chain(*splits.values()):
        text = _text(case)
        for probe in case["probes"]:
            if probe["how"] == "corrected":
                corrected += 1
                fix = re.search(rf"{re.escape(probe['answer'])}[.,] [Nn]ot (.+?)\.", text)
                assert fix, (case["id"], probe)
                assert fix.group(1) in text[: fix.start()], (case["id"], probe)
    assert corrected >= 20


def test_the_mix_covers_what_real_chats_hold(splits: dict[str, list[dict[str, Any]]]) -> None:
    probes = [p for case in itertools.chain(*splits.values()) for p in case["probes"]]
    kinds = {p["kind"] for p in probes}
    assert kinds >= {"person", "name", "place", "number", "code", "address", "date", "time"}
    assert kinds >= {"weekday", "list", "instruction", "preference"}
    assert {p["how"] for p in probes} == {"said", "multi", "offered", "pasted", "corrected"}
    lengths = [len(turn["content"]) for case in splits["dev"] for turn in case["turns"]]
    assert min(lengths) < 40 and max(lengths) > 600  # short and long turns
    assert all(len(p["question"]) < 100 and len(p["answer"]) < 40 for p in probes)


def test_offered_facts_come_from_the_assistant(splits: dict[str, list[dict[str, Any]]]) -> None:
    for case in itertools.chain(*splits.values()):
        for probe in case["probes"]:
            if probe["how"] == "offered":
                said_by = [t["role"] for t in case["turns"] if probe["answer"] in t["content"]]
                assert said_by[0] == "assistant", (case["id"], probe)


def test_shipped_splits_are_what_the_generator_makes() -> None:
    for split in SPLITS:
        path = shipped_path(split)
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == make_split(
            split, SHIPPED_SEED, SHIPPED_CASES[split]
        )
        assert len(parse_cases(lines, str(path))) == SHIPPED_CASES[split]


def test_command_line_writes_the_three_splits(tmp_path: Path) -> None:
    recall_gen.main(["--out", str(tmp_path / "out"), "--seed", "2", "--cases", "3"])
    for split in SPLITS:
        lines = (tmp_path / "out" / f"recall-{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == make_split(split, 2, 3)


@pytest.mark.model
def test_shipped_cases_push_their_facts_out_of_512_tokens(model_path: Path) -> None:
    """With the real tokenizer: every case is far longer than -c 512, what follows its last
    fact alone fills more than the context, and the probes are short."""
    from flashmem_cli.engine.backend import Model

    with Model(model_path, n_gpu_layers=0) as model:

        def tokens(text: str) -> int:
            return len(model.tokenize(text)) + 5  # + Gemma's turn markers

        for split in SPLITS:
            for case in parse_jsonl(shipped_path(split)):
                turns = [tokens(turn["content"]) for turn in case["turns"]]
                tail = sum(turns[case["facts_end"] :])
                assert sum(turns) >= 900, (case["id"], sum(turns))
                assert tail >= 600, (case["id"], tail)
                for probe in case["probes"]:
                    assert tokens(probe["question"]) + tokens(probe["answer"]) <= 40


def parse_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
