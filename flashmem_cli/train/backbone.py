"""A differentiable Gemma 3 forward in torch, built from the GGUF's own (dequantized) weights.

Training needs gradients through the frozen backbone into the latents; llama.cpp has none. This
forward is checked against llama.cpp's logits in the tests (same argmax, correlation > 0.999).
It works over an explicit cache, as llama.cpp's does after a consolidation: each cached entry
keeps its key *before* RoPE and its position, so positions can be moved (llama.cpp's
`seq_add` shift rotates the stored keys by the same angle) and the keys roped again.

Gemma 3, as llama.cpp runs it: token embeddings times sqrt(n_embd); per layer an RMS-normed
input, Q/K/V projections, per-head RMS norms on Q and K, NEOX RoPE (base 10,000 on sliding-window
layers, the GGUF's base on the global ones), attention scaled by 1/sqrt(head_dim), an output
projection with a post-norm, a GELU-tanh gated FFN with a post-norm; the output norm, then the
tied embedding matrix as the output. GGUF stores the norm weights with Gemma's +1 added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from flashmem_cli.memory.layer import WEIGHTS

ROPE_BASE_SWA = 10_000.0  # llama.cpp's rope_freq_base_train_swa for Gemma 3
SWA_PATTERN = 6  # every 6th layer attends globally; the others use the sliding window
# the consolidator's layer tensors (memory/layer.py) plus the K/V projections it does without
LAYER_TENSORS = (*WEIGHTS, "attn_k", "attn_v", "attn_k_norm")


class UnsupportedModel(ValueError):
    """A GGUF whose architecture this forward does not implement."""


@dataclass(frozen=True)
class GemmaConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_base: float  # global layers
    n_swa: int  # sliding window; 0: every layer global

    def is_global(self, layer: int) -> bool:
        return self.n_swa == 0 or (layer + 1) % SWA_PATTERN == 0

    def rope_base_of(self, layer: int) -> float:
        return self.rope_base if self.is_global(layer) else ROPE_BASE_SWA

    @property
    def global_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_global(i)]

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)


@dataclass
class LayerCache:
    """One layer's cached entries: keys before RoPE (n, n_head_kv, head_dim), values alike."""

    keys: torch.Tensor
    values: torch.Tensor

    def select(self, index: torch.Tensor | slice) -> LayerCache:
        return LayerCache(self.keys[index], self.values[index])


@dataclass
class Cache:
    layers: list[LayerCache]
    positions: torch.Tensor  # (n,) int64, one per entry

    def __len__(self) -> int:
        return len(self.positions)

    def select(self, index: torch.Tensor | slice) -> Cache:
        return Cache([layer.select(index) for layer in self.layers], self.positions[index])

    @staticmethod
    def concat(parts: list[Cache]) -> Cache:
        n_layer = len(parts[0].layers)
        layers = [
            LayerCache(
                torch.cat([p.layers[i].keys for p in parts]),
                torch.cat([p.layers[i].values for p in parts]),
            )
            for i in range(n_layer)
        ]
        return Cache(layers, torch.cat([p.positions for p in parts]))

    def renumbered(self, start: int = 0) -> Cache:
        """The same entries at consecutive positions from `start` (the gap closed)."""
        positions = torch.arange(start, start + len(self), dtype=torch.int64)
        return Cache(self.layers, positions)


@dataclass
class ForwardResult:
    hidden: torch.Tensor  # (n, n_embd) after the output norm, as llama.cpp's embeddings
    cache: Cache  # the new entries only
    attention: dict[int, torch.Tensor]  # layer -> (n_head, n, n_past + n) probabilities


