"""A conversation's KV window: one sequence's cache laid out as pinned head | memory region |
turns, and the one place that decides what leaves it when it fills.

Two fill policies share one interface, as mlx-lm's `KVCache` and `RotatingKVCache` do:
`DropOldest` removes the oldest whole turns (`--no-memory`); `Consolidate` (FlashMem memory)
first folds them into the memory region — their best-scored positions plus latents — and drops
only what folding cannot make room for. The transcript keeps everything either way.
"""

from __future__ import annotations

from collections.abc import Callable

from flashmem_cli.chat.events import MemoryEvent
from flashmem_cli.chat.layout import KVLayout
from flashmem_cli.chat.memory import ConversationMemory
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.errors import EngineError
from flashmem_cli.memory.budget import PROTECTED_TURNS, turns_to_consolidate
from flashmem_cli.memory.monitor import DEFAULT_SINKS


class DropOldest:
    """Room is made by removing the oldest whole turns; nothing is folded."""

    folds = False

    def remove(self, seq: KVSequence, start: int, end: int) -> None:
        seq.drop(start, end)

    def fold(self, window: KVWindow, needed: int) -> None:
        """Make `needed` more tokens fit the budget by folding old turns: nothing to fold."""

    def after_decode(self) -> None:
        """After each decode of the conversation's own tokens."""

    def after_reply_token(self, seq: KVSequence, step: int) -> None:
        """After each reply token is decoded."""

    def reset(self) -> None:
        """The cache was cleared."""


class Consolidate(DropOldest):
    """FlashMem memory: before a feed would pass the budget, the oldest turns (never the last
    two, never the pinned head or the first sink positions) are folded into the memory region;
    the memory region is folded again when it outgrows half the budget."""

    folds = True

    def __init__(self, memory: ConversationMemory, record: Callable[[MemoryEvent], None]):
        self.memory = memory
        self.record = record  # events go to the transcript

    def remove(self, seq: KVSequence, start: int, end: int) -> None:
        self.memory.drop(seq, start, end)

    def fold(self, window: KVWindow, needed: int) -> None:
        layout, memory = window.layout, self.memory
        self._fold_turns(window, needed, memory.budget_tokens, PROTECTED_TURNS)
        if len(window.seq) + needed > window.n_ctx:  # the last turns would be dropped: fold them
            self._fold_turns(window, needed, window.n_ctx, protected=0)
        too_full = len(window.seq) + needed > window.n_ctx
        if layout.memory > memory.budget_tokens // 2 or (too_full and layout.memory):
            self._fold_span(
                window, max(layout.pinned, DEFAULT_SINKS), layout.pinned + layout.memory
            )

    def _fold_turns(self, window: KVWindow, needed: int, limit: int, protected: int) -> None:
        """Fold the oldest turns (not the last `protected`) until `needed` more fit `limit`."""
        layout, memory = window.layout, self.memory
        count = turns_to_consolidate(
            layout.pinned + layout.memory,
            layout.turns,
            needed,
            limit,
            memory.options.keep_ratio,
            memory.latents_at_budget,
            protected,
        )
        if count:
            start = max(layout.pinned + layout.memory, DEFAULT_SINKS)
            end = layout.pinned + layout.memory + sum(layout.turns[:count])
            self._fold_span(window, start, end, turns=count)

    def _fold_span(self, window: KVWindow, start: int, end: int, turns: int = 0) -> None:
        """Fold positions [start, end) - whole turns, or the memory region's end - into memory."""
        layout, seq = window.layout, window.seq
        if end - start <= self.memory.latents_at_budget:
            return
        before = len(seq)
        event = self.memory.consolidate(seq, start, end, "turns" if turns else "memory", turns)
        # what stays of the span joins the memory region, which ends where the span ended
        layout.memory = end - (before - len(seq)) - layout.pinned
        del layout.turns[:turns]
        layout.consolidated += turns
        self.record(event)

    def after_decode(self) -> None:
        self.memory.note_decode()

    def after_reply_token(self, seq: KVSequence, step: int) -> None:
        """The Cognitive Monitor reads each reply token; latents go in where it fires (when
        in-reply insertion is on and they fit)."""
        memory = self.memory
        memory.note_decode()
        if not memory.observe_token(step) or not memory.options.inject_in_reply:
            return
        if memory.latents_in_reply and seq.free > memory.latents_in_reply + 1:
            self.record(memory.inject(seq, step))

    def reset(self) -> None:
        self.memory.reset()


FillPolicy = DropOldest  # the interface; Consolidate is the other implementation


