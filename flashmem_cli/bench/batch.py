"""Benchmark: generated tokens/s and peak memory of `flashmem run` at several --parallel values,
beside llama.cpp's own C++ `llama-batched-bench` when one is found.

Each measured run is a process of its own (`bench/batch_worker.py`), so that its peak RSS, read
with os.wait4, is that run's alone; its tokens/s leave out the model load.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flashmem_cli import models
from flashmem_cli.batch.requests import BatchRequest, parse_lines
from flashmem_cli.batch.scheduler import prompt_tokens
from flashmem_cli.bench.method import BenchOptions, Summary, interleaved, paired_ratio
from flashmem_cli.bench.report import Column, Plot, Section
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.threads import stock_openmp_env

Say = Callable[[str], None]

BATCHED_BENCH_ENV = "FLASHMEM_LLAMA_BATCHED_BENCH"
CTX = 256  # -c of each flashmem sequence
PEAK_RSS = Path(__file__).with_name("peak_rss.py")
RUNS = 3
WARMUPS = 0  # every run is a fresh process; the model file is in the page cache by now
TIMEOUT_S = 600
TOPICS = ["the sea", "a city at night", "bread", "winter", "a library", "bees", "trains", "rain"]


@dataclass(frozen=True)
class Work:
    prompts: int
    tokens: int
    parallel: tuple[int, ...]


FULL = Work(prompts=16, tokens=20, parallel=(1, 4, 8))  # about 2.5 min on 2 cores
QUICK = Work(prompts=4, tokens=8, parallel=(1, 2))


@dataclass(frozen=True)
class FlashmemRun:
    tokens_per_s: float  # generated tokens / the run's time after the model load
    decode_tokens_per_s: float  # generated tokens / time inside llama_decode
    peak_rss_mib: float
    kv_cells: int
    generated_tokens: int


@dataclass(frozen=True)
class CppRun:
    tokens_per_s: float  # S_TG: generation only
    peak_rss_mib: float


def run(options: BenchOptions, say: Say) -> Section:
    work = QUICK if options.quick else FULL
    options = replace(options, threads=options.thread_count())  # one for all runs
    tool = batched_bench()
    with tempfile.TemporaryDirectory(prefix="flashmem-bench-batch-") as tmp:
        source = write_prompts(Path(tmp) / "prompts.jsonl", work.prompts, work.tokens)
        npp = prompt_length(source, options) if tool else 0
        runs = measure(Path(tmp), source, work, options, tool, npp, say)
    return section(work, options, runs, tool, npp)


# -- the work ---------------------------------------------------------------------------------


def write_prompts(path: Path, prompts: int, tokens: int) -> Path:
    """Distinct prompts that invite a long reply (lengths vary if one stops early)."""
    lines = [
        {
            "id": f"p{i}",
            "prompt": f"Story {i}. Write a long story about {TOPICS[i % len(TOPICS)]}:",
            "max_tokens": tokens,
        }
        for i in range(prompts)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def prompt_length(source: Path, options: BenchOptions) -> int:
    """The prompts' median length in tokens, as flashmem feeds them: the C++ tool's -npp."""
    requests = [r for r in parse_lines(source.read_bytes()) if isinstance(r, BatchRequest)]
    with Model(models.resolve(options.model).path, n_gpu_layers=0) as model:
        template = models.chat_template_for(model)
        lengths = sorted(sum(map(len, prompt_tokens(model, template, r))) for r in requests)
    return lengths[len(lengths) // 2]


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Runs:
    """The measured runs of each --parallel value, in the order they ran."""

    flashmem: dict[int, list[FlashmemRun]]
    cpp: dict[int, list[CppRun]]
    cpp_failure: str | None = None  # the C++ tool failed: left out of later rounds

    def after(self, warmups: int) -> Runs:
        """Without the warm-up rounds; without any C++ figures if the tool failed."""
        cpp = {p: [] if self.cpp_failure else r[warmups:] for p, r in self.cpp.items()}
        flashmem = {p: r[warmups:] for p, r in self.flashmem.items()}
        return Runs(flashmem, cpp, self.cpp_failure)


def measure(
    tmp: Path,
    source: Path,
    work: Work,
    options: BenchOptions,
    tool: Path | None,
    npp: int,
    say: Say,
) -> Runs:
    """flashmem at each --parallel value, and the C++ tool at each -npl, once per round."""
    runs = Runs({p: [] for p in work.parallel}, {p: [] for p in work.parallel})
    tags = itertools.count()

    def flashmem_method(parallel: int) -> Callable[[], float]:
        def call() -> float:
            say(f"batch: flashmem run --parallel {parallel}")
            tag = tmp / f"run{next(tags)}"
            result = flashmem_run(source, tag, parallel, work, options)
            runs.flashmem[parallel].append(result)
            return result.tokens_per_s

        return call

    def cpp_method(tool: Path, parallel: int) -> Callable[[], float]:
        def call() -> float:
            if runs.cpp_failure is None:
                say(f"batch: {tool.name} -npl {parallel}")
                try:
                    runs.cpp[parallel].append(cpp_run(tool, npp, parallel, work, options))
                except (RuntimeError, OSError) as exc:
                    runs.cpp_failure = str(exc)
            return 0.0

        return call

    methods = {f"flashmem p{p}": flashmem_method(p) for p in work.parallel}
    if tool is not None:
        methods |= {f"cpp p{p}": cpp_method(tool, p) for p in work.parallel}
    interleaved(methods, options.runs(RUNS), WARMUPS)
    return runs.after(WARMUPS)


def flashmem_run(
    source: Path, tag: Path, parallel: int, work: Work, options: BenchOptions
) -> FlashmemRun:
    command = [
        sys.executable,
        "-m",
        "flashmem_cli.bench.batch_worker",
        str(source),
        f"{tag}.out.jsonl",
        f"{tag}.errors.jsonl",
        f"--parallel={parallel}",
        f"--tokens={work.tokens}",
        f"--ctx={CTX}",
        f"--threads={options.threads}",
    ]
    if options.model:
        command.append(f"--model={options.model}")
    if options.n_gpu_layers is not None:
        command.append(f"--n-gpu-layers={options.n_gpu_layers}")
    output, rss = run_measured(command)
    stats = json.loads(next(ln for ln in reversed(output.splitlines()) if ln.startswith("{")))
    if stats["failed"]:
        first = Path(f"{tag}.errors.jsonl").read_text().splitlines()[0]
        raise RuntimeError(f"{stats['failed']} requests failed, the first: {first}")
    tokens = stats["generated_tokens"]
    return FlashmemRun(
        tokens_per_s=tokens / (stats["elapsed_s"] - stats["setup_s"]),
        decode_tokens_per_s=tokens / stats["decode_s"],
        peak_rss_mib=rss,
        kv_cells=stats["kv_cells"],
        generated_tokens=tokens,
    )


def cpp_run(tool: Path, npp: int, parallel: int, work: Work, options: BenchOptions) -> CppRun:
    """One llama-batched-bench process for one -npl: its own peak RSS, like a flashmem run."""
    output, rss = run_measured(
        cpp_command(tool, npp, parallel, work, options), stock_openmp_env(dict(os.environ))
    )
    speeds = parse_batched_bench(output)
    if parallel not in speeds:
        raise RuntimeError(f"llama-batched-bench printed no -npl {parallel} row:\n{output[-2000:]}")
    return CppRun(tokens_per_s=speeds[parallel], peak_rss_mib=rss)


def cpp_command(
    tool: Path, npp: int, parallel: int, work: Work, options: BenchOptions
) -> list[str]:
    """The same work as a flashmem run: `parallel` sequences of about the prompts' length, each
    generating `work.tokens`; -c just big enough (the tool skips a size that does not fit)."""
    command = [
        str(tool),
        "-m",
        str(models.resolve(options.model).path),
        "-c",
        str(parallel * (npp + work.tokens)),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(npp),
        "-ntg",
        str(work.tokens),
        "-npl",
        str(parallel),
        "-fa",
        "off",
        "-t",
        str(options.threads),
    ]
    if options.n_gpu_layers is not None:
        command += ["-ngl", str(options.n_gpu_layers)]
    return command


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """A command's stdout and stderr together, and its peak RSS in MiB, which a small launcher
    (peak_rss.py) reads with wait4: this process's own peak would be counted in otherwise."""
    with (
        tempfile.TemporaryDirectory(prefix="flashmem-rss-") as tmp,
        tempfile.TemporaryFile() as output,
    ):
        rss_file = Path(tmp) / "rss"
        launcher = [sys.executable, str(PEAK_RSS), str(rss_file), *command]
        proc = subprocess.Popen(launcher, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(TIMEOUT_S)
        except BaseException:  # a timeout or Ctrl-C: never leave it behind
            proc.kill()
            proc.wait()
            raise
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} exited {proc.returncode}:\n{text[-2000:]}")
        return text, rss_mib(int(rss_file.read_text()))


