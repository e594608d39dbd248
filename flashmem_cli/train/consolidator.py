"""The Shared-KV Consolidator in torch, op for op as `memory/consolidator.py` runs it in numpy.

Its parameters are named as the weights file names them (`seed.w1`, `w_q`, `layer.ffn_up`,
`readout.w`, ...), so `ConsolidatorWeights` goes in and comes out unchanged but for the values:
export -> int8 `.npz` -> the numpy runtime. The tests check that both produce the same latents
from the same K/V.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from flashmem_cli.memory.weights import ConsolidatorWeights
from flashmem_cli.train.backbone import gelu, rms_norm, rope_neox

READOUT = ("readout.norm", "readout.w", "readout.b")


class TorchConsolidator(nn.Module):
    def __init__(
        self,
        weights: ConsolidatorWeights,
        n_head: int,
        head_dim: int,
        rms_eps: float,
        rope_base: float,
        input_scale: float,
    ):
        super().__init__()
        missing = [name for name in READOUT if name not in weights.tensors]
        if missing:
            raise ValueError(f"weights without a learned readout ({', '.join(missing)})")
        self.params = nn.ParameterDict(
            {_key(name): nn.Parameter(torch.from_numpy(np.array(t, dtype=np.float32)))
             for name, t in weights.tensors.items()}
        )  # fmt: skip
        self.fingerprint = weights.model_fingerprint
        self.source_layer = weights.source_layer
        self.n_head, self.head_dim = n_head, head_dim
        self.rms_eps, self.rope_base, self.input_scale = rms_eps, rope_base, input_scale

    def p(self, name: str) -> torch.Tensor:
        return self.params[_key(name)]

    def seed(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = gelu(self.p("seed.w1") @ hidden + self.p("seed.b1"))
        return hidden + self.p("seed.w2") @ inner + self.p("seed.b2")

    def step(self, x: torch.Tensor, position: int, keys: torch.Tensor, values: torch.Tensor):
        """The copied layer on one input `x` (n_embd,) at `position`, attending to the frozen,
        roped `keys` and `values` (cells, head_dim): one KV head for every query head."""
        eps = self.rms_eps
        q = (self.p("w_q") @ rms_norm(x, self.p("layer.attn_norm"), eps)).view(
            self.n_head, self.head_dim
        )
        q = rms_norm(q, self.p("layer.attn_q_norm"), eps)
        q = rope_neox(q[None], torch.tensor([position]), self.rope_base)[0]
        probs = torch.softmax((q / math.sqrt(self.head_dim)) @ keys.T, dim=-1)
        attended = self.p("layer.attn_output") @ (probs @ values).reshape(-1)
        residual = x + rms_norm(attended, self.p("layer.post_attention_norm"), eps)
        h = rms_norm(residual, self.p("layer.ffn_norm"), eps)
        ffn = self.p("layer.ffn_down") @ (
            gelu(self.p("layer.ffn_gate") @ h) * (self.p("layer.ffn_up") @ h)
        )
        return residual + rms_norm(ffn, self.p("layer.post_ffw_norm"), eps)

    def outputs(
        self,
        hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        position: int,
        n_latents: int,
    ) -> torch.Tensor:
        m = self.seed(hidden)
        out = []
        for i in range(n_latents):
            m = self.step(m, position + i, keys, values)
            out.append(m)
        return torch.stack(out)

    def readout(self, outputs: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(outputs, self.p("readout.norm"), self.rms_eps)
        return (normed @ self.p("readout.w").T + self.p("readout.b")) * self.input_scale

    def forward(
        self,
        hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        position: int,
        n_latents: int,
    ) -> torch.Tensor:
        """Latent input embeddings (K, n_embd), ready for the backbone."""
        return self.readout(self.outputs(hidden, keys, values, position, n_latents))

    def export(self, trained: bool = True) -> ConsolidatorWeights:
        tensors = {_name(key): p.detach().cpu().numpy().copy() for key, p in self.params.items()}
        return ConsolidatorWeights(
            tensors,
            trained=trained,
            model_fingerprint=self.fingerprint,
            source_layer=self.source_layer,
        )


def with_readout(weights: ConsolidatorWeights, output_norm: np.ndarray, gain: float):
    """Untrained weights plus a learned readout's starting point: the output normed as the
    backbone normalises its last hidden state, times `gain` (a latent on the scale of a token
    embedding), then the identity, no bias. The gain sits in the norm, so that every learned
    matrix starts at unit scale and one learning rate suits them all."""
    n_embd = len(output_norm)
    tensors = dict(weights.tensors)
    tensors["readout.norm"] = np.asarray(output_norm, dtype=np.float32) * np.float32(gain)
    tensors["readout.w"] = np.eye(n_embd, dtype=np.float32)
    tensors["readout.b"] = np.zeros(n_embd, dtype=np.float32)
    return ConsolidatorWeights(
        tensors,
        trained=False,
        model_fingerprint=weights.model_fingerprint,
        source_layer=weights.source_layer,
    )


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not hold dots


def _name(key: str) -> str:
    return key.replace("__", ".")
