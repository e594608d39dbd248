"""Benchmark: decode speed with the Cognitive Monitor's attention tap on vs off.

    python -m flashmem_cli.bench.monitor [--tokens 128] [--runs 5] [-m MODEL]

Both decode the same greedy continuation in a fresh context of the same size; "on" is what chat
does with memory on: the eval callback reads the last layer's `kq_soft_max` row of each token
(its sink-masked entropy is computed), the attention mass on the global layers and the final
hidden state. Runs alternate; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

from flashmem_cli import models
from flashmem_cli.config import default_threads
from flashmem_cli.engine.attention import AttentionCapture
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.architecture import describe
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
    info = model.info()
    entropies: list[float] = []
    capture = (
        AttentionCapture(info.n_layer - 1, list(describe(info).mass_layers), 1024)
        if monitored
        else None
    )
    params = ContextParams(
        n_ctx=1024,
        n_threads=default_threads(),
        tap=capture.tap if capture else None,
    )
    with Context(model, params) as ctx, Sampler(SamplingParams(temperature=0)) as sampler:
        seq = KVSequence(ctx)
        seq.feed(model.tokenize(PROMPT, parse_special=True))
        start = time.perf_counter()
        for _ in range(n_tokens):
            seq.feed([sampler.sample(ctx)])
            if capture is not None and capture.last_rows is not None:
                capture.check()
                entropies.append(attention_entropy(capture.last_rows))
        elapsed = time.perf_counter() - start
    if capture is not None:
        assert len(entropies) == n_tokens
    return n_tokens / elapsed


if __name__ == "__main__":
    main()
