"""Benchmark: batch throughput (generated tokens/s) at several --parallel values, one run.

    python -m flashmem_cli.bench.batch [--prompts 32] [--tokens 64] [--parallel 1,4,8]

Each setting runs the same greedy requests through `flashmem_cli.batch.runner` in this
process, after one warm-up run; settings are interleaved run by run and medians reported. Reported: generated tokens / wall time of the whole run
(prompt processing included), and generated tokens / time inside llama_decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flashmem_cli.batch import runner
from flashmem_cli.batch.scheduler import BatchSettings
from flashmem_cli.config import default_threads
from flashmem_cli.engine.sampling import SamplingParams

TOPICS = ["the sea", "a city at night", "bread", "winter", "a library", "bees", "trains", "rain"]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="flashmem-bench-") as tmp:
        source = Path(tmp) / "prompts.jsonl"
        source.write_text("".join(json.dumps(line) + "\n" for line in prompts(args)))
        measure(source, Path(tmp), 1, args, "warmup")
        runs: dict[int, list[runner.RunStats]] = {p: [] for p in args.parallel}
        for r in range(args.runs):  # interleaved, so drift on a shared machine hits all alike
            for p in args.parallel:
                runs[p].append(measure(source, Path(tmp), p, args, f"p{p}-{r}"))
        rows = [row_for(p, runs[p]) for p in args.parallel]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{args.prompts} prompts x {args.tokens} tokens, median of {args.runs}")
    for column in ("--parallel", "tok/s (wall)", "tok/s (decode)", "vs --parallel 1"):
        table.add_column(column, justify="right")
    for row in rows:
        ratio = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        table.add_row(
            str(row["parallel"]),
            f"{row['tokens_per_s']:.1f}",
            f"{row['decode_tokens_per_s']:.1f}",
            f"{ratio:.2f}x",
        )
    Console().print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--parallel", type=lambda s: [int(p) for p in s.split(",")], default=[1, 4, 8]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def prompts(args: argparse.Namespace) -> list[dict]:
    """Distinct prompts with no end-of-text stop (ignore_eos is not offered: lengths vary)."""
    return [
        {
            "id": f"p{i}",
            "prompt": f"Story {i}. Write a long story about {TOPICS[i % len(TOPICS)]}:",
            "max_tokens": args.tokens,
        }
        for i in range(args.prompts)
    ]


def row_for(parallel: int, runs: list[runner.RunStats]) -> dict:
    return {
        "parallel": parallel,
        "generated_tokens": runs[0].generated_tokens,
        "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
        "decode_tokens_per_s": statistics.median(r.generated_tokens / r.decode_s for r in runs),
    }


def measure(
    source: Path, tmp: Path, parallel: int, args: argparse.Namespace, tag: str
) -> runner.RunStats:
    plan = runner.RunPlan(
        source=source,
        out=tmp / f"{tag}.out.jsonl",
        errors=tmp / f"{tag}.errors.jsonl",
        model=args.model,
        n_gpu_layers=None,
        settings=BatchSettings(
            n_ctx=256,
            parallel=parallel,
            n_predict=args.tokens,
            sampling=SamplingParams(temperature=0),
            n_threads=default_threads(),
        ),
    )
    stats = runner.run(plan)
    assert stats.failed == 0, (tmp / f"{tag}.errors.jsonl").read_text()
    return stats


if __name__ == "__main__":
    main()
