"""The batch benchmark: its parser of llama-batched-bench's table, its memory units, and a quick
run end to end (flashmem for real, the C++ tool replaced by a script that prints its table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flashmem_cli.bench import batch
from flashmem_cli.bench.method import BenchOptions

# Captured from llama.cpp's llama-batched-bench (native build of the vendored llama.cpp):
# -m gemma-3-270m-q4_k_m.gguf -c 512 -b 2048 -ub 512 -npp 14 -ntg 8 -npl 1,2,4 -fa off -t 2
SAMPLE = """\
llama_batched_bench: n_kv_max = 1024, n_batch = 2048, n_ubatch = 512, flash_attn = 0, is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    14 |      8 |    1 |     22 |    0.089 |   157.38 |    0.228 |    35.14 |    0.317 |    69.48 |
|    14 |      8 |    2 |     44 |    0.169 |   165.52 |    0.419 |    38.16 |    0.588 |    74.78 |
|    14 |      8 |    4 |     88 |    0.277 |   202.49 |    0.522 |    61.34 |    0.798 |   110.24 |
"""


def test_the_parser_reads_s_tg_per_number_of_sequences():
    speeds = batch.parse_batched_bench(SAMPLE)
    assert speeds == {1: 35.14, 2: 38.16, 4: 61.34}


def test_the_parser_finds_nothing_in_other_output():
    assert batch.parse_batched_bench("main: error: unable to load model\n") == {}


def test_peak_rss_is_kib_on_linux_and_bytes_on_macos():
    assert batch.rss_mib(2048, "linux") == 2.0
    assert batch.rss_mib(2 * 1024 * 1024, "darwin") == 2.0


def test_the_tool_is_found_through_the_environment(tmp_path, monkeypatch):
    tool = tmp_path / "llama-batched-bench"
    tool.write_text("")
    monkeypatch.setenv(batch.BATCHED_BENCH_ENV, str(tool))
    assert batch.batched_bench() == tool
    monkeypatch.setenv(batch.BATCHED_BENCH_ENV, str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert batch.batched_bench() is None


def fake_tool(folder: Path) -> Path:
    """A stand-in for llama-batched-bench that prints the sample (rows for -npl 1, 2 and 4)."""
    (folder / "sample.txt").write_text(SAMPLE)
    tool = folder / "llama-batched-bench"
    tool.write_text(f"#!/bin/sh\ncat '{folder / 'sample.txt'}'\n")
    tool.chmod(0o755)
    return tool


@pytest.mark.model
def test_a_quick_run_reports_every_parallel_value(home, model_path, tmp_path, monkeypatch):
    monkeypatch.setenv(batch.BATCHED_BENCH_ENV, str(fake_tool(tmp_path)))
    said: list[str] = []
    section = batch.run(BenchOptions(quick=True, threads=2), said.append)
    assert [row["parallel"] for row in section.rows] == list(batch.QUICK.parallel)
    for row in section.rows:
        assert row["tokens_per_s"]["median"] > 0 and row["decode_tokens_per_s"]["median"] > 0
        assert row["peak_rss_mib"]["median"] > 50  # a Python process with a model
        assert row["kv_cells"] == 256 * (row["parallel"] + 2)
        assert row["cpp_tokens_per_s"]["median"] > 0 and row["cpp_peak_rss_mib"]["median"] > 0
        assert row["tokens_per_s_vs_cpp"]["median"] > 0
    top = batch.QUICK.parallel[-1]
    assert section.headline[f"tokens_per_s_p{top}_over_p1"] is not None
    assert section.headline[f"tokens_per_s_vs_cpp_p{top}"] is not None
    assert not section.notes, section.notes
    assert all(len(cells) == len(section.columns) for cells in section.table())
    assert any("-npl" in line for line in said)


def test_without_the_tool_the_cpp_columns_are_dashes_and_a_note_says_how():
    run = batch.FlashmemRun(50.0, 55.0, 300.0, 768, 32)
    runs = batch.Runs({1: [run], 2: [run]}, {1: [], 2: []})
    section = batch.section(batch.QUICK, BenchOptions(quick=True), runs, None, 0)
    assert section.table()[1][-4:] == ["-", "-", "-", "-"]
    assert batch.BATCHED_BENCH_ENV in section.notes[0]
    assert section.headline["tokens_per_s_vs_cpp_p2"] is None


def test_peak_rss_is_the_commands_not_the_benchs() -> None:
    """Linux carries a parent's peak RSS into its children: the launcher must not report it."""
    import numpy as np

    from flashmem_cli.bench.batch import run_measured

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB touched in this process
    small = [sys.executable, "-c", "print('hi')"]
    big = [sys.executable, "-c", "b = bytearray(200 * 2**20); print('hi')"]
    text, small_rss = run_measured(small)
    _, big_rss = run_measured(big)
    assert "hi" in text
    assert small_rss < 100, small_rss
    assert 200 < big_rss < 300, big_rss
    assert ballast.sum() > 0