def rss_mib(ru_maxrss: int, platform: str = sys.platform) -> float:
    """ru_maxrss is KiB on Linux, bytes on macOS."""
    return ru_maxrss / (1024 * 1024 if platform == "darwin" else 1024)


# -- llama-batched-bench ----------------------------------------------------------------------


def batched_bench() -> Path | None:
    """$FLASHMEM_LLAMA_BATCHED_BENCH, else llama-batched-bench on the PATH."""
    found = os.environ.get(BATCHED_BENCH_ENV) or shutil.which("llama-batched-bench")
    return Path(found) if found and Path(found).is_file() else None


def parse_batched_bench(output: str) -> dict[int, float]:
    """S_TG t/s per B (-npl) from the tool's markdown table."""
    speeds: dict[int, float] = {}
    header: list[str] | None = None
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells and "B" in cells:
            header = cells
        elif header and len(cells) == len(header) and re.fullmatch(r"\d+", cells[0]):
            row = dict(zip(header, cells, strict=True))
            speeds[int(row["B"])] = float(row["S_TG t/s"])
    return speeds


# -- the section ------------------------------------------------------------------------------


def section(work: Work, options: BenchOptions, runs: Runs, tool: Path | None, npp: int) -> Section:
    rows = [row(p, runs.flashmem[p], runs.cpp[p]) for p in work.parallel]
    return Section(
        name="batch",
        title="Batch throughput and memory (`flashmem run --parallel N`)",
        method=method_text(work, options, tool, npp),
        columns=COLUMNS,
        rows=rows,
        headline=headline(work, runs),
        notes=notes(work, rows, tool, runs.cpp_failure),
        plots=PLOTS,
    )


