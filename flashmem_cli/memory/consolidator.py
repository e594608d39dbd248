"""The Shared-KV Consolidator (FlashMem): latent memory tokens from the frozen KV cache (numpy).

A seed MLP maps the backbone's last hidden state h_t to the first input m_0. A copy of the
backbone's last global layer (memory/architecture.py), with its own query projection W_Q and no K/V projections, attends to
the backbone's *frozen* K/V of that layer (read from llama.cpp, never recomputed) and produces
K outputs greedily, each output the next step's input. A readout maps each output into the
backbone's input space, where it is decoded like a token embedding.

Trained weights carry a learned readout (`readout.*`: an RMS norm, then a linear map into the
input space; train/ learns it). Until trained weights exist the readout is parameter-free: the
output is read as next-token logits through the backbone's own output matrix, over a
candidate vocabulary, and the latent is the probability-weighted mixture of the top-k
candidates' embedding rows, scaled as the architecture scales token embeddings (the output
matrix is the tied embeddings, or the model's own `output.weight`).
"""

from __future__ import annotations

import numpy as np

from flashmem_cli.memory.gguf_tensors import GGUFTensors
from flashmem_cli.memory.layer import (
    DecoderLayer,
    LayerSpec,
    gelu,
    read_layer,
    read_weight,
    rms_norm,
)
from flashmem_cli.memory.weights import ConsolidatorWeights

TOKEN_EMBEDDINGS = "token_embd.weight"
OUTPUT = "output.weight"  # absent when the model ties its output to the token embeddings
DEFAULT_LATENTS = 8
DEFAULT_READOUT_TOP_K = 16


class EmbeddingRows:
    """Rows of the backbone's token-embedding (and tied output) matrix, read on demand."""

    def __init__(self, tensors: GGUFTensors, name: str = TOKEN_EMBEDDINGS):
        self.tensors = tensors
        self.name = name
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        missing = sorted({int(i) for i in ids} - self._cache.keys())
        if missing:
            for index, row in zip(missing, self.tensors.rows(self.name, missing), strict=True):
                self._cache[index] = row
        return np.stack([self._cache[int(i)] for i in ids])


class Consolidator:
    def __init__(
        self,
        weights: ConsolidatorWeights,
        spec: LayerSpec,
        embeddings: EmbeddingRows,
        output_norm: np.ndarray,
        input_scale: float,
        top_k: int = DEFAULT_READOUT_TOP_K,
        output_rows: EmbeddingRows | None = None,
        final_softcap: float = 0.0,
    ):
        self.weights = weights
        self.layer = DecoderLayer(spec, layer_weights(weights))
        self.embeddings = embeddings
        self.output_rows = output_rows or embeddings
        self.output_norm = output_norm
        self.input_scale = input_scale
        self.top_k = top_k
        self.final_softcap = final_softcap

    def seed(self, hidden: np.ndarray) -> np.ndarray:
        """m_0 = h + W2 gelu(W1 h + b1) + b2: the identity until W2 is trained."""
        t = self.weights.tensors
        inner = gelu(t["seed.w1"] @ hidden + t["seed.b1"])
        return hidden + t["seed.w2"] @ inner + t["seed.b2"]

    def outputs(
        self,
        hidden: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        position: int,
        n_latents: int = DEFAULT_LATENTS,
    ) -> np.ndarray:
        """K layer outputs (K, n_embd), greedily: step i runs at `position` + i on the last
        output. `keys`/`values` are the frozen cells (cells, head_dim) the latents may read."""
        m = self.seed(hidden.astype(np.float32))
        out = []
        for step in range(n_latents):
            m = self.layer.forward(m, position + step, keys, values)
            out.append(m)
        return np.stack(out)

    def readout(self, outputs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Input embeddings (K, n_embd) for the outputs, ready to decode."""
        t = self.weights.tensors
        if "readout.w" in t:  # trained: normed as the backbone's last hidden state, projected
            normed = rms_norm(outputs, t["readout.norm"], self.layer.spec.rms_eps)
            return ((normed @ t["readout.w"].T + t["readout.b"]) * self.input_scale).astype(
                np.float32
            )
        rows = self.embeddings(candidates)
        normed = rms_norm(outputs, self.output_norm, self.layer.spec.rms_eps)
        logits = normed @ self.output_rows(candidates).T  # (K, candidates)
        if self.final_softcap:
            logits = self.final_softcap * np.tanh(logits / self.final_softcap)
        k = min(self.top_k, len(candidates))
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        chosen = np.take_along_axis(logits, top, axis=1)
        weights = np.exp(chosen - chosen.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        mixed = np.einsum("kc,kcd->kd", weights, rows[top])
        return mixed.astype(np.float32) * self.input_scale

    def latents(
        self,
        hidden: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        position: int,
        candidates: np.ndarray,
        n_latents: int = DEFAULT_LATENTS,
    ) -> np.ndarray:
        return self.readout(self.outputs(hidden, keys, values, position, n_latents), candidates)


def layer_weights(weights: ConsolidatorWeights) -> dict[str, np.ndarray]:
    """The copied layer's weights as DecoderLayer names them, with the consolidator's own W_Q."""
    t = weights.tensors
    copied = {name.removeprefix("layer."): w for name, w in t.items() if name.startswith("layer.")}
    return {**copied, "attn_q": t["w_q"]}


def untrained_weights(
    tensors: GGUFTensors, layer: int, spec: LayerSpec, n_embd: int, fingerprint: str
) -> ConsolidatorWeights:
    """The paper's initialisation: the backbone's last layer copied, W_Q from the backbone's,
    a seed MLP that passes h_t through (W1 = I, W2 = 0), no learned readout."""
    copied = read_layer(tensors, layer, spec)
    found = {f"layer.{name}": w for name, w in copied.items() if name != "attn_q"}
    found["w_q"] = copied["attn_q"]
    eye = np.eye(n_embd, dtype=np.float32)
    zeros = np.zeros(n_embd, dtype=np.float32)
    found.update({"seed.w1": eye, "seed.b1": zeros, "seed.w2": 0 * eye, "seed.b2": zeros})
    return ConsolidatorWeights(
        found, trained=False, model_fingerprint=fingerprint, source_layer=layer
    )


def output_norm(tensors: GGUFTensors) -> np.ndarray:
    return read_weight(tensors, "output_norm.weight")


def output_matrix(tensors: GGUFTensors) -> str:
    """The tensor whose rows give the logits: the model's own output, else the tied embeddings."""
    return OUTPUT if OUTPUT in tensors.tensors else TOKEN_EMBEDDINGS
