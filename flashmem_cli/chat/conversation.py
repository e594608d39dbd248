"""A conversation: a session on disk bound to a loaded model and its own llama.cpp context.

Each turn feeds only the text the conversation adds since the KV cache last took it in, then
saves the cache, so a turn resumed in another process costs only its own tokens.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashmem_cli import models
from flashmem_cli.chat.events import INSERTION, MemoryEvent, memory_events
from flashmem_cli.chat.interrupt import CtrlC
from flashmem_cli.chat.layout import (
    KVLayout,
    Message,
    conversation_messages,
    last_user_index,
    split_turns,
)
from flashmem_cli.chat.memory import ConversationMemory, MemoryOptions
from flashmem_cli.chat.reports import (
    ChatStats,
    MemoryReport,
    RoomMade,
    TurnMemory,
    latent_blocks,
)
from flashmem_cli.chat.saved import NEW, SavedState
from flashmem_cli.chat.window import Consolidate, DropOldest, KVWindow
from flashmem_cli.config import DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_N_PREDICT, default_threads
from flashmem_cli.engine import prompt as rendering
from flashmem_cli.engine.backend import Context, ContextParams
from flashmem_cli.engine.generate import stream_generate
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import LATENT, KVSequence
from flashmem_cli.engine.stops import StopFilter, tokens_before
from flashmem_cli.errors import ContextOverflow, FlashmemError, TemplateError
from flashmem_cli.memory.architecture import describe
from flashmem_cli.models import LoadedModel, chat_template_for, load_model
from flashmem_cli.store.sessions import Session, SessionStore


@dataclass(frozen=True)
class ChatOptions:
    """How to run a conversation; `None` means the session's own setting, then the default."""

    model: str | None = None
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None  # None: the free cores, asked again every turn (-t fixes it)
    n_batch: int = DEFAULT_BATCH
    n_predict: int = DEFAULT_N_PREDICT
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stateless: bool = False
    rebuild: bool = False
    memory: MemoryOptions = field(default_factory=lambda: MemoryOptions(enabled=False))


@dataclass
class TurnResult:
    reply: str
    prompt_text: str
    new_prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    finish_reason: str
    dropped_turns: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    reprocessed_tokens: int = 0  # of earlier turns, fed again because the template rewrote them
    memory: TurnMemory | None = None  # None when memory is off
    notices: list[str] = field(default_factory=list)  # repairs, a save that failed


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


