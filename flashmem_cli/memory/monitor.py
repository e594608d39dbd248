"""The Cognitive Monitor's maths (FlashMem, Eq. 3-4): attention entropy of the current token.

Pure numpy. The probabilities come from the backbone's last layer (engine/ggml.py reads them);
this module masks the attention sinks, renormalises each head, and averages the heads' Shannon
entropies. High entropy means the model's attention is diffuse: the moment to consolidate.
"""

from __future__ import annotations

import numpy as np

DEFAULT_SINKS = 4
DEFAULT_PERCENTILE = 85.0


def attention_entropy(probs: np.ndarray, n_sinks: int = DEFAULT_SINKS) -> float:
    """Mean over heads of the entropy (nats) of each head's attention, sinks masked.

    `probs` is (n_head, n_kv), one row per head, columns in cache order; the first `n_sinks`
    columns must hold the first positions (BOS and the tokens after it), as they do in a
    cache filled from empty whose head is never dropped. A head whose whole mass sat on the
    sinks has entropy 0.
    """
    p = np.asarray(probs, dtype=np.float64).copy()
    if p.ndim != 2:
        raise ValueError(f"expected (n_head, n_kv) probabilities, got shape {p.shape}")
    p[:, :n_sinks] = 0.0
    mass = p.sum(axis=1, keepdims=True)
    p = np.divide(p, mass, out=np.zeros_like(p), where=mass > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return float(-(p * logs).sum(axis=1).mean())


def attention_entropies(probs: np.ndarray, n_sinks: int = DEFAULT_SINKS) -> np.ndarray:
    """`attention_entropy` of every token of a batch: `probs` is (n_head, n_tokens, n_kv)."""
    p = np.asarray(probs, dtype=np.float64).copy()
    p[..., :n_sinks] = 0.0
    mass = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, mass, out=np.zeros_like(p), where=mass > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    result: np.ndarray = -(p * logs).sum(axis=-1).mean(axis=0)
    return result


def entropy_threshold(entropies: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """τ: the given percentile of entropies seen on a calibration corpus."""
    values = np.asarray(entropies, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no entropies to calibrate on")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile {percentile} is not in 0..100")
    return float(np.percentile(values, percentile))


class TriggerPolicy:
    """When to consolidate within one reply: entropy above τ, at most `max_per_reply` times,
    at least `min_gap` generated tokens apart."""

    def __init__(self, tau: float, max_per_reply: int = 3, min_gap: int = 16):
        self.tau = tau
        self.max_per_reply = max_per_reply
        self.min_gap = min_gap
        self.fired: list[int] = []

    def should_fire(self, step: int, entropy: float) -> bool:
        if entropy <= self.tau or len(self.fired) >= self.max_per_reply:
            return False
        if self.fired and step - self.fired[-1] < self.min_gap:
            return False
        self.fired.append(step)
        return True
