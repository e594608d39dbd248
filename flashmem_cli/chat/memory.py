"""A conversation's FlashMem memory: the Cognitive Monitor on its decodes, the Shared-KV
Consolidator over its frozen KV cache, and bounded context.

This is where the engine (the KV cache, the attention tap) meets the numpy method in
`memory/`: it reads what llama.cpp computed, asks `memory/` what to do, and edits the cache.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashmem_cli.chat.events import INSERTION, MemoryEvent
from flashmem_cli.chat.layout import tokens_digest
from flashmem_cli.config import models_dir
from flashmem_cli.engine.attention import AttentionCapture
from flashmem_cli.engine.backend import Model, ModelInfo
from flashmem_cli.engine.sequence import LATENT, KVSequence
from flashmem_cli.errors import EngineError, FlashmemError
from flashmem_cli.memory.architecture import describe
from flashmem_cli.memory.budget import (
    DEFAULT_BUDGET,
    DEFAULT_KEEP_RATIO,
    POOL,
    budget_tokens,
    dropped_runs,
    kept_count,
    mixed,
    per_query,
    positions_to_keep,
)
from flashmem_cli.memory.calibration import load_calibration
from flashmem_cli.memory.consolidator import (
    DEFAULT_LATENTS,
    Consolidator,
    EmbeddingRows,
    output_matrix,
    output_norm,
    untrained_weights,
)
from flashmem_cli.memory.gguf_tensors import GGUFTensors
from flashmem_cli.memory.kv_state import CacheState, parse_sequence_state
from flashmem_cli.memory.layer import LayerSpec, layer_problem
from flashmem_cli.memory.monitor import DEFAULT_SINKS, TriggerPolicy, attention_entropy
from flashmem_cli.memory.shipped import calibration_paths, find_weights
from flashmem_cli.memory.weights import (
    load_weights,
    save_weights,
    weights_path,
)
from flashmem_cli.models import ModelFile

MEMORY_FORMAT = 1
# KVzip's reconstruction prompt: the span is fed again after it, teacher-forced
RECONSTRUCT_PROMPT = "\n\nRepeat the previous context exactly:\n"
MIN_RECONSTRUCT_CHUNK = 16  # fewer free cells than this (after the prompt): attention decides


@dataclass(frozen=True)
class MemoryOptions:
    enabled: bool = True
    n_latents: int | None = None  # None: DEFAULT_LATENTS, but none at the budget while untrained
    keep_ratio: float = DEFAULT_KEEP_RATIO
    keep_score: str = "reconstruction"  # what decides the kept positions: budget.KEEP_SCORES
    keep_pool: int = POOL
    budget: float = DEFAULT_BUDGET  # a fraction of n_ctx when <= 1, else tokens
    tau: float | None = None  # overrides the model's calibration
    tau_percentile: float | None = None
    max_insertions: int = 3  # latent insertions into one reply, at most
    inject_in_reply: bool = False  # untrained latents hurt replies (README); off until trained


def layer_spec(info: ModelInfo) -> LayerSpec:
    """The consolidator's layer spec for `info`'s architecture (memory/architecture.py)."""
    return describe(info).layer


def resolve_tau(file: ModelFile, options: MemoryOptions) -> float | None:
    """--tau, else the model's calibration at --tau-percentile (or its own); None without one."""
    if options.tau is not None:
        return options.tau
    found = (load_calibration(path, file.fingerprint) for path in calibration_paths(file))
    calibration = next((c for c in found if c is not None), None)
    if calibration is None and options.tau_percentile is not None:
        raise FlashmemError(
            f"--tau-percentile needs a calibration of {file.name}: run `flashmem calibrate -m "
            f"{file.name}`, or give --tau"
        )
    if calibration is None:
        return None
    if options.tau_percentile is not None:
        return calibration.tau_at(options.tau_percentile)
    return calibration.tau


