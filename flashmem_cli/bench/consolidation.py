"""Benchmark: one FlashMem consolidation against a MemGen-style insertion at growing
conversation sizes (the paper's cost comparison), with re-processing the context as reference.

The conversation is the example recall file's turns, one after another, rendered with the
model's own chat template. At each size, side by side in rotating order:
- flashmem: the older half folded into K = 8 latents written from the frozen cache plus 25% of
  its positions, the rest removed and the gap closed, and the K-shift the next decode applies;
- memgen: the whole context re-encoded from an empty cache, then K = 8 latents made from it
  and decoded after it (MemGen's weaver reads the context anew at every insertion); its
  re-encoding, timed on its own, is the re-process column.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flashmem_cli import models
from flashmem_cli.bench.method import BenchOptions, Summary, interleaved, paired_ratio
from flashmem_cli.bench.recall_cases import example_path, parse_cases
from flashmem_cli.bench.report import Column, Plot, Section
from flashmem_cli.chat.memory import ConversationMemory, MemoryOptions
from flashmem_cli.engine import prompt as rendering
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.monitor import DEFAULT_SINKS
from flashmem_cli.models import ModelFile, chat_template_for

SIZES = (1024, 2048, 4096)
QUICK_SIZES = (256, 512)
FULL_RUNS = 3
N_LATENTS = 8
HEADROOM = 256  # free cells after the conversation
# The timed methods and their keep scores; re-process is memgen's first part. "flashmem" keeps
# by the attention received while the context was read (nothing re-encoded, as in the paper);
# "chat" is chat's default, which re-reads the span to score it (KVzip's reconstruction).
WRITERS = {"flashmem": "attention", "memgen": "attention", "chat": "reconstruction"}

Message = dict[str, str]


def threads_phrase(threads: int | None) -> str:
    return "1 thread" if threads == 1 else f"{threads} threads"


def conversation_messages() -> list[Message]:
    """Every case of the example recall file, one after another; one system prompt first."""
    messages: list[Message] = []
    for case in parse_cases(example_path().read_text("utf-8").splitlines()):
        messages += [t for t in case.turns if t["role"] != "system" or not messages]
    return messages


def conversation_tokens(model: Model, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of the conversation in the model's own chat template."""
    template = chat_template_for(model)
    messages = conversation_messages()
    tokens: list[int] = []
    while len(tokens) < n_tokens:
        rendered = rendering.render(template, messages, add_generation_prompt=False)
        tokens = rendering.tokenize(model, rendered)
        messages = messages + messages[1:]  # a longer one than the file holds: round again
    if model.add_bos and tokens[:1] != [model.bos]:
        tokens = [model.bos] + tokens
    return tokens[:n_tokens]


@dataclass
class Rig:
    """The loaded model and one memory per method, reused run after run (its consolidator
    weights load once), each time on a fresh context."""

    model: Model
    file: ModelFile
    threads: int
    memories: dict[str, ConversationMemory]

    @classmethod
    def open(cls, model: Model, file: ModelFile, threads: int) -> Rig:
        memories = {
            name: ConversationMemory(model, file, MemoryOptions(n_latents=N_LATENTS, keep_score=k))
            for name, k in WRITERS.items()
        }
        for memory in memories.values():
            memory.consolidator  # noqa: B018 - loaded here, not inside a timed region
        return cls(model, file, threads, memories)

    def close(self) -> None:
        for memory in self.memories.values():
            memory.close()

    def fresh(self, method: str, n_ctx: int) -> tuple[ConversationMemory, KVSequence]:
        """`method`'s memory, emptied, tapping a new context of `n_ctx` cells."""
        memory = self.memories[method]
        memory.reset()
        params = ContextParams(n_ctx, n_threads=self.threads, tap=memory.capture.tap)
        ctx = Context(self.model, params)
        memory.attach(ctx.n_ctx)
        return memory, KVSequence(ctx, shifts=memory.arch.shifts)


