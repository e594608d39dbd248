"""The tiny random-weight GGUF models of tests/tiny_gguf.py load and decode in llama.cpp."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp as lc
import numpy as np
import pytest
from tiny_gguf import ARCHITECTURES, CONTROL_TOKENS, SPECS, write_tiny_gguf

from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.gguf_tensors import GGUFTensors

TEXT = "Hello, world! How are you?\n"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

# kind: (architecture, layers, heads, KV heads, head dim, sliding-window layers)
EXPECTED: dict[str, tuple[str, int, int, int, int, tuple[int, ...]]] = {
    "llama": ("llama", 2, 4, 2, 16, ()),
    "qwen2": ("qwen2", 2, 4, 2, 16, ()),
    "qwen3": ("qwen3", 2, 4, 2, 32, ()),
    "phi3": ("phi3", 2, 4, 4, 16, ()),
    "gemma2": ("gemma2", 4, 4, 2, 16, (0, 2)),
    "gemma3": ("gemma3", 7, 4, 2, 32, (0, 1, 2, 3, 4, 6)),
    "gemma3-no-global": ("gemma3", 2, 4, 2, 32, (0, 1)),
    "gpt2": ("gpt2", 2, 4, 4, 16, ()),
}
# (BOS, EOS, other end-of-generation tokens)
SPECIAL: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "llama": ("<|begin_of_text|>", "<|eot_id|>", ()),
    "qwen": ("<|endoftext|>", "<|im_end|>", ("<|endoftext|>",)),
    "phi3": ("<s>", "<|end|>", ("<|endoftext|>",)),
    "gemma": ("<bos>", "<eos>", ("<end_of_turn>",)),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", ()),
}


def test_every_kind_is_covered() -> None:
    assert set(ARCHITECTURES) == set(EXPECTED) == set(SPECS)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_loads_and_decodes(kind: str, tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", kind, chat_template=TEMPLATE)
    arch, n_layer, n_head, n_head_kv, head_dim, swa_layers = EXPECTED[kind]
    with Model(path, n_gpu_layers=0) as model:
        info = model.info()
        assert (info.architecture, info.n_layer, info.n_head, info.n_head_kv) == (
            arch,
            n_layer,
            n_head,
            n_head_kv,
        )
        assert info.head_dim == head_dim
        assert info.n_embd == 64
        assert info.n_ctx_train == 4096
        assert (info.n_swa > 0) == bool(swa_layers)
        assert info.chat_template == TEMPLATE

        tokens = model.tokenize(TEXT)
        assert tokens
        assert model.detokenize(tokens) == TEXT
        with Context(model, ContextParams(n_ctx=256, n_threads=1)) as ctx:
            KVSequence(ctx).feed(tokens)
            logits = ctx.logits()
        assert logits.shape == (model.n_vocab,)
        assert np.isfinite(logits).all()
        assert logits.std() > 1e-3  # random weights: the distribution is not flat


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_control_tokens(kind: str, tmp_path: Path) -> None:
    family = SPECS[kind].vocab
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", kind)
    with Model(path, n_gpu_layers=0) as model:
        for spelling in CONTROL_TOKENS[family]:
            tokens = model.tokenize(spelling, parse_special=True)
            assert len(tokens) == 1, spelling
            assert model.is_control(tokens[0]), spelling
            assert model.token_text(tokens[0]) == spelling
            assert len(model.tokenize(spelling)) > 1, spelling  # plain text without parsing
        bos, eos, other_eog = SPECIAL[family]
        assert model.token_text(model.bos) == bos
        assert model.token_text(model.eos) == eos
        assert model.is_eog(model.eos)
        for spelling in other_eog:
            assert model.is_eog(model.tokenize(spelling, parse_special=True)[0]), spelling
        assert model.add_bos == (family in ("llama", "gemma"))


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_tensors_read_back(kind: str, tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", kind, seed=3)
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    with GGUFTensors(path) as tensors:
        rows = tensors.rows("token_embd.weight", [0, 5])
        assert ("output.weight" in tensors.tensors) == (not SPECS[kind].tied)
        assert ("rope_freqs.weight" in tensors.tensors) == (kind == "llama")
    np.testing.assert_array_equal(rows, written["token_embd.weight"][[0, 5]])
    assert rows.shape == (2, 64)
    assert 0.05 < rows.std() < 0.2
    other_seed = write_tiny_gguf(tmp_path / "other.gguf", kind, seed=4)
    with GGUFTensors(other_seed) as tensors:
        assert not np.array_equal(tensors.rows("token_embd.weight", [0]), rows[:1])


@pytest.mark.parametrize(("kind", "freq_scale"), [("gemma3", 1 / 8), ("gemma3-no-global", 1.0)])
def test_gemma3_rope_scaling(kind: str, freq_scale: float, tmp_path: Path) -> None:
    """Gemma 3 4B+: linear rope scaling (factor 8) for the global layers."""
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", kind)
    with Model(path, n_gpu_layers=0) as model:
        assert lc.llama_model_rope_freq_scale_train(model.ptr) == pytest.approx(freq_scale)
        assert model.meta("gemma3.rope.freq_base_swa") is not None
