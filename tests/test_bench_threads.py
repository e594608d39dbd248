"""The load-aware default thread count (engine/threads.py) and `flashmem bench threads`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import MODEL_PATH

from flashmem_cli.bench import threads as bench
from flashmem_cli.bench.method import BenchOptions
from flashmem_cli.bench.report import Section, markdown_table
from flashmem_cli.engine import threads

# -- the adaptive choice, with fake readings ------------------------------------------------------


@pytest.mark.parametrize(
    ("usable", "others", "expected"),
    [
        (2, 0, 2),  # idle: every core
        (2, 1, 1),  # one busy neighbour: the core it leaves
        (2, 7, 1),  # swamped: still one thread
        (2, 0.4, 2),  # a blip rounds away
        (2, 0.6, 1),
        (1, 0, 1),
        (4, 1, 3),
        (8, 0, 4),  # never above the old rule (half the cores above 4)
        (8, 5, 3),
        (16, 20, 1),
    ],
)
def test_free_cores(usable: int, others: float, expected: int) -> None:
    assert threads.free_cores(usable, others) == expected


def test_ceiling_is_the_old_default() -> None:
    assert [threads.ceiling_threads(n) for n in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 3, 4, 3, 4, 8]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.52 0.58 0.59 3/467 12345\n", 3),
        ("9.31 8.23 4.63 12/123 22392", 12),
        ("0.00 0.00 0.00 1/1 1", 1),
        ("", None),
        ("0.52 0.58 0.59", None),
        ("0.52 0.58 0.59 467 12345", None),
        ("0.52 0.58 0.59 x/467 12345", None),
    ],
)
def test_parse_running(text: str, expected: int | None) -> None:
    assert threads.parse_running(text) == expected


def test_thread_state_after_the_last_parenthesis() -> None:
    assert threads.thread_state("4242 (python3) R 1 4242 4242 0 -1") == "R"
    assert threads.thread_state("4242 (odd) name (x)) S 1 4242") == "S"
    assert threads.thread_state("garbage") == "?"


def test_own_running_counts_runnable_threads(tmp_path: Path) -> None:
    for tid, state in ((1, "R"), (2, "S"), (3, "R"), (4, "D")):
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "stat").write_text(f"{tid} (python) {state} 1 1 1 0")
    assert threads.own_running(tmp_path) == 2
    assert threads.own_running(tmp_path / "none") == 1  # at least the caller


def test_sample_others_takes_the_median_less_our_own() -> None:
    readings = iter(["1 1 1 5/99 1", "1 1 1 9/99 1", "1 1 1 4/99 1"])
    others = threads.sample_others(lambda: next(readings), lambda: 2, 3, 0)
    assert others == 3  # median of 3, 7, 2
    assert threads.sample_others(lambda: "1 1 1 1/9 1", lambda: 3, 2, 0) == 0
    assert threads.sample_others(lambda: "unreadable", lambda: 1, 3, 0) is None


def test_adaptive_threads_stays_in_bounds() -> None:
    usable = threads.usable_cores()
    assert 1 <= threads.adaptive_threads() <= threads.ceiling_threads(usable)


def test_short_spins_leave_a_user_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv(threads.SPINS_MARK_ENV, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    threads.short_openmp_spins()
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    threads.short_openmp_spins()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    threads.short_openmp_spins()
    assert os.environ["GOMP_SPINCOUNT"] == threads.OPENMP_SPINS
    assert "GOMP_SPINCOUNT" not in threads.stock_openmp_env(dict(os.environ))


def test_a_users_spin_count_reaches_llama_cpp_tools_too() -> None:
    assert threads.stock_openmp_env({"GOMP_SPINCOUNT": "7"}) == {"GOMP_SPINCOUNT": "7"}


def test_no_load_adaptation_without_proc_loadavg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "linux_others", lambda: None)
    assert threads.adaptive_threads() == threads.ceiling_threads(threads.usable_cores())


def test_llama_cpp_loaded_with_short_spins() -> None:
    """libgomp reads the spin count once, as it loads: flashmem sets it before that."""
    code = "import flashmem_cli.engine.backend, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == threads.OPENMP_SPINS
    if "GOMP_SPINCOUNT = " in done.stderr:  # a GCC OpenMP build shows what it read
        assert f"GOMP_SPINCOUNT = '{threads.OPENMP_SPINS}'" in done.stderr


# -- the benchmark's plan and headline, without a model -------------------------------------------


def test_plans() -> None:
    quick = bench.plan_for(BenchOptions(quick=True), 8)
    assert quick.loads == (bench.IDLE, bench.CPU_BOUND)
    assert quick.settings == ("1", bench.AUTO)
    assert (quick.prompt_tokens, quick.decode_tokens, quick.runs) == (64, 8, 1)
    full = bench.plan_for(BenchOptions(), 8)
    assert full.loads == bench.LOADS
    assert full.settings == ("1", "2", "3", "4", bench.AUTO)
    assert (full.prompt_tokens, full.decode_tokens, full.runs) == (256, 32, bench.RUNS)
    assert bench.plan_for(BenchOptions(), 2).settings == ("1", "2", bench.AUTO)
    assert bench.plan_for(BenchOptions(threads=3), 2).settings == ("1", "2", "3", bench.AUTO)


def fake_row(load: str, setting: str, turn_ms: float) -> dict[str, Any]:
    return {"load": load, "threads": setting, "turn_ms": {"median": turn_ms}}


def test_headline_is_busy_over_idle() -> None:
    plan = bench.plan_for(BenchOptions(), 2)
    rows = [
        fake_row(load, setting, ms)
        for load, base in ((bench.IDLE, 100.0), (bench.CPU_BOUND, 120.0), (bench.FLASHMEM, 150.0))
        for setting, ms in (("1", base * 2), ("2", base), (bench.AUTO, base))
    ]
    assert bench.headline(rows, plan) == {
        "busy_over_idle_turn": pytest.approx(1.2),
        "busy_over_idle_turn_all_cores": pytest.approx(1.2),
        "flashmem_over_idle_turn": pytest.approx(1.5),
        "flashmem_over_idle_turn_all_cores": pytest.approx(1.5),
    }
    quick = bench.plan_for(BenchOptions(quick=True), 2)
    quick_rows = [r for r in rows if r["load"] != bench.FLASHMEM and r["threads"] != "2"]
    assert bench.headline(quick_rows, quick) == {
        "busy_over_idle_turn": pytest.approx(1.2),
        "busy_over_idle_turn_all_cores": None,
        "flashmem_over_idle_turn": None,
        "flashmem_over_idle_turn_all_cores": None,
    }


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_neighbour_is_killed_on_ctrl_c() -> None:
    started: list[subprocess.Popen[str]] = []
    with pytest.raises(KeyboardInterrupt), bench.neighbour(bench.CPU_BOUND, MODEL_PATH) as proc:
        assert proc is not None
        started.append(proc)
        raise KeyboardInterrupt
    assert started[0].poll() is not None
    assert gone(started[0].pid)


# -- the real model ------------------------------------------------------------------------------


@dataclass
class QuickRun:
    section: Section
    neighbours: list[subprocess.Popen[str]]
    said: list[str]


@pytest.fixture(scope="module")
def quick() -> Iterator[QuickRun]:
    assert MODEL_PATH.is_file(), f"{MODEL_PATH} is missing: run `make install`"
    neighbours: list[subprocess.Popen[str]] = []
    real_start = bench.start_neighbour

    def recording(load: str, model: Path) -> subprocess.Popen[str] | None:
        process = real_start(load, model)
        if process is not None:
            neighbours.append(process)
        return process

    said: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "start_neighbour", recording)
        section = bench.run(BenchOptions(quick=True, model=str(MODEL_PATH)), said.append)
    yield QuickRun(section, neighbours, said)


@pytest.mark.model
def test_quick_run_has_a_row_per_condition(quick: QuickRun) -> None:
    conditions = [(row["load"], row["threads"]) for row in quick.section.rows]
    assert conditions == [
        (load, setting) for load in bench.QUICK_LOADS for setting in ("1", bench.AUTO)
    ]
    header, _, *body = markdown_table(quick.section)
    assert "decode ms/token" in header
    assert len(body) == len(conditions)
    assert all(line.startswith("threads: ") for line in quick.said)


@pytest.mark.model
def test_quick_summaries_are_sane(quick: QuickRun) -> None:
    for row in quick.section.rows:
        for name in ("prefill_tok_s", "decode_ms_per_token", "turn_ms"):
            summary = row[name]
            assert 0 < summary["min"] <= summary["median"] <= summary["max"], name
            assert summary["runs"] == 1
        assert row["turn_ms"]["median"] == pytest.approx(
            1000 * bench.QUICK_PROMPT_TOKENS / row["prefill_tok_s"]["median"]
            + bench.QUICK_DECODE_TOKENS * row["decode_ms_per_token"]["median"]
        )
        assert all(n >= 1 for n in row["threads_used"])
    assert quick.section.headline["busy_over_idle_turn"] is not None


@pytest.mark.model
def test_neighbours_are_gone_after_the_run(quick: QuickRun) -> None:
    assert len(quick.neighbours) == 1  # the cpu-bound one; idle has none
    for process in quick.neighbours:
        assert process.poll() is not None
        assert gone(process.pid)


@pytest.mark.model
def test_flashmem_neighbour_decodes_then_is_killed(model_path: Path) -> None:
    with bench.neighbour(bench.FLASHMEM, model_path) as process:
        assert process is not None
        assert process.poll() is None  # said "ready" and still decoding
    assert process.poll() is not None
    assert gone(process.pid)


@pytest.mark.model
def test_set_threads(model_path: Path) -> None:
    from flashmem_cli.engine.backend import Context, ContextParams, Model

    with Model(model_path, n_gpu_layers=0) as model, Context(model, ContextParams(64)) as ctx:
        ctx.set_threads(1)
        assert ctx.n_threads == 1
        ctx.set_threads(0)
        assert ctx.n_threads == 1
