"""The training objective: what a target costs after chat's consolidation of an example's span.

As the runtime does it (chat/memory.py): the backbone has read [head | span | recent] (frozen);
the consolidator reads h_t (the last hidden state) and the span's frozen K/V of the last layer;
its K latents are decoded at the end of the cache, attending to everything, then moved to the
span's start; the span's best-attended positions stay, the rest leave and the gap closes; the
target follows the recent turns. Gradients reach the consolidator through the latents' K/V in
every layer of the frozen backbone.

Chat's default keep score is KVzip's reconstruction (chat/memory.py): the kept positions are
those the global layers attend to while the span is repeated after RECONSTRUCT_PROMPT, so the
latents learn to complement what chat actually keeps.

Long contexts: an example with a `gap` puts that many empty positions between the span and the
recent turns (and, after consolidation, between what stays of the span and the recent turns).
With a gap of at least the sliding window, the sliding-window layers of the recent turns, the
latents' decode and the target cannot see the head, the span, the latents or the kept positions,
as in a chat whose cache holds thousands of tokens: only the global layers connect them.

The policies of `eval recall` are the same construction with other parts left out, so that the
held-out loss of each can be compared on the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flashmem_cli.memory.budget import POOL, kept_count, positions_to_keep
from flashmem_cli.train.backbone import Cache, GemmaBackbone, rope_neox
from flashmem_cli.train.consolidator import TorchConsolidator
from flashmem_cli.train.examples import Example, Target

POLICIES = ("full", "truncate", "keep-only", "flashmem", "latents-only")


@dataclass
class Frozen:
    """The backbone's reading of an example's context, without gradients."""

    cache: Cache
    last_hidden: torch.Tensor  # h_t: the last context token's normed hidden state
    mass: np.ndarray  # the keep score of each position (reconstruction, as chat's default)

    @property
    def next_position(self) -> int:
        return int(self.cache.positions[-1]) + 1


def context_positions(example: Example) -> torch.Tensor:
    """0..n-1, with the example's gap opened before the recent turns."""
    positions = torch.arange(len(example.context))
    positions[example.end :] += example.gap
    return positions


@torch.no_grad()
def read_context(backbone: GemmaBackbone, example: Example) -> Frozen:
    """The context read once; then the span repeated after the reconstruction prompt to score
    its positions, and that copy forgotten."""
    positions = context_positions(example)
    result = backbone.forward(backbone.embed(example.context), positions)
    copy = example.reconstruct_prompt + example.context[example.start : example.end]
    first = int(positions[-1]) + 1
    layers = tuple(backbone.config.global_layers)
    reread = backbone.forward(
        backbone.embed(copy),
        torch.arange(first, first + len(copy)),
        past=result.cache,
        attention_layers=layers,
    )
    n = len(example.context)
    mass = torch.stack([p[:, :, :n].sum(dim=(0, 1)) for p in reread.attention.values()]).sum(0)
    return Frozen(result.cache, result.hidden[-1], mass.cpu().double().numpy())


def consolidator_layer(backbone: GemmaBackbone) -> int:
    """The layer the consolidator copies and reads: the last global one (the last layer on
    Gemma 3 270M), whose cache holds every position."""
    return backbone.config.global_layers[-1]


def consolidator_kv(backbone: GemmaBackbone, frozen: Frozen, end: int):
    """The consolidator layer's frozen keys (roped at their positions, as llama.cpp caches
    them) and values of positions before `end`: (cells, head_dim) each, one KV head."""
    last = consolidator_layer(backbone)
    layer = frozen.cache.layers[last]
    positions = frozen.cache.positions[:end]
    keys = rope_neox(layer.keys[:end], positions, backbone.config.rope_base_of(last))
    return keys[:, 0], layer.values[:end, 0]


def latents_for(
    backbone: GemmaBackbone,
    consolidator: TorchConsolidator,
    frozen: Frozen,
    example: Example,
    n_latents: int,
) -> Cache:
    """The latents' own cache entries: made by the consolidator, decoded after the context."""
    keys, values = consolidator_kv(backbone, frozen, example.end)
    rows = consolidator(frozen.last_hidden, keys, values, example.end, n_latents)
    first = frozen.next_position
    return backbone.forward(rows, torch.arange(first, first + n_latents), past=frozen.cache).cache


def compacted(
    frozen: Frozen,
    example: Example,
    policy: str,
    keep_ratio: float,
    latents: Cache | None,
    pool: int = POOL,
) -> Cache:
    """The cache a policy leaves: head, what stays of the span, then the recent turns after
    the example's gap; renumbered."""
    cache, start, end = frozen.cache, example.start, example.end
    if policy == "full":
        return cache
    n_latents = 0 if latents is None else len(latents)
    ratio = 0.0 if policy in ("truncate", "latents-only") else keep_ratio
    n_keep = kept_count(end - start, ratio, n_latents)
    kept = positions_to_keep(frozen.mass, start, end, n_keep, pool) if n_keep else np.zeros(0)
    parts = [cache.select(slice(0, start))]
    if latents is not None:
        parts.append(latents)
    parts.append(cache.select(torch.as_tensor(np.asarray(kept, dtype=np.int64))))
    front = Cache.concat(parts).renumbered()
    recent = cache.select(slice(end, len(cache))).renumbered(len(front) + example.gap)
    return Cache.concat([front, recent])


def target_nll(backbone: GemmaBackbone, cache: Cache, target: Target) -> torch.Tensor:
    """Summed negative log-likelihood of the target's scored tokens after `cache`."""
    fed = (target.prompt + target.scored)[:-1]
    n = int(cache.positions[-1]) + 1
    out = backbone.forward(backbone.embed(fed), torch.arange(n, n + len(fed)), past=cache)
    hidden = out.hidden
    if not target.prompt:  # the first scored token is predicted from the cache's last state
        return _first_token_nll(backbone, cache, target, hidden)
    logits = backbone.logits(hidden[len(target.prompt) - 1 :])
    return F.cross_entropy(logits, torch.as_tensor(target.scored), reduction="sum")


def _first_token_nll(
    backbone: GemmaBackbone, cache: Cache, target: Target, hidden: torch.Tensor
) -> torch.Tensor:
    """A target with no prompt: its tokens after the first, predicted from the ones before; the
    first is left out (the cache's own last state made it and carries no latent)."""
    if len(target.scored) < 2:
        return torch.zeros(())
    logits = backbone.logits(hidden)
    return F.cross_entropy(logits, torch.as_tensor(target.scored[1:]), reduction="sum")


def scored_count(target: Target) -> int:
    return len(target.scored) if target.prompt else max(0, len(target.scored) - 1)
