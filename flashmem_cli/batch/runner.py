"""A batch run: lines in, one result line per id out, resumable and shardable."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from flashmem_cli import models
from flashmem_cli.batch.requests import BatchRequest, LineError, parse_lines, shard_of
from flashmem_cli.batch.results import (
    Completion,
    DoneSet,
    JsonlWriter,
    error_line,
    scan_done,
    success_line,
)
from flashmem_cli.batch.scheduler import BatchScheduler, BatchSettings
from flashmem_cli.config import sessions_dir
from flashmem_cli.errors import FlashmemError
from flashmem_cli.store.files import try_lock
from flashmem_cli.store.sessions import SessionStore


@dataclass(frozen=True)
class RunPlan:
    source: Path | None  # None: standard input
    out: Path | None  # None: standard output
    errors: Path | None  # None: standard error
    model: str | None
    n_gpu_layers: int | None
    settings: BatchSettings
    resume: bool = False
    shard: tuple[int, int] = (0, 1)


@dataclass
class RunStats:
    total: int = 0
    skipped: int = 0
    failed_before: int = 0  # skipped lines that earlier runs reported as errors
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    decode_s: float = 0.0

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


Progress = Callable[[RunStats], None]


def default_paths(source: Path) -> tuple[Path, Path]:
    stem = source.name.removesuffix(".jsonl")
    return source.with_name(f"{stem}.out.jsonl"), source.with_name(f"{stem}.errors.jsonl")


def run(plan: RunPlan, progress: Progress | None = None) -> RunStats:
    """Every line of the plan's shard not done before gets exactly one line in OUT or ERR."""
    with lock_outputs(plan):
        return run_locked(plan, progress)


def run_locked(plan: RunPlan, progress: Progress | None) -> RunStats:
    file_model = models.resolve(plan.model)
    items = [i for i in parse_lines(read_source(plan.source)) if in_shard(i, plan.shard)]
    done = prepare_outputs(plan)
    todo = [item for item in items if not done.has(item)]
    stats = RunStats(
        total=len(items),
        skipped=len(items) - len(todo),
        failed_before=sum(1 for item in items if item.line in done.error_lines),
    )
    with open_output(plan.out) as out, open_output(plan.errors, stderr=True) as err:
        out_writer = JsonlWriter(out, durable=plan.out is not None)
        err_writer = JsonlWriter(err, durable=plan.errors is not None)

        def report(request: BatchRequest | LineError, result: Completion | LineError) -> None:
            if isinstance(result, LineError):
                err_writer.write(error_line(result))
                stats.failed += 1
            else:
                assert isinstance(request, BatchRequest)
                out_writer.write(success_line(request, result, file_model.name))
                stats.succeeded += 1
                stats.prompt_tokens += result.prompt_tokens
                stats.generated_tokens += result.completion_tokens
            if progress:
                progress(stats)

        for item in todo:
            if isinstance(item, LineError):
                report(item, item)
        requests = [item for item in todo if isinstance(item, BatchRequest)]
        if requests:
            run_requests(plan, file_model, requests, report, stats)
    stats.finished = time.perf_counter()
    return stats


def run_requests(
    plan: RunPlan,
    file_model: models.ModelFile,
    requests: list[BatchRequest],
    report: Callable[[BatchRequest, Completion | LineError], None],
    stats: RunStats,
) -> None:
    loaded = models.load_model(file_model, plan.n_gpu_layers)
    try:
        scheduler = BatchScheduler(loaded, plan.settings, SessionStore(sessions_dir()))
        try:
            scheduler.run(requests, report)
        finally:
            stats.decode_s = scheduler.decode_s
            scheduler.close()
    finally:
        loaded.model.close()


def read_source(source: Path | None) -> bytes:
    if source is None:
        return sys.stdin.buffer.read()
    try:
        return source.read_bytes()
    except OSError as exc:
        raise FlashmemError(f"cannot read {source}: {exc.strerror}") from None


def in_shard(item: BatchRequest | LineError, shard: tuple[int, int]) -> bool:
    index, count = shard
    return count == 1 or shard_of(item.id, count) == index


def lock_path(path: Path) -> Path:
    """The file whose lock guards output `path`: `path` with `.lock` appended, beside the file
    it guards (beside a symlink's target). It stays after the run: deleting a lock file while
    another process may have it open lets two runs each lock a different file of that name."""
    target = path.resolve()
    return target.with_name(target.name + ".lock")


@contextmanager
def lock_outputs(plan: RunPlan) -> Iterator[None]:
    """Hold an exclusive lock on each output file for the whole run, from before --resume reads
    it: a second run on the same OUT or ERR stops at once instead of writing every id again."""
    guarded: dict[Path, Path] = {}  # lock file -> output as the user named it; -o = --errors
    for path in (plan.out, plan.errors):
        if path is None or (path.exists() and not path.is_file()):
            continue  # standard output/error, or /dev/null, a pipe: nothing to guard
        if not path.parent.is_dir():  # the lock would create the directory; say what is wrong
            raise FlashmemError(f"cannot write {path}: no directory {path.parent}")
        guarded.setdefault(lock_path(path), path)
    held = []
    try:
        for lock_file, path in guarded.items():
            try:
                lock = try_lock(lock_file)
            except NotImplementedError:  # no flock here (Lustre without -o flock): filelock 3
                continue  # raises this; filelock 4 falls back to a marker-file lock itself
            except OSError as exc:
                raise FlashmemError(f"cannot lock {path} ({lock_file}): {exc.strerror}") from None
            if lock is None:
                raise FlashmemError(f"{path} is being written by another flashmem run")
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def prepare_outputs(plan: RunPlan) -> DoneSet:
    """With --resume, what earlier runs finished; without, refuse to mix with old results."""
    files = [p for p in (plan.out, plan.errors) if p is not None]
    if plan.resume:
        if plan.out is None or plan.errors is None:
            raise FlashmemError("--resume needs files to resume from: -o and --errors")
        return scan_done(plan.out, plan.errors)
    for path in files:
        if path.exists() and path.stat().st_size > 0:
            raise FlashmemError(
                f"{path} already has results: pass --resume to continue, or remove it"
            )
    return DoneSet(frozenset(), frozenset())


class open_output:  # noqa: N801 - used like open()
    """A file opened for appending, or standard output/error when there is no path."""

    def __init__(self, path: Path | None, stderr: bool = False):
        self.path = path
        self.stderr = stderr
        self.stream: IO[str] | None = None

    def __enter__(self) -> IO[str]:
        if self.path is None:
            return sys.stderr if self.stderr else sys.stdout
        try:
            self.stream = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise FlashmemError(f"cannot write {self.path}: {exc.strerror}") from None
        return self.stream

    def __exit__(self, *exc: object) -> None:
        if self.stream:
            self.stream.close()
