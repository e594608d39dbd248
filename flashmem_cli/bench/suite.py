"""`flashmem bench`: the benchmarks by name, run one after another into one Results."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from flashmem_cli.bench.method import BenchOptions
from flashmem_cli.bench.report import Results, Section

Say = Callable[[str], None]

# name -> module; each module has `run(options: BenchOptions, say: Say) -> Section`
BENCHES = {
    "resume": "flashmem_cli.bench.resume",
    "consolidation": "flashmem_cli.bench.consolidation",
    "decode": "flashmem_cli.bench.decode",
    "monitor": "flashmem_cli.bench.monitor",
    "batch": "flashmem_cli.bench.batch",
    "threads": "flashmem_cli.bench.threads",
    "recall": "flashmem_cli.bench.recall_bench",
    "ray": "flashmem_cli.bench.ray_bench",
}
# Run only when named: `ray` starts a Ray head and needs the ray extra, and `all` (make bench)
# keeps to 15 minutes on 2 cores.
NOT_IN_ALL = frozenset({"ray"})


def names(which: str) -> list[str]:
    return [n for n in BENCHES if n not in NOT_IN_ALL] if which == "all" else [which]


def run_one(name: str, options: BenchOptions, say: Say) -> Section:
    """The benchmark's section; one that fails becomes a section saying why, so that the
    others of an `all` run are kept."""
    module = importlib.import_module(BENCHES[name])
    try:
        section: Section = module.run(options, say)
    except Exception as exc:  # noqa: BLE001 - reported in the results, not lost with the rest
        return failed(name, exc)
    return section


def failed(name: str, exc: Exception) -> Section:
    return Section(
        name=name,
        title=f"{name}: failed",
        method=f"The benchmark stopped: {type(exc).__name__}: {exc}",
        columns=[],
        rows=[],
        headline={"failed": 1.0},
        notes=[f"{type(exc).__name__}: {exc}"],
    )


def run(
    which: str,
    options: BenchOptions,
    machine: dict,
    say: Say,
    on_section: Callable[[Results], None] | None = None,
) -> Results:
    started = time.perf_counter()
    results = Results(
        machine=machine,
        command=" ".join(["flashmem", *sys.argv[1:]]) if sys.argv else "flashmem bench",
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    for name in names(which):
        section = run_one(name, options, say)
        results.sections.append(section)
        results.elapsed_s = time.perf_counter() - started
        if on_section:
            on_section(results)
    results.elapsed_s = time.perf_counter() - started
    return results
