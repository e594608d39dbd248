"""Samplers: small factories over llama.cpp's sampler chain."""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp as lc
import numpy as np

from flashmem_cli.engine.backend import Context

RANDOM_SEED = lc.LLAMA_DEFAULT_SEED
MAX_SEED = RANDOM_SEED - 1  # the largest seed that is not llama.cpp's "random"


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's defaults; `temperature <= 0` means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = RANDOM_SEED

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """An owned llama.cpp sampler chain."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        for stage in _stages(params):
            lc.llama_sampler_chain_add(self._chain, stage)

    def sample(self, ctx: Context, index: int = -1) -> int:
        """Pick the next token from the logits at output `index` and accept it into the chain."""
        if self.params.greedy:
            # Greedy is an argmax (first maximum, as llama.cpp's greedy sampler picks); done in
            # place it costs a tenth of building the chain's 262k-entry candidate array.
            return int(np.argmax(ctx.logits_view(index)))
        return int(lc.llama_sampler_sample(self._chain, ctx.ptr, index))

    def close(self) -> None:
        if self._chain:
            lc.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stages(params: SamplingParams) -> list:
    """The chain in llama.cpp's common order: top-k, top-p, min-p, temperature, draw."""
    if params.greedy:
        return [lc.llama_sampler_init_greedy()]
    stages = []
    if params.top_k > 0:
        stages.append(lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        stages.append(lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        stages.append(lc.llama_sampler_init_min_p(params.min_p, 1))
    stages.append(lc.llama_sampler_init_temp(params.temperature))
    stages.append(lc.llama_sampler_init_dist(params.seed))
    return stages
