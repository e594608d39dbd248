"""Shared fixtures. Model tests (marked `model`) use the real default model that `make install`
assembles; every test gets a models directory of its own, so none writes into the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashmem_cli.config import MODELS_DIR_ENV, models_dir
from flashmem_cli.models import DEFAULT_MODEL

MODEL_PATH = models_dir() / f"{DEFAULT_MODEL}.gguf"  # found before any test moves models_dir()


@pytest.fixture(autouse=True)
def models_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`$FLASHMEM_MODELS_DIR` for every test (subprocesses inherit it): a fresh directory holding
    a link to the real default model, so consolidator weights and calibrations land there, and
    none a developer left in models/ is read."""
    directory = tmp_path_factory.mktemp("models")
    if MODEL_PATH.is_file():
        (directory / MODEL_PATH.name).symlink_to(MODEL_PATH.resolve())
    monkeypatch.setenv(MODELS_DIR_ENV, str(directory))
    return directory


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real file (not the test's link to it)."""
    assert MODEL_PATH.is_file(), f"{MODEL_PATH} is missing: run `make install`"
    return MODEL_PATH


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """All user state goes to a fresh directory."""
    monkeypatch.setenv("FLASHMEM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLASHMEM_MODEL", raising=False)
    return tmp_path / "home"


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`flashmem ARGS` in a new process, with the test's environment (FLASHMEM_HOME)."""
    return subprocess.run(
        [sys.executable, "-m", "flashmem_cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )


def own_turn_tokens(model_path: Path, message: str) -> int:
    """Tokens of one user turn of the default model's built-in template (a base model's plain
    transcript), generation prompt included: what a turn feeds when the cache already holds
    everything before it."""
    from flashmem_cli.engine.backend import Model

    with Model(model_path, n_gpu_layers=0) as model:
        text = f"User: {message}\nAssistant:"
        return len(model.tokenize(text, parse_special=True))


def run_json(*args: str) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture()
def no_shipped_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In this process, flashmem ships nothing for any model (to test the untrained path)."""
    from flashmem_cli.memory import shipped

    empty = tmp_path / "no-shipped-data"
    empty.mkdir()
    monkeypatch.setattr(shipped, "SHIPPED_DIR", empty)
    return empty
