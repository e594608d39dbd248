"""One sequence's KV cache, with the tokens it holds kept in step with llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flashmem_cli.engine.backend import Context
from flashmem_cli.errors import EngineError

LATENT = -1  # the token recorded for a cell filled from an input embedding (a memory latent)


class KVSequence:
    """Positions 0..n-1 of sequence `seq_id` hold exactly `tokens`, with no gaps; a cell
    decoded from an embedding holds LATENT.

    `limit` caps the sequence's length: the whole context unless several sequences share it.
    `shifts` False: the model's cache cannot be shifted (llama.cpp aborts on a Gemma 3 whose
    every layer is windowed), so a removal re-decodes what followed the gap instead.
    """

    def __init__(
        self, ctx: Context, seq_id: int = 0, limit: int | None = None, shifts: bool = True
    ):
        self.ctx = ctx
        self.seq_id = seq_id
        self.limit = limit or ctx.n_ctx
        self.shifts = shifts
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def free(self) -> int:
        return self.limit - len(self.tokens)

    def feed(self, tokens: list[int]) -> None:
        """Decode `tokens` after what the sequence holds; the last one's logits become current."""
        if not tokens:
            return
        if len(tokens) > self.free:
            raise EngineError(f"{len(tokens)} tokens do not fit the {self.free} free context slots")
        start = len(self.tokens)
        try:
            self.ctx.decode(tokens, start, self.seq_id)
        except BaseException:  # a failed decode, or Ctrl-C arriving as it returns
            self.ctx.remove(self.seq_id, start, -1)
            raise
        self.tokens.extend(tokens)

    def feed_embeddings(self, rows: np.ndarray) -> None:
        """Decode input embeddings (n, n_embd) after what the sequence holds, as LATENT cells."""
        if len(rows) > self.free:
            raise EngineError(f"{len(rows)} latents do not fit the {self.free} free context slots")
        start = len(self.tokens)
        try:
            self.ctx.decode_embeddings(rows, start, self.seq_id)
        except BaseException:
            self.ctx.remove(self.seq_id, start, -1)
            raise
        self.tokens.extend([LATENT] * len(rows))

    def move_tail(self, count: int, to: int) -> None:
        """Move the last `count` cells to positions to..to+count-1, shifting what was there up.

        llama.cpp decodes a sequence only at its end, so a block meant for the middle is decoded
        last and rotated into place: out of the way, the rest up, then down into the gap (each
        shift re-ropes the keys; shifts of a cell add up)."""
        n = len(self.tokens)
        if not 0 <= to <= n - count or count < 0:
            raise ValueError(f"cannot move {count} tail cells of {n} to {to}")
        if count == 0 or to == n - count:
            return
        parked = 2 * n + count
        self.ctx.shift(self.seq_id, n - count, n, parked)
        self.ctx.shift(self.seq_id, to, n - count, count)
        self.ctx.shift(self.seq_id, n - count + parked, n + parked, to - (n - count) - parked)
        block = self.tokens[n - count :]
        self.tokens[to:] = block + self.tokens[to : n - count]

    def extend_decoded(self, tokens: list[int]) -> None:
        """Record tokens that a multi-sequence batch decoded for this sequence."""
        self.tokens.extend(tokens)

    def copy_prefix_from(self, source: KVSequence, n_tokens: int) -> None:
        """Share the first `n_tokens` of `source` (a copy of cell tags, not of data)."""
        self.clear()
        self.ctx.copy(source.seq_id, self.seq_id, 0, n_tokens)
        self.tokens = source.tokens[:n_tokens]

    def drop(self, start: int, end: int) -> None:
        """Remove positions [start, end) and shift the rest down to close the gap."""
        if not 0 <= start <= end <= len(self.tokens):
            raise ValueError(f"bad span {start}..{end} of {len(self.tokens)} tokens")
        if start == end:
            return
        if not self.shifts:
            self._redecode_without(start, end)
            return
        self.ctx.remove(self.seq_id, start, end)
        self.ctx.shift(self.seq_id, end, -1, start - end)
        del self.tokens[start:end]

    def _redecode_without(self, start: int, end: int) -> None:
        after = self.tokens[end:]
        if LATENT in after:
            raise EngineError("latents cannot be re-decoded: this model's cache cannot shift")
        self.ctx.remove(self.seq_id, start, -1)
        del self.tokens[start:]
        self.feed(after)

    def clear(self) -> None:
        self.ctx.remove(self.seq_id, -1, -1)
        self.tokens = []

    def save(self, path: Path) -> int:
        """Write the KV state and tokens to `path`; returns the bytes written."""
        return self.ctx.save_sequence(path, self.tokens, self.seq_id)

    def load(self, path: Path) -> bool:
        """Replace the sequence with a saved one; False (and empty) when the file is unusable."""
        self.clear()
        tokens = self.ctx.load_sequence(path, self.seq_id)
        if tokens is None:
            return False
        self.tokens = tokens
        return True