def row(parallel: int, runs: list[FlashmemRun], cpp: list[CppRun]) -> dict[str, Any]:
    wall = [r.tokens_per_s for r in runs]
    rss = [r.peak_rss_mib for r in runs]
    result: dict[str, Any] = {
        "parallel": parallel,
        "generated_tokens": runs[0].generated_tokens,
        "kv_cells": runs[0].kv_cells,
        "tokens_per_s": Summary.of(wall).as_dict(),
        "tokens_per_s_range": f"{min(wall):.1f}-{max(wall):.1f}",
        "decode_tokens_per_s": Summary.of([r.decode_tokens_per_s for r in runs]).as_dict(),
        "peak_rss_mib": Summary.of(rss).as_dict(),
    }
    if cpp:
        cpp_wall = [r.tokens_per_s for r in cpp]
        cpp_rss = [r.peak_rss_mib for r in cpp]
        result |= {
            "cpp_tokens_per_s": Summary.of(cpp_wall).as_dict(),
            "cpp_peak_rss_mib": Summary.of(cpp_rss).as_dict(),
            "tokens_per_s_vs_cpp": paired_ratio(wall, cpp_wall).as_dict(),
            "peak_rss_vs_cpp": paired_ratio(rss, cpp_rss).as_dict(),
        }
    return result


COLUMNS = [
    Column("parallel", "--parallel"),
    Column("tokens_per_s.median", "tok/s (wall)", "{:.1f}"),
    Column("tokens_per_s_range", "wall min-max"),
    Column("decode_tokens_per_s.median", "tok/s (decode)", "{:.1f}"),
    Column("peak_rss_mib.median", "peak RSS (MiB)", "{:.0f}"),
    Column("kv_cells", "KV cells"),
    Column("cpp_tokens_per_s.median", "llama-batched-bench S_TG tok/s", "{:.1f}"),
    Column("cpp_peak_rss_mib.median", "its peak RSS (MiB)", "{:.0f}"),
    Column("tokens_per_s_vs_cpp.median", "tok/s flashmem / C++", "{:.2f}"),
    Column("peak_rss_vs_cpp.median", "RSS flashmem / C++", "{:.2f}"),
]