class KVWindow:
    """One sequence's cache and its layout, kept in step; every removal goes through here."""

    def __init__(self, seq: KVSequence, policy: FillPolicy):
        self.seq = seq
        self.policy = policy
        self.layout = KVLayout()
        self.dropped_tokens = 0  # of turns and memory dropped whole, since this window was made

    @property
    def n_ctx(self) -> int:
        return self.seq.limit

    def feed(self, head: list[int], turns: list[list[int]], reserve: int) -> int:
        """Feed `head` (the pinned BOS and system prompt, on a first feed) and whole turns after
        what the cache holds, leaving `reserve` tokens free after the last; older turns leave
        (folded or dropped) to make room, then the oldest of these. Returns the tokens fed."""
        if head:
            self.layout.pinned = len(head)
        if self.policy.folds:
            return self._feed_each(head, turns, reserve)
        return self._feed_all(head, turns, reserve)

    def close_reply(self, closing: list[int], generated: int) -> None:
        """Feed the template's end-of-reply tokens, so the next turn feeds only its own; the
        reply's `generated` cells join the last turn."""
        self._make_room(len(closing), keep_last=True)
        if len(closing) <= self.seq.free and self.layout.turns:
            self.seq.feed(closing)
            self.policy.after_decode()
            self.layout.turns[-1] += generated + len(closing)
        else:  # no room even alone: this turn leaves the cache too (the transcript keeps it)
            self.dropped_tokens += len(self.seq) - self.layout.pinned
            self.remove_tail(self.layout.pinned)
            self.layout.turns = []
            self.layout.memory = 0
            self.layout.dropped += 1
        self.layout.messages += 1

    def rewind(self, turn: int, kept: int) -> None:
        """Remove turn `turn` (an index into layout.turns) from its `kept`-th token on, and
        every turn after it: a template rewrote them. The kept tokens stay a turn of their own
        for `extend_last_turn` to complete (none: the turn leaves whole)."""
        start = self.layout.pinned + self.layout.memory + sum(self.layout.turns[:turn])
        if start + kept < len(self.seq):
            self.remove_tail(start + kept)
        self.layout.turns[turn:] = [kept] if kept else []

    def extend_last_turn(self, tokens: list[int]) -> None:
        """Feed `tokens` as the rest of the last turn (older turns leave to make room)."""
        if not tokens:
            return
        self._make_room(len(tokens), keep_last=True)
        self.seq.feed(tokens)
        self.policy.after_decode()
        self.layout.turns[-1] += len(tokens)

    def settle_reply(self, reply_start: int, reply: list[int]) -> None:
        """Make the cache hold exactly `reply` after `reply_start`: feed the last token a batch
        sampled but did not decode, remove what follows a cut (a stop string)."""
        held = self.seq.tokens[reply_start:]
        common = min(len(held), len(reply))
        if held[:common] != reply[:common]:
            raise EngineError("internal: the cache holds another reply than the one given")
        if len(held) > len(reply):
            self.remove_tail(reply_start + len(reply))
        self.seq.feed(reply[len(held) :])

    def remove_tail(self, start: int) -> None:
        self.policy.remove(self.seq, start, len(self.seq))

    def reset(self) -> None:
        self.seq.clear()
        self.layout = KVLayout()
        self.policy.reset()

    def check(self) -> None:
        if self.layout.n_tokens != len(self.seq):
            raise EngineError(
                f"internal: layout counts {self.layout.n_tokens} tokens, cache holds {len(self.seq)}"
            )

    def _feed_all(self, head: list[int], turns: list[list[int]], reserve: int) -> int:
        """Everything in one decode, after dropping the oldest turns (cached ones first, then
        the oldest of these) until it fits."""
        kept = list(turns)

        def needed() -> int:
            return len(head) + sum(len(tokens) for tokens in kept) + reserve

        self._make_room(needed())
        if len(self.seq) + needed() - reserve > self.n_ctx:
            self._drop_memory_region()
        while kept and len(self.seq) + needed() - (reserve if len(kept) == 1 else 0) > self.n_ctx:
            self.dropped_tokens += len(kept.pop(0))  # a turn never fed: the transcript has it
            self.layout.dropped += 1
        tokens = head + [token for turn in kept for token in turn]
        self.seq.feed(tokens)
        self.layout.turns.extend(len(turn) for turn in kept)
        return len(tokens)

    def _feed_each(self, head: list[int], turns: list[list[int]], reserve: int) -> int:
        """Turn by turn, folding old turns whenever the next would pass the budget; dropping
        only what folding cannot make room for."""
        fed = 0
        for i, turn in enumerate(turns):
            tokens = (head if i == 0 else []) + turn
            needed = len(tokens) + (reserve if i == len(turns) - 1 else 0)
            self.policy.fold(self, needed)
            self._make_room(needed)
            if len(self.seq) + len(tokens) > self.n_ctx:
                self._drop_memory_region()
            fits = len(self.seq) + len(tokens) <= self.n_ctx
            if not fits:  # a turn never fed (never the user's own: it was checked to fit)
                tokens = tokens[: len(head)] if i == 0 else []
                self.layout.dropped += 1
                self.dropped_tokens += len(turn)
            if tokens:
                self.seq.feed(tokens)
                self.policy.after_decode()
            if fits:
                self.layout.turns.append(len(turn))
            fed += len(tokens)
        return fed

    def _make_room(self, needed: int, keep_last: bool = False) -> None:
        """Drop the oldest whole turns until `needed` more tokens fit."""
        keep = 1 if keep_last else 0
        while len(self.layout.turns) > keep and len(self.seq) + needed > self.n_ctx:
            start, end = self.layout.oldest_turn_span()
            self.policy.remove(self.seq, start, end)
            self.layout.turns.pop(0)
            self.layout.dropped += 1
            self.dropped_tokens += end - start

    def _drop_memory_region(self) -> None:
        """The last resort before a turn could not be fed: memory leaves the cache too."""
        start, end = self.layout.pinned, self.layout.pinned + self.layout.memory
        if start < end:
            self.policy.remove(self.seq, start, end)
            self.layout.memory = 0
            self.dropped_tokens += end - start
