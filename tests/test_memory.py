"""The Cognitive Monitor's entropy maths (pure) and the attention capture on the real model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.ggml import NodeTap, attention_rows, batch_size
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.monitor import TriggerPolicy, attention_entropy, entropy_threshold


def test_uniform_attention_has_log_n_entropy_after_the_sinks():
    probs = np.full((4, 20), 1 / 20)
    assert attention_entropy(probs, n_sinks=4) == pytest.approx(math.log(16))


def test_one_hot_attention_has_zero_entropy():
    probs = np.zeros((2, 10))
    probs[:, 7] = 1.0
    assert attention_entropy(probs) == pytest.approx(0.0)


def test_mass_on_the_sinks_is_ignored_and_heads_are_averaged():
    focused = np.array([0.9, 0.0, 0.0, 0.0, 0.1, 0.0])  # after masking: one-hot on 4
    spread = np.array([0.5, 0.0, 0.0, 0.0, 0.25, 0.25])  # after masking: uniform on 4, 5
    probs = np.stack([focused, spread])
    assert attention_entropy(probs, n_sinks=4) == pytest.approx(math.log(2) / 2)
    only_sinks = np.array([[0.5, 0.5, 0.0, 0.0, 0.0]])
    assert attention_entropy(only_sinks, n_sinks=2) == 0.0


def test_threshold_is_a_percentile_and_checks_its_input():
    assert entropy_threshold(np.arange(101.0), 85) == pytest.approx(85.0)
    with pytest.raises(ValueError):
        entropy_threshold(np.array([]))
    with pytest.raises(ValueError):
        entropy_threshold(np.arange(3.0), 101)


def test_trigger_respects_tau_budget_and_gap():
    policy = TriggerPolicy(tau=1.0, max_per_reply=2, min_gap=5)
    fired = [step for step in range(30) if policy.should_fire(step, 2.0 if step != 1 else 0.5)]
    assert fired == [0, 5]


@pytest.mark.model
def test_last_layer_attention_is_captured_as_llama_cpp_computes_it(model_path):
    captured: list[np.ndarray] = []

    def on_node(name, ptr):
        captured.append(np.stack([attention_rows(ptr, t) for t in range(batch_size(ptr))]))

    tap = NodeTap(["kq_soft_max-17"], on_node)
    with Model(model_path, n_gpu_layers=0) as model:
        tokens = model.tokenize(
            "<bos>The quick brown fox jumps over the lazy dog. It was", parse_special=True
        )
        params = ContextParams(n_ctx=256, n_threads=2, tap=tap)
        with Context(model, params) as ctx:
            seq = KVSequence(ctx)
            seq.feed(tokens)
            tap.check()
            seq.feed([model.tokenize(" a")[0]])
            tap.check()

    prompt, step = captured  # one node per decode
    n = len(tokens)
    assert prompt.shape[0] == n and prompt.shape[1] == 4  # (tokens, heads, n_kv)
    np.testing.assert_allclose(prompt.sum(axis=2), 1.0, atol=1e-5)
    for i in range(n):
        assert np.all(prompt[i, :, : i + 1] > 0)  # the last layer is global: all it may see
        assert np.all(prompt[i, :, i + 1 :] == 0)  # no future, no padding
    last = step[0]
    np.testing.assert_allclose(last.sum(axis=1), 1.0, atol=1e-5)
    assert np.count_nonzero(last[0]) == n + 1
    assert 0.0 < attention_entropy(last) < math.log(n + 1 - 4)


@pytest.mark.parametrize("names", [["kq_soft_max-17"], ["kq_soft_max-5", "kq_soft_max-17"]])
def test_node_tap_matches_exact_names_only(names):
    import ctypes

    from flashmem_cli.engine.ggml import GgmlTensor

    seen = []
    tap = NodeTap(names, lambda name, ptr: seen.append(name))
    for name in (b"kq_soft_max-17", b"kq_soft_max-1", b"kq_soft_max-170", b"kq_soft_max-5"):
        tensor = GgmlTensor()
        tensor.name = name
        address = ctypes.addressof(tensor)
        wanted = name.decode() in names
        assert tap._call(address, True, None) is wanted
        assert tap._call(address, False, None) is True
    assert sorted(seen) == sorted(names)
    tap.check()


def test_the_compiled_filter_forwards_only_wanted_nodes():
    """`make install` builds engine/tapfilter.c; llama.cpp calls it for every graph node."""
    import ctypes

    from flashmem_cli.engine.ggml import GgmlTensor

    seen = []
    tap = NodeTap(["kq_soft_max-17", "result_norm"], lambda name, ptr: seen.append(name))
    assert tap.filtered_in_c
    for name in (b"kq_soft_max-17", b"kq_soft_max-1", b"result_norm", b"result_output"):
        tensor = GgmlTensor()
        tensor.name = name
        address = ctypes.addressof(tensor)
        wanted = name in (b"kq_soft_max-17", b"result_norm")
        assert tap.callback(address, True, tap.user_data) is wanted
        assert tap.callback(address, False, tap.user_data) is True
    assert seen == ["kq_soft_max-17", "result_norm"]


@pytest.mark.model
def test_gguf_rows_match_the_official_reader_on_a_few_rows(model_path):
    from gguf.quants import dequantize

    from flashmem_cli.memory.gguf_tensors import GGUFTensors

    with GGUFTensors(model_path) as tensors:
        info = tensors.tensors["token_embd.weight"]
        assert info.shape == (640, 262144)
        rows = tensors.rows("token_embd.weight", [0, 2, 105, 262143])
        raw = np.memmap(
            model_path, dtype=np.uint8, mode="r", offset=info.offset, shape=(262144, info.row_bytes)
        )
        expected = dequantize(np.asarray(raw[[0, 2, 105, 262143]]), info.type)
        np.testing.assert_array_equal(rows, expected)
        with pytest.raises(IndexError):
            tensors.rows("token_embd.weight", [262144])


@pytest.mark.model
def test_own_scaled_embedding_rows_reproduce_the_token_run(model_path):
    from flashmem_cli.memory.gguf_tensors import GGUFTensors

    with Model(model_path, n_gpu_layers=0) as model, GGUFTensors(model_path) as tensors:
        tokens = model.tokenize(
            "<bos>The capital of France is Paris, and the capital of Italy is", parse_special=True
        )
        with Context(model, ContextParams(n_ctx=256, n_threads=2)) as ctx:
            KVSequence(ctx).feed(tokens)
            by_tokens = ctx.logits()
        rows = tensors.rows("token_embd.weight", tokens) * math.sqrt(model.n_embd)
        with Context(model, ContextParams(n_ctx=256, n_threads=2)) as ctx:
            ctx.decode_embeddings(rows, start_pos=0)
            by_embeddings = ctx.logits()
    assert by_embeddings.argmax() == by_tokens.argmax()
    assert np.corrcoef(by_tokens, by_embeddings)[0, 1] > 0.999


PROMPT = "<bos>The quick brown fox jumps over the lazy dog. It was"


def decode_one_token_capturing(model, names):
    """Decode PROMPT, then one more token with `names` tapped; returns (nodes captured during
    that token's decode, the sequence's parsed KV state after it, the prompt's length)."""
    from flashmem_cli.engine.ggml import read_f32
    from flashmem_cli.memory.kv_state import parse_sequence_state

    captured: dict[str, list[np.ndarray]] = {}
    tap = NodeTap(names, lambda name, ptr: captured.setdefault(name, []).append(read_f32(ptr)))
    tokens = model.tokenize(PROMPT, parse_special=True)
    params = ContextParams(n_ctx=256, n_threads=2, tap=tap)
    with Context(model, params) as ctx:
        seq = KVSequence(ctx)
        seq.feed(tokens)
        captured.clear()
        seq.feed([model.tokenize(" a")[0]])
        tap.check()
        state = parse_sequence_state(ctx.sequence_state(0), n_caches=2)
    return captured, state, len(tokens)


@pytest.mark.model
def test_frozen_kv_from_the_state_and_the_own_query_reproduce_llama_cpps_attention(model_path):
    with Model(model_path, n_gpu_layers=0) as model:
        names = ["Qcur-17", "kq_soft_max-17", "kqv_out-17"]
        captured, (full, windowed), n_prompt = decode_one_token_capturing(model, names)

    n = n_prompt + 1
    assert list(full.positions) == list(range(n)) and len(full.keys) == 3  # layers 5, 11, 17
    assert len(windowed.keys) == 15
    keys = full.keys[2].astype(np.float32)  # layer 17: (cells, head size 256)
    values = full.values[2].astype(np.float32)
    query = captured["Qcur-17"][-1]  # the roped query of the new token, (4 heads, 256)
    scores = query / math.sqrt(256) @ keys.T  # Gemma 3: query_pre_attn_scalar = head size
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, captured["kq_soft_max-17"][0][:, 0, :n], atol=1e-3)
    output = (probs @ values).reshape(-1)
    expected = captured["kqv_out-17"][0]
    assert np.abs(output - expected).max() < 1e-3 * np.abs(expected).max() * 10
    assert np.corrcoef(output, expected)[0, 1] > 0.9999