class Conversation:
    """Use as a context manager; it owns the session lock and the llama.cpp context."""

    def __init__(
        self,
        session: Session,
        loaded: LoadedModel,
        options: ChatOptions,
        owns_model: bool = False,
        seq: KVSequence | None = None,
    ):
        """With `seq`, the conversation lives in one sequence of a shared context (batch runs)
        and may use `options.n_ctx` tokens of it; otherwise it gets a context of its own."""
        self.session = session
        self.loaded = loaded
        self.model = loaded.model
        self.options = options
        self._owns_model = owns_model
        self._owns_ctx = seq is None
        self.memory: ConversationMemory | None = None
        self._memory_off: str | None = None  # why memory could not run on this model
        self.arch = describe(self.model.info())
        if seq is None:
            n_ctx = options.n_ctx or session.meta.n_ctx or DEFAULT_CTX
            seq = KVSequence(self._own_context(n_ctx), shifts=self.arch.shifts)
        policy = DropOldest() if self.memory is None else Consolidate(self.memory, self._record)
        self.window = KVWindow(seq, policy)
        self.template = chat_template_for(self.model)
        self.saved = SavedState(session, loaded.file, self.window, self.memory, self.template)
        self.seq = seq
        self.ctx = seq.ctx
        self.n_ctx = seq.limit
        self.restore_ms = 0.0
        self._pending_restore_ms = 0.0
        self.notices: list[str] = list(session.notices)  # what was repaired, one line each
        if self._memory_off is not None:
            self.notices.append(f"memory is off: {self._memory_off}")
        try:
            self._start()
        except BaseException:
            self._release_kv()
            raise

    # -- lifecycle ------------------------------------------------------------------------------

    def _own_context(self, n_ctx: int) -> Context:
        """A context of the conversation's own, with the memory's attention tap when on."""
        params = ContextParams(
            n_ctx,
            n_batch=self.options.n_batch,
            n_threads=self.options.n_threads or default_threads(),
        )
        if not self.options.memory.enabled or self.options.stateless:
            return Context(self.model, params)
        self._memory_off = self.arch.memory_problem
        if self._memory_off is not None:
            return Context(self.model, params)
        self.memory = ConversationMemory(self.model, self.loaded.file, self.options.memory)
        ctx = Context(
            self.model,
            ContextParams(
                n_ctx,
                n_batch=self.options.n_batch,
                n_threads=self.options.n_threads or default_threads(),
                tap=self.memory.capture.tap,
            ),
        )
        self.memory.attach(ctx.n_ctx)  # llama.cpp pads the size it was asked for
        return ctx

    def _release_kv(self) -> None:
        if self.memory is not None:
            self.memory.close()
        if self._owns_ctx:
            self.ctx.close()
        else:
            self.seq.clear()

    @property
    def layout(self) -> KVLayout:
        return self.window.layout

    def _record(self, event: MemoryEvent) -> None:
        self.session.append(event.to_record())

    def close(self) -> None:
        self._release_kv()
        if self._owns_model:
            self.model.close()
        self.session.close()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        """Restore the saved KV state; rebuild it from the transcript when there is none to
        trust (never saved, missing, damaged, or made for another model or -c)."""
        if self.options.stateless:
            return
        start = time.perf_counter()
        why = "--rebuild" if self.options.rebuild else self.saved.restore(self.messages())
        if why is not None:
            self._replay(self.messages())
            if why != NEW:
                self._save()
            if why not in (NEW, "--rebuild"):
                self.notices.append(
                    f"session {self.session.name}: {why}; rebuilt the KV state from the "
                    f"transcript ({len(self.seq)} tokens re-processed)"
                )
        self.restore_ms = self._pending_restore_ms = _ms(start)

    # -- turns ----------------------------------------------------------------------------------

    def messages(self) -> list[Message]:
        return conversation_messages(self.session.records())

    def set_system_prompt(self, system: str) -> None:
        """Start the conversation with a system prompt; refused once it has begun without it."""
        messages = self.messages()
        if messages and messages[0] == {"role": "system", "content": system}:
            return
        if messages:
            raise FlashmemError(
                f"session {self.session.name} has already begun; its system prompt cannot change "
                "(/system in the chat changes it, re-processing the conversation)"
            )
        self._check_system_fits(system)
        self.session.append({"role": "system", "content": system})

    def change_system_prompt(self, system: str) -> int:
        """Give a conversation under way another system prompt (none when empty): the transcript
        records the change and the cache, whose pinned head holds the system prompt, is
        rebuilt from it. Returns the tokens re-processed."""
        messages = self.messages()
        current = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        if system == current:
            return 0
        if system:
            self._check_system_fits(system)
        self.session.append({"event": "system", "content": system})
        if self.options.stateless:
            return 0
        self._replay(self.messages())
        self._save_after_turn()
        return len(self.seq)

    def _check_system_fits(self, system: str) -> None:
        probe = [{"role": "system", "content": system}, {"role": "user", "content": ""}]
        rendered = rendering.render(self.template, probe, add_generation_prompt=True)
        head, _ = rendering.tokenize_head(self.model, rendered, 0, self.template.bos_token)
        pinned = len(head)
        if pinned > self.n_ctx // 2:
            raise ContextOverflow(
                f"the system prompt is {pinned} tokens; -c {self.n_ctx} allows at most "
                f"{self.n_ctx // 2} for it"
            )

    def undo(self, reason: str = "undo") -> Message:
        """Take back the last exchange (or a message that got no reply): the transcript records
        the undo and keeps what was said; the cache rolls back to before it. Returns the user
        message taken back."""
        messages = self.messages()
        index = last_user_index(messages)
        if index is None:
            raise FlashmemError("nothing to undo: no message since the start (or the last /reset)")
        self.session.append({"event": "undo", "for": reason})
        if self.options.stateless:
            return messages[index]
        if not self._roll_back(messages, index):
            self._replay(messages[:index])
            if len(self.seq) > self.layout.pinned:
                self.notices.append(
                    f"the exchange had left the cache; re-processed {len(self.seq)} tokens "
                    "to undo it"
                )
        self._save_after_turn()
        return messages[index]

    def _roll_back(self, messages: list[Message], index: int) -> bool:
        """Remove the last turn's block from the cache when it is the exchange from `index` on
        and is still there whole; False when the cache must be rebuilt instead."""
        layout = self.layout
        if layout.messages == index and layout.n_tokens == len(self.seq):
            return True  # never fed (a reply cut short before a restart): nothing to take back
        groups = split_turns(messages)
        whole = layout.messages == len(messages) and len(layout.turns) > 0
        if not whole or groups[-1][0] is not messages[index] or index == 0:
            return False
        self.window.rewind(len(layout.turns) - 1, 0)
        layout.messages = index
        return True

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """One turn: feed what is new, stream the reply, append both to the transcript, save."""
        turn = self.begin_turn(text)
        finish, first_token_ms = self.generate(turn, on_text)
        return self.finish_turn(turn, finish, first_token_ms)

    def begin_turn(self, text: str, tags: dict[str, Any] | None = None) -> PendingTurn:
        """Record the user's message and feed it (with anything the cache missed); the logits
        of the generation prompt are then current, ready for the first reply token. `tags`
        go into both transcript records of the turn (a batch run's request id)."""
        if self._owns_ctx and self.options.n_threads is None:
            self.ctx.set_threads(default_threads())  # before the clock: not part of the turn
        start = time.perf_counter()
        if self.options.stateless:
            self.window.reset()
        history = self.messages()
        if history and history[-1]["role"] == "user":
            history = history[:-1]  # a turn that failed before its reply: the transcript keeps it
        if self.layout.messages > len(history):  # a reset whose save was interrupted, or that turn
            self._replay(history)
        user: Message = {"role": "user", "content": text}
        dropped_before = self.layout.dropped, self.window.dropped_tokens
        events_before = len(self.memory.events) if self.memory else 0
        try:
            chunks = self._chunks(
                history[: self.layout.messages], history[self.layout.messages :], user
            )
        except TemplateError:  # the template rewrites earlier text: re-feed from the change
            chunks = self._turn_chunks(history + [user], prompt=True)
            self._check_fits(chunks)
            self.session.append({**user, **(tags or {})})
            reprocessed, new_prompt = self._resync(history + [user], chunks)
            chunks = chunks[-1:]  # the turn's own text, as the fast path reports it
        else:
            self.session.append({**user, **(tags or {})})
            reprocessed, new_prompt = 0, self._feed(chunks)
        return PendingTurn(
            start=start,
            messages=history + [user],
            prompt_text="".join(chunk.text for chunk in chunks),
            new_prompt_tokens=new_prompt,
            cached_tokens=len(self.seq) - new_prompt,
            dropped_before=dropped_before[0],
            dropped_tokens_before=dropped_before[1],
            reply_start=len(self.seq),
            prefill_ms=_ms(start),
            tags=tags or {},
            events_before=events_before,
            reprocessed_tokens=reprocessed,
        )

    def finish_turn(
        self,
        turn: PendingTurn,
        finish: str,
        first_token_ms: float,
        reply: list[int] | None = None,
    ) -> TurnResult:
        """The reply is what the cache holds after the prompt (or `reply`, when a batch decoded
        it: the cache is brought in line first): record it, close it, save."""
        if reply is not None:
            self.window.settle_reply(turn.reply_start, reply)
        generated = self.seq.tokens[turn.reply_start :]
        reply_tokens = [token for token in generated if token != LATENT]
        reply_message: Message = {
            "role": "assistant",
            "content": self.model.detokenize(reply_tokens),
        }
        usage = {"prompt_tokens": turn.reply_start, "completion_tokens": len(reply_tokens)}
        record = {**reply_message, **turn.tags, "finish_reason": finish}
        self.session.append({**record, "usage": usage} if turn.tags else record)
        reprocessed = self._close_reply(turn.messages + [reply_message], len(generated))
        if not self.options.stateless:
            self._save_after_turn()
        restore_ms, self._pending_restore_ms = self._pending_restore_ms, 0.0
        notices, self.notices = self.notices, []
        return TurnResult(
            reply=reply_message["content"],
            prompt_text=turn.prompt_text,
            new_prompt_tokens=turn.new_prompt_tokens,
            cached_tokens=turn.cached_tokens,
            reprocessed_tokens=turn.reprocessed_tokens + reprocessed,
            generated_tokens=len(reply_tokens),
            finish_reason=finish,
            dropped_turns=self.layout.dropped - turn.dropped_before,
            memory=self._turn_memory(turn),
            notices=notices,
            timings_ms={
                "restore": restore_ms,
                "prefill": turn.prefill_ms,
                "ttft": round(restore_ms + first_token_ms, 2),
                "total": round(restore_ms + _ms(turn.start), 2),
            },
        )

    def room_made(self, turn: PendingTurn) -> RoomMade:
        """What left the cache so far in this turn to make room: said before the reply."""
        events = self.memory.events[turn.events_before :] if self.memory else []
        return RoomMade(
            consolidations=[e for e in events if e.kind != INSERTION],
            dropped_turns=self.layout.dropped - turn.dropped_before,
            dropped_tokens=self.window.dropped_tokens - turn.dropped_tokens_before,
        )

    def memory_report(self) -> MemoryReport:
        """What /memory shows: settings, the latent blocks in the cache, every memory event."""
        settings: dict[str, Any] = {"memory": "on" if self.memory else "off"}
        if self.memory is not None:
            settings.update(self.memory.settings())
        settings.update(
            {
                "kv_tokens": len(self.seq),
                "memory_tokens": self.layout.memory,
                "turns_consolidated": self.layout.consolidated,
            }
        )
        events = memory_events(self.session.records())
        return MemoryReport(settings, latent_blocks(self.seq.tokens), events)

    def score_reply(self, question: str, answer: str) -> list[float]:
        """Teacher-forced log-probabilities of `answer`'s tokens as the reply to `question`,
        each given the ones before; the cache and the transcript are left as they were."""
        asked: Message = {"role": "user", "content": question}
        text = rendering.delta(self.template, self.messages(), [asked], add_generation_prompt=True)
        prompt, target = rendering.tokenize(self.model, text), self.model.tokenize(answer)
        if len(prompt) + len(target) > self.seq.free:
            raise ContextOverflow(
                f"the probe needs {len(prompt) + len(target)} tokens; {self.seq.free} are free"
            )
        mark = len(self.seq)
        scores = []
        try:
            self.seq.feed(prompt)
            for token in target:
                scores.append(log_softmax_at(self.ctx.logits_view(), token))
                self.seq.feed([token])
        finally:
            self.window.remove_tail(mark)
        return scores

    def _turn_memory(self, turn: PendingTurn) -> TurnMemory | None:
        if self.memory is None:
            return None
        return TurnMemory(
            self.memory.events[turn.events_before :],
            self.memory.reply_entropies,
            self.memory.reply_triggers,
        )

    def reset(self) -> None:
        """Start over: the transcript keeps everything, the KV cache forgets it."""
        self.session.append({"event": "reset"})
        self.window.reset()
        if not self.options.stateless:
            self._save()

    def stats(self) -> ChatStats:
        return ChatStats(
            session=self.session.name,
            model=self.loaded.file.name,
            n_ctx=self.n_ctx,
            kv_tokens=len(self.seq),
            pinned_tokens=self.layout.pinned,
            turns_in_kv=len(self.layout.turns),
            turns_dropped=self.layout.dropped,
            turns_consolidated=self.layout.consolidated,
            memory_tokens=self.layout.memory,
            messages=len(self.messages()),
            template=self.template.name,
        )

    # -- feeding --------------------------------------------------------------------------------

    def _chunks(
        self, fed: list[Message], unfed: list[Message], user: Message | None
    ) -> list[_Chunk]:
        """Tokenized text of each turn not yet in the KV cache; the user's turn, if any, last
        and ending in the generation prompt. Raises before anything is written if it cannot fit."""
        groups = split_turns(unfed + ([user] if user else []))
        if groups and [m["role"] for m in groups[-1]] == ["system"]:
            groups.pop()  # a system prompt alone waits for the first user message
        chunks = []
        for i, group in enumerate(groups):
            prompt = user is not None and i == len(groups) - 1
            text = rendering.delta(self.template, fed, group, add_generation_prompt=prompt)
            first = not self.seq.tokens and i == 0
            system = len(fed) if group[0]["role"] == "system" else None
            chunks.append(self._tokenize(text, group, system if first else -1, prompt=prompt))
            fed = fed + group
        if user is not None:
            self._check_fits(chunks)
        return chunks

    def _tokenize(
        self, text: rendering.Rendered, group: list[Message], system: int | None, prompt: bool
    ) -> _Chunk:
        """A turn's tokens; the conversation's first (`system` not -1: the index of its system
        message, or None) also gets its pinned head, BOS and system prompt."""
        if system == -1:
            return _Chunk(group, text.text, [], rendering.tokenize(self.model, text), prompt)
        bos = self.template.bos_token
        pinned, rest = rendering.tokenize_head(self.model, text, system, bos)
        return _Chunk(group, text.text, pinned, rest, prompt)

    def _check_fits(self, chunks: list[_Chunk]) -> None:
        """The user's own turn must fit beside the pinned head, or nothing is done at all."""
        final = chunks[-1]
        pinned = len(chunks[0].pinned) or self.layout.pinned
        room = self.n_ctx - pinned - 1  # memory and older turns leave the cache if need be
        if len(final.tokens) > room:
            raise ContextOverflow(
                f"this message needs {len(final.tokens)} tokens but -c {self.n_ctx} leaves "
                f"room for {room}; use a larger -c or a shorter message"
            )

    def _feed(self, chunks: list[_Chunk]) -> int:
        """Feed the turns not yet in the cache; the window makes room. Returns tokens fed. A
        feed that fails leaves an empty cache, which the next turn fills from the transcript."""
        self.layout.messages += sum(len(chunk.group) for chunk in chunks)
        reserve = self._generation_reserve() if chunks and chunks[-1].prompt else 0
        head = chunks[0].pinned if chunks else []
        try:
            return self.window.feed(head, [chunk.tokens for chunk in chunks], reserve)
        except BaseException:
            self.window.reset()
            raise

    def _generation_reserve(self) -> int:
        limit = self.n_ctx // 4
        return min(self.options.n_predict, limit) if self.options.n_predict > 0 else limit

    def generate(
        self, turn: PendingTurn, on_text: Callable[[str], None] | None = None
    ) -> tuple[str, float]:
        """Stream the reply into the cache; returns (finish reason, ms to first token). A reply
        that reaches one of the template's stop strings ends there, and the cache is cut to
        the tokens before it."""
        start = turn.start
        first_token_ms: float | None = None
        finish = "stop"
        sampler = Sampler(self.options.sampling)
        stops = StopFilter(self.template.stop)
        after_feed = None
        if self.memory is not None:
            self.memory.begin_reply()
            after_feed = self._after_reply_token
        try:
            with CtrlC() as ctrl_c:
                for response in stream_generate(
                    self.seq, sampler, self.options.n_predict, after_feed
                ):
                    if first_token_ms is None:
                        first_token_ms = _ms(start)
                    shown = stops.push(response.text)
                    if shown and on_text:
                        on_text(shown)
                    finish = response.finish_reason or finish
                    if stops.stopped:
                        finish = "stop"
                        break
                    if ctrl_c.pressed:
                        finish = "interrupted"
                        break
        except KeyboardInterrupt:
            finish = "interrupted"
        finally:
            sampler.close()
        if stops.stopped:
            self._cut_reply(turn.reply_start, stops.text)
        elif on_text and (rest := stops.flush()):
            on_text(rest)
        return finish, first_token_ms or _ms(start)

    def _cut_reply(self, reply_start: int, text: str) -> None:
        """Make the cache hold the reply as `text` (cut at a stop string): its tokens past the
        last one wholly inside `text` are removed, and the rest of `text` (the start of the
        token that began the stop string: "!" of "!\n") is fed as tokens of its own. Space
        before the stop string is not part of the reply."""
        text = text.rstrip()
        held = self.seq.tokens[reply_start:]
        words = [token for token in held if token != LATENT]
        keep = tokens_before(self.model.token_bytes, words, text)
        cells = next((i for i, n in enumerate(_running_count(held)) if n == keep), len(held))
        if reply_start + cells < len(self.seq):
            self.window.remove_tail(reply_start + cells)
        if self.memory is not None:
            self.memory.cut_reply(keep)
        kept_text = self.model.detokenize(words[:keep])
        rest = text[len(kept_text) :] if text.startswith(kept_text) else ""
        tokens = self.model.tokenize(rest) if rest else []
        if len(tokens) < self.seq.free:
            for step, token in enumerate(
                tokens, start=keep
            ):  # as if generated: the monitor reads them
                self.seq.feed([token])
                self._after_reply_token(step)

    def _after_reply_token(self, step: int) -> None:
        self.window.policy.after_reply_token(self.seq, step)

    def _close_reply(self, messages: list[Message], generated: int) -> int:
        """Feed the template's end-of-reply text now, so the next turn feeds only its own.
        Returns the tokens re-fed because the template renders the reply otherwise than it
        was generated (from the first token that differs)."""
        try:
            ending = rendering.reply_closing(self.template, messages)
        except TemplateError:
            if not self.layout.turns:  # the turn already left the cache: so does its reply
                self.window.close_reply([], generated)
                return 0
            self.layout.turns[-1] += generated
            self.layout.messages += 1
            if self.options.stateless:  # the next turn starts from an empty cache anyway
                return 0
            return self._resync(messages, self._settled_chunks(messages))[0]
        self.window.close_reply(rendering.tokenize(self.model, ending), generated)
        return 0

    # -- templates that rewrite earlier text ----------------------------------------------------

    def _turn_chunks(self, messages: list[Message], prompt: bool) -> list[_Chunk]:
        """Every turn of `messages` from one rendering, cut turn by turn (prompt.turn_texts)."""
        groups = split_turns(messages)
        sizes = [len(group) for group in groups]
        texts = rendering.turn_texts(self.template, messages, sizes, prompt)
        system = 0 if messages and messages[0]["role"] == "system" else None
        return [
            self._tokenize(text, group, system if i == 0 else -1, prompt and i == len(texts) - 1)
            for i, (text, group) in enumerate(zip(texts, groups, strict=True))
        ]

    def _settled_chunks(self, messages: list[Message]) -> list[_Chunk]:
        """The turns of `messages` as the next turn will render them: a template may render a
        conversation that ends in a reply otherwise (Qwen3's think block, Phi-3's EOS,
        Mistral's system prompt)."""
        if not messages or messages[-1]["role"] != "assistant":
            return self._turn_chunks(messages, prompt=False)
        return self._turn_chunks([*messages, rendering.NEXT_TURN], prompt=False)[:-1]

    def _resync(self, messages: list[Message], chunks: list[_Chunk]) -> tuple[int, int]:
        """Make the cache hold `chunks` (every turn of `messages`): the cached turns are compared
        with their new tokens, the cache is cut at the first token that differs, and fed from
        there (llama-server's prompt cache does the same). What left the cache - dropped
        turns, turns consolidated into memory - and, once anything has, the pinned head stay as
        first rendered: they cannot be re-processed. Returns (cached tokens the rewrite
        replaced, tokens fed)."""
        try:
            return self._rewind_and_feed(messages, chunks)
        except BaseException:  # the layout may no longer match the turns: start over next turn
            self.window.reset()
            raise

    def _rewind_and_feed(self, messages: list[Message], chunks: list[_Chunk]) -> tuple[int, int]:
        layout = self.layout
        fed_turns = len(split_turns(messages[: layout.messages]))
        first = fed_turns - len(layout.turns)  # the oldest turn still in the cache
        whole = first == 0 and layout.memory == 0
        if whole and self.seq.tokens[: layout.pinned] != chunks[0].pinned:
            return self._refeed_all(messages, chunks)
        position = layout.pinned + layout.memory
        for k, chunk in enumerate(chunks[first:fed_turns]):
            held = self.seq.tokens[position : position + layout.turns[k]]
            if held != chunk.tokens:
                kept = _common_prefix(held, chunk.tokens)
                before = len(self.seq)
                self.window.rewind(k, kept)
                replaced = before - len(self.seq)
                fed = self._feed_rest(chunk.tokens[kept:], chunks[first + k + 1 :], kept > 0)
                layout.messages = len(messages)
                return replaced, fed
            position += layout.turns[k]
        fed = self._feed_rest([], chunks[fed_turns:], False)
        layout.messages = len(messages)
        return 0, fed

    def _feed_rest(self, rest: list[int], chunks: list[_Chunk], continues: bool) -> int:
        """Feed the rest of a rewound turn (`continues`: its kept start is still cached), then
        whole turns."""
        if continues:
            self.window.extend_last_turn(rest)
        elif rest:
            chunks = [_Chunk([], "", [], rest, False), *chunks]
        reserve = self._generation_reserve() if chunks and chunks[-1].prompt else 0
        extended = len(rest) if continues else 0
        return extended + self.window.feed([], [c.tokens for c in chunks], reserve)

    def _refeed_all(self, messages: list[Message], chunks: list[_Chunk]) -> tuple[int, int]:
        """The pinned head itself was rewritten while nothing has left the cache: start over."""
        before = len(self.seq)
        self.window.reset()
        reserve = self._generation_reserve() if chunks[-1].prompt else 0
        fed = self.window.feed(chunks[0].pinned, [c.tokens for c in chunks], reserve)
        self.layout.messages = len(messages)
        return min(before, fed), fed

    def _replay(self, messages: list[Message]) -> None:
        """Feed a transcript's turns into an empty cache (a first start, a rebuild). A replay
        cut short leaves the cache empty, for the next turn to replay again."""
        self.window.reset()
        try:
            chunks = self._chunks([], messages, None)
        except TemplateError:  # the template rewrites earlier text: one rendering, cut
            if messages and messages[-1]["role"] == "system":
                messages = messages[:-1]  # a system prompt alone waits for the first message
            if messages:
                try:
                    self._refeed_all(messages, self._settled_chunks(messages))
                except BaseException:
                    self.window.reset()
                    raise
            return
        self._feed(chunks)

    def recover(self) -> None:
        """After an interruption at an unknown point: forget the cache, which the next turn
        rebuilds from the transcript (nothing said is lost)."""
        self.window.reset()

    def _save_after_turn(self) -> None:
        """The transcript already holds the turn, so a save that fails (a full disk) loses
        nothing: the saved state stays the previous one, and the next start feeds it what it
        lacks. Said in a notice rather than failing a turn that happened."""
        try:
            self._save()
        except OSError as exc:
            self.notices.append(
                f"could not save the KV state ({exc.strerror or exc}); the turn is in the "
                "transcript, and the next turn re-processes what the saved state lacks"
            )

    def _save(self) -> None:
        self.saved.save(self.messages()[: self.layout.messages])


