"""The backbone's frozen K and V, read from llama.cpp's serialized sequence state (pure).

`llama_state_seq_get_data` writes, per KV cache (a model with sliding-window layers has two:
the full-context layers first, then the windowed ones), the sequence's cells — position and
sequence ids — and then each layer's K rows and V rows for those cells (V transposed when flash
attention is off). Layout as written by llama_kv_cache::state_write in the pinned llama.cpp.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

IO_MAGIC = 0xAF143CD8  # llama_state_seq_get_data starts with it, then the sequence id
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
_DTYPES = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}


@dataclass
class CacheState:
    """One KV cache's cells of a sequence: positions, and K/V per layer (cells x width).

    K and V are read-only views of the state bytes in the cache's own type (f16 by default):
    convert just the layers you use."""

    positions: np.ndarray
    keys: list[np.ndarray]
    values: list[np.ndarray]


def parse_sequence_state(data: bytes, n_caches: int) -> list[CacheState]:
    """The `n_caches` caches in `data` (2 for Gemma 3's full + sliding-window caches)."""
    reader = _Reader(data)
    magic, _seq_id = reader.unpack("<Ii")
    if magic != IO_MAGIC:
        raise ValueError(f"not llama.cpp sequence state (magic {magic:#x})")
    caches = [_read_cache(reader) for _ in range(n_caches)]
    if reader.pos != len(data):
        raise ValueError(f"{len(data) - reader.pos} bytes left after {n_caches} caches")
    return caches


def _read_cache(reader: _Reader) -> CacheState:
    (n_stream,) = reader.unpack("<I")
    found: CacheState | None = None
    for _ in range(n_stream):
        (cell_count,) = reader.unpack("<I")
        if cell_count == 0:
            continue
        if found is not None:
            raise ValueError("a sequence spread over several streams is not supported")
        positions = np.empty(cell_count, dtype=np.int64)
        for i in range(cell_count):
            positions[i], n_seq = reader.unpack("<iI")
            reader.skip(4 * n_seq)
        keys, values = _read_layers(reader, cell_count)
        found = CacheState(positions, keys, values)
    return found or CacheState(np.empty(0, dtype=np.int64), [], [])


def _read_layers(reader: _Reader, cells: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    v_trans, n_layer = reader.unpack("<II")
    keys = []
    for _ in range(n_layer):
        k_type, row_bytes = reader.unpack("<iQ")
        dtype = _dtype(k_type)
        width = row_bytes // np.dtype(dtype).itemsize
        keys.append(reader.array(dtype, cells * width).reshape(cells, width))
    values = []
    for _ in range(n_layer):
        if v_trans:
            v_type, _element_bytes, width = reader.unpack("<iII")
            flat = reader.array(_dtype(v_type), width * cells)
            values.append(flat.reshape(width, cells).T)
        else:
            v_type, row_bytes = reader.unpack("<iQ")
            dtype = _dtype(v_type)
            width = row_bytes // np.dtype(dtype).itemsize
            values.append(
                reader.array(dtype, cells * width).reshape(cells, width).astype(np.float32)
            )
    return keys, values


def _dtype(ggml_type: int) -> type:
    if ggml_type not in _DTYPES:
        raise ValueError(f"KV cache type {ggml_type} is not f16/f32 (quantized caches: not yet)")
    return _DTYPES[ggml_type]


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def skip(self, n: int) -> None:
        self.pos += n

    def array(self, dtype: type, count: int) -> np.ndarray:
        out: np.ndarray = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out
