"""Where a model's consolidator weights and calibration are found: the user's models directory
or what flashmem ships (memory/shipped.py). Pure file logic: small made-up weights files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flashmem_cli.memory import shipped
from flashmem_cli.memory.calibration import Calibration, calibration_path, save_calibration
from flashmem_cli.memory.weights import ConsolidatorWeights, save_weights, weights_path
from flashmem_cli.models import ModelFile


@pytest.fixture()
def package_data(no_shipped_weights: Path) -> Path:
    """An empty stand-in for the package's data directory (conftest's no_shipped_weights)."""
    return no_shipped_weights


def _file(models_home: Path, fingerprint: str = "abc") -> ModelFile:
    return ModelFile("m", models_home / "m.gguf", 1, fingerprint)


def _weights(path: Path, trained: bool, fingerprint: str = "abc") -> Path:
    tensors = {"w_q": np.ones((2, 2), np.float32)}
    save_weights(path, ConsolidatorWeights(tensors, trained, fingerprint, source_layer=0))
    return path


def test_no_weights_anywhere_is_none(models_home, package_data):
    assert shipped.find_weights(_file(models_home)) is None


def test_shipped_trained_weights_win_over_an_untrained_file(models_home, package_data):
    file = _file(models_home)
    _weights(weights_path(models_home, "m"), trained=False)
    _weights(shipped.shipped_weights_path("abc"), trained=True)
    found = shipped.find_weights(file)
    assert found is not None and found.shipped and found.trained


def test_the_users_own_trained_weights_win_over_shipped_ones(models_home, package_data):
    file = _file(models_home)
    own = _weights(weights_path(models_home, "m"), trained=True)
    _weights(shipped.shipped_weights_path("abc"), trained=True)
    found = shipped.find_weights(file)
    assert found is not None and found.path == own and not found.shipped


def test_weights_for_another_model_are_not_called_trained(models_home, package_data):
    _weights(weights_path(models_home, "m"), trained=True, fingerprint="other")
    found = shipped.find_weights(_file(models_home))
    assert found is not None and not found.trained and not found.shipped


def test_a_shipped_file_whose_weights_are_for_another_model_is_not_used(models_home, package_data):
    _weights(shipped.shipped_weights_path("abc"), trained=True, fingerprint="other")
    assert shipped.find_weights(_file(models_home)) is None


def test_chat_writes_latents_and_reports_trained_with_shipped_weights(models_home, package_data):
    from flashmem_cli.chat.memory import latents_at_budget, weights_status

    file = _file(models_home)
    assert latents_at_budget(file, None) == 0 and weights_status(file).startswith("none yet")
    _weights(weights_path(models_home, "m"), trained=False)
    assert latents_at_budget(file, None) == 0
    assert weights_status(file).startswith("UNTRAINED")
    _weights(shipped.shipped_weights_path("abc"), trained=True)
    assert latents_at_budget(file, None) == 8 and latents_at_budget(file, 2) == 2
    assert weights_status(file).startswith("TRAINED") and "shipped with flashmem" in weights_status(
        file
    )


def test_calibration_is_looked_for_in_the_users_directory_first(models_home, package_data):
    file = _file(models_home)
    assert shipped.calibration_paths(file) == [
        calibration_path(models_home, "m"),
        package_data / "calibration-abc.json",
    ]


def test_a_shipped_calibration_gives_tau_with_no_set_up(models_home, package_data):
    from flashmem_cli.chat.memory import MemoryOptions, resolve_tau

    file = _file(models_home)
    assert resolve_tau(file, MemoryOptions()) is None
    calibration = Calibration("abc", "built-in", [1.0, 2.0, 3.0, 4.0], 50.0)
    save_calibration(shipped.shipped_calibration_path("abc"), calibration)
    assert resolve_tau(file, MemoryOptions()) == pytest.approx(calibration.tau)
    own = Calibration("abc", "mine", [9.0, 9.0], 50.0)
    save_calibration(calibration_path(models_home, "m"), own)
    assert resolve_tau(file, MemoryOptions()) == pytest.approx(9.0)