@dataclass(frozen=True)
class PendingTurn:
    """A turn whose prompt is fed and whose reply is being generated into the cache."""

    start: float
    messages: list[Message]
    prompt_text: str
    new_prompt_tokens: int
    cached_tokens: int
    dropped_before: int
    reply_start: int
    prefill_ms: float
    tags: dict[str, Any] = field(default_factory=dict)
    events_before: int = 0
    reprocessed_tokens: int = 0
    dropped_tokens_before: int = 0


@dataclass
class _Chunk:
    group: list[Message]
    text: str
    pinned: list[int]  # the never-dropped head, only on a conversation's first chunk
    tokens: list[int]
    prompt: bool  # ends in the generation prompt


def _running_count(held: list[int]) -> list[int]:
    """For each cell of a reply, how many word tokens (not latents) came before it."""
    counts, n = [], 0
    for token in held:
        counts.append(n)
        n += token != LATENT
    return counts


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token] - top - np.log(np.exp(logits - top).sum()))


def open_conversation(
    store: SessionStore, name: str, options: ChatOptions, system: str | None = None
) -> Conversation:
    """Lock the session, load its model (`-m`, else the one it was made with), restore its KV.
    A session created here is removed again if this fails before anything was said in it."""
    created = not store.exists(name)
    session = store.open(name)
    try:
        stored_model = session.meta.model.path if session.meta.model else None
        loaded = load_model(models.resolve(options.model or stored_model), options.n_gpu_layers)
        try:
            conversation = Conversation(session, loaded, options, owns_model=True)
        except BaseException:
            loaded.model.close()
            raise
        try:
            if system is not None:
                conversation.set_system_prompt(system)
        except BaseException:
            conversation.close()
            raise
        return conversation
    except BaseException:
        session.close()
        if created and not session.records():
            shutil.rmtree(session.dir, ignore_errors=True)
        raise
