"""`flashmem calibrate`: the Cognitive Monitor's τ for a model, from the entropies it shows
while generating after passages of a corpus.

For each paragraph the model reads it (with up to `CONTEXT_PARAGRAPHS - 1` paragraphs before
it, so contexts of several lengths are seen), then generates `GENERATED` tokens greedily; each
generated token's last-layer attention gives one entropy, sinks masked, exactly as in chat. τ
is a percentile of them, stored in the user's models directory (config.models_dir).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flashmem_cli.config import default_threads, models_dir
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.ggml import NodeTap, attention_rows, batch_size
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.errors import FlashmemError
from flashmem_cli.memory.calibration import Calibration, calibration_path, save_calibration
from flashmem_cli.memory.monitor import DEFAULT_PERCENTILE, attention_entropy
from flashmem_cli.models import ModelFile

CONTEXT_PARAGRAPHS = 3
GENERATED = 32
MAX_CONTEXT = 2048


def paragraphs(corpus: str) -> list[str]:
    return [p.strip() for p in corpus.split("\n\n") if p.strip()]


def measure_entropies(
    model: Model, passages: list[str], progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """The entropies of the tokens generated after each passage."""
    last_layer = f"kq_soft_max-{model.info().n_layer - 1}"
    rows: list[np.ndarray] = []
    tap = NodeTap(
        [last_layer], lambda name, ptr: rows.append(attention_rows(ptr, batch_size(ptr) - 1))
    )
    params = ContextParams(MAX_CONTEXT, n_threads=default_threads(), tap=tap)
    entropies: list[float] = []
    with Context(model, params) as ctx, Sampler(SamplingParams(temperature=0)) as sampler:
        seq = KVSequence(ctx)
        for i in range(len(passages)):
            text = "\n\n".join(passages[max(0, i - CONTEXT_PARAGRAPHS + 1) : i + 1]) + "\n\n"
            prompt = [model.bos] + model.tokenize(text)[: MAX_CONTEXT - GENERATED - 1]
            seq.clear()
            seq.feed(prompt)
            for _ in range(GENERATED):
                token = sampler.sample(ctx)
                if model.is_eog(token):
                    break
                rows.clear()
                seq.feed([token])
                tap.check()
                entropies.append(attention_entropy(rows[-1]))
            if progress:
                progress(i + 1, len(passages))
    return np.asarray(entropies)


def calibrate(
    model: Model,
    file: ModelFile,
    corpus: str,
    corpus_name: str,
    percentile: float = DEFAULT_PERCENTILE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Calibration, str]:
    """Measure, store in the models directory, and return the calibration and where it went."""
    passages = paragraphs(corpus)
    if not passages:
        raise FlashmemError(f"the corpus {corpus_name} has no text")
    entropies = measure_entropies(model, passages, progress)
    if len(entropies) < 16:
        raise FlashmemError(
            f"the corpus {corpus_name} gave {len(entropies)} entropies; give it more paragraphs"
        )
    calibration = Calibration(
        model_fingerprint=file.fingerprint,
        corpus=corpus_name,
        entropies=[round(float(x), 5) for x in entropies],
        percentile=percentile,
    )
    path = calibration_path(models_dir(), file.path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_calibration(path, calibration)
    return calibration, str(path)
