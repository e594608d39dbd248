"""Tiny GGUF models with random weights, written with the official `gguf.GGUFWriter`, that the
llama.cpp bundled in llama-cpp-python loads and decodes: tests get a model of each architecture
family flashmem meets (and one it does not support) without downloading anything.

Tensor names and shapes follow llama.cpp's `load_arch_tensors` (src/models/<arch>.cpp). All
tensors are float32; numpy arrays are (rows, row length), which GGUF stores reversed, so a
(n_vocab, n_embd) array is llama.cpp's {n_embd, n_vocab} tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "gemma3-no-global",
    "gpt2",
)

N_EMBD = 64
N_FF = 128
CONTEXT_LENGTH = 4096
SLIDING_WINDOW = 16


@dataclass(frozen=True)
class Spec:
    """One kind of tiny model: its llama.cpp architecture, shape and tensor layout."""

    arch: str
    n_layer: int
    vocab: str  # a key of CONTROL_TOKENS
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    tied: bool = False  # no output.weight: llama.cpp reuses token_embd.weight
    fused_qkv: bool = False  # attn_qkv.weight, rows q, k, v
    qkv_bias: bool = False
    qk_norm: bool = False  # per-head RMS norm of q and k (attn_q_norm, attn_k_norm)
    post_norms: bool = False  # Gemma's post_attention_norm and post_ffw_norm
    ffn: str = "swiglu"  # swiglu (gate, up, down) | fused-swiglu (up holds gate, up) | gelu
    sliding_window: int = 0


GEMMA3 = Spec(
    "gemma3",
    n_layer=7,
    vocab="gemma",
    head_dim=32,
    tied=True,
    qk_norm=True,
    post_norms=True,
    sliding_window=SLIDING_WINDOW,
)
SPECS: dict[str, Spec] = {
    "llama": Spec("llama", n_layer=2, vocab="llama"),
    "qwen2": Spec("qwen2", n_layer=2, vocab="qwen", tied=True, qkv_bias=True),
    "qwen3": Spec("qwen3", n_layer=2, vocab="qwen", head_dim=32, tied=True, qk_norm=True),
    "phi3": Spec("phi3", n_layer=2, vocab="phi3", n_head_kv=4, fused_qkv=True, ffn="fused-swiglu"),
    "gemma2": Spec(
        "gemma2",
        n_layer=4,
        vocab="gemma",
        tied=True,
        post_norms=True,
        sliding_window=SLIDING_WINDOW,
    ),
    "gemma3": GEMMA3,
    "gemma3-no-global": replace(GEMMA3, n_layer=2),  # both layers sliding-window
    "gpt2": Spec(
        "gpt2", n_layer=2, vocab="gpt2", n_head_kv=4, tied=True, fused_qkv=True, ffn="gelu"
    ),
}

# Control tokens of each family's chat template (and its BOS, EOS, padding), in their real order.
CONTROL_TOKENS: dict[str, tuple[str, ...]] = {
    "llama": ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    "qwen": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    # Phi-3's SentencePiece specials too: llama.cpp's Phi-3 fix-up (a general.name with "phi3")
    # looks them up and fails to load a vocabulary without them.
    "phi3": (
        "<unk>",
        "<s>",
        "</s>",
        "<|endoftext|>",
        "<|user|>",
        "<|assistant|>",
        "<|system|>",
        "<|end|>",
    ),
    "gemma": ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    "gpt2": ("<|endoftext|>",),
}
BOS_TOKEN = {
    "llama": "<|begin_of_text|>",
    "qwen": "<|endoftext|>",
    "phi3": "<s>",
    "gemma": "<bos>",
    "gpt2": "<|endoftext|>",
}
EOS_TOKEN = {
    "llama": "<|eot_id|>",
    "qwen": "<|im_end|>",
    "phi3": "<|end|>",
    "gemma": "<eos>",
    "gpt2": "<|endoftext|>",
}
ADD_BOS = {"llama": True, "qwen": False, "phi3": False, "gemma": True, "gpt2": False}
BPE_PRE = {"llama": "llama-bpe", "qwen": "qwen2", "phi3": "gpt-2", "gpt2": "gpt-2"}

# A few byte-level BPE merges (GPT-2 spelling: "Ġ" is a space) so that merging runs at all.
BPE_MERGES = ("Ġ t", "h e", "Ġt he", "i n", "e r", "o u", "l l", "o r", "Ġ w", "Ġ a")
# SentencePiece pieces beyond single characters ("▁" is a space), best first.
SPM_PIECES = ("▁t", "he", "▁the", "in", "er", "ou", "ll", "or", "▁w", "▁a", "llo")


def write_tiny_gguf(
    path: Path,
    kind: str,
    chat_template: str | None = None,
    seed: int = 0,
    rope_scaling: str | None = None,
    name: str | None = None,
) -> Path:
    """Write a tiny `kind` model (one of ARCHITECTURES) with random weights to `path`;
    `rope_scaling` ("yarn", "linear") adds that RoPE scaling, factor 4; `name` is its
    general.name (default `tiny-<kind>`)."""
    spec = SPECS[kind]
    path = Path(path)
    writer = gguf.GGUFWriter(path, spec.arch)
    writer.add_name(name or f"tiny-{kind}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_hparams(writer, kind, spec)
    n_vocab = _add_vocab(writer, spec.vocab)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(CONTEXT_LENGTH // 4)
    for name, array in _tensors(spec, n_vocab, np.random.default_rng(seed)).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hparams(writer: gguf.GGUFWriter, kind: str, spec: Spec) -> None:
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    if spec.head_dim != N_EMBD // spec.n_head:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    if spec.arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
        return  # learned positions: no rope
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(1e6 if spec.arch in ("qwen2", "qwen3", "gemma3") else 10000.0)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)
    if spec.arch == "gemma2":  # every other layer is sliding-window (llama.cpp's default)
        # caps low enough to bite on random weights (the real model's are 50 and 30)
        writer.add_attn_logit_softcapping(1.0)
        writer.add_final_logit_softcapping(1.0)
    if spec.arch == "gemma3":  # five sliding-window layers to one global (llama.cpp's default)
        writer.add_rope_freq_base_swa(10000.0)
        if kind == "gemma3":  # Gemma 3 4B+: global layers' positions scaled down 8x
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(8.0)


def _add_vocab(writer: gguf.GGUFWriter, family: str) -> int:
    """A tokenizer that spells any text: byte-level BPE, or SentencePiece with byte fallback for
    Gemma; the family's special tokens are CONTROL tokens (<unk>: UNKNOWN). Returns the
    vocabulary size."""
    control = CONTROL_TOKENS[family]
    if family == "gemma":
        tokens, types, scores = _spm_vocab(control)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)
        writer.add_pad_token_id(tokens.index("<pad>"))
        writer.add_eot_token_id(tokens.index("<end_of_turn>"))
    else:
        tokens, types = _bpe_vocab(control)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(BPE_PRE[family])
        writer.add_token_merges(list(BPE_MERGES))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if "<unk>" in control:
        writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_bos_token_id(tokens.index(BOS_TOKEN[family]))
    writer.add_eos_token_id(tokens.index(EOS_TOKEN[family]))
    writer.add_add_bos_token(ADD_BOS[family])
    return len(tokens)


def _bpe_vocab(control: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """The 256 byte tokens in GPT-2's byte-to-unicode spelling, the merges' results, then the
    control tokens."""
    tokens = list(_gpt2_byte_chars()) + [merge.replace(" ", "") for merge in BPE_MERGES]
    types = [gguf.TokenType.NORMAL] * len(tokens) + [_special_type(t) for t in control]
    return tokens + list(control), [int(t) for t in types]


def _special_type(token: str) -> gguf.TokenType:
    return gguf.TokenType.UNKNOWN if token == "<unk>" else gguf.TokenType.CONTROL


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest from U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(0x100 + shifted)
            shifted += 1
    return [chars[byte] for byte in range(256)]


def _spm_vocab(control: tuple[str, ...]) -> tuple[list[str], list[int], list[float]]:
    """Gemma-style: special tokens first (<pad> <eos> <bos> <unk>, as in Gemma), byte-fallback
    tokens <0x00>..<0xFF>, then "▁", printable ASCII and a few longer pieces, scored so that
    longer pieces win."""
    pieces = ["▁", *(chr(c) for c in range(ord("!"), ord("~") + 1)), *SPM_PIECES]
    tokens = [*control, *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = (
        [_special_type(t) for t in control]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * len(pieces)
    )
    scores = [0.0] * (len(control) + 256) + [float(len(p)) for p in pieces]
    return tokens, [int(t) for t in types], scores


def _tensors(spec: Spec, n_vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 0.1, (rows, cols)).astype(np.float32)

    def norm(size: int = N_EMBD) -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.05, size)).astype(np.float32)

    def bias(size: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, size).astype(np.float32)

    n_q = spec.n_head * spec.head_dim
    n_kv = spec.n_head_kv * spec.head_dim
    out: dict[str, np.ndarray] = {"token_embd.weight": matrix(n_vocab, N_EMBD)}
    if spec.arch == "gpt2":
        out["position_embd.weight"] = matrix(CONTEXT_LENGTH, N_EMBD)
    if spec.arch == "llama":  # Llama 3.x rope frequency factors, one per rotated pair
        out["rope_freqs.weight"] = np.linspace(1.0, 4.0, spec.head_dim // 2, dtype=np.float32)
    out["output_norm.weight"] = norm()
    if spec.arch == "gpt2":
        out["output_norm.bias"] = bias(N_EMBD)
    if not spec.tied:
        out["output.weight"] = matrix(n_vocab, N_EMBD)

    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        out[f"{blk}.attn_norm.weight"] = norm()
        if spec.arch == "gpt2":
            out[f"{blk}.attn_norm.bias"] = bias(N_EMBD)
        if spec.fused_qkv:
            out[f"{blk}.attn_qkv.weight"] = matrix(n_q + 2 * n_kv, N_EMBD)
            if spec.arch == "gpt2":
                out[f"{blk}.attn_qkv.bias"] = bias(n_q + 2 * n_kv)
        else:
            for name, rows in (("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)):
                out[f"{blk}.{name}.weight"] = matrix(rows, N_EMBD)
                if spec.qkv_bias:
                    out[f"{blk}.{name}.bias"] = bias(rows)
        if spec.qk_norm:
            out[f"{blk}.attn_q_norm.weight"] = norm(spec.head_dim)
            out[f"{blk}.attn_k_norm.weight"] = norm(spec.head_dim)
        out[f"{blk}.attn_output.weight"] = matrix(N_EMBD, n_q)
        if spec.arch == "gpt2":
            out[f"{blk}.attn_output.bias"] = bias(N_EMBD)
        if spec.post_norms:
            out[f"{blk}.post_attention_norm.weight"] = norm()

        out[f"{blk}.ffn_norm.weight"] = norm()
        if spec.ffn == "swiglu":
            out[f"{blk}.ffn_gate.weight"] = matrix(N_FF, N_EMBD)
            out[f"{blk}.ffn_up.weight"] = matrix(N_FF, N_EMBD)
        elif spec.ffn == "fused-swiglu":  # ggml_swiglu: the first half gates the second
            out[f"{blk}.ffn_up.weight"] = matrix(2 * N_FF, N_EMBD)
        else:
            out[f"{blk}.ffn_norm.bias"] = bias(N_EMBD)
            out[f"{blk}.ffn_up.weight"] = matrix(N_FF, N_EMBD)
            out[f"{blk}.ffn_up.bias"] = bias(N_FF)
            out[f"{blk}.ffn_down.bias"] = bias(N_EMBD)
        out[f"{blk}.ffn_down.weight"] = matrix(N_EMBD, N_FF)
        if spec.post_norms:
            out[f"{blk}.post_ffw_norm.weight"] = norm()
    return out
