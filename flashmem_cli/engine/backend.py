"""Model and context lifecycle over llama.cpp's C API (llama-cpp-python's low-level bindings).

This module and its siblings in `engine/` are the only code that imports `llama_cpp`.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc
import numpy as np

from flashmem_cli.engine.ggml import NodeTap
from flashmem_cli.errors import EngineError, ModelNotFound

_log_callback_ref = None
_OFFLOAD_LINE = re.compile(rb"offloaded (\d+)/(\d+) layers to GPU")
_last_offload: tuple[int, int] | None = None


def init_backend() -> None:
    """Initialise llama.cpp once and silence its logging unless FLASHMEM_VERBOSE is set."""
    global _log_callback_ref
    if _log_callback_ref is not None:
        return
    verbose = os.environ.get("FLASHMEM_VERBOSE", "") not in ("", "0")

    @lc.llama_log_callback
    def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        global _last_offload
        found = _OFFLOAD_LINE.search(text or b"")
        if found:
            _last_offload = (int(found.group(1)), int(found.group(2)))
        if verbose:
            os.write(2, text)

    _log_callback_ref = _log
    lc.llama_log_set(_log, ctypes.c_void_p(0))
    lc.llama_backend_init()


def supports_gpu_offload() -> bool:
    return bool(lc.llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's build description: backends and CPU features (`CPU : AVX2 = 1 | ...`)."""
    init_backend()
    return bytes(lc.llama_print_system_info()).decode("utf-8", "replace").strip(" |")


def bindings_version() -> str:
    return str(getattr(lc, "__version__", "unknown"))


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    description: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    n_swa: int
    chat_template: str | None
    head_dim: int
    rms_eps: float
    rope_base: float
    rope_type: int = 0  # llama_rope_type: 0 pairs adjacent dimensions, 2 (NEOX) halves
    rope_freq_scale: float = 1.0  # position multiplier (linear scaling: 1 / factor)
    metadata: tuple[tuple[str, str], ...] = ()  # the GGUF's `<architecture>.*` keys, as text

    def meta(self, key: str) -> str | None:
        """An architecture-scoped value (`attention.sliding_window`) as text, if present."""
        return dict(self.metadata).get(f"{self.architecture}.{key}")


class Model:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: Path, n_gpu_layers: int | None = None, vocab_only: bool = False):
        """`vocab_only`: the vocabulary and metadata without the weights (tokenizing only)."""
        init_backend()
        params = lc.llama_model_default_params()
        if n_gpu_layers is None:
            n_gpu_layers = 999 if supports_gpu_offload() and not vocab_only else 0
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        self.path = Path(path)
        self.n_gpu_layers = n_gpu_layers
        global _last_offload
        _last_offload = None
        self._ptr = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            raise ModelNotFound(f"llama.cpp could not load {self.path} (not a usable GGUF model)")
        self.offloaded_layers = _last_offload  # (layers on the GPU, of): what llama.cpp logged
        self._vocab = lc.llama_model_get_vocab(self._ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.n_embd = lc.llama_model_n_embd(self._ptr)
        self.bos = lc.llama_vocab_bos(self._vocab)
        self.eos = lc.llama_vocab_eos(self._vocab)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))

    @property
    def ptr(self):  # noqa: ANN201 - a ctypes pointer
        return self._ptr

    def close(self) -> None:
        if self._ptr:
            lc.llama_model_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- vocabulary ---------------------------------------------------------------------------

    def tokenize(
        self, text: str, add_special: bool = False, parse_special: bool = False
    ) -> list[int]:
        """Tokens of `text`; spellings of control tokens (`<end_of_turn>`) stay text unless
        `parse_special` (for a template's own markup only: engine/prompt.py)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(
            self._vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        if n < 0:
            raise EngineError(f"could not tokenize {len(data)} bytes of text")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        """The vocabulary's own spelling of a token (`<bos>`, `<end_of_turn>`)."""
        return (lc.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    def is_control(self, token: int) -> bool:
        """A token that only special-token parsing makes of its spelling (control, unknown)."""
        attr = lc.llama_vocab_get_attr(self._vocab, token)
        return bool(attr & (lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN))

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self._vocab, token))

    # -- metadata -----------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        return buf.value.decode("utf-8", "replace")

    def _meta_number(self, key: str, default: float) -> float:
        """An architecture-scoped number (`<arch>.<key>`) from the GGUF metadata."""
        arch = self.meta("general.architecture") or ""
        value = self.meta(f"{arch}.{key}")
        return float(value) if value is not None else float(default)

    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self._ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    def info(self) -> ModelInfo:
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self._ptr, desc, len(desc))
        return ModelInfo(
            architecture=self.meta("general.architecture") or "unknown",
            description=desc.value.decode("utf-8", "replace"),
            n_layer=lc.llama_model_n_layer(self._ptr),
            n_head=lc.llama_model_n_head(self._ptr),
            n_head_kv=lc.llama_model_n_head_kv(self._ptr),
            n_embd=self.n_embd,
            n_ctx_train=lc.llama_model_n_ctx_train(self._ptr),
            n_vocab=self.n_vocab,
            n_params=lc.llama_model_n_params(self._ptr),
            n_swa=lc.llama_model_n_swa(self._ptr),
            chat_template=self.chat_template(),
            head_dim=int(
                self._meta_number(
                    "attention.key_length", self.n_embd // max(1, lc.llama_model_n_head(self._ptr))
                )
            ),
            rms_eps=self._meta_number("attention.layer_norm_rms_epsilon", 1e-6),
            rope_base=self._meta_number("rope.freq_base", 10000.0),
            rope_type=int(lc.llama_model_rope_type(self._ptr)),
            rope_freq_scale=float(lc.llama_model_rope_freq_scale_train(self._ptr)),
            metadata=self.scoped_metadata(),
        )

    def scoped_metadata(self) -> tuple[tuple[str, str], ...]:
        """Every `<architecture>.*` metadata key with its value as llama.cpp prints it (arrays
        as `[a, b]`); the tokenizer's large arrays are not among them."""
        prefix = (self.meta("general.architecture") or "") + "."
        key, value = ctypes.create_string_buffer(256), ctypes.create_string_buffer(4096)
        found = []
        for i in range(lc.llama_model_meta_count(self._ptr)):
            if lc.llama_model_meta_key_by_index(self._ptr, i, key, len(key)) < 0:
                continue
            name = key.value.decode("utf-8", "replace")
            if name.startswith(prefix) and (
                lc.llama_model_meta_val_str_by_index(self._ptr, i, value, len(value)) >= 0
            ):
                found.append((name, value.value.decode("utf-8", "replace")))
        return tuple(found)


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int
    n_batch: int = 512
    n_threads: int = 2
    n_seq_max: int = 1
    flash_attn: bool = False
    tap: NodeTap | None = None  # reads graph nodes as they are computed (engine/ggml.py)
    hidden_states: bool = False  # keep the final (normed) hidden state of output tokens


