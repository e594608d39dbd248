"""Benchmark: per-token decode cost with memory on against vanilla (the paper's 12.28 vs 9.97 ms).

Greedy decoding after a conversation history, side by side in rotating order:
- vanilla: a context without the attention tap, the history in its cache;
- memory on: what chat does with memory on: the tap reads every token, the Cognitive Monitor's
  entropy is computed on each (`Consolidate.after_reply_token`), and a consolidation was done
  before the reply, so K latents and kept positions sit in the cache, which holds about as many
  tokens as vanilla's.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from flashmem_cli import models
from flashmem_cli.bench.consolidation import (
    N_LATENTS,
    WRITERS,
    conversation_tokens,
    threads_phrase,
)
from flashmem_cli.bench.method import BenchOptions, Summary, interleaved, paired_ratio
from flashmem_cli.bench.report import Column, Section
from flashmem_cli.chat.memory import ConversationMemory, MemoryOptions
from flashmem_cli.chat.window import Consolidate
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.monitor import DEFAULT_SINKS
from flashmem_cli.models import ModelFile

HISTORY = 1024
QUICK_HISTORY = 256
GENERATED = 128
QUICK_GENERATED = 16
FULL_RUNS = 5
HEADROOM = 64
# Memory on reads 8/5 of the history and folds its older half into a quarter of it, so that
# its cache then holds about the history's length, as vanilla's does.
GROWTH = 8 / 5

AfterToken = Callable[[KVSequence, int], None]


def no_op(seq: KVSequence, step: int) -> None:
    """Vanilla chat does nothing after a reply token."""


def decode_ms_per_token(seq: KVSequence, n_tokens: int, after_token: AfterToken) -> float:
    """Greedy decoding of `n_tokens` as chat's generation loop does it (never stopping early)."""
    with Sampler(SamplingParams(temperature=0)) as sampler:
        start = time.perf_counter()
        for step in range(n_tokens):
            seq.feed([sampler.sample(seq.ctx)])
            after_token(seq, step)
        elapsed = time.perf_counter() - start
    return elapsed * 1000 / n_tokens


