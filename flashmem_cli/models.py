"""The models/ registry: resolving `-m`, listing GGUF files, fingerprints."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from flashmem_cli.config import MODEL_ENV, models_dir
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.templates import ChatTemplate, select_template
from flashmem_cli.errors import ModelNotFound
from flashmem_cli.memory.architecture import describe as describe_architecture

DEFAULT_MODEL = "gemma-3-270m-q4_k_m"
GGUF_MAGIC = b"GGUF"
_FINGERPRINT_SPAN = 1 << 20


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: Path
    size: int
    fingerprint: str


@dataclass
class LoadedModel:
    file: ModelFile
    model: Model
    load_ms: float


def load_model(file: ModelFile, n_gpu_layers: int | None) -> LoadedModel:
    start = time.perf_counter()
    model = Model(file.path, n_gpu_layers=n_gpu_layers)
    return LoadedModel(file, model, round((time.perf_counter() - start) * 1000, 2))


def chat_template_for(model: Model) -> ChatTemplate:
    """The GGUF's own chat template, else a built-in one for its architecture."""
    architecture = model.meta("general.architecture") or "unknown"
    return select_template(
        model.chat_template(),
        architecture,
        model.token_text(model.bos),
        model.token_text(model.eos),
    )


def resolve(spec: str | None) -> ModelFile:
    """A model by path or by name in models/; None means $FLASHMEM_MODEL, then the default."""
    spec = spec or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    path = _candidate_path(spec)
    if path is None:
        raise ModelNotFound(f"model {spec!r} not found; {_available_hint()}")
    if not is_gguf(path):
        raise ModelNotFound(f"{path} is not a GGUF file; {_available_hint()}")
    return describe(path)


def describe(path: Path) -> ModelFile:
    return ModelFile(
        name=path.name.removesuffix(".gguf"),
        path=path.resolve(),
        size=path.stat().st_size,
        fingerprint=fingerprint(path),
    )


def inspect(file: ModelFile) -> dict[str, object]:
    """What `models info` shows. Loads the model on the CPU (memory-mapped, so it is quick)."""
    with Model(file.path, n_gpu_layers=0) as model:
        info = model.info()
    arch = describe_architecture(info)
    layers = ", ".join(map(str, arch.global_layers))
    return {
        "name": file.name,
        "path": str(file.path),
        "size": file.size,
        "fingerprint": file.fingerprint,
        "architecture": info.architecture,
        "description": info.description,
        "layers": info.n_layer,
        "heads": info.n_head,
        "kv_heads": info.n_head_kv,
        "embedding": info.n_embd,
        "context_length": info.n_ctx_train,
        "sliding_window": info.n_swa,
        "vocab": info.n_vocab,
        "chat_template": "present" if info.chat_template else "absent (built-in fallback)",
        "memory": f"off: {arch.memory_problem}"
        if arch.memory_problem
        else f"on (global layers {layers}; the consolidator copies layer {arch.consolidator_layer})",
        "latents": f"no: {arch.latent_problem}" if arch.latent_problem else "supported",
        "default": file.name == DEFAULT_MODEL,
    }


def available() -> list[Path]:
    directory = models_dir()
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.gguf") if p.is_file())


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def fingerprint(path: Path) -> str:
    """A fast identity for a model file: its size and its first and last MiB, hashed."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        f.seek(max(size - _FINGERPRINT_SPAN, 0))
        digest.update(f.read(_FINGERPRINT_SPAN))
    return digest.hexdigest()[:16]


def _candidate_path(spec: str) -> Path | None:
    direct = Path(spec).expanduser()
    if direct.is_file():
        return direct
    for name in (spec, f"{spec}.gguf"):
        in_models = models_dir() / name
        if in_models.is_file():
            return in_models
    return None


def _available_hint() -> str:
    names = [p.name.removesuffix(".gguf") for p in available()]
    where = models_dir()
    if not names:
        return f"{where} has no GGUF files (make install assembles the default model)"
    return f"{where} has: {', '.join(names)}"
