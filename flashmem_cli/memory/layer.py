"""One Gemma 3 decoder layer in numpy, run over the backbone's frozen K/V (pure).

The Shared-KV Consolidator is a copy of the backbone's last layer with its own query projection
and no K/V projections of its own: its attention reads the backbone's cached K and V of that
layer (memory/kv_state.py). Gemma 3's layer: RMS-normed input, Q projection, per-head Q norm,
NEOX RoPE, scaled dot-product attention, output projection and post-norm, residual; then a
normed GELU-gated FFN with a post-norm, residual. GGUF stores the norm weights with Gemma's +1
already added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flashmem_cli.memory.gguf_tensors import GGUFTensors

WEIGHTS = (
    "attn_norm",
    "attn_q",
    "attn_q_norm",
    "attn_output",
    "post_attention_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "post_ffw_norm",
)


@dataclass(frozen=True)
class LayerSpec:
    n_head: int
    head_dim: int
    rms_eps: float
    rope_base: float
    attention_scale: float  # Gemma 3 below 27B: 1 / sqrt(head_dim)


@dataclass
class DecoderLayer:
    spec: LayerSpec
    weights: dict[str, np.ndarray]  # matrices as (out, in), norms as vectors; float32

    @classmethod
    def from_gguf(cls, tensors: GGUFTensors, layer: int, spec: LayerSpec) -> DecoderLayer:
        return cls(
            spec, {name: read_weight(tensors, f"blk.{layer}.{name}.weight") for name in WEIGHTS}
        )

    def query(self, x: np.ndarray, position: int, w_q: np.ndarray | None = None) -> np.ndarray:
        """The roped, unscaled query (n_head, head_dim) of hidden state `x` at `position`."""
        s = self.spec
        projection = self.weights["attn_q"] if w_q is None else w_q
        q = (projection @ rms_norm(x, self.weights["attn_norm"], s.rms_eps)).reshape(
            s.n_head, s.head_dim
        )
        q = rms_norm(q, self.weights["attn_q_norm"], s.rms_eps)
        return rope_neox(q, position, s.rope_base)

    def forward(
        self,
        x: np.ndarray,
        position: int,
        keys: np.ndarray,
        values: np.ndarray,
        w_q: np.ndarray | None = None,
    ) -> np.ndarray:
        """The layer's output for hidden state `x` (n_embd,) attending to `keys`/`values`
        (cells, head_dim) - one KV head shared by all query heads, as in Gemma 3 270M."""
        s, w = self.spec, self.weights
        q = self.query(x, position, w_q) * s.attention_scale
        probs = softmax(q @ keys.T)
        attended = w["attn_output"] @ (probs @ values).reshape(-1)
        residual = x + rms_norm(attended, w["post_attention_norm"], s.rms_eps)
        h = rms_norm(residual, w["ffn_norm"], s.rms_eps)
        ffn = w["ffn_down"] @ (gelu(w["ffn_gate"] @ h) * (w["ffn_up"] @ h))
        return residual + rms_norm(ffn, w["post_ffw_norm"], s.rms_eps)


def read_weight(tensors: GGUFTensors, name: str) -> np.ndarray:
    info = tensors.tensors[name]
    if len(info.shape) == 1:
        return tensors.rows(name, [0]).reshape(-1)
    return tensors.rows(name, np.arange(info.shape[1]))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def rope_neox(x: np.ndarray, position: int, base: float) -> np.ndarray:
    """Rotary embedding, NEOX layout: dimension i pairs with i + d/2."""
    half = x.shape[-1] // 2
    angles = position * base ** (-np.arange(half) * 2.0 / x.shape[-1])
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation, as ggml_gelu computes it."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
