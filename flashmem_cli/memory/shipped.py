"""What flashmem ships for known models, and where a model's memory files are found.

Trained consolidator weights and monitor calibrations for a model live in two places: the
user's models directory (`<stem>.consolidator.npz`, `<stem>.calibration.json`: made by
`flashmem train-consolidator` and `flashmem calibrate`) and the package (`memory/data/`, keyed
by the model's fingerprint, so that the default model works with no set-up). The user's own
file wins when it fits the model (trained, for weights); else the shipped one; else an
untrained file in the models directory (created on first use).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flashmem_cli.config import models_dir
from flashmem_cli.memory.calibration import calibration_path
from flashmem_cli.memory.weights import read_weights_meta, weights_path
from flashmem_cli.models import ModelFile

SHIPPED_DIR = Path(str(resources.files("flashmem_cli.memory") / "data"))


@dataclass(frozen=True)
class FoundWeights:
    path: Path
    shipped: bool  # from the package, not the models directory
    trained: bool


def shipped_weights_path(fingerprint: str) -> Path:
    return SHIPPED_DIR / f"consolidator-{fingerprint}.npz"


def shipped_calibration_path(fingerprint: str) -> Path:
    return SHIPPED_DIR / f"calibration-{fingerprint}.json"


def find_weights(file: ModelFile) -> FoundWeights | None:
    """The consolidator weights chat should load for `file`; None when there are none yet."""
    own = weights_path(models_dir(), file.path.stem)
    own_meta = read_weights_meta(own) if own.is_file() else None
    own_fits = own_meta is not None and own_meta["model_fingerprint"] == file.fingerprint
    if own_meta is not None and own_fits and own_meta["trained"]:
        return FoundWeights(own, shipped=False, trained=True)
    shipped = shipped_weights_path(file.fingerprint)
    shipped_meta = read_weights_meta(shipped) if shipped.is_file() else None
    if shipped_meta is not None and shipped_meta["model_fingerprint"] == file.fingerprint:
        return FoundWeights(shipped, shipped=True, trained=shipped_meta["trained"])
    if own_meta is not None:
        return FoundWeights(own, shipped=False, trained=own_fits and own_meta["trained"])
    return None


def calibration_paths(file: ModelFile) -> list[Path]:
    """Where `file`'s calibration may be, the user's own first, then the shipped one."""
    return [
        calibration_path(models_dir(), file.path.stem),
        shipped_calibration_path(file.fingerprint),
    ]