@dataclass(frozen=True)
class BatchEntry:
    """Tokens of one sequence in a multi-sequence decode."""

    seq_id: int
    start_pos: int
    tokens: list[int]
    want_logits: bool


class Context:
    """A llama.cpp context: one KV cache that holds up to `n_seq_max` sequences."""

    def __init__(self, model: Model, params: ContextParams):
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = params.n_ctx
        cparams.n_batch = min(params.n_batch, params.n_ctx)
        cparams.n_ubatch = cparams.n_batch
        cparams.n_seq_max = params.n_seq_max
        cparams.n_threads = params.n_threads
        cparams.n_threads_batch = params.n_threads
        cparams.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if params.flash_attn
            else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        # Full-size sliding-window cache: needed to restore, trim and shift saved sequences.
        cparams.swa_full = True
        if params.hidden_states:
            cparams.embeddings = True
            cparams.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        if params.tap is not None:
            if params.flash_attn:
                raise EngineError("reading attention needs flash attention off")
            cparams.cb_eval = params.tap.callback
            cparams.cb_eval_user_data = params.tap.user_data
        # One pool of cells for all sequences, so a shared prefix is stored once (seq_cp tags).
        cparams.kv_unified = params.n_seq_max > 1
        self.model = model
        self.params = params
        self._ptr = lc.llama_init_from_model(model.ptr, cparams)
        if not self._ptr:
            raise EngineError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        self.n_ctx = lc.llama_n_ctx(self._ptr)
        self.n_batch = lc.llama_n_batch(self._ptr)
        self._memory = lc.llama_get_memory(self._ptr)
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._embd_batch: lc.llama_batch | None = None

    @property
    def ptr(self):  # noqa: ANN201 - a ctypes pointer
        return self._ptr

    @property
    def n_threads(self) -> int:
        return int(lc.llama_n_threads(self._ptr))

    def set_threads(self, n_threads: int) -> None:
        """Threads for the decodes from now on, single tokens and batches alike (chat re-picks
        them per turn as the machine's load changes: engine/threads.py)."""
        if not self._ptr:
            raise EngineError("the context is closed")
        lc.llama_set_n_threads(self._ptr, max(1, n_threads), max(1, n_threads))

    def close(self) -> None:
        if self._ptr:
            lc.llama_batch_free(self._batch)
            if self._embd_batch is not None:
                lc.llama_batch_free(self._embd_batch)
            lc.llama_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, tokens: list[int], start_pos: int, seq_id: int = 0) -> None:
        """Decode `tokens` at positions start_pos..; logits are kept for the last one only."""
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            is_last_chunk = offset + len(chunk) == len(tokens)
            self._fill_batch(chunk, start_pos + offset, seq_id, is_last_chunk)
            rc = lc.llama_decode(self._ptr, self._batch)
            if rc != 0:
                raise EngineError(
                    f"llama_decode failed (code {rc}) at position {start_pos + offset}"
                )

    def decode_embeddings(self, embeddings: np.ndarray, start_pos: int, seq_id: int = 0) -> None:
        """Decode input embeddings (n, n_embd) instead of tokens, logits for the last row.

        They enter the graph as they are: where an architecture scales its token embeddings
        inside the graph (Gemma: by sqrt(n_embd)), the caller must scale these the same way."""
        rows = np.ascontiguousarray(embeddings, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.model.n_embd:
            raise EngineError(f"embeddings must be (n, {self.model.n_embd}), got {rows.shape}")
        if self._embd_batch is None:
            self._embd_batch = lc.llama_batch_init(self.n_batch, self.model.n_embd, 1)
        batch = self._embd_batch
        for offset in range(0, len(rows), self.n_batch):
            chunk = rows[offset : offset + self.n_batch]
            ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(len(chunk)):
                batch.pos[i] = start_pos + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = offset + i == len(rows) - 1
            batch.n_tokens = len(chunk)
            rc = lc.llama_decode(self._ptr, batch)
            if rc != 0:
                raise EngineError(f"llama_decode of embeddings failed (code {rc})")

    def decode_batch(self, entries: list[BatchEntry]) -> list[int]:
        """One llama_decode over several sequences (at most n_batch tokens in all). Returns,
        per entry, the output index of its last token's logits, or -1 when not wanted."""
        batch = self._batch
        n = 0
        indices = []
        for entry in entries:
            for i, token in enumerate(entry.tokens):
                batch.token[n] = token
                batch.pos[n] = entry.start_pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = entry.seq_id
                batch.logits[n] = False
                n += 1
            batch.logits[n - 1] = entry.want_logits
            indices.append(n - 1 if entry.want_logits else -1)
        batch.n_tokens = n
        rc = lc.llama_decode(self._ptr, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed (code {rc}) on a batch of {n} tokens")
        return indices

    def _fill_batch(
        self, tokens: list[int], start_pos: int, seq_id: int, want_logits: bool
    ) -> None:
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = False
        batch.logits[len(tokens) - 1] = want_logits

    def logits(self, index: int = -1) -> np.ndarray:
        """A copy of the logits at output `index` of the last decode (-1: the last output)."""
        return self.logits_view(index).copy()

    def logits_view(self, index: int = -1) -> np.ndarray:
        """The logits at output `index`, without a copy: valid until the next decode."""
        ptr = lc.llama_get_logits_ith(self._ptr, index)
        if not ptr:
            raise EngineError(f"no logits at output {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def hidden_state(self, index: int = -1) -> np.ndarray:
        """A copy of the final hidden state (after the output norm) at output `index`; needs
        ContextParams.hidden_states."""
        if not self.params.hidden_states:
            raise EngineError("this context keeps no hidden states (ContextParams.hidden_states)")
        ptr = lc.llama_get_embeddings_ith(self._ptr, index)
        if not ptr:
            raise EngineError(f"no hidden state at output {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()

    # -- KV memory ------------------------------------------------------------------------------

    def remove(self, seq_id: int, p0: int, p1: int) -> None:
        if not lc.llama_memory_seq_rm(self._memory, seq_id, p0, p1):
            raise EngineError(
                f"llama.cpp could not remove positions {p0}..{p1} of sequence {seq_id}"
            )

    def copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        lc.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def shift(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        lc.llama_memory_seq_add(self._memory, seq_id, p0, p1, delta)

    def clear(self) -> None:
        lc.llama_memory_clear(self._memory, True)

    def sequence_state(self, seq_id: int = 0) -> bytes:
        """The serialized KV cells of one sequence (llama_state_seq_get_data)."""
        size = lc.llama_state_seq_get_size(self._ptr, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self._ptr, buf, size, seq_id)
        if written == 0:
            raise EngineError(f"llama.cpp could not serialize sequence {seq_id}")
        return bytes(memoryview(buf)[:written])

    def save_sequence(self, path: Path, tokens: list[int], seq_id: int = 0) -> int:
        arr = (lc.llama_token * max(len(tokens), 1))(*tokens)
        written = lc.llama_state_seq_save_file(
            self._ptr, str(path).encode(), seq_id, arr, len(tokens)
        )
        if written == 0:
            raise EngineError(f"llama.cpp could not save the KV state to {path}")
        return int(written)

    def load_sequence(self, path: Path, seq_id: int = 0) -> list[int] | None:
        """Restore a saved sequence; None when the file is corrupt, truncated or does not fit."""
        arr = (lc.llama_token * self.n_ctx)()
        count = ctypes.c_size_t(0)
        read = lc.llama_state_seq_load_file(
            self._ptr, str(path).encode(), seq_id, arr, self.n_ctx, ctypes.byref(count)
        )
        if read == 0:
            self.remove(seq_id, -1, -1)
            return None
        return list(arr[: count.value])
