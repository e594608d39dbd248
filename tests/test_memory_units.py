"""Pure pieces of the memory: batch entropies, calibration files, the consolidator's maths,
the cache layout with a memory region."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flashmem_cli.chat.layout import KVLayout
from flashmem_cli.chat.reports import LatentBlock, latent_blocks
from flashmem_cli.engine.sequence import LATENT
from flashmem_cli.errors import FlashmemError
from flashmem_cli.memory.calibration import Calibration, load_calibration, save_calibration
from flashmem_cli.memory.consolidator import Consolidator
from flashmem_cli.memory.layer import WEIGHTS, LayerSpec
from flashmem_cli.memory.monitor import attention_entropies, attention_entropy
from flashmem_cli.memory.weights import ConsolidatorWeights


def test_batch_entropies_equal_the_per_token_entropy():
    rng = np.random.default_rng(0)
    probs = rng.random((4, 6, 30))
    probs[:, :, 20:] = 0.0
    probs /= probs.sum(axis=-1, keepdims=True)
    expected = [attention_entropy(probs[:, t, :]) for t in range(6)]
    np.testing.assert_allclose(attention_entropies(probs), expected)


def test_calibration_round_trip_and_model_check(tmp_path):
    path = tmp_path / "m.calibration.json"
    calibration = Calibration("abc", "built-in", [float(x) for x in range(101)], 85.0)
    save_calibration(path, calibration)
    loaded = load_calibration(path, "abc")
    assert loaded is not None and loaded.tau == pytest.approx(85.0)
    assert loaded.tau_at(50) == pytest.approx(50.0)
    assert json.loads(path.read_text())["tau"] == pytest.approx(85.0)
    assert load_calibration(path, "another model") is None
    assert load_calibration(tmp_path / "none.json", "abc") is None
    path.write_text('{"format": "flashmem-calibration", "model_fingerprint": "abc"}')
    with pytest.raises(FlashmemError, match="calibrate"):
        load_calibration(path, "abc")


class FakeRows:
    def __init__(self, table: np.ndarray):
        self.table = table

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(ids)]


def tiny_consolidator(top_k: int = 2) -> Consolidator:
    rng = np.random.default_rng(1)
    n_embd, n_head, head_dim, ffn = 8, 2, 4, 16
    shapes = {
        "attn_norm": (n_embd,),
        "attn_q": (n_head * head_dim, n_embd),
        "attn_q_norm": (head_dim,),
        "attn_output": (n_embd, n_head * head_dim),
        "post_attention_norm": (n_embd,),
        "ffn_norm": (n_embd,),
        "ffn_gate": (ffn, n_embd),
        "ffn_up": (ffn, n_embd),
        "ffn_down": (n_embd, ffn),
        "post_ffw_norm": (n_embd,),
    }
    tensors = {
        ("w_q" if name == "attn_q" else f"layer.{name}"): rng.standard_normal(shapes[name]).astype(
            np.float32
        )
        for name in WEIGHTS
    }
    eye = np.eye(n_embd, dtype=np.float32)
    tensors.update(
        {"seed.w1": eye, "seed.b1": 0 * eye[0], "seed.w2": 0 * eye, "seed.b2": 0 * eye[0]}
    )
    weights = ConsolidatorWeights(tensors, trained=False, model_fingerprint="x", source_layer=0)
    spec = LayerSpec(n_head, head_dim, 1e-6, 10000.0, 1 / math.sqrt(head_dim))
    table = rng.standard_normal((10, n_embd)).astype(np.float32)
    return Consolidator(weights, spec, FakeRows(table), np.ones(n_embd), 2.0, top_k)  # type: ignore[arg-type]


def test_untrained_seed_passes_the_hidden_state_through():
    consolidator = tiny_consolidator()
    h = np.arange(8, dtype=np.float32)
    np.testing.assert_allclose(consolidator.seed(h), h)


def test_latents_are_greedy_steps_read_out_as_embedding_mixtures():
    consolidator = tiny_consolidator(top_k=2)
    rng = np.random.default_rng(2)
    keys, values = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    h = rng.standard_normal(8).astype(np.float32)
    outputs = consolidator.outputs(h, keys, values, position=5, n_latents=3)
    assert outputs.shape == (3, 8)
    second = consolidator.layer.forward(outputs[0], 6, keys, values)  # step 2 reads step 1
    np.testing.assert_allclose(outputs[1], second, rtol=1e-5)
    candidates = np.array([1, 4, 7])
    latents = consolidator.readout(outputs, candidates)
    table = consolidator.embeddings.table  # type: ignore[attr-defined]
    for latent, out in zip(latents, outputs, strict=True):
        logits = table[candidates] @ (out / np.sqrt((out**2).mean() + 1e-6))
        top = candidates[np.argsort(-logits)[:2]]
        weights = np.exp(np.sort(logits)[::-1][:2] - logits.max())
        expected = (weights / weights.sum()) @ table[top] * 2.0
        np.testing.assert_allclose(latent, expected, rtol=1e-4, atol=1e-5)


def test_layout_counts_the_memory_region_and_reads_old_records():
    layout = KVLayout(pinned=1, turns=[10, 20], messages=4, memory=7, consolidated=3)
    assert layout.n_tokens == 38
    assert layout.oldest_turn_span() == (8, 18)
    assert KVLayout.from_dict(layout.to_dict()) == layout
    old = KVLayout.from_dict({"pinned": 1, "turns": [5], "messages": 2})
    assert old.memory == 0 and old.consolidated == 0


def test_latent_blocks_are_runs_of_latent_cells():
    tokens = [2, 5, LATENT, LATENT, 9, LATENT, 3]
    assert latent_blocks(tokens) == [LatentBlock(0, 2, 2), LatentBlock(1, 5, 1)]
    assert latent_blocks([1, 2]) == []
