"""The bench's methodology and reports: interleaving, medians, paired ratios, results files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from flashmem_cli.bench import readme, report
from flashmem_cli.bench.method import Summary, interleaved, paired_ratio
from flashmem_cli.bench.report import Column, Plot, Results, Section


def test_interleaved_rotates_the_order_and_drops_warmups() -> None:
    calls: list[str] = []

    def method(name: str, value: float):  # noqa: ANN202
        def run() -> float:
            calls.append(name)
            return value + len(calls)

        return run

    samples = interleaved({"a": method("a", 0), "b": method("b", 100)}, runs=3, warmups=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert samples["a"] == [4, 5, 8]  # warm-up round (calls 1-2) dropped
    assert samples["b"] == [103, 106, 107]


def test_summary_is_median_min_max() -> None:
    summary = Summary.of([5.0, 1.0, 9.0, 3.0])
    assert (summary.median, summary.min, summary.max, summary.runs) == (4.0, 1.0, 9.0, 4)
    with pytest.raises(ValueError):
        Summary.of([])


def test_paired_ratio_divides_within_a_round() -> None:
    # the ratio of medians (20/2=10) differs from the median of per-round ratios
    ratio = paired_ratio([10.0, 20.0, 90.0], [1.0, 2.0, 3.0])
    assert ratio.median == 10.0
    assert (ratio.min, ratio.max) == (10.0, 30.0)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def sample_results() -> Results:
    section = Section(
        name="demo",
        title="Demo | speed",
        method="Two methods, interleaved.",
        columns=[
            Column("size", "size"),
            Column("fast.median", "fast (ms)", "{:.1f}"),
            Column("slow.median", "slow (ms)", "{:.1f}"),
            Column("missing", "missing"),
        ],
        rows=[
            {"size": 1, "fast": {"median": 1.25}, "slow": {"median": 10.0}},
            {"size": 2, "fast": {"median": 2.5}, "slow": {"median": 30.0}},
        ],
        headline={"slow_over_fast_at_2": 12.0},
        notes=["a note"],
        plots=[Plot("cost", "cost", "size", "size", "ms", (("fast.median", "fast"),))],
    )
    return Results({"cpu": "test"}, "flashmem bench demo", "2026-11-27", [section], 61.0)


def test_markdown_has_machine_method_table_and_missing_dash() -> None:
    text = report.markdown(sample_results(), {"demo": ["demo-cost.png"]})
    assert "| cpu | test |" in text
    assert "Two methods, interleaved." in text
    assert "| 2 | 2.5 | 30.0 | - |" in text
    assert "- a note" in text
    assert "![Demo | speed](demo-cost.png)" in text
    assert "1.0 min" in text


def test_write_results_json_md_and_a_real_png(tmp_path: Path) -> None:
    written = report.write(sample_results(), tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["sections"]["demo"]["headline"] == {"slow_over_fast_at_2": 12.0}
    assert data["machine"] == {"cpu": "test"}
    png = tmp_path / "out" / "demo-cost.png"
    assert png in written
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (600, 400)
    assert "(demo-cost.png)" in (tmp_path / "out" / "results.md").read_text()


def test_write_without_matplotlib_has_tables_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    written = report.write(sample_results(), tmp_path)
    assert sorted(p.name for p in written) == ["results.json", "results.md"]
    assert ".png" not in (tmp_path / "results.md").read_text()


def test_readme_block_is_replaced_and_links_point_at_figures() -> None:
    body = readme.generated_section("x\n![t](demo-cost.png)\n", "flashmem_cli/bench/figures")
    assert "![t](flashmem_cli/bench/figures/demo-cost.png)" in body
    old = f"intro\n{readme.BEGIN}\nold numbers\n{readme.END}\nrest\n"
    new = readme.replace_between_markers(old, body)
    assert "old numbers" not in new
    assert new.startswith("intro\n") and new.endswith(f"{readme.END}\nrest\n")
    with pytest.raises(ValueError):
        readme.replace_between_markers("no markers", body)


def test_pipes_in_cells_are_escaped() -> None:
    results = sample_results()
    results.machine = {"llama.cpp build": "CPU : AVX = 1 | F16C = 1"}
    assert "| llama.cpp build | CPU : AVX = 1 \\| F16C = 1 |" in report.markdown(results)


def test_gpu_offload_is_said_as_llama_cpp_logged_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmem_cli.bench import machine

    monkeypatch.setattr(machine, "supports_gpu_offload", lambda: False)
    assert machine.gpu_offload(None, 18).startswith("none")
    monkeypatch.setattr(machine, "supports_gpu_offload", lambda: True)
    assert machine.gpu_offload((19, 19), 18) == "19/19 layers on the GPU"
    assert "did not report" in machine.gpu_offload(None, 18)


def test_the_offload_line_of_llama_cpp_is_parsed() -> None:
    from flashmem_cli.engine.backend import _OFFLOAD_LINE

    found = _OFFLOAD_LINE.search(b"load_tensors: offloaded 12/19 layers to GPU\n")
    assert found is not None and found.groups() == (b"12", b"19")


def test_machine_is_described_with_the_real_build(model_path: Path) -> None:
    from flashmem_cli.bench import machine
    from flashmem_cli.bench.method import BenchOptions

    described = machine.describe(BenchOptions(model=str(model_path)))
    assert "CPU" in described["llama.cpp build"]
    assert "18 layers" in described["model"]
    assert described["gpu offload"]  # the CPU build here: "none: ..."


def test_a_failing_benchmark_becomes_a_section_and_the_rest_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    from flashmem_cli.bench import suite
    from flashmem_cli.bench.method import BenchOptions

    def broken(options: BenchOptions, say: object) -> Section:
        raise RuntimeError("the model ran away")

    good = sample_results().sections[0]
    modules = {
        "flashmem_cli.bench.one": types.SimpleNamespace(run=broken),
        "flashmem_cli.bench.two": types.SimpleNamespace(run=lambda options, say: good),
    }
    monkeypatch.setattr(
        suite, "BENCHES", {"one": "flashmem_cli.bench.one", "two": "flashmem_cli.bench.two"}
    )
    monkeypatch.setattr(suite.importlib, "import_module", modules.__getitem__)
    seen: list[int] = []
    results = suite.run(
        "all", BenchOptions(quick=True), {}, print, lambda r: seen.append(len(r.sections))
    )
    assert [s.name for s in results.sections] == ["one", "demo"]
    assert "RuntimeError: the model ran away" in results.sections[0].notes[0]
    assert results.sections[0].headline == {"failed": 1.0}
    assert seen == [1, 2]
    assert "the model ran away" in report.markdown(results)


def test_a_plot_that_fails_is_a_note_and_the_tables_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> bool:
        raise ValueError("bad axis")

    monkeypatch.setattr(report, "draw", broken)
    results = sample_results()
    report.write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["sections"]["demo"]
    assert "plot cost not drawn: bad axis" in results.sections[0].notes
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*"))


def test_benchmarks_run_on_a_fixed_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashmem_cli.bench.method import BenchOptions
    from flashmem_cli.engine import threads

    monkeypatch.setattr(threads, "linux_others", lambda: 5.0)  # a busy moment: auto would say 1
    assert BenchOptions(threads=3).thread_count() == 3
    expected = threads.ceiling_threads(threads.usable_cores())
    assert BenchOptions().thread_count() == expected
