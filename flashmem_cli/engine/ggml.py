"""Reading graph nodes while llama.cpp computes them: a ctypes mirror of `ggml_tensor` and a tap
on the context's eval callback.

llama-cpp-python does not define `ggml_tensor`; the layout below is the one in
vendor/llama.cpp/ggml/include/ggml.h of the pinned llama-cpp-python (0.3.36). With flash
attention off, the attention probabilities of layer i are the node `kq_soft_max-i`, shape
ne = [n_kv, n_tokens, n_head] (f32; masked cells are 0; n_kv is padded).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import llama_cpp as lc
import numpy as np
from llama_cpp._ctypes_extensions import load_shared_library

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


NAME_OFFSET = GgmlTensor.name.offset

_ggml_base = load_shared_library("ggml-base", Path(lc.__file__).parent / "lib")
_ggml_base.ggml_backend_tensor_get.argtypes = [
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
]
_ggml_base.ggml_backend_tensor_get.restype = None


def attention_rows(ptr: int, token: int) -> np.ndarray:
    """(n_head, n_kv) probabilities of batch token `token` from a `kq_soft_max` node."""
    tensor = GgmlTensor.from_address(ptr)
    if tensor.type != GGML_TYPE_F32:
        raise ValueError(f"expected an f32 node, got ggml type {tensor.type}")
    n_kv, n_tokens, n_head = tensor.ne[0], tensor.ne[1], tensor.ne[2]
    if not 0 <= token < n_tokens:
        raise IndexError(f"token {token} of a batch of {n_tokens}")
    rows = np.empty((n_head, n_kv), dtype=np.float32)
    for head in range(n_head):
        offset = head * tensor.nb[2] + token * tensor.nb[1]
        _ggml_base.ggml_backend_tensor_get(ptr, rows[head].ctypes.data, offset, n_kv * 4)
    return rows


def read_f32(ptr: int) -> np.ndarray:
    """A whole contiguous f32 node, shaped (ne[3], ne[2], ne[1], ne[0]) with unit dims dropped
    from the front (numpy order: the last axis is ggml's ne[0])."""
    tensor = GgmlTensor.from_address(ptr)
    if tensor.type != GGML_TYPE_F32:
        raise ValueError(f"expected an f32 node, got ggml type {tensor.type}")
    ne = [int(n) for n in tensor.ne]
    expected = [4, 4 * ne[0], 4 * ne[0] * ne[1], 4 * ne[0] * ne[1] * ne[2]]
    if [int(n) for n in tensor.nb] != expected:
        raise ValueError("node is not contiguous")
    out = np.empty(ne[::-1], dtype=np.float32)
    _ggml_base.ggml_backend_tensor_get(ptr, out.ctypes.data, 0, out.nbytes)
    while out.ndim > 1 and out.shape[0] == 1:
        out = out[0]
    return out


def read_row(ptr: int, row: int, n: int, dtype: type) -> np.ndarray:
    """The first `n` elements of row `row` (stride nb[1]) of a node, as float32."""
    tensor = GgmlTensor.from_address(ptr)
    out: np.ndarray = np.empty(n, dtype=dtype)
    _ggml_base.ggml_backend_tensor_get(ptr, out.ctypes.data, row * tensor.nb[1], out.nbytes)
    return out.astype(np.float32)


def batch_size(ptr: int) -> int:
    return int(GgmlTensor.from_address(ptr).ne[1])


TAP_MAX_NAMES, TAP_NAME_LEN = 8, 64  # as in tapfilter.c


class _TapFilter(ctypes.Structure):
    _fields_ = [
        ("forward", lc.ggml_backend_sched_eval_callback),
        ("name_offset", ctypes.c_long),
        ("n_names", ctypes.c_int),
        ("names", (ctypes.c_char * TAP_NAME_LEN) * TAP_MAX_NAMES),
    ]


def _load_tap_filter() -> ctypes.CDLL | None:
    """The compiled name filter (engine/tapfilter.c), unless absent or FLASHMEM_PY_TAP is set."""
    if os.environ.get("FLASHMEM_PY_TAP"):
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(f"_tapfilter{suffix}")
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


_tap_filter_lib = _load_tap_filter()


class NodeTap:
    """Hands the graph nodes named `names` to `on_node(name, ptr)` once they are computed.

    Give the tap to the context (ContextParams.tap): llama.cpp asks about every node (~800 per
    decoded token here). The compiled filter answers for unwanted nodes in C; without it
    (`filtered_in_c` False) each question is one fixed-width read and a set lookup in Python.
    """

    def __init__(self, names: Iterable[str], on_node: Callable[[str, int], None]):
        self.names = {name.encode() for name in names}
        widths = {len(n) + 1 for n in self.names}
        # Names of one length are matched with their NUL in a single read: the common case.
        self._fixed = {n + b"\0" for n in self.names} if len(widths) == 1 else None
        self._width = max(widths)
        self._on_node = on_node
        self.error: BaseException | None = None  # raised in a callback; see `check`
        self._python = lc.ggml_backend_sched_eval_callback(self._call)
        self.callback = self._python
        self.user_data: ctypes.c_void_p | None = None
        self.filtered_in_c = _tap_filter_lib is not None and len(self.names) <= TAP_MAX_NAMES
        if self.filtered_in_c:
            self._filter = _TapFilter(self._python, NAME_OFFSET, len(self.names))
            for i, name in enumerate(sorted(self.names)):
                self._filter.names[i].value = name
            self.callback = ctypes.cast(
                _tap_filter_lib.flashmem_tap_filter,  # type: ignore[union-attr]
                lc.ggml_backend_sched_eval_callback,
            )
            self.user_data = ctypes.cast(ctypes.pointer(self._filter), ctypes.c_void_p)

    def check(self) -> None:
        """Re-raise, after the decode, what `on_node` raised inside llama.cpp's callback."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def _call(self, ptr: int, ask: bool, user_data: ctypes.c_void_p) -> bool:
        # Nothing may cross into C: an exception there (Ctrl-C included) would be printed and
        # dropped, and a False answer after compute stops the graph half-way. It is kept for
        # `check` and the graph runs to the end.
        try:
            raw = ctypes.string_at(ptr + NAME_OFFSET, self._width)
            wanted = (
                raw in self._fixed
                if self._fixed is not None
                else (raw.partition(b"\0")[0] in self.names)
            )
            if not wanted:
                return not ask  # not wanted; after compute, keep going
            if not ask:
                self._on_node(raw.partition(b"\0")[0].decode(), ptr)
        except BaseException as exc:
            self.error = self.error or exc
        return True
