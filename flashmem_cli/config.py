"""Where flashmem keeps things, and the defaults every command shares."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "flashmem"
HOME_ENV = "FLASHMEM_HOME"
MODEL_ENV = "FLASHMEM_MODEL"
MODELS_DIR_ENV = "FLASHMEM_MODELS_DIR"

DEFAULT_CTX = 4096
DEFAULT_N_PREDICT = 512
DEFAULT_BATCH = 512


def data_dir() -> Path:
    """All user state: `$FLASHMEM_HOME` when set (tests point it at a temp dir)."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def sessions_dir() -> Path:
    return data_dir() / "sessions"


def models_dir() -> Path:
    """`models/` of the checkout, or `$FLASHMEM_MODELS_DIR`, or `<data dir>/models`."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override).expanduser()
    checkout_models = Path(__file__).resolve().parent.parent / "models"
    if checkout_models.is_dir():
        return checkout_models
    return data_dir() / "models"


def default_threads() -> int:
    """Every core on small machines; half of them (about the physical cores) on large ones."""
    cores = os.cpu_count() or 1
    return cores if cores <= 4 else cores // 2
