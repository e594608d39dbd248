"""τ per model: the Cognitive Monitor's threshold, from entropies seen on a calibration corpus.

Stored as `<models dir>/<model stem>.calibration.json` (config.models_dir: the checkout's models/,
else `<data dir>/models`, never inside the installed package), with the entropies themselves so
that another `--tau-percentile` needs no new run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from flashmem_cli.errors import FlashmemError
from flashmem_cli.memory.monitor import DEFAULT_PERCENTILE, entropy_threshold
from flashmem_cli.store.files import atomic_write_json

FORMAT = "flashmem-calibration"
VERSION = 1


@dataclass(frozen=True)
class Calibration:
    model_fingerprint: str
    corpus: str
    entropies: list[float]
    percentile: float = DEFAULT_PERCENTILE

    @property
    def tau(self) -> float:
        return self.tau_at(self.percentile)

    def tau_at(self, percentile: float) -> float:
        return entropy_threshold(np.asarray(self.entropies), percentile)


def calibration_path(models_dir: Path, model_stem: str) -> Path:
    """Where `flashmem calibrate` writes and chat first looks; `models_dir` is the user's
    (config.models_dir()), the package's own data/ is read-only (memory/shipped.py)."""
    return models_dir / f"{model_stem}.calibration.json"


def builtin_corpus() -> str:
    return (resources.files("flashmem_cli.memory") / "data" / "calibration.txt").read_text("utf-8")


def save_calibration(path: Path, calibration: Calibration) -> None:
    record = {"format": FORMAT, "version": VERSION, "tau": calibration.tau, **asdict(calibration)}
    atomic_write_json(path, record)


def load_calibration(path: Path, fingerprint: str) -> Calibration | None:
    """The stored calibration of the model with `fingerprint`; None when there is none for it."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text("utf-8"))
        if record.get("format") != FORMAT or record.get("model_fingerprint") != fingerprint:
            return None
        calibration = Calibration(
            model_fingerprint=record["model_fingerprint"],
            corpus=str(record["corpus"]),
            entropies=[float(x) for x in record["entropies"]],
            percentile=float(record["percentile"]),
        )
        calibration.tau  # noqa: B018 - refuse an empty or bad record here, not later
        return calibration
    except (OSError, ValueError, KeyError, TypeError):
        raise FlashmemError(
            f"{path} is not a usable calibration; run `flashmem calibrate` again"
        ) from None
