"""Which positions a consolidation keeps: keep-score variants compared on one recall split.

    python -m flashmem_cli.bench.keep_search --split dev -c 512 --out dev-512.json \\
        [--variants attention:7,reconstruction:3,...]

`full` and `truncate` are run once; each variant (`SCORE:POOL`, SCORE one of
memory.budget.KEEP_SCORES) runs the keep-only policy (no latents, so that only the choice of
positions differs). Per variant: gap recovered (pooled, with a bootstrap 95% interval), its
difference from the first variant with a paired interval (the same cases resampled for both:
a case's probes share its consolidations, so cases are the unit),
the compression reached and the median consolidation time. Choose on dev; report test.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from flashmem_cli import models
from flashmem_cli.bench import stats
from flashmem_cli.bench.recall import RecallSettings, compared_by_case, run_policy
from flashmem_cli.bench.recall_cases import (
    RecallCase,
    case_gains_and_gaps,
    gains_and_gaps,
    parse_cases,
)
from flashmem_cli.chat.memory import MemoryOptions
from flashmem_cli.memory.budget import KEEP_SCORES

DATA = Path(__file__).parent / "data"
DEFAULT_VARIANTS = (
    "attention:7,attention:1,attention:3,attention-per-query:7,"
    "reconstruction:1,reconstruction:3,reconstruction:7,mix:3,mix:7"
)


def parse_variant(text: str) -> tuple[str, int]:
    score, _, pool = text.partition(":")
    if score not in KEEP_SCORES or not pool.isdigit() or int(pool) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want SCORE:POOL, SCORE in {KEEP_SCORES}")
    return score, int(pool)


def run_variants(
    cases: list[RecallCase], n_ctx: int, variants: list[tuple[str, int]], model: str | None
) -> dict[str, Any]:
    loaded = models.load_model(models.resolve(model), None)
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        base = RecallSettings(n_ctx, MemoryOptions(), generate=False)
        for policy in ("full", "truncate"):
            runs[policy] = [run_policy(loaded, case, policy, base) for case in cases]
            print(f"{policy}: done", flush=True)
        for score, pool in variants:
            memory = MemoryOptions(keep_score=score, keep_pool=pool)
            settings = RecallSettings(n_ctx, memory, generate=False)
            runs[f"{score}:{pool}"] = [
                run_policy(loaded, case, "keep-only", settings) for case in cases
            ]
            print(f"{score}:{pool}: done", flush=True)
    finally:
        loaded.model.close()
    return runs


def as_results(cases: list[RecallCase], runs: dict[str, list[dict[str, Any]]]) -> list[Any]:
    """The runs in `recall.compared_by_case`' shape: one record per case, policies inside."""
    return [
        {"id": case.id, "policies": {name: records[i] for name, records in runs.items()}}
        for i, case in enumerate(cases)
    ]


def compare(runs: dict[str, list[dict[str, Any]]], results: list[Any]) -> dict[str, Any]:
    names = tuple(runs)
    by_case, skipped = compared_by_case(results, names)
    per_probe = [probe for probes in by_case for probe in probes]
    _, hurt = gains_and_gaps(per_probe, "truncate")
    variants = [name for name in names if name not in ("full", "truncate")]
    first_gains, gaps = case_gains_and_gaps(by_case, variants[0])
    table = {}
    for name in variants:
        gains, _ = case_gains_and_gaps(by_case, name)
        diff = np.asarray(gains) - np.asarray(first_gains)
        table[name] = {
            "gap_recovered": rounded_ratio(sum(gains), sum(gaps)),
            "ci": stats.rounded(stats.bootstrap_ratio_ci(gains, gaps)),
            "minus_first": rounded_ratio(float(diff.sum()), sum(gaps)),
            "minus_first_ci": stats.rounded(stats.bootstrap_ratio_ci(diff, gaps)),
            **costs(runs[name]),
        }
    return {"probes": len(per_probe), "hurt": len(hurt), "skipped": skipped, "variants": table}


def rounded_ratio(numerator: float, denominator: float) -> float | None:
    value = stats.ratio(numerator, denominator)
    return None if value is None else round(value, 3)


def costs(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The compression a variant reached and its median consolidation time."""
    ms = [m for r in records for m in r["consolidation_ms"]]
    compression = stats.ratio(
        sum(r["span_tokens"] for r in records), sum(r["left_tokens"] for r in records)
    )
    return {
        "compression": None if compression is None else round(compression, 2),
        "consolidation_ms_median": round(statistics.median(ms), 1) if ms else None,
    }


def markdown(summary: dict[str, Any], split: str, n_ctx: int) -> str:
    """The comparison as a Markdown table, as the README shows it."""
    lines = [
        f"{split}, -c {n_ctx}: {summary['hurt']} of {summary['probes']} probes hurt by truncation",
        "",
        "| keep score:pool | gap recovered (95% CI) | minus the first (95% CI) | compression | ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in summary["variants"].items():
        lines.append(
            f"| {name} | {shown(row['gap_recovered'])} ({interval(row['ci'])}) "
            f"| {shown(row['minus_first'], '+.2f')} ({interval(row['minus_first_ci'], '+.2f')}) "
            f"| {row['compression']}x | {row['consolidation_ms_median']} |"
        )
    return "\n".join(lines)


def shown(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def interval(pair: list[float] | None, spec: str = ".2f") -> str:
    return "n/a" if pair is None else f"{format(pair[0], spec)} to {format(pair[1], spec)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="dev", help="dev, test, train or a JSONL file")
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--limit", type=int)
    parser.add_argument("-m", "--model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(",")]
    path = Path(args.split)
    if not path.is_file():
        path = DATA / f"recall-{args.split}.jsonl"
    cases = parse_cases(path.read_text(encoding="utf-8").splitlines(), str(path))[: args.limit]
    runs = run_variants(cases, args.ctx_size, variants, args.model)
    results = as_results(cases, runs)
    summary = compare(runs, results)
    args.out.write_text(
        json.dumps({"split": str(path), "ctx_size": args.ctx_size, "summary": summary,
                    "cases": results}, indent=1)
    )  # fmt: skip
    print(markdown(summary, path.stem, args.ctx_size))


if __name__ == "__main__":
    main()
