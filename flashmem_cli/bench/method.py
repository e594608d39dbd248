"""One methodology for every benchmark: warm-up, interleaved repeats, medians with min/max, and
ratios taken pair by pair within a round (pure Python; no model here).

Interleaving matters on a shared laptop: drift (a browser waking, thermal throttling) then hits
every method of a round alike, and a ratio of two samples from the same round cancels it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from flashmem_cli.engine.threads import ceiling_threads, usable_cores


@dataclass(frozen=True)
class BenchOptions:
    """What every benchmark takes: --quick shrinks sizes and repeats to a smoke run."""

    quick: bool = False
    model: str | None = None
    threads: int | None = None
    n_gpu_layers: int | None = None

    def thread_count(self) -> int:
        """-t, else every usable core up to 4 (half above): fixed for the whole run, not the
        load-aware default, so that a neighbour's blip as a benchmark starts does not decide
        its threads (`flashmem bench threads` measures that default itself)."""
        return self.threads or ceiling_threads(usable_cores())

    def runs(self, full: int) -> int:
        return 1 if self.quick else full

    def warmups(self) -> int:
        return 0 if self.quick else 1


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    runs: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.runs}


def interleaved(
    methods: Mapping[str, Callable[[], float]], runs: int, warmups: int = 1
) -> dict[str, list[float]]:
    """Each method once per round, `runs` rounds after `warmups` discarded ones; the order
    rotates round by round so that no method always runs first (cold caches) or last."""
    names = list(methods)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmups + runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            value = methods[name]()
            if round_ >= warmups:
                samples[name].append(value)
    return samples


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Summary:
    """numerator / denominator within each round, summarised: the drift-free comparison."""
    if len(numerators) != len(denominators):
        raise ValueError("ratios need pairs from the same rounds")
    return Summary.of([a / b for a, b in zip(numerators, denominators, strict=True)])


def summaries(samples: Mapping[str, Sequence[float]]) -> dict[str, Summary]:
    return {name: Summary.of(values) for name, values in samples.items()}
