"""One decoder layer in numpy, run over the backbone's frozen K/V (pure).

The Shared-KV Consolidator is a copy of one of the backbone's layers with its own query
projection and no K/V projections of its own: its attention reads the backbone's cached K and
V of that layer (memory/kv_state.py). The layer, as llama.cpp builds it for the families in
memory/architecture.py: RMS-normed input, Q projection (a bias, when the model has one), a
per-head Q norm (Qwen 3, Gemma 3), RoPE (adjacent pairs or NEOX halves, scaled positions,
frequency factors), grouped-query attention (soft-capped on Gemma 2), output projection,
a post-norm (Gemma 2/3), residual; then a normed gated FFN (GELU on Gemma, SiLU elsewhere) with
a post-norm (Gemma 2/3), residual. Which optional parts a layer has is read off its tensors.
GGUF stores Gemma's norm weights with the +1 already added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flashmem_cli.errors import FlashmemError
from flashmem_cli.memory.gguf_tensors import GGUFTensors

# Tensors every supported layer has, and the ones only some families have. Names are GGUF's
# (`blk.<i>.<name>.weight`, biases `<name>.bias`); `rope_freqs` is the model's RoPE factors.
REQUIRED = ("attn_norm", "attn_q", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_q_norm", "post_attention_norm", "post_ffw_norm")
BIASES = ("attn_q.bias", "attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")
ROPE_FACTORS = "rope_freqs"
# Gemma 3's layer: what the torch backbone (train/) loads
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


class UnsupportedLayer(FlashmemError):
    """A GGUF layer this module cannot reproduce (a tensor it lacks, one it does not know)."""


@dataclass(frozen=True)
class LayerSpec:
    n_head: int
    head_dim: int
    rms_eps: float
    rope_base: float
    attention_scale: float  # Gemma 3 below 27B: 1 / sqrt(head_dim)
    n_head_kv: int = 1
    rope_neox: bool = True  # NEOX pairs dimension i with i + n_rot/2; else 2i with 2i + 1
    rope_scale: float = 1.0  # positions are multiplied by it (linear RoPE scaling: 1 / factor)
    n_rot: int = 0  # dimensions RoPE rotates; 0: all of head_dim
    attn_softcap: float = 0.0  # Gemma 2: scores become cap * tanh(scores / cap)
    activation: str = "gelu"  # of the FFN's gate: "gelu" (tanh approximation) or "silu"


@dataclass
class DecoderLayer:
    spec: LayerSpec
    weights: dict[str, np.ndarray]  # matrices as (out, in), norms and biases as vectors; float32

    @classmethod
    def from_gguf(cls, tensors: GGUFTensors, layer: int, spec: LayerSpec) -> DecoderLayer:
        return cls(spec, read_layer(tensors, layer, spec))

    def query(self, x: np.ndarray, position: int, w_q: np.ndarray | None = None) -> np.ndarray:
        """The roped, unscaled query (n_head, head_dim) of hidden state `x` at `position`."""
        s, w = self.spec, self.weights
        projection = w["attn_q"] if w_q is None else w_q
        q = projection @ rms_norm(x, w["attn_norm"], s.rms_eps)
        q = _plus_bias(q, w, "attn_q.bias").reshape(s.n_head, s.head_dim)
        if "attn_q_norm" in w:
            q = rms_norm(q, w["attn_q_norm"], s.rms_eps)
        return rope(q, position, s, w.get(ROPE_FACTORS))

    def forward(
        self,
        x: np.ndarray,
        position: int,
        keys: np.ndarray,
        values: np.ndarray,
        w_q: np.ndarray | None = None,
    ) -> np.ndarray:
        """The layer's output for hidden state `x` (n_embd,) attending to `keys`/`values`
        (cells, n_head_kv * head_dim): query head h reads KV head h // (n_head / n_head_kv)."""
        s, w = self.spec, self.weights
        attended = self.attend(self.query(x, position, w_q) * s.attention_scale, keys, values)
        out = _plus_bias(w["attn_output"] @ attended, w, "attn_output.bias")
        residual = x + _post_norm(out, w, "post_attention_norm", s.rms_eps)
        h = rms_norm(residual, w["ffn_norm"], s.rms_eps)
        gate = _plus_bias(w["ffn_gate"] @ h, w, "ffn_gate.bias")
        up = _plus_bias(w["ffn_up"] @ h, w, "ffn_up.bias")
        ffn = _plus_bias(w["ffn_down"] @ (ACTIVATIONS[s.activation](gate) * up), w, "ffn_down.bias")
        return residual + _post_norm(ffn, w, "post_ffw_norm", s.rms_eps)

    def attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Grouped-query attention of the scaled queries (n_head, head_dim) over the cells."""
        s = self.spec
        group = s.n_head // s.n_head_kv
        q = q.reshape(s.n_head_kv, group, s.head_dim)
        k = keys.reshape(len(keys), s.n_head_kv, -1)
        v = values.reshape(len(values), s.n_head_kv, -1)
        scores = np.einsum("kgd,ckd->kgc", q, k)
        if s.attn_softcap:
            scores = s.attn_softcap * np.tanh(scores / s.attn_softcap)
        return np.einsum("kgc,ckd->kgd", softmax(scores), v).reshape(-1)


def read_layer(tensors: GGUFTensors, layer: int, spec: LayerSpec) -> dict[str, np.ndarray]:
    """Layer `layer`'s weights under REQUIRED/NORMS/BIASES names, fused tensors split: Phi-3's
    `attn_qkv` gives its Q rows, its `ffn_up` holds the gate's rows then the up rows."""
    names = tensors.tensors

    def get(name: str) -> np.ndarray | None:
        full = f"blk.{layer}.{name}" + ("" if name.endswith(".bias") else ".weight")
        return read_weight(tensors, full) if full in names else None

    found = {name: t for name in (*REQUIRED, *NORMS, *BIASES) if (t := get(name)) is not None}
    n_q = spec.n_head * spec.head_dim
    if "attn_q" not in found and (qkv := get("attn_qkv")) is not None:
        found["attn_q"] = qkv[:n_q]
        if (qkv_bias := get("attn_qkv.bias")) is not None:
            found["attn_q.bias"] = qkv_bias[:n_q]
    if "ffn_gate" not in found and "ffn_up" in found:
        fused = found.pop("ffn_up")
        found["ffn_gate"], found["ffn_up"] = np.split(fused, 2)
    problem = layer_problem(set(names), layer)
    if problem is not None:
        raise UnsupportedLayer(problem)
    if f"{ROPE_FACTORS}.weight" in names:
        found[ROPE_FACTORS] = read_weight(tensors, f"{ROPE_FACTORS}.weight")
    return found


