"""Benchmark: one consolidation (K latents + kept positions) against re-processing the context.

    python -m flashmem_cli.bench.consolidation [--tokens 2000] [--runs 5] [-m MODEL]

A conversation of about --tokens tokens (the recall example's turns, templated) is fed into a
context with the memory tap on. Then, side by side on fresh copies:
- consolidate: fold the older half into K = 8 latents plus 25% of its positions (frozen K/V
  read from llama.cpp, the numpy consolidator, removal and shift, the latents decoded and moved
  into place), plus the extra cost the shift adds to the next decode;
- re-process: decode the whole conversation again from an empty cache, which is what a memory
  that re-encodes its history pays.
Medians of --runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

from flashmem_cli import models
from flashmem_cli.bench.recall_cases import example_path, parse_cases
from flashmem_cli.chat.memory import ConversationMemory, MemoryOptions
from flashmem_cli.config import default_threads
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.monitor import DEFAULT_SINKS


def conversation_tokens(model: Model, n_tokens: int) -> list[int]:
    tokens = [model.bos]
    for case in parse_cases(example_path().read_text("utf-8").splitlines()):
        for turn in case.turns:
            role = "model" if turn["role"] == "assistant" else "user"
            text = f"<start_of_turn>{role}\n{turn['content']}<end_of_turn>\n"
            tokens += model.tokenize(text, parse_special=True)  # our own markup
            if len(tokens) >= n_tokens:
                return tokens[:n_tokens]
    return tokens


def fresh(model: Model, file: models.ModelFile, n_ctx: int) -> tuple[ConversationMemory, Context]:
    memory = ConversationMemory(model, file, MemoryOptions(n_latents=8))
    params = ContextParams(n_ctx, n_threads=default_threads(), tap=memory.capture.tap)
    ctx = Context(model, params)
    memory.attach(ctx.n_ctx)
    return memory, ctx


def time_reprocess(model: Model, file: models.ModelFile, tokens: list[int]) -> float:
    memory, ctx = fresh(model, file, len(tokens) + 256)
    start = time.perf_counter()
    KVSequence(ctx).feed(tokens)
    elapsed = time.perf_counter() - start
    ctx.close()
    memory.close()
    return elapsed * 1000


def time_consolidation(model: Model, file: models.ModelFile, tokens: list[int]) -> float:
    memory, ctx = fresh(model, file, len(tokens) + 256)
    seq = KVSequence(ctx)
    seq.feed(tokens[:-1])
    memory.note_decode()
    memory.consolidator  # noqa: B018 - weights load once per process, not per consolidation
    start = time.perf_counter()
    memory.consolidate(seq, DEFAULT_SINKS, len(tokens) // 2, "turns")
    seq.feed(tokens[-1:])  # the next decode applies the K-shift
    elapsed = time.perf_counter() - start
    probe = time.perf_counter()
    seq.feed(tokens[-1:])  # an ordinary one-token decode, subtracted
    baseline = time.perf_counter() - probe
    ctx.close()
    memory.close()
    return (elapsed - baseline) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-m", "--model", default=None)
    args = parser.parse_args()
    file = models.resolve(args.model)
    with Model(file.path) as model:
        tokens = conversation_tokens(model, args.tokens)
        consolidate, reprocess = [], []
        for _ in range(args.runs):
            consolidate.append(time_consolidation(model, file, tokens))
            reprocess.append(time_reprocess(model, file, tokens))
    c, r = statistics.median(consolidate), statistics.median(reprocess)
    print(
        f"{len(tokens)} tokens, median of {args.runs}: one consolidation of {len(tokens) // 2 - 4} "
        f"tokens (K=8, keep 25%) {c:.1f} ms; re-processing the context {r:.1f} ms; {r / c:.1f}x"
    )


if __name__ == "__main__":
    main()
