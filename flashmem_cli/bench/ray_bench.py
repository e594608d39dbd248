"""Benchmark: `flashmem run` here beside `flashmem run --ray` with 1 and 2 workers, on a Ray head
this benchmark starts on 127.0.0.1 (the `ray` extra).

Generated tokens per second after setup (model loads, worker starts), the same file each time.
The threads are split, not multiplied: a run of N workers gives each worker 1/N of the bench's
threads, so every run has the same cores; on one machine the workers can only share them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flashmem_cli.batch import runner
from flashmem_cli.batch.cluster import RayOptions
from flashmem_cli.batch.scheduler import BatchSettings
from flashmem_cli.bench.batch import write_prompts
from flashmem_cli.bench.method import BenchOptions, interleaved, paired_ratio, summaries
from flashmem_cli.bench.ray_head import local_head
from flashmem_cli.bench.report import Column, Section
from flashmem_cli.engine.sampling import SamplingParams

Say = Callable[[str], None]

RUNS = 3
CTX = 256


@dataclass(frozen=True)
class Work:
    prompts: int
    tokens: int
    parallel: int  # --parallel of each worker, and of the local run


FULL = Work(prompts=24, tokens=24, parallel=4)
QUICK = Work(prompts=4, tokens=4, parallel=2)
METHODS = {"local": None, "ray, 1 worker": 1, "ray, 2 workers": 2}  # name -> workers


def run(options: BenchOptions, say: Say) -> Section:
    with local_head(cpus=max(options.thread_count(), 2)) as address:
        return run_on(address, options, say)


def run_on(address: str, options: BenchOptions, say: Say) -> Section:
    """The benchmark on a running Ray head (one with at least 2 CPUs)."""
    work = QUICK if options.quick else FULL
    threads = options.thread_count()
    with tempfile.TemporaryDirectory(prefix="flashmem-bench-ray-") as tmp:
        source = write_prompts(Path(tmp) / "prompts.jsonl", work.prompts, work.tokens)
        samples = measure(Path(tmp), source, work, options, threads, address, say)
    return section(work, threads, samples)


def measure(
    tmp: Path,
    source: Path,
    work: Work,
    options: BenchOptions,
    threads: int,
    address: str,
    say: Say,
) -> dict[str, list[float]]:
    counter = iter(range(10**6))

    def method(name: str, workers: int | None) -> Callable[[], float]:
        def call() -> float:
            say(f"ray: {name}")
            tag = tmp / f"run{next(counter)}"
            return tokens_per_s(one_run(source, tag, work, options, threads, address, workers))

        return call

    methods = {name: method(name, workers) for name, workers in METHODS.items()}
    return interleaved(methods, options.runs(RUNS), warmups=0)


def one_run(
    source: Path,
    tag: Path,
    work: Work,
    options: BenchOptions,
    threads: int,
    address: str,
    workers: int | None,
) -> runner.RunStats:
    settings = BatchSettings(
        n_ctx=CTX,
        parallel=work.parallel,
        n_predict=work.tokens,
        sampling=SamplingParams(temperature=0),
        n_threads=max(1, threads // (workers or 1)),
    )
    plan = runner.RunPlan(
        source=source,
        out=Path(f"{tag}.out.jsonl"),
        errors=Path(f"{tag}.errors.jsonl"),
        model=options.model,
        n_gpu_layers=options.n_gpu_layers,
        settings=settings,
        ray=RayOptions(address, workers) if workers else None,
    )
    stats = runner.run(plan)
    if stats.failed:
        first = Path(f"{tag}.errors.jsonl").read_text().splitlines()[0]
        raise RuntimeError(f"{stats.failed} requests failed, the first: {first}")
    return stats


def tokens_per_s(stats: runner.RunStats) -> float:
    """Generated tokens over the run's time after its setup."""
    return stats.generated_tokens / (stats.elapsed_s - stats.setup_s)


def section(work: Work, threads: int, samples: dict[str, list[float]]) -> Section:
    summary = summaries(samples)
    local = samples["local"]
    rows = [
        {
            "method": name,
            "tokens_per_s": summary[name].as_dict(),
            "vs_local": paired_ratio(samples[name], local).median,
        }
        for name in METHODS
    ]
    two_vs_one = paired_ratio(samples["ray, 2 workers"], samples["ray, 1 worker"]).median
    return Section(
        name="ray",
        title="Batch on Ray: 1 and 2 workers beside a local run",
        method=(
            f"{work.prompts} prompts x {work.tokens} tokens, greedy, --parallel {work.parallel} "
            f"per worker (and locally), -c {CTX}. `flashmem run` here, then `flashmem run --ray` "
            f"with 1 and 2 workers on a Ray head on 127.0.0.1 started for this benchmark; "
            f"{threads} threads in all, split between the workers. Generated tokens/s after "
            f"setup (worker start and model load), medians of {len(local)} rounds with min/max, "
            "ratios within each round, methods in rotating order."
        ),
        columns=[
            Column("method", "run"),
            Column("tokens_per_s.median", "tok/s", "{:.1f}"),
            Column("tokens_per_s.min", "min", "{:.1f}"),
            Column("tokens_per_s.max", "max", "{:.1f}"),
            Column("vs_local", "vs local", "{:.2f}x"),
        ],
        rows=rows,
        headline={"two_workers_vs_one": two_vs_one},
        notes=[
            f"2 workers / 1 worker: {two_vs_one:.2f}x. One machine's cores are shared by its "
            "workers: this shows the cost of going through Ray, not scaling, which needs more "
            "machines (each worker then has its own cores). Two workers also decode twice the "
            f"sequences at once (2 x {work.parallel}), each with half the threads."
        ],
    )
