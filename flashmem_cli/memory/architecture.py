"""What flashmem's memory needs to know about a model's architecture, in one place (pure).

A `Family` row holds what llama.cpp hard-codes per architecture and the GGUF does not say:
the FFN's activation, which layers attend through a sliding window by default, how token
embeddings are scaled, the attention scale and soft-capping. Optional tensors (q/k norms,
post-norms, biases, fused projections) are read off the GGUF by memory/layer.py.
`describe(info)` resolves a loaded model into an `Architecture`: the layers memory reads, the
consolidator's layer, the scale its latents enter with, and, where memory cannot run, why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from flashmem_cli.memory.layer import LayerSpec

if TYPE_CHECKING:
    from flashmem_cli.engine.backend import ModelInfo

ROPE_NORM, ROPE_NEOX = 0, 2  # llama_rope_type values
MASS_LAYERS = 3  # the last global layers whose attention accumulates a position's claim to stay


@dataclass(frozen=True)
class Family:
    activation: str  # the FFN gate's: "gelu" (Gemma) or "silu" (SwiGLU)
    swa_period: int = 0  # n_swa > 0: layer i is windowed when i % period < period - 1
    scales_tokens: bool = False  # the graph multiplies token embeddings by sqrt(n_embd)
    scales_inputs: bool = False  # ... and embeddings given as input too (Gemma 2)
    attn_softcap: float = 0.0  # llama.cpp's default when the GGUF has no key
    final_softcap: float = 0.0
    wide_query_scale_layers: int = 0  # the 27B's layer count: it scales by 1/sqrt(n_embd/n_head)


FAMILIES = {
    "llama": Family("silu"),  # Llama 2/3, Mistral 7B, and GGUFs converted as llama
    "qwen2": Family("silu"),
    "qwen3": Family("silu"),
    "phi3": Family("silu"),  # llama.cpp turns Phi-3's sliding window off
    "gemma2": Family(
        "gelu",
        swa_period=2,
        scales_tokens=True,
        scales_inputs=True,
        attn_softcap=50.0,
        final_softcap=30.0,
        wide_query_scale_layers=46,
    ),
    "gemma3": Family("gelu", swa_period=6, scales_tokens=True, wide_query_scale_layers=62),
}


@dataclass(frozen=True)
class Architecture:
    name: str
    global_layers: tuple[int, ...]  # attend over the whole context (their cache holds it all)
    n_caches: int  # KV caches in the sequence state: full-context, then sliding-window
    layer: LayerSpec  # of the consolidator's layer, the last global one
    input_scale: float  # latents (in token-embedding units) are multiplied by it when fed
    final_softcap: float  # output logits become cap * tanh(logits / cap)
    memory_problem: str | None = None  # why memory cannot run on this model at all
    latent_problem: str | None = None  # why latents cannot be written (kept positions can)

    @property
    def shifts(self) -> bool:
        """Whether llama.cpp can shift this model's cache: not when no layer is global."""
        return bool(self.global_layers)

    @property
    def consolidator_layer(self) -> int:
        return self.global_layers[-1]

    @property
    def mass_layers(self) -> tuple[int, ...]:
        """The last global layers, whose attention memory accumulates."""
        return self.global_layers[-MASS_LAYERS:]


def describe(info: ModelInfo) -> Architecture:
    family = FAMILIES.get(info.architecture)
    if family is None:
        known = ", ".join(FAMILIES)
        return _without_memory(
            info,
            f"flashmem's memory does not support {info.architecture} models yet ({known})",
        )
    windowed = sliding_layers(info, family)
    if windowed is None:
        return _without_memory(
            info,
            f"the sliding-window layers of this {info.architecture} "
            "model are not listed in a form flashmem reads",
        )
    global_layers = tuple(i for i in range(info.n_layer) if i not in windowed)
    if not global_layers:
        return replace(
            _without_memory(
                info,
                f"every layer of this {info.architecture} model attends through a sliding "
                "window, so no layer holds the whole conversation for memory to read",
            ),
            global_layers=(),
        )
    softcap = info.meta("final_logit_softcapping")
    return Architecture(
        name=info.architecture,
        global_layers=global_layers,
        n_caches=2 if info.n_swa > 0 else 1,
        layer=layer_spec(info, family),
        input_scale=math.sqrt(info.n_embd)
        if family.scales_tokens and not family.scales_inputs
        else 1.0,
        final_softcap=float(softcap) if softcap is not None else family.final_softcap,
        latent_problem=rope_problem(info),
    )


def sliding_layers(info: ModelInfo, family: Family) -> set[int] | None:
    """Layers that see only a window, as llama.cpp decides: the GGUF's
    `attention.sliding_window_pattern` (a period, or one flag per layer), else the family's
    period; none when the model has no window. None when the pattern cannot be read."""
    if info.n_swa <= 0:
        return set()
    pattern = info.meta("attention.sliding_window_pattern")
    if pattern is not None and pattern.startswith("["):
        flags = [flag.strip() for flag in pattern.strip("[]").split(",")]
        if len(flags) != info.n_layer or not set(flags) <= {"true", "false"}:
            return None
        return {i for i, flag in enumerate(flags) if flag == "true"}
    period = int(pattern) if pattern is not None and pattern.isdigit() else family.swa_period
    if pattern == "0":  # llama.cpp: every layer windowed
        return set(range(info.n_layer))
    if period <= 0:
        return None
    return {i for i in range(info.n_layer) if i % period < period - 1}


def layer_spec(info: ModelInfo, family: Family) -> LayerSpec:
    """The spec of the consolidator's layer (a global one: the model's main RoPE base and
    scale, not the sliding-window layers' own)."""
    softcap = info.meta("attn_logit_softcapping")
    return LayerSpec(
        n_head=info.n_head,
        head_dim=info.head_dim,
        rms_eps=info.rms_eps,
        rope_base=info.rope_base,
        attention_scale=attention_scale(info, family),
        n_head_kv=max(1, info.n_head_kv),
        rope_neox=info.rope_type == ROPE_NEOX,
        rope_scale=info.rope_freq_scale,
        n_rot=int(info.meta("rope.dimension_count") or 0),
        attn_softcap=(float(softcap or family.attn_softcap) if family.attn_softcap else 0.0),
        activation=family.activation,
    )


def attention_scale(info: ModelInfo, family: Family) -> float:
    if family.wide_query_scale_layers and info.n_layer == family.wide_query_scale_layers:
        return 1 / math.sqrt(info.n_embd / info.n_head)
    return 1 / math.sqrt(info.head_dim)  # llama.cpp reads no scale key for these families


def rope_problem(info: ModelInfo) -> str | None:
    """Why the consolidator's RoPE would not be llama.cpp's, if it would not."""
    scaling = info.meta("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        return f"latents do not support {scaling} RoPE scaling yet"
    if info.rope_type not in (ROPE_NORM, ROPE_NEOX):
        return f"latents do not support RoPE type {info.rope_type}"
    return None


def _without_memory(info: ModelInfo, why: str) -> Architecture:
    spec = LayerSpec(info.n_head, info.head_dim, info.rms_eps, info.rope_base, 1.0)
    return Architecture(
        name=info.architecture,
        global_layers=(info.n_layer - 1,),
        n_caches=2 if info.n_swa > 0 else 1,
        layer=spec,
        input_scale=1.0,
        final_softcap=0.0,
        memory_problem=why,
        latent_problem=why,
    )
