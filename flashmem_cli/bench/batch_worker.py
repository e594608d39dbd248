"""One measured `flashmem run` for the batch benchmark, in a process of its own (so that its peak
RSS is its own): runs a prompts file greedily and prints the run's figures as JSON.

    python -m flashmem_cli.bench.batch_worker SOURCE OUT ERR --parallel P --tokens N
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashmem_cli.batch import runner
from flashmem_cli.batch.scheduler import BatchSettings
from flashmem_cli.config import default_threads
from flashmem_cli.engine.sampling import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("errors", type=Path)
    parser.add_argument("--parallel", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=None)
    return parser.parse_args(argv)


def plan_for(args: argparse.Namespace) -> runner.RunPlan:
    settings = BatchSettings(
        n_ctx=args.ctx,
        parallel=args.parallel,
        n_predict=args.tokens,
        sampling=SamplingParams(temperature=0),
        n_threads=args.threads or default_threads(),
    )
    return runner.RunPlan(
        args.source, args.out, args.errors, args.model, args.n_gpu_layers, settings
    )


def figures(stats: runner.RunStats) -> dict[str, float]:
    """What the benchmark reads: tokens, and times with the model load apart."""
    return {
        "succeeded": stats.succeeded,
        "failed": stats.failed,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "elapsed_s": stats.elapsed_s,
        "setup_s": stats.setup_s,
        "decode_s": stats.decode_s,
        "kv_cells": stats.kv_cells,
    }


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(figures(runner.run(plan_for(parse_args(argv))))))


if __name__ == "__main__":
    main()
