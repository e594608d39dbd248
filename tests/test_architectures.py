"""Memory on the architectures people run (issue 12), checked on tiny random-weight GGUFs that
tests/tiny_gguf.py writes: llama.cpp computes, and memory's numpy reproduces what it reads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from tiny_gguf import write_tiny_gguf

from flashmem_cli.engine.attention import AttentionCapture
from flashmem_cli.engine.backend import Context, ContextParams, Model, ModelInfo
from flashmem_cli.engine.ggml import NodeTap, read_f32
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.memory.architecture import FAMILIES, describe, sliding_layers
from flashmem_cli.memory.gguf_tensors import GGUFTensors
from flashmem_cli.memory.kv_state import parse_sequence_state
from flashmem_cli.memory.layer import DecoderLayer

SUPPORTED = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. It was"
# (global layers, sliding-window layers) as llama.cpp's load log lists them for the tiny kinds
LAYERS = {
    "llama": ((0, 1), ()),
    "qwen2": ((0, 1), ()),
    "qwen3": ((0, 1), ()),
    "phi3": ((0, 1), ()),
    "gemma2": ((1, 3), (0, 2)),
    "gemma3": ((5,), (0, 1, 2, 3, 4, 6)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tiny")
    made: dict[str, Path] = {}

    def path(kind: str) -> Path:
        if kind not in made:
            made[kind] = write_tiny_gguf(directory / f"tiny-{kind}.gguf", kind)
        return made[kind]

    return path


def capture_one_token(model: Model, names: list[str], n_ctx: int = 256):
    """Feed TEXT, then decode one more token with `names` tapped: (captured nodes, the parsed
    sequence state after it, the new token's position)."""
    captured: dict[str, np.ndarray] = {}
    tap = NodeTap(names, lambda name, ptr: captured.__setitem__(name, read_f32(ptr)))
    arch = describe(model.info())
    with Context(model, ContextParams(n_ctx=n_ctx, n_threads=1, tap=tap)) as ctx:
        seq = KVSequence(ctx)
        tokens = model.tokenize(TEXT)
        seq.feed(([model.bos] if model.add_bos else []) + tokens)
        captured.clear()
        seq.feed(model.tokenize(" a")[:1])
        tap.check()
        state = parse_sequence_state(ctx.sequence_state(0), arch.n_caches)
        return captured, state, len(seq) - 1


# -- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SUPPORTED)
def test_global_layers_are_the_ones_llama_cpp_windows_not(tiny, kind):
    with Model(tiny(kind), n_gpu_layers=0) as model:
        arch = describe(model.info())
    expected_global, _ = LAYERS[kind]
    assert arch.memory_problem is None and arch.latent_problem is None
    assert arch.global_layers == expected_global
    assert arch.consolidator_layer == expected_global[-1]


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_a_global_layer_sees_past_the_window_and_a_windowed_one_does_not(tiny, kind):
    """What the table says about layers, checked against the attention llama.cpp computes: the
    last token's attention on a global layer reaches every position, on a windowed one only
    the last 16 (the tiny models' window)."""
    with Model(tiny(kind), n_gpu_layers=0) as model:
        global_layers, windowed = LAYERS[kind]
        names = [f"kq_soft_max-{global_layers[-1]}", f"kq_soft_max-{windowed[-1]}"]
        captured, _, position = capture_one_token(model, names)
    n = position + 1
    assert n > 40
    for name, reach in zip(names, (n, 16), strict=True):
        probs = captured[name].reshape(4, -1)  # one token: (heads, n_kv)
        assert int((probs[0] > 0).sum()) == reach, name


@pytest.mark.parametrize("kind", SUPPORTED)
def test_the_sequence_state_parses_into_each_cache_and_layer(tiny, kind):
    with Model(tiny(kind), n_gpu_layers=0) as model:
        info = model.info()
        _, state, position = capture_one_token(model, ["result_norm"])
    global_layers, windowed = LAYERS[kind]
    full = state[0]
    assert list(full.positions) == list(range(position + 1))
    assert len(full.keys) == len(full.values) == len(global_layers)
    if windowed:
        assert len(state) == 2 and len(state[1].keys) == len(windowed)
    width = info.n_head_kv * info.head_dim
    assert full.keys[-1].shape == full.values[-1].shape == (position + 1, width)


# -- the consolidator's layer reproduces llama.cpp's ------------------------------------------


@pytest.mark.parametrize("kind", SUPPORTED)
def test_the_consolidators_layer_over_the_frozen_kv_reproduces_llama_cpp(tiny, kind):
    """Memory's numpy copy of the last global layer, given llama.cpp's input to it and the K/V
    the sequence state holds, gives llama.cpp's output: grouped-query attention, SwiGLU or
    GELU, biases, q norms, post-norms, fused projections, RoPE layout, scaling and factors,
    soft-capping, as each family has them."""
    path = tiny(kind)
    with Model(path, n_gpu_layers=0) as model, GGUFTensors(path) as tensors:
        arch = describe(model.info())
        layer_index = arch.consolidator_layer
        names = [f"l_out-{layer_index - 1}", f"l_out-{layer_index}"]
        captured, state, position = capture_one_token(model, names)
        layer = DecoderLayer.from_gguf(tensors, layer_index, arch.layer)
    x = captured[f"l_out-{layer_index - 1}"].reshape(-1, model.n_embd)[-1]
    keys = state[0].keys[-1].astype(np.float32)
    values = state[0].values[-1].astype(np.float32)
    out = layer.forward(x, position, keys, values)
    expected = captured[f"l_out-{layer_index}"].reshape(-1, model.n_embd)[-1]
    assert np.corrcoef(out, expected)[0, 1] > 0.9999
    assert np.abs(out - expected).max() < 0.01 * np.abs(expected).max()


@pytest.mark.parametrize("kind", SUPPORTED)
def test_embedding_rows_at_the_architectures_scale_reproduce_the_token_run(tiny, kind):
    """Latents enter as embeddings: the table's input scale makes a prompt's own embedding rows
    give the logits its tokens give (Gemma 3 scales tokens only, Gemma 2 inputs too)."""
    path = tiny(kind)
    with Model(path, n_gpu_layers=0) as model, GGUFTensors(path) as tensors:
        arch = describe(model.info())
        tokens = model.tokenize(TEXT)
        with Context(model, ContextParams(n_ctx=256, n_threads=1)) as ctx:
            KVSequence(ctx).feed(tokens)
            by_tokens = ctx.logits()
        rows = tensors.rows("token_embd.weight", tokens) * arch.input_scale
        with Context(model, ContextParams(n_ctx=256, n_threads=1)) as ctx:
            ctx.decode_embeddings(rows, start_pos=0)
            by_embeddings = ctx.logits()
    assert by_embeddings.argmax() == by_tokens.argmax()
    assert np.corrcoef(by_tokens, by_embeddings)[0, 1] > 0.999


@pytest.mark.parametrize("kind", SUPPORTED)
def test_the_untrained_readout_sees_llama_cpps_logits(tiny, kind):
    """The readout's logits (the output matrix, tied or the model's own, then the final
    soft-cap) from llama.cpp's last hidden state equal llama.cpp's logits."""
    from flashmem_cli.memory.consolidator import EmbeddingRows, output_matrix

    path = tiny(kind)
    with Model(path, n_gpu_layers=0) as model, GGUFTensors(path) as tensors:
        arch = describe(model.info())
        with Context(model, ContextParams(n_ctx=256, n_threads=1, hidden_states=True)) as ctx:
            KVSequence(ctx).feed(model.tokenize(TEXT))
            hidden, logits = ctx.hidden_state(), ctx.logits()
        ids = np.arange(model.n_vocab)
        ours = EmbeddingRows(tensors, output_matrix(tensors))(ids) @ hidden
    if arch.final_softcap:
        ours = arch.final_softcap * np.tanh(ours / arch.final_softcap)
    np.testing.assert_allclose(ours, logits, atol=1e-3 * np.abs(logits).max() + 1e-4)


@pytest.mark.parametrize("kind", SUPPORTED)
def test_the_monitor_taps_find_their_nodes(tiny, kind):
    """The attention tap's node names exist on every family: the last layer's attention rows,
    the mass layers' probabilities, the final hidden state."""
    with Model(tiny(kind), n_gpu_layers=0) as model:
        info = model.info()
        arch = describe(info)
        capture = AttentionCapture(info.n_layer - 1, list(arch.mass_layers), 256)
        params = ContextParams(n_ctx=256, n_threads=1, tap=capture.tap)
        with Context(model, params) as ctx:
            seq = KVSequence(ctx)
            seq.feed(model.tokenize(TEXT))
            capture.check()
    assert capture.last_rows is not None and capture.last_rows.shape[0] == info.n_head
    np.testing.assert_allclose(capture.last_rows.sum(axis=1), 1.0, atol=1e-4)
    assert capture.last_hidden is not None and capture.last_hidden.shape == (info.n_embd,)
    assert len(capture.visible_cells) == len(seq)
    assert capture.cell_mass[: len(seq)].sum() > 0


# -- what the table refuses -------------------------------------------------------------------


def fake_info(architecture: str, n_layer: int = 6, n_swa: int = 0, **meta: str) -> ModelInfo:
    return ModelInfo(
        architecture=architecture,
        description="",
        n_layer=n_layer,
        n_head=4,
        n_head_kv=2,
        n_embd=64,
        n_ctx_train=4096,
        n_vocab=100,
        n_params=0,
        n_swa=n_swa,
        chat_template=None,
        head_dim=16,
        rms_eps=1e-6,
        rope_base=10000.0,
        rope_type=2,
        metadata=tuple((f"{architecture}.{k.replace('__', '.')}", v) for k, v in meta.items()),
    )


def test_sliding_window_pattern_from_metadata_or_the_family():
    gemma3 = FAMILIES["gemma3"]
    assert sliding_layers(fake_info("gemma3", 12, n_swa=512), gemma3) == {
        0,
        1,
        2,
        3,
        4,
        6,
        7,
        8,
        9,
        10,
    }
    given = fake_info("gemma3", 4, n_swa=512, attention__sliding_window_pattern="2")
    assert sliding_layers(given, gemma3) == {0, 2}
    flags = "[true, false, true, true]"
    listed = fake_info("gemma3", 4, n_swa=512, attention__sliding_window_pattern=flags)
    assert sliding_layers(listed, gemma3) == {0, 2, 3}
    assert sliding_layers(fake_info("gemma3", 4, n_swa=0), gemma3) == set()
    bad = fake_info("gemma3", 4, n_swa=512, attention__sliding_window_pattern="[true]")
    assert sliding_layers(bad, gemma3) is None


def test_unknown_architectures_and_unsupported_rope_are_refused_with_a_reason():
    unknown = describe(fake_info("mamba"))
    assert unknown.memory_problem is not None and "mamba" in unknown.memory_problem
    no_global = describe(fake_info("gemma3", 2, n_swa=16))
    assert no_global.memory_problem is not None and "sliding window" in no_global.memory_problem
    yarn = describe(fake_info("qwen2", rope__scaling__type="yarn"))
    assert yarn.memory_problem is None
    assert yarn.latent_problem is not None and "yarn" in yarn.latent_problem
    assert describe(fake_info("qwen2", rope__scaling__type="linear")).latent_problem is None


def test_the_27b_gemmas_scale_queries_by_the_embedding_width():
    """Head size 32 but n_embd / n_head 16: the 27B (62 layers for Gemma 3, 46 for Gemma 2)
    scales by 1/sqrt(16), the others by 1/sqrt(head size)."""

    def scale(architecture: str, n_layer: int) -> float:
        info = replace(fake_info(architecture, n_layer, n_swa=1024), head_dim=32)
        return describe(info).layer.attention_scale

    assert scale("gemma3", 62) == pytest.approx(1 / 4)
    assert scale("gemma2", 46) == pytest.approx(1 / 4)
    assert scale("gemma3", 26) == pytest.approx(1 / np.sqrt(32))


# -- chat past its budget, on every family ----------------------------------------------------


def chat_turns(model: Path, session: str, turns: int, *flags: str) -> list[dict]:
    """`flashmem chat -m MODEL -c 256` one process per turn, with memory on (the default)."""
    results = []
    for i in range(turns):
        done = run_cli(
            "chat", "-m", str(model), "-c", "256", "-n", "12", "--temp", "0", "-t", "1",
            "--session", session, "--json", *flags, stdin=f"Turn {i}: rain by the sea.",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        results.append(json.loads(done.stdout))
    return results


@pytest.mark.parametrize("kind", SUPPORTED)
def test_chat_runs_past_its_budget_with_memory_and_latents(home, tiny, kind):
    """Memory on, K = 8 untrained latents asked for: the oldest turns are consolidated (kept
    positions and latents), none is dropped, and the session resumes each turn."""
    results = chat_turns(tiny(kind), f"s-{kind}", 7, "--latents", "8")
    events = [event for result in results for event in result["memory"]["consolidations"]]
    assert events and all(event["latents"] == 8 for event in events)
    assert sum(result["dropped_turns"] for result in results) == 0
    assert all(not result["notices"] for result in results)
    assert results[-1]["tokens"]["cached"] > 0  # resumed from the saved state


@pytest.mark.parametrize(
    "kind, why",
    [("gpt2", "does not support gpt2 models"), ("gemma3-no-global", "sliding window")],
)
def test_without_memory_support_chat_says_why_and_drops_turns(home, tiny, kind, why):
    """An architecture memory cannot serve: a one-line notice, memory off, and the oldest
    turns dropped when the context fills (the no-global Gemma 3 by re-decoding the rest:
    llama.cpp aborts shifting its cache)."""
    results = chat_turns(tiny(kind), f"s-{kind}", 7)
    assert why in results[0]["notices"][0] and results[0]["notices"][0].startswith("memory is off")
    assert sum(result["dropped_turns"] for result in results) >= 1
    assert all(not result["memory"]["consolidations"] for result in results)


def test_latents_on_an_architecture_whose_rope_they_cannot_follow_are_refused(home, tmp_path):
    path = write_tiny_gguf(tmp_path / "yarn.gguf", "qwen2", rope_scaling="yarn")
    done = run_cli("chat", "-m", str(path), "-c", "256", "--latents", "8", stdin="Hi")
    assert done.returncode == 1
    assert "yarn RoPE scaling" in done.stderr and "--latents 0" in done.stderr
    assert "Traceback" not in done.stderr
    assert run_cli("chat", "-m", str(path), "-c", "256", "-n", "4", stdin="Hi").returncode == 0


def test_layers_the_consolidator_cannot_copy_are_named_before_any_turn():
    from flashmem_cli.memory.layer import layer_problem

    dense = {f"blk.3.{n}.weight" for n in ("attn_norm", "attn_q", "attn_output", "ffn_norm")}
    dense |= {"blk.3.ffn_gate.weight", "blk.3.ffn_up.weight", "blk.3.ffn_down.weight"}
    assert layer_problem(dense, 3) is None
    fused = {n.replace("attn_q", "attn_qkv") for n in dense} - {"blk.3.ffn_gate.weight"}
    assert layer_problem(fused, 3) is None  # Phi-3
    experts = {n for n in dense if "ffn_" not in n or "norm" in n} | {"blk.3.ffn_up_exps.weight"}
    assert "no ffn_up, ffn_down" in (layer_problem(experts, 3) or "")
    long_rope = dense | {"rope_factors_long.weight", "rope_factors_short.weight"}
    assert "LongRoPE" in (layer_problem(long_rope, 3) or "")


@pytest.mark.parametrize(
    "kind, memory, latents",
    [
        ("gemma3", "on (global layers 5; the consolidator copies layer 5)", "supported"),
        ("gpt2", "off: flashmem's memory does not support gpt2 models yet", "no: "),
    ],
)
def test_models_info_says_what_memory_can_do_with_a_model(home, tiny, kind, memory, latents):
    done = run_cli("models", "info", str(tiny(kind)), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["memory"].startswith(memory) and info["latents"].startswith(latents)