@pytest.mark.model
def test_final_hidden_state_times_tied_embeddings_gives_the_logits(model_path):
    from flashmem_cli.memory.gguf_tensors import GGUFTensors

    with Model(model_path, n_gpu_layers=0) as model, GGUFTensors(model_path) as tensors:
        tokens = model.tokenize("<bos>The capital of France is", parse_special=True)
        with Context(model, ContextParams(n_ctx=256, n_threads=2, hidden_states=True)) as ctx:
            KVSequence(ctx).feed(tokens)
            hidden, logits = ctx.hidden_state(), ctx.logits()
        with Context(model, ContextParams(n_ctx=256, n_threads=2)) as ctx:
            KVSequence(ctx).feed(tokens)
            np.testing.assert_array_equal(ctx.logits(), logits)  # same graph output
        top = np.argsort(logits)[-50:]
        recomputed = tensors.rows("token_embd.weight", top) @ hidden  # Gemma ties its output
    assert hidden.shape == (model.n_embd,)
    assert np.abs(recomputed - logits[top]).max() < 0.25  # the output matmul quantizes h to 8 bits
    assert np.corrcoef(recomputed, logits[top])[0, 1] > 0.99


@pytest.mark.model
def test_the_last_layer_in_numpy_over_the_frozen_kv_reproduces_llama_cpp(model_path):
    """The consolidator's layer: a numpy copy of layer 17 given llama.cpp's own input
    (l_out-16) and the cached K/V reproduces llama.cpp's layer output (l_out-17)."""
    from flashmem_cli.memory.gguf_tensors import GGUFTensors
    from flashmem_cli.memory.layer import DecoderLayer, LayerSpec

    with Model(model_path, n_gpu_layers=0) as model, GGUFTensors(model_path) as tensors:
        info = model.info()
        spec = LayerSpec(
            info.n_head,
            info.head_dim,
            info.rms_eps,
            info.rope_base,
            attention_scale=1 / math.sqrt(info.head_dim),
        )
        layer = DecoderLayer.from_gguf(tensors, info.n_layer - 1, spec)
        names = ["l_out-16", "l_out-17", "Qcur-17"]
        captured, (full, _), position = decode_one_token_capturing(model, names)

    x = captured["l_out-16"][0]
    query = layer.query(x, position)
    assert np.corrcoef(query.ravel(), captured["Qcur-17"][-1].ravel())[0, 1] > 0.9999
    out = layer.forward(
        x, position, full.keys[2].astype(np.float32), full.values[2].astype(np.float32)
    )
    expected = captured["l_out-17"][0]
    assert np.corrcoef(out, expected)[0, 1] > 0.9999
    assert np.abs(out - expected).max() < 0.01 * np.abs(expected).max()
