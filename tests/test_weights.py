"""Consolidator weights on disk: int8 accuracy, metadata, refusal of bad files, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flashmem_cli.errors import FlashmemError
from flashmem_cli.memory.weights import (
    FORMAT_VERSION,
    ConsolidatorWeights,
    WeightsError,
    dequantize_int8,
    load_weights,
    quantize_int8,
    save_weights,
    weights_path,
)


def _matrix(rng: np.random.Generator) -> np.ndarray:
    """64x32 with row magnitudes spanning six orders and one all-zero row."""
    m = rng.standard_normal((64, 32)).astype(np.float32)
    m *= np.logspace(-3, 3, 64, dtype=np.float32)[:, None]
    m[7] = 0.0
    return m


def _weights(seed: int = 0) -> ConsolidatorWeights:
    rng = np.random.default_rng(seed)
    return ConsolidatorWeights(
        tensors={
            "attn_q": _matrix(rng),
            "ffn_down": rng.standard_normal((32, 64)).astype(np.float32),
            "attn_norm": rng.standard_normal(32).astype(np.float32),
            "post_ffw_norm": (1.0 + rng.random(64)).astype(np.float32),
        },
        trained=True,
        model_fingerprint="sha256:abc123",
        source_layer=17,
    )


def _raw_save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)


def _meta(**overrides: object) -> np.ndarray:
    meta = {
        "format": "flashmem-consolidator",
        "version": FORMAT_VERSION,
        "trained": False,
        "model_fingerprint": "fp",
        "source_layer": 3,
    }
    meta.update(overrides)
    return np.array(json.dumps(meta))


def test_quantize_error_within_half_a_step_per_row() -> None:
    m = _matrix(np.random.default_rng(1))
    q, scales = quantize_int8(m)
    assert q.dtype == np.int8 and q.shape == m.shape
    assert scales.dtype == np.float32 and scales.shape == (64,)
    assert scales[7] == 0 and not q[7].any()
    assert np.abs(q.astype(np.int16)).max() <= 127
    err = np.abs(dequantize_int8(q, scales) - m)
    assert (err <= scales[:, None] / 2 * (1 + 1e-5) + 1e-12).all()


def test_gaussian_matrix_relative_error_below_one_percent() -> None:
    m = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    d = dequantize_int8(*quantize_int8(m))
    assert d.dtype == np.float32
    assert np.linalg.norm(d - m) / np.linalg.norm(m) < 0.01


def test_int8_matvec_correlates_with_float() -> None:
    rng = np.random.default_rng(3)
    m = rng.standard_normal((640, 640)).astype(np.float32)
    x = rng.standard_normal(640).astype(np.float32)
    y_int8 = dequantize_int8(*quantize_int8(m)) @ x
    assert np.corrcoef(y_int8, m @ x)[0, 1] > 0.9999


def test_round_trip(tmp_path: Path) -> None:
    w = _weights()
    path = weights_path(tmp_path, "gemma-3-270m")
    assert path == tmp_path / "gemma-3-270m.consolidator.npz"
    save_weights(path, w)
    back = load_weights(path)
    assert set(back.tensors) == set(w.tensors)
    for name, original in w.tensors.items():
        got = back.tensors[name]
        assert got.dtype == np.float32 and got.shape == original.shape
        if original.ndim == 1:
            np.testing.assert_array_equal(got, original)
        else:
            _, scales = quantize_int8(original)
            assert (np.abs(got - original) <= scales[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert (back.trained, back.model_fingerprint, back.source_layer, back.version) == (
        True,
        "sha256:abc123",
        17,
        FORMAT_VERSION,
    )
    assert back.n_params() == w.n_params() == 64 * 32 + 32 * 64 + 32 + 64
    assert back.nbytes == 4 * w.n_params()


def test_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "m.consolidator.npz"
    save_weights(path, _weights())
    with np.load(path, allow_pickle=False) as data:
        assert data["q/attn_q"].dtype == np.int8
        assert data["s/attn_q"].dtype == np.float32
        assert data["f/attn_norm"].dtype == np.float32
        meta = json.loads(str(data["meta"][()]))
    assert meta == {
        "format": "flashmem-consolidator",
        "version": FORMAT_VERSION,
        "trained": True,
        "model_fingerprint": "sha256:abc123",
        "source_layer": 17,
    }


def test_meta_as_uint8_bytes_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    raw = np.frombuffer(str(_meta()[()]).encode(), dtype=np.uint8)
    _raw_save(path, {"meta": raw, "f/norm": np.ones(4, np.float32)})
    back = load_weights(path)
    assert back.source_layer == 3 and not back.trained
    np.testing.assert_array_equal(back.tensors["norm"], np.ones(4, np.float32))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="missing"):
        load_weights(tmp_path / "nope.npz")


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    save_weights(path, _weights())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="delete it"):
        load_weights(path)


@pytest.mark.parametrize("garbage", [b"", b"not a zip file at all\n" * 10, b"\x93NUMPY junk"])
def test_garbage_bytes(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "w.npz"
    path.write_bytes(garbage)
    with pytest.raises(WeightsError):
        load_weights(path)


def test_plain_npy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3, np.float32))
    with pytest.raises(WeightsError):
        load_weights(path)


def test_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    _raw_save(path, {"meta": _meta(version=FORMAT_VERSION + 1)})
    with pytest.raises(WeightsError, match="newer flashmem"):
        load_weights(path)


def test_missing_meta(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    _raw_save(path, {"f/norm": np.ones(4, np.float32)})
    with pytest.raises(WeightsError, match="metadata"):
        load_weights(path)


@pytest.mark.parametrize(
    "meta",
    [
        np.array("{not json"),
        np.array("[1, 2]"),
        _meta(trained="yes"),
        _meta(source_layer=None),
        _meta(version="1"),
    ],
)
def test_bad_meta(tmp_path: Path, meta: np.ndarray) -> None:
    path = tmp_path / "w.npz"
    _raw_save(path, {"meta": meta})
    with pytest.raises(WeightsError):
        load_weights(path)


def test_wrong_format(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    _raw_save(path, {"meta": _meta(format="something-else")})
    with pytest.raises(WeightsError, match="not a flashmem"):
        load_weights(path)


def test_int8_matrix_without_scales(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    _raw_save(path, {"meta": _meta(), "q/attn_q": np.zeros((4, 3), np.int8)})
    with pytest.raises(WeightsError, match="no scales"):
        load_weights(path)


def test_scales_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    arrays = {
        "meta": _meta(),
        "q/attn_q": np.zeros((4, 3), np.int8),
        "s/attn_q": np.ones(3, np.float32),
    }
    _raw_save(path, arrays)
    with pytest.raises(WeightsError, match="scales of shape"):
        load_weights(path)


def test_weights_error_is_a_flashmem_error() -> None:
    assert issubclass(WeightsError, FlashmemError)


def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "w.consolidator.npz"
    save_weights(path, _weights(0))
    save_weights(path, _weights(1))  # replacing an existing file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("shape", [(2, 3, 4), ()])
def test_failed_save_keeps_old_file(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "w.consolidator.npz"
    save_weights(path, _weights())
    before = path.read_bytes()
    bad = _weights()
    bad.tensors["cube"] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="only vectors and matrices"):
        save_weights(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failure_while_writing_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.consolidator.npz"
    save_weights(path, _weights())
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, _weights(1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