def layer_problem(names: set[str], layer: int) -> str | None:
    """Why `read_layer` cannot give layer `layer` of a GGUF holding tensors `names`, if so."""
    if "rope_factors_long.weight" in names or "rope_factors_short.weight" in names:
        return "latents do not support LongRoPE frequency factors (Phi-3 128k) yet"

    def has(*options: str) -> bool:
        return any(f"blk.{layer}.{option}.weight" in names for option in options)

    missing = [
        name
        for name, options in [
            ("attn_norm", ("attn_norm",)),
            ("attn_q", ("attn_q", "attn_qkv")),
            ("attn_output", ("attn_output",)),
            ("ffn_norm", ("ffn_norm",)),
            ("ffn_up", ("ffn_up",)),
            ("ffn_down", ("ffn_down",)),
        ]
        if not has(*options)
    ]
    if missing:  # a mixture-of-experts layer has ffn_*_exps instead
        return f"latents do not support layer {layer}'s form yet (no {', '.join(missing)})"
    return None


def read_weight(tensors: GGUFTensors, name: str) -> np.ndarray:
    info = tensors.tensors[name]
    if len(info.shape) == 1:
        return tensors.rows(name, [0]).reshape(-1)
    return tensors.rows(name, np.arange(info.shape[1]))


def _plus_bias(x: np.ndarray, weights: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x + weights[name] if name in weights else x


def _post_norm(x: np.ndarray, weights: dict[str, np.ndarray], name: str, eps: float) -> np.ndarray:
    return rms_norm(x, weights[name], eps) if name in weights else x


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def rope(
    x: np.ndarray, position: int, spec: LayerSpec, factors: np.ndarray | None = None
) -> np.ndarray:
    """Rotary embedding as ggml_rope_ext computes it without YaRN: the first n_rot dimensions
    of each head turn by position * rope_scale * base^(-2i/n_rot) / factor_i."""
    n_rot = spec.n_rot or x.shape[-1]
    frequencies = spec.rope_base ** (-np.arange(0, n_rot, 2) / n_rot)
    if factors is not None:
        frequencies = frequencies / factors
    angles = position * spec.rope_scale * frequencies
    cos, sin = np.cos(angles), np.sin(angles)
    turned, rest = x[..., :n_rot], x[..., n_rot:]
    if spec.rope_neox:
        first, second = turned[..., : n_rot // 2], turned[..., n_rot // 2 :]
        out = np.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
    else:
        even, odd = turned[..., 0::2], turned[..., 1::2]
        out = np.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
        out = out.reshape(turned.shape)
    return np.concatenate([out, rest], axis=-1)


def rope_neox(x: np.ndarray, position: int, base: float) -> np.ndarray:
    """Rotary embedding, NEOX layout: dimension i pairs with i + d/2."""
    return rope(x, position, LayerSpec(1, x.shape[-1], 0.0, base, 1.0))


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation, as ggml_gelu computes it."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"gelu": gelu, "silu": silu}
