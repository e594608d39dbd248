"""Benchmark: a turn's speed by thread count, on an idle machine and beside a busy neighbour.

For each load (idle; beside a CPU-bound process; beside a second flashmem decoding in a loop)
and each thread setting (1..N fixed, and "auto": the load-aware default, chosen again before
each turn as chat does), one context times the prefill of a prompt and a greedy reply, the
settings interleaved round by round. The neighbours are subprocesses, started for their load
and killed after it, whatever happens.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashmem_cli import models
from flashmem_cli.bench.method import BenchOptions, Summary, interleaved
from flashmem_cli.bench.report import Column, Plot, Section
from flashmem_cli.config import default_threads
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.threads import (
    OPENMP_SPIN_ENV,
    OPENMP_WAIT_ENV,
    runnable_others,
    usable_cores,
)
from flashmem_cli.errors import FlashmemError

Say = Callable[[str], None]

IDLE, CPU_BOUND, FLASHMEM = "idle", "cpu-bound", "flashmem"
LOADS = (IDLE, CPU_BOUND, FLASHMEM)
QUICK_LOADS = (IDLE, CPU_BOUND)
AUTO = "auto"
MAX_FIXED = 4
RUNS = 2
PROMPT_TOKENS, DECODE_TOKENS = 256, 32
QUICK_PROMPT_TOKENS, QUICK_DECODE_TOKENS = 64, 8
READY_TIMEOUT_S = 120.0
KILL_TIMEOUT_S = 10.0
# Busy until killed, or until orphaned (the benchmark killed by a signal it cannot catch).
SPIN = (
    "import os\nparent = os.getppid()\n"
    "while os.getppid() == parent:\n    for _ in range(1_000_000): pass"
)
TEXT = "The keeper climbed the stairs of the lighthouse at dusk and lit the lamp again. "


@dataclass(frozen=True)
class Plan:
    loads: tuple[str, ...]
    settings: tuple[str, ...]  # "1", "2", ..., "auto"
    prompt_tokens: int
    decode_tokens: int
    runs: int
    warmups: int


@dataclass(frozen=True)
class Turn:
    threads: int
    prefill_s: float
    decode_s: float

    @property
    def ms(self) -> float:
        return (self.prefill_s + self.decode_s) * 1000


def plan_for(options: BenchOptions, usable: int) -> Plan:
    if options.quick:
        return Plan(QUICK_LOADS, ("1", AUTO), QUICK_PROMPT_TOKENS, QUICK_DECODE_TOKENS, 1, 0)
    most = options.threads or min(usable, MAX_FIXED)
    fixed = tuple(str(n) for n in range(1, most + 1))
    return Plan(LOADS, (*fixed, AUTO), PROMPT_TOKENS, DECODE_TOKENS, RUNS, options.warmups())


def run(options: BenchOptions, say: Say) -> Section:
    plan = plan_for(options, usable_cores())
    path = models.resolve(options.model).path
    rows: list[dict[str, Any]] = []
    with Model(path, options.n_gpu_layers) as model:
        prompt = prompt_tokens(model, plan.prompt_tokens)
        n_ctx = plan.prompt_tokens + plan.decode_tokens + 16
        with Context(model, ContextParams(n_ctx, n_threads=1)) as ctx:
            timed_turn(ctx, prompt, 1, plan.decode_tokens)  # pages the weights in
            for i, load in enumerate(plan.loads):
                say(f"threads: {load}, settings {', '.join(plan.settings)}")
                with neighbour(load, path):
                    warmups = plan.warmups if i == 0 else 0
                    rows += measure_load(ctx, prompt, plan, load, warmups)
    return section(rows, plan)


def prompt_tokens(model: Model, n: int) -> list[int]:
    tokens = ([model.bos] if model.add_bos else []) + model.tokenize(TEXT * (n // 8 + 1))
    return tokens[:n]


def threads_for(setting: str) -> int:
    return default_threads() if setting == AUTO else int(setting)


def timed_turn(ctx: Context, prompt: list[int], threads: int, n_decode: int) -> Turn:
    """Prefill `prompt` into an empty cache, then decode `n_decode` greedy tokens."""
    ctx.set_threads(threads)
    ctx.clear()
    start = time.perf_counter()
    ctx.decode(prompt, 0)
    prefilled = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + n_decode):
        ctx.decode([int(ctx.logits_view().argmax())], pos)
    return Turn(threads, prefilled - start, time.perf_counter() - prefilled)


def measure_load(
    ctx: Context, prompt: list[int], plan: Plan, load: str, warmups: int
) -> list[dict[str, Any]]:
    """One row per thread setting under `load`, the settings interleaved."""
    turns: dict[str, list[Turn]] = {setting: [] for setting in plan.settings}

    def method(setting: str) -> Callable[[], float]:
        def once() -> float:
            turn = timed_turn(ctx, prompt, threads_for(setting), plan.decode_tokens)
            turns[setting].append(turn)
            return turn.ms

        return once

    others = runnable_others()
    interleaved({s: method(s) for s in plan.settings}, plan.runs, warmups)
    return [
        {**row(load, s, turns[s][warmups:], plan), "others_runnable": others} for s in plan.settings
    ]


def row(load: str, setting: str, turns: list[Turn], plan: Plan) -> dict[str, Any]:
    prefill = [plan.prompt_tokens / t.prefill_s for t in turns]
    decode = [t.decode_s * 1000 / plan.decode_tokens for t in turns]
    turn_ms = [t.ms for t in turns]
    return {
        "load": load,
        "threads": setting,
        "threads_used": [t.threads for t in turns],
        "prefill_tok_s": Summary.of(prefill).as_dict(),
        "decode_ms_per_token": Summary.of(decode).as_dict(),
        "turn_ms": Summary.of(turn_ms).as_dict(),
        "samples": {"prefill_tok_s": prefill, "decode_ms_per_token": decode, "turn_ms": turn_ms},
        "x_threads": None if setting == AUTO else int(setting),  # the plots' x axis
        f"turn_ms_{load}": statistics.median(turn_ms),
    }


# -- neighbours ----------------------------------------------------------------------------------


@contextmanager
def neighbour(load: str, model: Path) -> Iterator[subprocess.Popen[str] | None]:
    """The process that makes `load` (none when idle), killed on the way out."""
    process = start_neighbour(load, model)
    try:
        if load == FLASHMEM and process is not None:
            wait_ready(process, READY_TIMEOUT_S)
        yield process
    finally:
        if process is not None:
            stop(process)


def start_neighbour(load: str, model: Path) -> subprocess.Popen[str] | None:
    if load == IDLE:
        return None
    if load == CPU_BOUND:
        return subprocess.Popen([sys.executable, "-c", SPIN], text=True)
    if load == FLASHMEM:
        command = [sys.executable, "-m", "flashmem_cli.bench.threads_neighbour", "-m", str(model)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    raise ValueError(f"unknown load {load!r}")


def wait_ready(process: subprocess.Popen[str], timeout_s: float) -> None:
    """Until the neighbour says it decodes; a thread reads, since a pipe has no timeout."""
    lines: list[str] = []
    assert process.stdout is not None
    stdout = process.stdout
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not lines or lines[0].strip() != "ready":
        code = process.poll()
        why = f"exited with code {code}" if code is not None else f"silent for {timeout_s:.0f} s"
        raise FlashmemError(f"the flashmem neighbour did not start: {why}")


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(KILL_TIMEOUT_S)
    if process.stdout is not None:
        process.stdout.close()


# -- the section ---------------------------------------------------------------------------------


def section(rows: list[dict[str, Any]], plan: Plan) -> Section:
    return Section(
        name="threads",
        title="Threads under load: a turn idle and beside a busy neighbour",
        method=method_text(plan),
        columns=[
            Column("load", "load"),
            Column("threads", "threads"),
            Column("prefill_tok_s.median", "prefill tok/s", "{:.0f}"),
            Column("decode_ms_per_token.median", "decode ms/token", "{:.1f}"),
            Column("turn_ms.median", "turn ms", "{:.0f}"),
            Column("turn_ms.min", "min", "{:.0f}"),
            Column("turn_ms.max", "max", "{:.0f}"),
        ],
        rows=rows,
        headline=headline(rows, plan),
        notes=notes(rows),
        plots=[
            Plot(
                name="turn",
                title="Turn time by fixed thread count",
                x="x_threads",
                x_label="threads",
                y_label=f"turn ms ({plan.prompt_tokens}-token prompt + {plan.decode_tokens})",
                lines=tuple((f"turn_ms_{load}", load) for load in plan.loads),
            )
        ],
    )


def median_turn(rows: list[dict[str, Any]], load: str, setting: str) -> float | None:
    for r in rows:
        if r["load"] == load and r["threads"] == setting:
            return float(r["turn_ms"]["median"])
    return None


def ratio(rows: list[dict[str, Any]], load: str, setting: str) -> float | None:
    busy, idle = median_turn(rows, load, setting), median_turn(rows, IDLE, setting)
    return None if busy is None or idle is None else busy / idle


def headline(rows: list[dict[str, Any]], plan: Plan) -> dict[str, float | None]:
    """Busy turn time over idle turn time: with the default (auto) threads and with every
    core fixed, beside a CPU-bound process and beside a second flashmem."""
    fixed = [s for s in plan.settings if s != AUTO]
    most = fixed[-1] if len(fixed) > 1 else None
    result: dict[str, float | None] = {}
    for load, name in ((CPU_BOUND, "busy"), (FLASHMEM, "flashmem")):
        result[f"{name}_over_idle_turn"] = ratio(rows, load, AUTO)
        result[f"{name}_over_idle_turn_all_cores"] = ratio(rows, load, most) if most else None
    return result


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What auto chose, and what else ran: idle means no neighbour of ours, not an idle
    machine, and auto sees every other runnable task."""
    found = []
    used = sorted({n for r in rows if r["threads"] == AUTO for n in r["threads_used"]})
    if used:
        found.append(f"auto chose {', '.join(map(str, used))} thread(s) across its turns")
    idle = [r["others_runnable"] for r in rows if r["load"] == IDLE and "others_runnable" in r]
    if idle:
        found.append(f"idle: {idle[0]:g} runnable tasks of other processes when it began")
    return found


