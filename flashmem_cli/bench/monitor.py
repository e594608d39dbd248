"""Benchmark: decode speed with the Cognitive Monitor's attention tap on vs off.

    python -m flashmem_cli.bench.monitor [--tokens 128] [--runs 5] [-m MODEL]

Both decode the same greedy continuation in a fresh context of the same size; "on" reads the
last layer's `kq_soft_max` row of each token through the eval callback and computes its
sink-masked entropy. Runs alternate; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

from flashmem_cli import models
from flashmem_cli.config import default_threads
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.ggml import NodeTap, attention_rows, batch_size
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.monitor import attention_entropy

PROMPT = "<bos>The history of the lighthouse begins with"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-m", "--model", default=None)
    args = parser.parse_args()
    with Model(models.resolve(args.model).path) as model:
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.runs):
            for monitored in (False, True):
                speeds[monitored].append(decode_speed(model, args.tokens, monitored))
    off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
    print(
        f"decode tok/s, median of {args.runs}: monitor off {off:.1f}, on {on:.1f} "
        f"({on / off:.1%} of off)"
    )


def decode_speed(model: Model, n_tokens: int, monitored: bool) -> float:
    entropies: list[float] = []

    def on_node(name: str, ptr: int) -> None:
        entropies.append(attention_entropy(attention_rows(ptr, batch_size(ptr) - 1)))

    last_layer = f"kq_soft_max-{model.info().n_layer - 1}"
    tap = NodeTap([last_layer], on_node) if monitored else None
    params = ContextParams(
        n_ctx=1024, n_threads=default_threads(), eval_callback=tap.callback if tap else None
    )
    with Context(model, params) as ctx, Sampler(SamplingParams(temperature=0)) as sampler:
        seq = KVSequence(ctx)
        seq.feed(model.tokenize(PROMPT))
        start = time.perf_counter()
        for _ in range(n_tokens):
            seq.feed([sampler.sample(ctx)])
        elapsed = time.perf_counter() - start
    if tap:
        tap.check()
        assert len(entropies) == n_tokens + 1
    return n_tokens / elapsed


if __name__ == "__main__":
    main()