class GemmaBackbone:
    """The frozen backbone: weights as float32 tensors, no parameters to train."""

    def __init__(self, config: GemmaConfig, weights: dict[str, torch.Tensor]):
        self.config = config
        self.w = weights

    @classmethod
    def from_gguf(cls, path: Path) -> GemmaBackbone:
        reader = gguf.GGUFReader(path)
        config = read_config(reader)
        tensors = {t.name: t for t in reader.tensors}
        names = ["token_embd.weight", "output_norm.weight"] + [
            f"blk.{i}.{name}.weight" for i in range(config.n_layer) for name in LAYER_TENSORS
        ]
        return cls(config, {name: _dequantize(tensors[name]) for name in names})

    def to(self, device: torch.device) -> GemmaBackbone:
        self.w = {name: t.to(device) for name, t in self.w.items()}
        return self

    def layer(self, i: int, name: str) -> torch.Tensor:
        return self.w[f"blk.{i}.{name}.weight"]

    def embed(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.int64)
        return self.w["token_embd.weight"][ids] * self.config.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of normed hidden states (the output is tied to the embeddings)."""
        return hidden @ self.w["token_embd.weight"].T

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        past: Cache | None = None,
        attention_layers: tuple[int, ...] = (),
    ) -> ForwardResult:
        """Inputs `x` (n, n_embd) (scaled token embeddings or latents) at `positions`, attending
        to `past` and, causally, to each other."""
        c = self.config
        new_layers: list[LayerCache] = []
        attention: dict[int, torch.Tensor] = {}
        past_positions = past.positions if past is not None else positions[:0]
        key_positions = torch.cat([past_positions, positions])
        for i in range(c.n_layer):
            h = rms_norm(x, self.layer(i, "attn_norm"), c.rms_eps)
            q = (h @ self.layer(i, "attn_q").T).view(-1, c.n_head, c.head_dim)
            k = (h @ self.layer(i, "attn_k").T).view(-1, c.n_head_kv, c.head_dim)
            v = (h @ self.layer(i, "attn_v").T).view(-1, c.n_head_kv, c.head_dim)
            q = rms_norm(q, self.layer(i, "attn_q_norm"), c.rms_eps)
            k = rms_norm(k, self.layer(i, "attn_k_norm"), c.rms_eps)
            new_layers.append(LayerCache(k, v))
            if past is not None:
                k = torch.cat([past.layers[i].keys, k])
                v = torch.cat([past.layers[i].values, v])
            base = c.rope_base_of(i)
            mask = attention_mask(positions, key_positions, None if c.is_global(i) else c.n_swa)
            out, probs = attend(
                rope_neox(q, positions, base), rope_neox(k, key_positions, base), v, mask, c
            )
            if i in attention_layers:
                attention[i] = probs
            out = out @ self.layer(i, "attn_output").T
            x = x + rms_norm(out, self.layer(i, "post_attention_norm"), c.rms_eps)
            h = rms_norm(x, self.layer(i, "ffn_norm"), c.rms_eps)
            ffn = gelu(h @ self.layer(i, "ffn_gate").T) * (h @ self.layer(i, "ffn_up").T)
            ffn = ffn @ self.layer(i, "ffn_down").T
            x = x + rms_norm(ffn, self.layer(i, "post_ffw_norm"), c.rms_eps)
        hidden = rms_norm(x, self.w["output_norm.weight"], c.rms_eps)
        return ForwardResult(hidden, Cache(new_layers, positions), attention)


def read_config(reader: gguf.GGUFReader) -> GemmaConfig:
    architecture = _field(reader, "general.architecture")
    if architecture != "gemma3":
        raise UnsupportedModel(
            f"training supports Gemma 3 models only; this GGUF is {architecture!r}"
        )

    def number(key: str, default: float | None = None) -> float:
        value = _field(reader, f"gemma3.{key}")
        if value is None:
            if default is None:
                raise UnsupportedModel(f"the GGUF has no gemma3.{key}")
            return default
        return float(value)

    n_embd = int(number("embedding_length"))
    n_head = int(number("attention.head_count"))
    return GemmaConfig(
        n_layer=int(number("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(number("attention.head_count_kv", n_head)),
        head_dim=int(number("attention.key_length", n_embd // n_head)),
        rms_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
        rope_base=number("rope.freq_base", 1_000_000.0),
        n_swa=int(number("attention.sliding_window", 0)),
    )


def _field(reader: gguf.GGUFReader, key: str) -> str | float | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return float(part[0])


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    rows = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = [int(n) for n in reversed(tensor.shape)]
    return torch.from_numpy(np.array(rows, dtype=np.float32).reshape(shape))


def attention_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    """True where a query may read a key: causal by position, and within the sliding window."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, c: GemmaConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (n, n_head * head_dim), probabilities (n_head, n, n_keys)); grouped-query
    attention: each KV head serves n_head / n_head_kv query heads."""
    group = c.n_head // c.n_head_kv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out.reshape(len(q), -1), probs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def rope_neox(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of `x` (n, heads, d) at `positions` (n,), NEOX layout: i pairs with
    i + d/2 (as memory/layer.py's numpy version)."""
    half = x.shape[-1] // 2
    # angles in float64 on the CPU (Apple's MPS has no float64), then where x is
    inv = base ** (-torch.arange(half, dtype=torch.float64, device="cpu") * 2.0 / x.shape[-1])
    angles = positions.to("cpu", torch.float64)[:, None] * inv[None, :]
    angles = angles.to(x.device, x.dtype)[:, None, :]
    cos, sin = torch.cos(angles), torch.sin(angles)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
