"""Where flashmem keeps things, and the defaults every command shares."""

from __future__ import annotations

import os
import re
from pathlib import Path

import platformdirs

from flashmem_cli.engine.threads import adaptive_threads

APP_NAME = "flashmem"
PROJECT_NAME = "flashmem-cli"  # the distribution name in pyproject.toml
PACKAGE_DIR = Path(__file__).resolve().parent
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
    """`$FLASHMEM_MODELS_DIR`, else `models/` of the checkout flashmem runs from, else
    `<data dir>/models` (an installed flashmem never writes next to its own code)."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override).expanduser()
    checkout = checkout_dir()
    if checkout is not None:
        return checkout / "models"
    return data_dir() / "models"


def checkout_dir(package_dir: Path | None = None) -> Path | None:
    """The source checkout holding `package_dir` (default: this package), None when flashmem is
    installed. Installed, the parent folder is site-packages, shared with every other package,
    so a `models/` there proves nothing: a checkout must also hold flashmem-cli's pyproject."""
    root = (package_dir or PACKAGE_DIR).parent
    if (root / "models").is_dir() and _names_this_project(root / "pyproject.toml"):
        return root
    return None


def _names_this_project(pyproject: Path) -> bool:
    """Whether `pyproject` declares this project (a line `name = "flashmem-cli"`); a regex,
    since tomllib only comes with Python 3.11 and one line is all it takes."""
    try:
        text = pyproject.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    declaration = rf'^name\s*=\s*"{re.escape(PROJECT_NAME)}"\s*$'
    return re.search(declaration, text, re.MULTILINE) is not None


def default_threads() -> int:
    """The threads to use when not told (-t): the cores no other process is running on now,
    at most every core on small machines and half of them on large ones (engine/threads.py).
    It changes with the load, so chat and batch ask again as they go."""
    return adaptive_threads()