def method_text(plan: Plan) -> str:
    spins = os.environ.get(OPENMP_SPIN_ENV, "unset")
    policy = os.environ.get(OPENMP_WAIT_ENV, "unset")
    warmup = ", after one discarded warm-up round at the first load" if plan.warmups else ""
    return (
        f"One context of the model times a turn: a {plan.prompt_tokens}-token prompt into an "
        f"empty cache (prefill tok/s), then {plan.decode_tokens} greedy tokens (decode "
        "ms/token); turn ms is both. Thread settings: fixed counts and auto (flashmem's "
        "default, chosen again before each turn from the cores that other processes leave "
        f"free). Loads: {', '.join(plan.loads)}; cpu-bound is a Python busy loop, flashmem "
        "is `python -m flashmem_cli.bench.threads_neighbour` (the same model in a loop of "
        "turns: a 64-token prompt, 32 greedy tokens, the default threads chosen again each "
        "turn); each is started before its load and killed "
        f"after it. Medians of {plan.runs} interleaved rounds per load{warmup}; the headline "
        "ratios are busy over idle medians of turn ms (the loads run one after another, so "
        "they are not paired by round). OpenMP waits as llama.cpp loaded: "
        f"GOMP_SPINCOUNT {spins}, OMP_WAIT_POLICY {policy}."
    )