PLOTS = [
    Plot(
        name="throughput",
        title="Generated tokens/s",
        x="parallel",
        x_label="--parallel (sequences)",
        y_label="tokens/s",
        lines=(
            ("tokens_per_s.median", "flashmem wall"),
            ("decode_tokens_per_s.median", "flashmem decode"),
            ("cpp_tokens_per_s.median", "llama-batched-bench S_TG"),
        ),
    ),
    Plot(
        name="memory",
        title="Peak RSS",
        x="parallel",
        x_label="--parallel (sequences)",
        y_label="MiB",
        lines=(
            ("peak_rss_mib.median", "flashmem run"),
            ("cpp_peak_rss_mib.median", "llama-batched-bench"),
        ),
    ),
]


def headline(work: Work, runs: Runs) -> dict[str, float | None]:
    """Scaling from one sequence to the most, memory at the most, and both against C++."""
    flashmem, cpp = runs.flashmem, runs.cpp
    first, top = work.parallel[0], work.parallel[-1]
    wall_top = [r.tokens_per_s for r in flashmem[top]]
    rss_top = [r.peak_rss_mib for r in flashmem[top]]
    scaling = paired_ratio(wall_top, [r.tokens_per_s for r in flashmem[first]]).median
    result: dict[str, float | None] = {
        f"tokens_per_s_p{top}_over_p{first}": scaling,
        f"peak_rss_mib_p{top}": Summary.of(rss_top).median,
        f"tokens_per_s_vs_cpp_p{top}": None,
        f"peak_rss_vs_cpp_p{top}": None,
    }
    if cpp[top]:
        cpp_top = cpp[top]
        result[f"tokens_per_s_vs_cpp_p{top}"] = paired_ratio(
            wall_top, [r.tokens_per_s for r in cpp_top]
        ).median
        result[f"peak_rss_vs_cpp_p{top}"] = paired_ratio(
            rss_top, [r.peak_rss_mib for r in cpp_top]
        ).median
    return result


def method_text(work: Work, options: BenchOptions, tool: Path | None, npp: int) -> str:
    parallel = ", ".join(map(str, work.parallel))
    rounds = f"{options.runs(RUNS)} interleaved rounds, no warm-up (each run a fresh process)"
    text = (
        f"{work.prompts} greedy prompts x {work.tokens} generated tokens through `flashmem run` "
        f"(-c {CTX}, --temp 0, -t {options.threads}) at --parallel {parallel}; {rounds}; "
        "medians (min-max of wall). "
        "Each run is a fresh process; its peak RSS comes from os.wait4. "
        "Wall tok/s: generated tokens / the run's time after the model load and context "
        "creation (prompt processing and scheduling included); decode tok/s: generated tokens / "
        "time inside llama_decode."
    )
    if tool is not None:
        text += (
            f" Beside each: `{tool.name} -npp {npp} -ntg {work.tokens} -npl N -c N x "
            f"({npp} + {work.tokens}) -b 2048 -ub 512 -fa off -t {options.threads}`, one process "
            "per N (so each row has its own peak RSS; its KV cache is one stream per sequence, "
            "each padded to 256 cells); its S_TG counts generation only, on random prompt "
            "tokens. Ratios are taken within each round."
        )
    return text


def notes(
    work: Work, rows: list[dict[str, Any]], tool: Path | None, failure: str | None
) -> list[str]:
    result = []
    if tool is None:
        result.append(
            "No llama-batched-bench: build llama.cpp's (`cmake --build build --target "
            f"llama-batched-bench`) and set {BATCHED_BENCH_ENV}=/path/to/llama-batched-bench "
            "(or put it on the PATH) for the C++ columns."
        )
    if failure:
        result.append(f"llama-batched-bench failed, C++ columns left out: {failure[:500]}")
    short = [r["parallel"] for r in rows if r["generated_tokens"] < work.prompts * work.tokens]
    if short:
        result.append(f"Some replies stopped before {work.tokens} tokens at --parallel {short}.")
    return result