@dataclass
class Decoder:
    """The loaded model, the memory of the memory-on runs (its consolidator loads once) and
    the two histories, each saved once (all but its last token) and restored for every run."""

    model: Model
    threads: int
    n_ctx: int
    n_generated: int
    memory: ConversationMemory
    vanilla_tokens: list[int]
    memory_tokens: list[int]
    directory: Path
    cache_tokens: int = 0  # what memory on's cache holds after its consolidation

    def context(self, tapped: bool) -> KVSequence:
        tap = self.memory.capture.tap if tapped else None
        ctx = Context(self.model, ContextParams(self.n_ctx, n_threads=self.threads, tap=tap))
        if tapped:
            self.memory.reset()
            self.memory.attach(ctx.n_ctx)
        return KVSequence(ctx, shifts=self.memory.arch.shifts)

    def path(self, name: str) -> Path:
        return self.directory / name

    def save(self) -> None:
        seq = self.context(tapped=False)
        try:
            seq.feed(self.vanilla_tokens[:-1])
            seq.save(self.path("vanilla.bin"))
        finally:
            seq.ctx.close()
        seq = self.context(tapped=True)
        try:
            seq.feed(self.memory_tokens[:-1])
            self.memory.note_decode()
            seq.save(self.path("memory.bin"))
            self.memory.save(self.path("memory.npz"), seq)
        finally:
            seq.ctx.close()

    def vanilla(self) -> float:
        seq = self.context(tapped=False)
        try:
            restore(seq, self.path("vanilla.bin"))
            seq.feed(self.vanilla_tokens[-1:])
            return decode_ms_per_token(seq, self.n_generated, no_op)
        finally:
            seq.ctx.close()

    def memory_on(self) -> float:
        seq, memory = self.context(tapped=True), self.memory
        try:
            restore(seq, self.path("memory.bin"))
            if not memory.load(self.path("memory.npz"), seq):
                raise RuntimeError("the saved memory could not be restored")
            memory.consolidate(seq, DEFAULT_SINKS, len(self.memory_tokens) // 2, "turns")
            seq.feed(self.memory_tokens[-1:])
            memory.note_decode()
            self.cache_tokens = len(seq)
            memory.begin_reply()
            policy = Consolidate(memory, lambda event: None)
            return decode_ms_per_token(seq, self.n_generated, policy.after_reply_token)
        finally:
            seq.ctx.close()


def restore(seq: KVSequence, path: Path) -> None:
    if not seq.load(path):
        raise RuntimeError(f"llama.cpp could not restore {path}")


def open_decoder(model: Model, file: ModelFile, options: BenchOptions, directory: Path) -> Decoder:
    history = QUICK_HISTORY if options.quick else HISTORY
    generated = QUICK_GENERATED if options.quick else GENERATED
    memory_tokens = conversation_tokens(model, round(history * GROWTH))
    memory = ConversationMemory(
        model, file, MemoryOptions(n_latents=N_LATENTS, keep_score=WRITERS["flashmem"])
    )
    memory.consolidator  # noqa: B018 - loaded here, not inside a timed region
    return Decoder(
        model=model,
        threads=options.thread_count(),
        n_ctx=len(memory_tokens) + generated + HEADROOM,
        n_generated=generated,
        memory=memory,
        vanilla_tokens=memory_tokens[:history],
        memory_tokens=memory_tokens,
        directory=directory,
    )


def run(options: BenchOptions, say: Callable[[str], None]) -> Section:
    options = replace(options, threads=options.thread_count())  # once, for all
    file = models.resolve(options.model)
    with (
        Model(file.path, n_gpu_layers=options.n_gpu_layers) as model,
        tempfile.TemporaryDirectory(prefix="flashmem-bench-") as tmp,
    ):
        decoder = open_decoder(model, file, options, Path(tmp))
        try:
            say(f"decode: {len(decoder.vanilla_tokens)} history tokens")
            decoder.save()
            methods = {"vanilla": decoder.vanilla, "memory": decoder.memory_on}
            samples = interleaved(methods, options.runs(FULL_RUNS), options.warmups())
        finally:
            decoder.memory.close()
    return section(result_row(decoder, samples), options)


def result_row(decoder: Decoder, samples: dict[str, list[float]]) -> dict:
    ratio = paired_ratio(samples["memory"], samples["vanilla"])
    return {
        "history_tokens": len(decoder.vanilla_tokens),
        "memory_cache_tokens": decoder.cache_tokens,
        "generated_tokens": decoder.n_generated,
        "vanilla_ms_per_token": Summary.of(samples["vanilla"]).as_dict(),
        "memory_ms_per_token": Summary.of(samples["memory"]).as_dict(),
        "memory_over_vanilla": ratio.as_dict(),
        "samples": samples,
    }


def section(row: dict, options: BenchOptions) -> Section:
    return Section(
        name="decode",
        title="Per-token decode cost: memory on vs vanilla",
        method=method_text(row, options),
        columns=[
            Column("history_tokens", "history tokens"),
            Column("memory_cache_tokens", "memory-on cache"),
            Column("vanilla_ms_per_token.median", "vanilla", "{:.2f} ms/token"),
            Column("memory_ms_per_token.median", "memory on", "{:.2f} ms/token"),
            Column("memory_over_vanilla.median", "memory / vanilla", "{:.3f}"),
        ],
        rows=[row],
        headline={"memory_over_vanilla": row["memory_over_vanilla"]["median"]},
    )


def method_text(row: dict, options: BenchOptions) -> str:
    runs = (
        "One run each, no warm-up (--quick)"
        if options.quick
        else f"Medians of {FULL_RUNS} with min/max, after one warm-up round"
    )
    return (
        f"ms per generated token, greedy, {row['generated_tokens']} tokens (sampling included, "
        "never stopping early) after a history from the example recall file in the model's "
        f"chat template. **vanilla**: a context without the attention tap holding "
        f"{row['history_tokens']} history tokens. **memory on**: what chat does with memory "
        "on: the tap reads every token and the Cognitive Monitor's entropy is computed on each "
        "(`Consolidate.after_reply_token`); before the reply, a history 8/5 as long was "
        f"consolidated (its older half folded into K = {N_LATENTS} latents plus kept positions, "
        f"25% of the span in all) so the cache holds {row['memory_cache_tokens']} tokens, "
        "latents included. The freed cells stay inside the cache's used range, as after a "
        "consolidation in chat. Each history is read once, saved, and restored before each "
        "run; its last token is fed after the restore. "
        f"{threads_phrase(options.threads)}. {runs}, side by side in rotating order; the ratio "
        "is taken within each round."
    )
