"""The speed benchmarks (consolidation, decode, monitor): one quick run of each on the real
default model, checked for shape, consistent summaries and the cost ordering they exist to show."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MODEL_PATH

from flashmem_cli.bench import suite
from flashmem_cli.bench.method import BenchOptions
from flashmem_cli.bench.report import Section, lookup, markdown_table
from flashmem_cli.config import MODELS_DIR_ENV

pytestmark = pytest.mark.model

NAMES = ("consolidation", "decode", "monitor")
SUMMARIES = {
    "consolidation": ("flashmem", "memgen", "reprocess", "memgen_over_flashmem"),
    "decode": ("vanilla_ms_per_token", "memory_ms_per_token", "memory_over_vanilla"),
    "monitor": ("off", "on", "on_over_off"),
}
# (row key of the ratio, its numerator's samples, its denominator's)
RATIOS = {
    "consolidation": ("memgen_over_flashmem", "memgen", "flashmem"),
    "decode": ("memory_over_vanilla", "memory", "vanilla"),
    "monitor": ("on_over_off", "on", "off"),
}
HEADLINES = {
    "consolidation": {
        "memgen_over_flashmem_at_256",
        "memgen_over_flashmem_at_512",
        "memgen_over_chat_at_256",
        "memgen_over_chat_at_512",
    },
    "decode": {"memory_over_vanilla"},
    "monitor": {"decode_on_over_off", "prefill_on_over_off"},
}


@pytest.fixture(scope="module")
def sections(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Section]]:
    """The three quick runs, once for the module, in a models directory of their own."""
    assert MODEL_PATH.is_file(), f"{MODEL_PATH} is missing: run `make install`"
    directory: Path = tmp_path_factory.mktemp("bench-models")
    (directory / MODEL_PATH.name).symlink_to(MODEL_PATH.resolve())
    options = BenchOptions(quick=True, threads=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MODELS_DIR_ENV, str(directory))
        patch.delenv("FLASHMEM_MODEL", raising=False)
        yield {name: suite.run_one(name, options, lambda _: None) for name in NAMES}


def test_each_quick_run_has_its_rows(sections):
    consolidation, decode, monitor = (sections[name] for name in NAMES)
    assert [row["context_tokens"] for row in consolidation.rows] == [256, 512]
    assert [row["consolidated_tokens"] for row in consolidation.rows] == [124, 252]
    assert [(row["history_tokens"], row["generated_tokens"]) for row in decode.rows] == [(256, 16)]
    assert [(row["phase"], row["tokens"]) for row in monitor.rows] == [
        ("decode", 16),
        ("prefill", 200),
    ]
    assert [s.name for s in (consolidation, decode, monitor)] == list(NAMES)
    assert all("2 threads" in s.method for s in (consolidation, decode, monitor))


@pytest.mark.parametrize("name", NAMES)
def test_every_summary_is_ordered_positive_and_one_run(sections, name):
    for row in sections[name].rows:
        for key in SUMMARIES[name]:
            summary = row[key]
            assert 0 < summary["min"] <= summary["median"] <= summary["max"], (key, summary)
            assert summary["runs"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_paired_ratios_are_the_ratios_of_the_rounds(sections, name):
    key, numerator, denominator = RATIOS[name]
    for row in sections[name].rows:
        samples = row["samples"]
        ratios = [a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)]
        assert row[key]["median"] == pytest.approx(ratios[0])
        assert row[key]["min"] == pytest.approx(min(ratios))
        assert row[key]["max"] == pytest.approx(max(ratios))


@pytest.mark.parametrize("name", NAMES)
def test_headlines_are_there_and_positive(sections, name):
    headline = sections[name].headline
    assert set(headline) == HEADLINES[name]
    assert all(value is not None and value > 0 for value in headline.values())


@pytest.mark.parametrize("name", NAMES)
def test_the_table_shows_every_timed_cell(sections, name):
    section = sections[name]
    header, _, *body = markdown_table(section)
    assert len(body) == len(section.rows)
    for row in section.rows:
        for column in section.columns:
            assert lookup(row, column.key) is not None, column.key
    assert all(" - " not in line for line in body), body


def test_a_memgen_insertion_costs_more_than_a_consolidation(sections):
    """MemGen re-encodes the whole context; FlashMem reads the cache it already has."""
    row = next(r for r in sections["consolidation"].rows if r["context_tokens"] == 512)
    assert row["memgen"]["median"] > row["flashmem"]["median"]
    assert row["memgen_over_flashmem"]["median"] > 1


def test_memgen_includes_its_re_encoding(sections):
    for row in sections["consolidation"].rows:
        samples = row["samples"]
        assert all(m > r for m, r in zip(samples["memgen"], samples["reprocess"], strict=True))


def test_memory_on_decodes_after_a_cache_of_about_the_same_length(sections):
    (row,) = sections["decode"].rows
    assert abs(row["memory_cache_tokens"] - row["history_tokens"]) <= row["history_tokens"] // 10
