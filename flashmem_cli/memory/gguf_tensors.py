"""Tensors of a GGUF file, found fast and read a few rows at a time.

`gguf.GGUFReader` builds an object for every metadata value: on the default model (262,144
vocabulary strings) opening it takes ~9 s. Latent readout needs a handful of embedding rows per
step, so this reads only what locating tensors needs: the header is walked once (values are
skipped, not decoded) and rows are dequantized with the official `gguf.quants.dequantize`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Byte sizes of GGUF metadata scalar types (uint8..float64, bool); 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    type: GGMLQuantizationType
    offset: int  # from the start of the file

    @property
    def row_bytes(self) -> int:
        block, block_bytes = GGML_QUANT_SIZES[self.type]
        return self.shape[0] // block * block_bytes


class GGUFTensors:
    """Open a GGUF file's tensor index; read rows of 2-D tensors by index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.tensors = {info.name: info for info in _read_index(self._map)}

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> GGUFTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rows(self, name: str, indices: list[int] | np.ndarray) -> np.ndarray:
        """Dequantized rows (len(indices), row length) as float32."""
        info = self.tensors[name]
        n_rows = info.shape[1] if len(info.shape) > 1 else 1
        size = info.row_bytes
        raw = np.empty((len(indices), size), dtype=np.uint8)
        for i, index in enumerate(indices):
            if not 0 <= index < n_rows:
                raise IndexError(f"row {index} of {name} ({n_rows} rows)")
            start = info.offset + int(index) * size
            raw[i] = np.frombuffer(self._map, dtype=np.uint8, count=size, offset=start)
        return np.asarray(dequantize(raw, info.type), dtype=np.float32).reshape(len(indices), -1)


def _read_index(buf: mmap.mmap) -> list[TensorInfo]:
    if buf[:4] != MAGIC:
        raise ValueError("not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    pos = 24
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = _skip_value(buf, pos + 4, value_type)
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        tensor_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, shape, tensor_type, offset))
    data_start = (pos + alignment - 1) // alignment * alignment
    return [
        TensorInfo(name, tuple(shape), GGMLQuantizationType(kind), data_start + offset)
        for name, shape, kind, offset in infos
    ]


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    start = pos + 8
    return buf[start : start + length].decode("utf-8", "replace"), start + length


def _skip_value(buf: mmap.mmap, pos: int, value_type: int) -> int:
    if value_type in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[value_type]
    if value_type == _STRING:
        (length,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + length
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type in _SCALAR_SIZES:
            return pos + count * _SCALAR_SIZES[item_type]
        for _ in range(count):
            pos = _skip_value(buf, pos, item_type)
        return pos
    raise ValueError(f"unknown GGUF value type {value_type} at byte {pos}")
