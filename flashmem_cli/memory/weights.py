"""The consolidator's own weights on disk: one versioned int8 `.npz` per model.

Matrices are stored as int8 with one float32 scale per output channel (row), a quarter of the
float32 size at well under 1% error; vectors (norms) are small and stay float32. Everything is
dequantized to float32 on load, so the numpy layer never sees int8. The file carries a JSON
`meta` entry (format name, version, whether the weights were trained, the model fingerprint and
the source layer) so that a file from another model or a newer flashmem is refused, not misread.
Writes are atomic: a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from flashmem_cli.errors import FlashmemError
from flashmem_cli.store.files import commit_temp, temp_path_beside

FORMAT_VERSION = 1
FORMAT_NAME = "flashmem-consolidator"
FIX = "delete it to re-create untrained weights"

_META = "meta"
_QUANT = "q/"
_SCALE = "s/"
_FLOAT = "f/"


class WeightsError(FlashmemError):
    """A consolidator weights file that cannot be read as this flashmem's format."""


@dataclass
class ConsolidatorWeights:
    tensors: dict[str, np.ndarray]  # float32; matrices are (out, in), norms are vectors
    trained: bool
    model_fingerprint: str
    source_layer: int
    version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        """Bytes of the float32 tensors in memory (not of the int8 file)."""
        return sum(int(t.nbytes) for t in self.tensors.values())

    def n_params(self) -> int:
        return sum(int(t.size) for t in self.tensors.values())


def quantize_int8(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 same shape, scales float32 (rows,)); scale = max|row|/127, q = round(row/scale)
    clipped to [-127, 127]; an all-zero row gets scale 0 and q 0."""
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"quantize_int8 takes a matrix, not an array of shape {m.shape}")
    scales = (np.abs(m).max(axis=1, initial=0.0) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))[:, None]
    q = np.clip(np.rint(m / safe), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scales.astype(np.float32)[:, None]).astype(np.float32)


def weights_path(models_dir: Path, model_stem: str) -> Path:
    """Where trained or untrained weights are written; `models_dir` is the user's
    (config.models_dir()), the package's own data/ is read-only (memory/shipped.py)."""
    return models_dir / f"{model_stem}.consolidator.npz"


def save_weights(path: Path, weights: ConsolidatorWeights) -> None:
    """Write `weights` atomically; refuses tensors that are not vectors or matrices."""
    arrays = _encode(weights)  # validate before touching the directory
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez(f, allow_pickle=False, **arrays)
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_weights(path: Path) -> ConsolidatorWeights:
    """Read and dequantize a weights file; raises WeightsError for anything it cannot trust."""
    if not path.is_file():
        raise WeightsError(f"{path}: consolidator weights file is missing; {FIX}")
    entries = _read_entries(path)
    meta = _parse_meta(path, entries.pop(_META, None))
    return ConsolidatorWeights(
        tensors=_decode_tensors(path, entries),
        trained=meta["trained"],
        model_fingerprint=meta["model_fingerprint"],
        source_layer=meta["source_layer"],
        version=meta["version"],
    )


def read_weights_meta(path: Path) -> dict[str, Any]:
    """Only a weights file's metadata (trained, fingerprint, version): no tensor is read."""
    if not path.is_file():
        raise WeightsError(f"{path}: consolidator weights file is missing; {FIX}")
    entries = _read_entries(path, only=_META)
    return _parse_meta(path, entries.get(_META))


def _encode(weights: ConsolidatorWeights) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {_META: np.array(json.dumps(_meta_dict(weights)))}
    for name, tensor in weights.tensors.items():
        t = np.asarray(tensor, dtype=np.float32)
        if not name:
            raise ValueError("a consolidator tensor needs a non-empty name")
        if not np.isfinite(t).all():
            raise ValueError(f"tensor {name!r} has non-finite values; refusing to save it")
        if t.ndim == 2:
            arrays[_QUANT + name], arrays[_SCALE + name] = quantize_int8(t)
        elif t.ndim == 1:
            arrays[_FLOAT + name] = t
        else:
            raise ValueError(
                f"tensor {name!r} has shape {t.shape}; only vectors and matrices can be saved"
            )
    return arrays


def _meta_dict(weights: ConsolidatorWeights) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "trained": bool(weights.trained),
        "model_fingerprint": weights.model_fingerprint,
        "source_layer": int(weights.source_layer),
    }


def _read_entries(path: Path, only: str | None = None) -> dict[str, np.ndarray]:
    """Every array in the npz (or just `only`), read eagerly; corrupt or non-npz files become
    WeightsError."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise WeightsError(f"{path}: not a consolidator weights archive (.npz); {FIX}")
        with loaded:
            keys = [k for k in loaded.files if only is None or k == only]
            return {key: loaded[key] for key in keys}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise WeightsError(
            f"{path}: consolidator weights file is corrupt or truncated ({e}); {FIX}"
        ) from e


def _parse_meta(path: Path, raw: np.ndarray | None) -> dict[str, Any]:
    if raw is None:
        raise WeightsError(f"{path}: consolidator weights file has no metadata; {FIX}")
    try:
        text = raw.tobytes().decode() if raw.dtype == np.uint8 else str(raw[()])
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError, IndexError) as e:
        raise WeightsError(f"{path}: consolidator weights metadata is unreadable; {FIX}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise WeightsError(f"{path}: not a flashmem consolidator weights file; {FIX}")
    version = meta.get("version")
    if not _is_int(version) or version < 1:
        raise WeightsError(f"{path}: consolidator weights have a bad version ({version!r}); {FIX}")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{path} was made by a newer flashmem (weights format {version}, this one reads up to {FORMAT_VERSION}); upgrade flashmem or {FIX}"
        )
    if not (
        isinstance(meta.get("trained"), bool)
        and isinstance(meta.get("model_fingerprint"), str)
        and _is_int(meta.get("source_layer"))
    ):
        raise WeightsError(f"{path}: consolidator weights metadata is incomplete; {FIX}")
    return meta


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_tensors(path: Path, entries: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for key, array in entries.items():
        if key.startswith(_QUANT):
            name = key[len(_QUANT) :]
            tensors[name] = _decode_matrix(path, name, array, entries.get(_SCALE + name))
        elif key.startswith(_FLOAT):
            if array.ndim != 1 or array.dtype.kind != "f":
                raise WeightsError(f"{path}: vector {key!r} is not a float vector; {FIX}")
            tensors[key[len(_FLOAT) :]] = array.astype(np.float32)
        elif key.startswith(_SCALE):
            if _QUANT + key[len(_SCALE) :] not in entries:
                raise WeightsError(f"{path}: scales {key!r} have no int8 matrix; {FIX}")
        else:
            raise WeightsError(f"{path}: unexpected entry {key!r} in consolidator weights; {FIX}")
    return tensors


def _decode_matrix(path: Path, name: str, q: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    if scales is None:
        raise WeightsError(f"{path}: int8 matrix {name!r} has no scales; {FIX}")
    if q.dtype != np.int8 or q.ndim != 2:
        raise WeightsError(f"{path}: matrix {name!r} is not a 2-D int8 array; {FIX}")
    if scales.dtype.kind != "f" or scales.shape != (q.shape[0],):
        raise WeightsError(
            f"{path}: matrix {name!r} of shape {q.shape} has scales of shape {scales.shape}; {FIX}"
        )
    return dequantize_int8(q, scales)
