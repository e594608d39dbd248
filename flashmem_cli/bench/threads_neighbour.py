"""A second flashmem for the threads benchmark: greedy turns in a loop until killed.

    python -m flashmem_cli.bench.threads_neighbour [-m MODEL] [--threads N]

It loads the model, says "ready" on stdout once it decodes, then keeps going until killed
or orphaned: each turn re-reads a 64-token prompt and decodes 32 tokens with the default
threads, chosen again before each turn as chat does (or `--threads`).
"""

from __future__ import annotations

import argparse
import os
import sys

from flashmem_cli import models
from flashmem_cli.config import default_threads
from flashmem_cli.engine.backend import Context, ContextParams, Model

PROMPT_TOKENS = 64
DECODE_TOKENS = 32
TEXT = "The keeper climbed the stairs of the lighthouse at dusk and lit the lamp. "


def main() -> None:
    args = parse_args()
    with Model(models.resolve(args.model).path) as model:
        prompt = (model.tokenize(TEXT * 32))[:PROMPT_TOKENS]
        with Context(model, ContextParams(256, n_threads=1)) as ctx:
            turn(ctx, prompt, args.threads)
            print("ready", flush=True)
            parent = os.getppid()
            while os.getppid() == parent:  # orphaned: the benchmark died without killing us
                turn(ctx, prompt, args.threads)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def turn(ctx: Context, prompt: list[int], threads: int | None) -> None:
    """One prompt and a greedy reply, from an empty cache."""
    ctx.set_threads(threads or default_threads())
    ctx.clear()
    ctx.decode(prompt, 0)
    for pos in range(len(prompt), len(prompt) + DECODE_TOKENS):
        ctx.decode([int(ctx.logits_view().argmax())], pos)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