def open_consolidator(model: Model, file: ModelFile, tensors: GGUFTensors) -> Consolidator:
    """The model's consolidator weights: trained ones from models/ or shipped with flashmem,
    else models/'s untrained file, created when there is none."""
    info = model.info()
    arch = describe(info)  # ConversationMemory refused latents this architecture cannot have
    path = weights_path(models_dir(), file.path.stem)
    found = find_weights(file)
    source = found.path if found is not None else path
    weights = load_weights(source) if found is not None else None
    if weights is not None and weights.model_fingerprint != file.fingerprint:
        if weights.trained:
            raise FlashmemError(
                f"{source} holds trained weights for another model (fingerprint "
                f"{weights.model_fingerprint}); move it away to use {file.name}"
            )
        weights = None
    if weights is None:
        layer = arch.consolidator_layer  # its cache holds every position (kv_state keys[-1])
        fresh = untrained_weights(tensors, layer, arch.layer, info.n_embd, file.fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(path, fresh)
        weights = load_weights(path)  # use what int8 storage gives, as every later run will
    return Consolidator(
        weights,
        arch.layer,
        EmbeddingRows(tensors),
        output_norm(tensors),
        arch.input_scale,
        output_rows=EmbeddingRows(tensors, output_matrix(tensors)),
        final_softcap=arch.final_softcap,
    )


class ConversationMemory:
    """Owns the attention tap of one conversation's context and what memory did to its cache."""

    def __init__(self, model: Model, file: ModelFile, options: MemoryOptions):
        self.model = model
        self.file = file
        self.info = model.info()
        self.arch = describe(self.info)
        self.options = options
        self.capture = AttentionCapture(self.info.n_layer - 1, list(self.arch.mass_layers), 0)
        self.budget_tokens = 0  # --budget, a fraction of n_ctx or tokens, made tokens
        self.latents_at_budget = latents_at_budget(file, options.n_latents)
        self.latents_in_reply = DEFAULT_LATENTS if options.n_latents is None else options.n_latents
        writes_latents = self.latents_at_budget > 0 or (
            options.inject_in_reply and self.latents_in_reply > 0
        )
        if writes_latents:
            with GGUFTensors(file.path) as tensors:
                problem = self.arch.latent_problem or layer_problem(
                    set(tensors.tensors), self.arch.consolidator_layer
                )
            if problem is not None:
                raise FlashmemError(f"{file.name}: {problem}; use --latents 0")
        self.tau = resolve_tau(file, options)
        self.last_hidden: np.ndarray | None = None
        self.latent_rows = np.zeros((0, self.info.n_embd), dtype=np.float32)
        self.events: list[MemoryEvent] = []
        self.reply_entropies: list[float] = []
        self.reply_triggers: list[int] = []
        self._policy: TriggerPolicy | None = None
        self._tensors: GGUFTensors | None = None
        self._consolidator: Consolidator | None = None

    def attach(self, n_ctx: int) -> None:
        """Size the tap and the budget for the context the callback was given to."""
        self.capture.cell_mass = np.zeros(n_ctx)
        self.budget_tokens = budget_tokens(self.options.budget, n_ctx)

    def close(self) -> None:
        if self._tensors is not None:
            self._tensors.close()
            self._tensors = None

    @property
    def consolidator(self) -> Consolidator:
        if self._consolidator is None:
            self._tensors = GGUFTensors(self.file.path)
            self._consolidator = open_consolidator(self.model, self.file, self._tensors)
        return self._consolidator

    # -- the monitor ------------------------------------------------------------------------

    def note_decode(self) -> None:
        """After each decode of the conversation's own tokens: surface tap errors, keep h_t."""
        self.capture.check()
        self.last_hidden = self.capture.last_hidden

    def begin_reply(self) -> None:
        self.reply_entropies = []
        self.reply_triggers = []
        self._policy = (
            TriggerPolicy(self.tau, self.options.max_insertions) if self.tau is not None else None
        )

    def cut_reply(self, steps: int) -> None:
        """The reply was cut to its first `steps` tokens (a stop string): forget the rest."""
        del self.reply_entropies[steps:]
        self.reply_triggers = [step for step in self.reply_triggers if step < steps]

    def observe_token(self, step: int) -> bool:
        """The entropy of the token just decoded; True when the monitor says consolidate."""
        rows = self.capture.last_rows
        if rows is None:
            return False
        entropy = attention_entropy(rows, DEFAULT_SINKS)
        self.reply_entropies.append(round(entropy, 4))
        if self._policy is None or not self._policy.should_fire(step, entropy):
            return False
        self.reply_triggers.append(step)
        return True

    # -- consolidation ----------------------------------------------------------------------

    def consolidate(
        self, seq: KVSequence, start: int, end: int, kind: str, turns: int = 0
    ) -> MemoryEvent:
        """Fold positions [start, end) - `turns` whole turns, or older memory - into memory: K
        latents written from the frozen cache, the span's best-scored positions kept
        (--keep-score), the rest removed and the gap closed."""
        began = time.perf_counter()
        n_latents = self.latents_at_budget
        if self.last_hidden is None and n_latents:
            self._recompute_hidden(seq)
        full = self._full_cache(seq)
        n_keep = kept_count(end - start, self.options.keep_ratio, n_latents)
        score = self._keep_score(seq, full, start, end) if n_keep else np.zeros(len(seq))
        kept = positions_to_keep(score, start, end, n_keep, self.options.keep_pool)
        cell_of = np.empty(len(seq), dtype=np.int64)
        cell_of[full.positions] = self.capture.visible_cells
        latents = self._latents(seq, full, end, n_latents) if n_latents else None
        # written while the span is still in the cache, unless the cache is too full for them
        early = latents is not None and len(latents) <= seq.free
        if latents is not None and early:
            self._insert_latents(seq, latents, at=len(seq))
        for a, b in dropped_runs(start, end, kept):
            self.capture.forget_cells(cell_of[a:b])
            self._forget_latent_rows(seq, a, b)
            seq.drop(a, b)
        if latents is not None:
            if early:
                self._move_latents(seq, len(latents), to=start)
            else:
                self._insert_latents(seq, latents, at=start)
        event = MemoryEvent(
            kind=kind,
            latents=n_latents,
            ms=round((time.perf_counter() - began) * 1000, 2),
            span=(start, end),
            kept=len(kept),
            after_tokens=len(seq),
            turns=turns,
        )
        self.events.append(event)
        return event

    def drop(self, seq: KVSequence, start: int, end: int) -> None:
        """Remove positions [start, end) outright (no room even after consolidating)."""
        full = self._full_cache(seq)
        cell_of = np.empty(len(seq), dtype=np.int64)
        cell_of[full.positions] = self.capture.visible_cells
        self.capture.forget_cells(cell_of[start:end])
        self._forget_latent_rows(seq, start, end)
        seq.drop(start, end)

    def reset(self) -> None:
        """The cache was cleared: nothing it held is remembered."""
        self.capture.cell_mass[:] = 0.0
        self.capture.visible_cells = np.empty(0, dtype=np.int64)
        self.latent_rows = self.latent_rows[:0]
        self.last_hidden = None

    def inject(self, seq: KVSequence, step: int) -> MemoryEvent:
        """In-reply insertion: K latents from the whole frozen cache, appended where the reply is."""
        began = time.perf_counter()
        full = self._full_cache(seq)  # after a decode: h_t is current
        latents = self._latents(seq, full, len(seq), self.latents_in_reply)
        self._insert_latents(seq, latents, at=len(seq))
        event = MemoryEvent(
            kind=INSERTION,
            latents=len(latents),
            ms=round((time.perf_counter() - began) * 1000, 2),
            step=step,
            position=len(seq) - len(latents),
        )
        self.events.append(event)
        return event

    def _full_cache(self, seq: KVSequence) -> CacheState:
        state = seq.ctx.sequence_state(seq.seq_id)
        full = parse_sequence_state(state, self.arch.n_caches)[0]
        if len(full.positions) != len(seq) or len(self.capture.visible_cells) != len(seq):
            raise EngineError(
                f"internal: the cache lists {len(full.positions)} cells and the tap "
                f"{len(self.capture.visible_cells)}, the sequence holds {len(seq)} tokens"
            )
        return full

    def _mass_by_position(self, full: CacheState, n: int) -> np.ndarray:
        mass = np.zeros(n)
        mass[full.positions] = self.capture.cell_mass[self.capture.visible_cells]
        return mass

    def _keep_score(self, seq: KVSequence, full: CacheState, start: int, end: int) -> np.ndarray:
        """Each position's claim to stay, by `keep_score`: attention accumulated since it was
        read (optionally per query that could see it), attention received while the span is
        reconstructed, or both as shares."""
        kind = self.options.keep_score
        mass = self._mass_by_position(full, len(seq))
        if kind == "attention":
            return mass
        if kind == "attention-per-query":
            return per_query(mass)
        rebuilt = self._reconstruction_mass(seq, full, start, end)
        if rebuilt is None:
            return mass
        return rebuilt if kind == "reconstruction" else mixed(mass, rebuilt, start, end)

    def _reconstruction_mass(
        self, seq: KVSequence, full: CacheState, start: int, end: int
    ) -> np.ndarray | None:
        """A KVzip-style score (arXiv 2505.23416): the attention each position receives on the
        global layers while the model, teacher-forced, repeats the span after
        RECONSTRUCT_PROMPT, summed over queries and heads (llama.cpp evicts whole positions).
        Fed in chunks into the free cells after the sequence and removed again; None when too
        few cells are free or the span holds no tokens."""
        prompt = self.model.tokenize(RECONSTRUCT_PROMPT)
        # one decode per chunk: a second would let llama.cpp reuse the window's older cells
        room = min(seq.free, seq.ctx.n_batch) - len(prompt)
        span = [token for token in seq.tokens[start:end] if token != LATENT]
        if room < MIN_RECONSTRUCT_CHUNK or not span:
            return None
        capture, mark = self.capture, len(seq)
        cells = capture.visible_cells.copy()
        kept = capture.cell_mass, capture.last_hidden, capture.last_rows
        capture.cell_mass = np.zeros_like(kept[0])
        try:
            for at in range(0, len(span), room):
                seq.feed(prompt + span[at : at + room])
                capture.check()
                self._remove_copy(seq, mark, cells)
            rebuilt = np.zeros(len(seq))
            rebuilt[full.positions] = capture.cell_mass[cells]
        finally:
            capture.cell_mass, capture.last_hidden, capture.last_rows = kept
            self._remove_copy(seq, mark, cells)
        return rebuilt

    def _remove_copy(self, seq: KVSequence, mark: int, cells: np.ndarray) -> None:
        """Remove what was fed after `mark`; the tap sees `cells` again, as before the feed."""
        if len(seq) > mark:
            seq.drop(mark, len(seq))
        copied = np.setdiff1d(self.capture.visible_cells, cells)
        self.capture.cell_mass[copied] = 0.0
        self.capture.visible_cells = cells.copy()

    def _latents(self, seq: KVSequence, full: CacheState, end: int, n: int) -> np.ndarray:
        if self.last_hidden is None:
            raise EngineError("internal: no hidden state to consolidate from")
        visible = full.positions < end
        keys = full.keys[-1][visible].astype(np.float32)
        values = full.values[-1][visible].astype(np.float32)
        tokens = np.asarray(seq.tokens[:end])
        candidates = np.unique(tokens[tokens >= 0])
        return self.consolidator.latents(self.last_hidden, keys, values, end, candidates, n)

    def _recompute_hidden(self, seq: KVSequence) -> None:
        """h_t for a cache restored without its memory file: decode its last token again."""
        last = seq.tokens[-1]
        if last == LATENT:
            raise EngineError("cannot recover the hidden state of a cache that ends in a latent")
        self.drop(seq, len(seq) - 1, len(seq))
        seq.feed([last])
        self.note_decode()

    def _insert_latents(self, seq: KVSequence, rows: np.ndarray, at: int) -> None:
        """Decode latents at the end of the sequence, then move them to position `at`."""
        self.capture.track_mass = False  # the latents' own queries are not the conversation's
        try:
            seq.feed_embeddings(rows)
            self.capture.check()
        finally:
            self.capture.track_mass = True
        self.latent_rows = np.concatenate([self.latent_rows, rows.astype(np.float32)])
        self._move_latents(seq, len(rows), at)

    def _move_latents(self, seq: KVSequence, count: int, to: int) -> None:
        """Move the last `count` cells (latents) to `to`, keeping their rows in position order."""
        ordinal = seq.tokens[:to].count(LATENT)
        seq.move_tail(count, to)
        moved, rest = self.latent_rows[-count:], self.latent_rows[:-count]
        self.latent_rows = np.concatenate([rest[:ordinal], moved, rest[ordinal:]])

    def _forget_latent_rows(self, seq: KVSequence, start: int, end: int) -> None:
        first = seq.tokens[:start].count(LATENT)
        count = seq.tokens[start:end].count(LATENT)
        self.latent_rows = np.delete(self.latent_rows, np.s_[first : first + count], axis=0)

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Path, seq: KVSequence) -> None:
        """The memory file: latents, their positions, attention mass in the order of the cells
        the state file restores, and h_t (a restored cache has no last decode to read it from)."""
        positions = [i for i, token in enumerate(seq.tokens) if token == LATENT]
        with open(path, "wb") as f:
            np.savez(
                f,
                version=np.array(MEMORY_FORMAT),
                n_tokens=np.array(len(seq)),
                digest=np.array(tokens_digest(seq.tokens)),
                latents=self.latent_rows,
                latent_positions=np.array(positions, dtype=np.int64),
                cell_mass=self.capture.cell_mass[self.capture.visible_cells],
                last_hidden=(
                    self.last_hidden
                    if self.last_hidden is not None
                    else np.zeros(0, dtype=np.float32)
                ),
            )

    def load(self, path: Path | None, seq: KVSequence) -> bool:
        """Take up a saved memory after the state was restored into a fresh context (its cells
        then sit at 0..n-1 in saved order). False, memory empty, when there is none that
        matches (`path` None: none was saved, or it failed its check)."""
        n = len(seq)
        self.capture.visible_cells = np.arange(n)
        self.latent_rows = np.zeros((seq.tokens.count(LATENT), self.info.n_embd), np.float32)
        if path is None:
            return False
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["version"]) != MEMORY_FORMAT or int(data["n_tokens"]) != n:
                    return False
                if str(data["digest"]) != tokens_digest(seq.tokens):
                    return False  # saved beside another state (a later --no-memory run)
                latents, mass, hidden = data["latents"], data["cell_mass"], data["last_hidden"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return False
        if len(mass) != n or len(latents) != seq.tokens.count(LATENT):
            return False
        self.capture.cell_mass[:n] = mass
        self.latent_rows = latents.astype(np.float32)
        self.last_hidden = hidden if len(hidden) else None
        return True

    def settings(self) -> dict[str, Any]:
        o = self.options
        return {
            "budget_tokens": self.budget_tokens,
            "keep_ratio": o.keep_ratio,
            "keep_score": o.keep_score
            if o.keep_pool == POOL
            else f"{o.keep_score}, pool {o.keep_pool}",
            "latents_per_consolidation": self.latents_at_budget,
            "latents_per_insertion": self.latents_in_reply,
            "tau": "not calibrated (flashmem calibrate)"
            if self.tau is None
            else round(self.tau, 4),
            "in_reply_insertion": "on" if o.inject_in_reply else "off",
            "consolidator": weights_status(self.file),
        }


def latents_at_budget(file: ModelFile, requested: int | None) -> int:
    """Latents per bounded-context consolidation: as asked, else DEFAULT_LATENTS once the
    model's consolidator is trained and 0 before (untrained latents lowered recall at the same
    cache footprint on the example recall file: README)."""
    if requested is not None:
        return requested
    found = find_weights(file)  # at every chat start: metadata only, no tensor is dequantized
    return DEFAULT_LATENTS if found is not None and found.trained else 0


def weights_status(file: ModelFile) -> str:
    """How the model's consolidator weights stand, for `models info` and /memory."""
    found = find_weights(file)
    if found is None:
        return "none yet (created untrained when latents are first written)"
    weights = load_weights(found.path)
    if weights.model_fingerprint != file.fingerprint:
        return f"{found.path.name} is for another model"
    state = "TRAINED" if weights.trained else "UNTRAINED (initialised from the model)"
    where = "shipped with flashmem" if found.shipped else str(found.path)
    return (
        f"{state}, int8, {weights.n_params() / 1e6:.1f} M parameters, format "
        f"v{weights.version} ({where})"
    )
