"""Benchmark: decode and prompt-processing speed with the Cognitive Monitor's attention tap on
vs off.

"On" is what chat does with memory on: the eval callback reads the last layer's `kq_soft_max`
row of each token (its sink-masked entropy is computed after each decode), the attention mass
on the global layers (summed over every query of a prompt) and the final hidden state. Each
phase runs in fresh contexts of one size, on and off side by side in rotating order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from flashmem_cli import models
from flashmem_cli.bench.consolidation import conversation_tokens, threads_phrase
from flashmem_cli.bench.method import BenchOptions, Summary, interleaved, paired_ratio
from flashmem_cli.bench.report import Column, Section
from flashmem_cli.engine.attention import AttentionCapture
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.architecture import describe
from flashmem_cli.memory.monitor import DEFAULT_SINKS, attention_entropy

PROMPT = "The history of the lighthouse begins with"
DECODE_CTX = 1024
DECODE_TOKENS = 128
QUICK_DECODE_TOKENS = 16
DECODE_RUNS = 5
PREFILL_TOKENS = 1000
QUICK_PREFILL_TOKENS = 200
PREFILL_RUNS = 3


@dataclass
class Monitor:
    """The loaded model; each call opens a fresh context, tapped or not."""

    model: Model
    threads: int

    def capture(self, n_cells: int) -> AttentionCapture:
        info = self.model.info()
        return AttentionCapture(info.n_layer - 1, list(describe(info).mass_layers), n_cells)

    def context(self, n_ctx: int, capture: AttentionCapture | None) -> Context:
        tap = capture.tap if capture is not None else None
        return Context(self.model, ContextParams(n_ctx, n_threads=self.threads, tap=tap))

    def prompt(self) -> list[int]:
        tokens = self.model.tokenize(PROMPT)
        return [self.model.bos] + tokens if self.model.add_bos else tokens

    def decode_speed(self, n_tokens: int, monitored: bool) -> float:
        """Generated tokens/s, greedy, after a short prompt."""
        capture = self.capture(DECODE_CTX) if monitored else None
        entropies: list[float] = []
        with (
            self.context(DECODE_CTX, capture) as ctx,
            Sampler(SamplingParams(temperature=0)) as sampler,
        ):
            seq = KVSequence(ctx)
            seq.feed(self.prompt())
            start = time.perf_counter()
            for _ in range(n_tokens):
                seq.feed([sampler.sample(ctx)])
                if capture is not None and capture.last_rows is not None:
                    capture.check()
                    entropies.append(attention_entropy(capture.last_rows, DEFAULT_SINKS))
            elapsed = time.perf_counter() - start
        if capture is not None and len(entropies) != n_tokens:
            raise RuntimeError(f"the tap read {len(entropies)} of {n_tokens} tokens")
        return n_tokens / elapsed

    def prefill_speed(self, tokens: list[int], monitored: bool) -> float:
        """Prompt tokens/s, reading `tokens` into an empty cache."""
        n_ctx = len(tokens) + 64
        capture = self.capture(n_ctx) if monitored else None
        with self.context(n_ctx, capture) as ctx:
            start = time.perf_counter()
            KVSequence(ctx).feed(tokens)
            if capture is not None:
                capture.check()
            elapsed = time.perf_counter() - start
        if capture is not None and not capture.cell_mass.any():
            raise RuntimeError("the tap read no attention during the prompt")
        return len(tokens) / elapsed


def compare(
    phase: str, n_tokens: int, speed: Callable[[bool], float], runs: int, warmups: int
) -> dict[str, Any]:
    """One row: tokens/s off and on, side by side, and on/off within each round."""
    methods = {"off": lambda: speed(False), "on": lambda: speed(True)}
    samples = interleaved(methods, runs, warmups)
    return {
        "phase": phase,
        "tokens": n_tokens,
        "off": Summary.of(samples["off"]).as_dict(),
        "on": Summary.of(samples["on"]).as_dict(),
        "on_over_off": paired_ratio(samples["on"], samples["off"]).as_dict(),
        "samples": samples,
    }


def run(options: BenchOptions, say: Callable[[str], None]) -> Section:
    threads = options.thread_count()
    options = replace(options, threads=threads)  # chosen once, for every run and the report
    file = models.resolve(options.model)
    n_decode = QUICK_DECODE_TOKENS if options.quick else DECODE_TOKENS
    n_prefill = QUICK_PREFILL_TOKENS if options.quick else PREFILL_TOKENS
    warmups = options.warmups()
    with Model(file.path, n_gpu_layers=options.n_gpu_layers) as model:
        monitor = Monitor(model, threads)
        say(f"monitor: decode of {n_decode} tokens")
        decode = compare(
            "decode",
            n_decode,
            lambda on: monitor.decode_speed(n_decode, on),
            options.runs(DECODE_RUNS),
            warmups,
        )
        say(f"monitor: prompt processing of {n_prefill} tokens")
        tokens = conversation_tokens(model, n_prefill)
        prefill = compare(
            "prefill",
            n_prefill,
            lambda on: monitor.prefill_speed(tokens, on),
            options.runs(PREFILL_RUNS),
            warmups,
        )
    return section([decode, prefill], options)


def section(rows: list[dict[str, Any]], options: BenchOptions) -> Section:
    return Section(
        name="monitor",
        title="Cognitive Monitor overhead: attention tap on vs off",
        method=method_text(rows, options),
        columns=[
            Column("phase", "phase"),
            Column("tokens", "tokens"),
            Column("off.median", "tap off", "{:.1f} tok/s"),
            Column("on.median", "tap on", "{:.1f} tok/s"),
            Column("on_over_off.median", "on / off", "{:.1%}"),
        ],
        rows=rows,
        headline={f"{row['phase']}_on_over_off": row["on_over_off"]["median"] for row in rows},
    )


def method_text(rows: list[dict[str, Any]], options: BenchOptions) -> str:
    decode, prefill = rows
    runs = (
        "One run each, no warm-up (--quick)"
        if options.quick
        else f"Medians of {DECODE_RUNS} (decode) and {PREFILL_RUNS} (prompt processing) with "
        "min/max, after one warm-up round"
    )
    return (
        f"**decode**: tokens/s of {decode['tokens']} greedy tokens after a short prompt, in a "
        f"context of {DECODE_CTX}. **prefill**: tokens/s reading {prefill['tokens']} tokens of "
        "a conversation (the example recall file in the model's chat template) into an empty "
        "cache. **on** is what chat does with memory on: the eval callback reads the last "
        "layer's attention row of every token (its sink-masked entropy is computed after each "
        "decode), the attention mass on the global layers (summed over every prompt token) "
        "and the final hidden state; **off** is a context without the tap. "
        f"{threads_phrase(options.threads)}. {runs}, on and off side by side in rotating "
        "order; the ratio is taken within each round."
    )
