"""`flashmem bench resume --quick` on the real default model: one run, its rows checked."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import MODEL_PATH

from flashmem_cli.bench import resume
from flashmem_cli.bench.method import BenchOptions
from flashmem_cli.bench.report import Section, markdown_table
from flashmem_cli.config import HOME_ENV, MODELS_DIR_ENV

pytestmark = pytest.mark.model

SUMMARIES = ("restored", "stateless", "warm", "restore_ms", "stateless_over_restored")


@dataclass
class QuickRun:
    section: Section
    environ_before: dict[str, str]
    environ_after: dict[str, str]
    said: list[str]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickRun]:
    """One quick run, with a models directory of its own (as conftest's `models_home` gives
    each test) and a FLASHMEM_HOME that the run must leave as it was."""
    assert MODEL_PATH.is_file(), f"{MODEL_PATH} is missing: run `make install`"
    models = tmp_path_factory.mktemp("models")
    (models / MODEL_PATH.name).symlink_to(MODEL_PATH.resolve())
    said: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MODELS_DIR_ENV, str(models))
        patch.setenv(HOME_ENV, str(tmp_path_factory.mktemp("home")))
        before = dict(os.environ)
        section = resume.run(BenchOptions(quick=True), said.append)
        yield QuickRun(section, before, dict(os.environ), said)


def rows(quick: QuickRun) -> list[dict[str, Any]]:
    return quick.section.rows


def test_one_row_per_quick_size_near_its_target(quick: QuickRun) -> None:
    tokens = [row["history_tokens"] for row in rows(quick)]
    assert len(tokens) == len(resume.QUICK_SIZES)
    for target, got in zip(resume.QUICK_SIZES, tokens, strict=True):
        assert target <= got <= target + 64


def test_summaries_are_ordered(quick: QuickRun) -> None:
    for row in rows(quick):
        for name in SUMMARIES:
            summary = row[name]
            assert summary["min"] <= summary["median"] <= summary["max"], name
            assert summary["runs"] == 1


def test_times_and_state_sizes(quick: QuickRun) -> None:
    for row in rows(quick):
        assert row["restored"]["median"] > 0
        assert row["stateless"]["median"] > 0
        assert row["warm"]["median"] > 0
        assert row["state_bytes"] > 0
    small, large = rows(quick)
    assert large["state_bytes"] > small["state_bytes"]


def test_ratio_is_taken_within_each_round(quick: QuickRun) -> None:
    for row in rows(quick):
        samples = row["samples"]
        ratios = [s / r for s, r in zip(samples["stateless"], samples["restored"], strict=True)]
        assert row["stateless_over_restored"]["median"] == pytest.approx(statistics.median(ratios))
        assert row["restored"]["median"] == statistics.median(samples["restored"])


def test_headline_names_the_largest_size(quick: QuickRun) -> None:
    largest = resume.QUICK_SIZES[-1]
    last = rows(quick)[-1]
    assert quick.section.headline == {
        f"stateless_over_restored_at_{largest}": last["stateless_over_restored"]["median"],
        f"restored_ttft_ms_at_{largest}": last["restored"]["median"],
    }


def test_table_has_every_cell(quick: QuickRun) -> None:
    header, _, *body = markdown_table(quick.section)
    assert "stateless/restored" in header
    assert len(body) == len(resume.QUICK_SIZES)
    for line in body:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert "-" not in cells, line


def test_environment_left_as_it_was(quick: QuickRun) -> None:
    assert quick.environ_after.get(HOME_ENV) == quick.environ_before.get(HOME_ENV)
    assert quick.environ_after == quick.environ_before


def test_progress_is_said(quick: QuickRun) -> None:
    assert any("stateless" in line for line in quick.said)
    assert all(line.startswith("resume: ") for line in quick.said)