@dataclass(frozen=True)
class Saved:
    """A conversation read once (all but its last two tokens) and saved as chat saves a
    session: each flashmem run restores it instead of reading it again."""

    tokens: list[int]
    state: Path
    memory: Path

    @property
    def n_ctx(self) -> int:
        return len(self.tokens) + HEADROOM


def save_conversation(rig: Rig, tokens: list[int], directory: Path) -> Saved:
    """Read all but the last two tokens and save them, with the memory's attention record."""
    saved = Saved(tokens, directory / f"state-{len(tokens)}.bin", directory / f"{len(tokens)}.npz")
    memory, seq = rig.fresh("flashmem", saved.n_ctx)
    try:
        seq.feed(tokens[:-2])
        memory.note_decode()
        seq.save(saved.state)
        memory.save(saved.memory, seq)
    finally:
        seq.ctx.close()
    return saved


def time_flashmem(rig: Rig, saved: Saved, method: str = "flashmem") -> float:
    """ms of one consolidation of the older half and the K-shift the next decode applies
    (that decode's ordinary cost subtracted). Restored, the conversation reads one more token
    first, as a live one has just done."""
    memory, seq = rig.fresh(method, saved.n_ctx)
    try:
        if not seq.load(saved.state) or not memory.load(saved.memory, seq):
            raise RuntimeError("the saved conversation could not be restored")
        seq.feed(saved.tokens[-2:-1])
        memory.note_decode()
        last = saved.tokens[-1:]
        start = time.perf_counter()
        memory.consolidate(seq, DEFAULT_SINKS, len(saved.tokens) // 2, "turns")
        seq.feed(last)
        elapsed = time.perf_counter() - start
        probe = time.perf_counter()
        seq.feed(last)
        baseline = time.perf_counter() - probe
    finally:
        seq.ctx.close()
    return (elapsed - baseline) * 1000


@dataclass
class MemGen:
    """A MemGen-style insertion, timed: re-encode the context from an empty cache, make K
    latents from it and decode them after it. The re-encoding is timed on its own too (the
    re-process column): the same work, so it is not run a second time."""

    rig: Rig
    tokens: list[int]
    reencode_ms: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        memory, seq = self.rig.fresh("memgen", len(self.tokens) + HEADROOM)
        try:
            start = time.perf_counter()
            seq.feed(self.tokens)
            memory.note_decode()
            reencoded = time.perf_counter()
            memory.inject(seq, step=0)
            done = time.perf_counter()
        finally:
            seq.ctx.close()
        self.reencode_ms.append((reencoded - start) * 1000)
        return (done - start) * 1000


def measure(rig: Rig, tokens: list[int], directory: Path, runs: int, warmups: int) -> dict:
    saved = save_conversation(rig, tokens, directory)
    memgen = MemGen(rig, tokens)
    methods: dict[str, Callable[[], float]] = {
        "flashmem": lambda: time_flashmem(rig, saved),
        "memgen": memgen,
        "chat": lambda: time_flashmem(rig, saved, "chat"),
    }
    samples = interleaved(methods, runs, warmups)
    samples["reprocess"] = memgen.reencode_ms[warmups:]
    row: dict[str, Any] = {
        "context_tokens": len(tokens),
        "consolidated_tokens": len(tokens) // 2 - DEFAULT_SINKS,
    }
    row.update({name: Summary.of(values).as_dict() for name, values in samples.items()})
    for method in ("flashmem", "chat"):
        ratio = paired_ratio(samples["memgen"], samples[method])
        row[f"memgen_over_{method}"] = ratio.as_dict()
    row["samples"] = samples
    return row


def run(options: BenchOptions, say: Callable[[str], None]) -> Section:
    threads = options.thread_count()
    options = replace(options, threads=threads)  # chosen once, for every run and the report
    file = models.resolve(options.model)
    with Model(file.path, n_gpu_layers=options.n_gpu_layers) as model:
        rig = Rig.open(model, file, threads)
        try:
            rows = measure_sizes(rig, sizes_for(options), options, say)
        finally:
            rig.close()
    return section(rows, options)


def sizes_for(options: BenchOptions) -> tuple[int, ...]:
    return QUICK_SIZES if options.quick else SIZES


def measure_sizes(
    rig: Rig, sizes: tuple[int, ...], options: BenchOptions, say: Callable[[str], None]
) -> list[dict]:
    """One row per size; the warm-up round runs once, at the first size."""
    tokens = conversation_tokens(rig.model, max(sizes))
    rows = []
    with tempfile.TemporaryDirectory(prefix="flashmem-bench-") as tmp:
        for i, size in enumerate(sizes):
            say(f"consolidation: {size} context tokens")
            warmups = options.warmups() if i == 0 else 0
            rows.append(measure(rig, tokens[:size], Path(tmp), options.runs(FULL_RUNS), warmups))
    return rows


def headline(rows: list[dict]) -> dict[str, float | None]:
    return {
        f"memgen_over_{method}_at_{row['context_tokens']}": row[f"memgen_over_{method}"]["median"]
        for method in ("flashmem", "chat")
        for row in rows
    }


def section(rows: list[dict], options: BenchOptions) -> Section:
    return Section(
        name="consolidation",
        title="Consolidation cost: FlashMem vs MemGen-style insertion",
        method=method_text(options),
        columns=[
            Column("context_tokens", "context tokens"),
            Column("consolidated_tokens", "consolidated"),
            Column("flashmem.median", "flashmem", "{:.1f} ms"),
            Column("memgen.median", "memgen", "{:.1f} ms"),
            Column("chat.median", "flashmem, chat's keep score", "{:.1f} ms"),
            Column("reprocess.median", "re-process", "{:.1f} ms"),
            Column("memgen_over_flashmem.median", "memgen / flashmem", "{:.1f}x"),
            Column("memgen_over_chat.median", "memgen / chat's", "{:.1f}x"),
        ],
        rows=rows,
        headline=headline(rows),
        plots=[
            Plot(
                name="cost",
                title="One memory write: cost against context size",
                x="context_tokens",
                x_label="context tokens",
                y_label="ms",
                lines=(
                    ("flashmem.median", "FlashMem consolidation"),
                    ("memgen.median", "MemGen-style insertion"),
                    ("chat.median", "FlashMem, chat's keep score"),
                    ("reprocess.median", "re-process"),
                ),
                log_y=True,
            )
        ],
    )


def method_text(options: BenchOptions) -> str:
    sizes = ", ".join(str(s) for s in sizes_for(options))
    runs = (
        "One run each, no warm-up (--quick)"
        if options.quick
        else f"Medians of {FULL_RUNS} with min/max, after one warm-up round at the smallest size"
    )
    return (
        f"A conversation of {sizes} tokens (the example recall file's turns, one after another, "
        f"in the model's chat template) in a context with {HEADROOM} free cells after it. "
        "**flashmem**: one consolidation of the older half: K = 8 latents written from the "
        "frozen cache while the span is still there, 25% of the span's positions kept (by the "
        "attention they received while the conversation was read, so nothing is re-encoded; "
        "chat's default `--keep-score reconstruction`, the next column, re-reads the span to "
        "score it), the rest "
        "removed and the gap closed, plus the K-shift the next decode applies (that decode's "
        "ordinary cost subtracted). The conversation is read once, saved, and restored before "
        "each run, as a resumed chat is. **memgen**: a MemGen-style insertion: the whole "
        "context re-encoded into an empty cache (MemGen's weaver reads it anew at every "
        "insertion), then the same consolidator makes K = 8 latents from that cache and they "
        "are decoded after it (`ConversationMemory.inject`). A lower bound on MemGen, whose "
        "weaver is a second model and whose reasoner's cache is rebuilt as well. "
        "**re-process**: the re-encoding part of each memgen run, timed on its own. All read "
        "the attention tap, as chat does with memory on. The three run side by side "
        f"in rotating order, {threads_phrase(options.threads)}. {runs}; the ratio is taken "
        "within each round."
    )
