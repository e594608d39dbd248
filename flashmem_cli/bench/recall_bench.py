"""`flashmem bench recall`: the recall evaluation on the first cases of the test split, in a
size that fits the bench's time (the whole split: `flashmem eval recall`, about 20 minutes)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from flashmem_cli import models
from flashmem_cli.bench.method import BenchOptions
from flashmem_cli.bench.recall import RecallSettings, run_recall
from flashmem_cli.bench.recall_cases import parse_cases
from flashmem_cli.bench.report import Column, Section
from flashmem_cli.chat.memory import MemoryOptions

POLICIES = ("full", "truncate", "flashmem")
CASES, QUICK_CASES = 2, 1
CTX = 512


def test_split() -> str:
    return (resources.files("flashmem_cli.bench") / "data" / "recall-test.jsonl").read_text("utf-8")


def run(options: BenchOptions, say: Callable[[str], None]) -> Section:
    limit = QUICK_CASES if options.quick else CASES
    cases = parse_cases(test_split().splitlines(), "recall-test.jsonl")[:limit]
    settings = RecallSettings(CTX, MemoryOptions(n_latents=8), POLICIES, generate=False)
    loaded = models.load_model(models.resolve(options.model), options.n_gpu_layers)
    try:
        result = run_recall(
            loaded, cases, settings, lambda case, policy: say(f"recall: {case}, {policy}")
        )
    finally:
        loaded.model.close()
    return section(result["summary"], len(cases))


def section(summary: dict[str, Any], n_cases: int) -> Section:
    means = summary.get("mean_logprob", {})
    interval = summary.get("gap_recovered_ci", {}).get("flashmem")
    rows = [
        {
            "policy": policy,
            "mean_logprob": means.get(policy),
            "gap_recovered": {"full": 1.0, "truncate": 0.0}.get(
                policy, summary.get("gap_recovered")
            ),
            "ci": None if policy != "flashmem" or not interval else f"{interval[0]}-{interval[1]}",
        }
        for policy in POLICIES
    ]
    return Section(
        name="recall",
        title=f"Recall of early facts (first {n_cases} test cases, -c {CTX})",
        method=(
            "Each case's turns fill a session at -c 512; every probe's reference answer is then "
            "scored teacher-forced (mean log-prob per answer token) under full (a context large "
            "enough for everything), truncate (oldest turns dropped) and flashmem (consolidated). "
            "gap_recovered = (flashmem - truncate) / (full - truncate) over the probes truncation "
            "hurt, with a bootstrap 95% interval over cases. A subset, to fit the bench's time: "
            "the README's Memory section has the whole test split."
        ),
        columns=[
            Column("policy", "policy"),
            Column("mean_logprob", "mean log-prob", "{:.3f}"),
            Column("gap_recovered", "gap recovered", "{:.2f}"),
            Column("ci", "95% interval"),
        ],
        rows=rows,
        headline={"gap_recovered": summary.get("gap_recovered"), "probes": summary.get("probes")},
    )
