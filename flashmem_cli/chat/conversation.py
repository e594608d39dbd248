"""A conversation: a session on disk bound to a loaded model and its own llama.cpp context.

Each turn feeds only the text the conversation adds since the KV cache last took it in, then
saves the cache, so a turn resumed in another process costs only its own tokens.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashmem_cli import models
from flashmem_cli.chat.layout import (
    KVLayout,
    Message,
    conversation_messages,
    split_turns,
    tokens_digest,
)
from flashmem_cli.chat.memory import ConversationMemory, MemoryOptions
from flashmem_cli.config import DEFAULT_BATCH, DEFAULT_CTX, DEFAULT_N_PREDICT, default_threads
from flashmem_cli.engine import prompt as rendering
from flashmem_cli.engine.backend import Context, ContextParams, Model
from flashmem_cli.engine.generate import stream_generate
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import LATENT, KVSequence
from flashmem_cli.engine.templates import ChatTemplate, select_template
from flashmem_cli.errors import ContextOverflow, EngineError, FlashmemError
from flashmem_cli.memory.budget import turns_to_consolidate
from flashmem_cli.memory.monitor import DEFAULT_SINKS
from flashmem_cli.models import ModelFile
from flashmem_cli.store.sessions import Session, SessionStore, StoredFile


@dataclass(frozen=True)
class ChatOptions:
    """How to run a conversation; `None` means the session's own setting, then the default."""

    model: str | None = None
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int = field(default_factory=default_threads)
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
    memory: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # repairs, a save that failed


@dataclass
class LoadedModel:
    file: ModelFile
    model: Model
    load_ms: float


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
        if seq is None:
            n_ctx = options.n_ctx or session.meta.get("n_ctx") or DEFAULT_CTX
            seq = KVSequence(self._own_context(n_ctx))
        self.seq = seq
        self.ctx = seq.ctx
        self.n_ctx = seq.limit
        self.template = chat_template_for(self.model)
        self.layout = KVLayout()
        self.restore_ms = 0.0
        self._pending_restore_ms = 0.0
        self.notices: list[str] = list(session.notices)  # what was repaired, one line each
        try:
            self._start()
        except BaseException:
            self._release_kv()
            raise

    # -- lifecycle ------------------------------------------------------------------------------

    def _own_context(self, n_ctx: int) -> Context:
        """A context of the conversation's own, with the memory's attention tap when on."""
        params = ContextParams(
            n_ctx, n_batch=self.options.n_batch, n_threads=self.options.n_threads
        )
        if not self.options.memory.enabled or self.options.stateless:
            return Context(self.model, params)
        self.memory = ConversationMemory(self.model, self.loaded.file, self.options.memory)
        ctx = Context(
            self.model,
            ContextParams(
                n_ctx,
                n_batch=self.options.n_batch,
                n_threads=self.options.n_threads,
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
        kv = self.session.meta.get("kv")
        why = "--rebuild" if self.options.rebuild else self._restore(kv) if kv else "new"
        if why is not None:
            self._replay(self.messages())
            if why != "new":
                self._save()
            if why not in ("new", "--rebuild"):
                self.notices.append(
                    f"session {self.session.name}: {why}; rebuilt the KV state from the "
                    f"transcript ({len(self.seq)} tokens re-processed)"
                )
        self.restore_ms = self._pending_restore_ms = _ms(start)

    def _restore(self, kv: dict[str, Any]) -> str | None:
        """Load the KV record's state; None when done, else why it cannot be used."""
        try:
            why = self._stale(kv)
            layout = KVLayout.from_dict(kv["layout"])
            state = StoredFile.from_dict(kv["state"])
            memory = StoredFile.from_dict(kv["memory"]) if kv.get("memory") else None
            recorded = (int(kv["n_tokens"]), str(kv["digest"]))
        except (KeyError, TypeError, ValueError):
            return "its meta.json has a damaged or older KV record"
        if why is not None:
            return why
        path = self.session.verified(state)
        if path is None:
            return f"{state.name} is missing or damaged (its size or CRC32 differs from meta.json)"
        if not self.seq.load(path):
            return f"llama.cpp could not read {state.name}"
        if recorded != (len(self.seq), tokens_digest(self.seq.tokens)) or layout.n_tokens != len(
            self.seq
        ):
            self.seq.clear()
            return f"{state.name} does not hold the tokens meta.json records"
        self.layout = layout
        if self.memory is not None:
            self.memory.load(self.session.verified(memory) if memory else None, self.seq)
        return None

    def _stale(self, kv: dict[str, Any]) -> str | None:
        """Why a KV record was made for another model or context size, if it was."""
        if kv["fingerprint"] != self.loaded.file.fingerprint:
            return f"its KV state was made by model {kv['model']}, not {self.loaded.file.name}"
        if kv["n_ctx"] != self.n_ctx:
            return f"its KV state was made with -c {kv['n_ctx']}, not -c {self.n_ctx}"
        return None

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
                "(start a new session, or /reset first)"
            )
        probe = [{"role": "system", "content": system}, {"role": "user", "content": ""}]
        rendered = rendering.render(self.template, probe, add_generation_prompt=True)
        head, _ = rendering.tokenize_head(self.model, rendered, 0, self.template.bos_token)
        pinned = len(head)
        if pinned > self.n_ctx // 2:
            raise ContextOverflow(
                f"the system prompt is {pinned} tokens; -c {self.n_ctx} allows at most "
                f"{self.n_ctx // 2} for it"
            )
        self.session.append({"role": "system", "content": system})

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """One turn: feed what is new, stream the reply, append both to the transcript, save."""
        turn = self.begin_turn(text)
        finish, first_token_ms = self.generate(turn, on_text)
        return self.finish_turn(turn, finish, first_token_ms)

    def begin_turn(self, text: str, tags: dict[str, Any] | None = None) -> PendingTurn:
        """Record the user's message and feed it (with anything the cache missed); the logits
        of the generation prompt are then current, ready for the first reply token. `tags`
        go into both transcript records of the turn (a batch run's request id)."""
        start = time.perf_counter()
        if self.options.stateless:
            self.seq.clear()
            self.layout = KVLayout()
        history = self.messages()
        if self.layout.messages > len(history):  # a reset whose save was interrupted
            self._replay(history)
        user: Message = {"role": "user", "content": text}
        chunks = self._chunks(
            history[: self.layout.messages], history[self.layout.messages :], user
        )
        self.session.append({**user, **(tags or {})})
        dropped_before = self.layout.dropped
        events_before = len(self.memory.events) if self.memory else 0
        new_prompt = self._feed(chunks)
        return PendingTurn(
            start=start,
            messages=history + [user],
            prompt_text="".join(chunk.text for chunk in chunks),
            new_prompt_tokens=new_prompt,
            cached_tokens=len(self.seq) - new_prompt,
            dropped_before=dropped_before,
            reply_start=len(self.seq),
            prefill_ms=_ms(start),
            tags=tags or {},
            events_before=events_before,
        )

    def finish_turn(self, turn: PendingTurn, finish: str, first_token_ms: float) -> TurnResult:
        """The reply is what the cache holds after the prompt: record it, close it, save."""
        generated = self.seq.tokens[turn.reply_start :]
        reply_tokens = [token for token in generated if token != LATENT]
        reply_message: Message = {
            "role": "assistant",
            "content": self.model.detokenize(reply_tokens),
        }
        usage = {"prompt_tokens": turn.reply_start, "completion_tokens": len(reply_tokens)}
        record = {**reply_message, **turn.tags, "finish_reason": finish}
        self.session.append({**record, "usage": usage} if turn.tags else record)
        self._close_reply(turn.messages + [reply_message], len(generated))
        if not self.options.stateless:
            self._save_after_turn()
        restore_ms, self._pending_restore_ms = self._pending_restore_ms, 0.0
        notices, self.notices = self.notices, []
        return TurnResult(
            reply=reply_message["content"],
            prompt_text=turn.prompt_text,
            new_prompt_tokens=turn.new_prompt_tokens,
            cached_tokens=turn.cached_tokens,
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

    def memory_report(self) -> dict[str, Any]:
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
        events = [r for r in self.session.records() if r.get("event") == "memory"]
        return {
            "settings": settings,
            "latent_blocks": latent_blocks(self.seq.tokens),
            "events": events,
        }

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
            self._remove_tail(mark)
        return scores

    def _remove_tail(self, start: int) -> None:
        if self.memory is not None:
            self.memory.drop(self.seq, start, len(self.seq))
        else:
            self.seq.drop(start, len(self.seq))

    def _turn_memory(self, turn: PendingTurn) -> dict[str, Any]:
        if self.memory is None:
            return {}
        return {
            "consolidations": self.memory.events[turn.events_before :],
            "entropy": self.memory.reply_entropies,
            "triggers": self.memory.reply_triggers,
        }

    def reset(self) -> None:
        """Start over: the transcript keeps everything, the KV cache forgets it."""
        self.session.append({"event": "reset"})
        self.seq.clear()
        self.layout = KVLayout()
        if self.memory is not None:
            self.memory.reset()
        if not self.options.stateless:
            self._save()

    def stats(self) -> dict[str, Any]:
        return {
            "session": self.session.name,
            "model": self.loaded.file.name,
            "n_ctx": self.n_ctx,
            "kv_tokens": len(self.seq),
            "pinned_tokens": self.layout.pinned,
            "turns_in_kv": len(self.layout.turns),
            "turns_dropped": self.layout.dropped,
            "turns_consolidated": self.layout.consolidated,
            "memory_tokens": self.layout.memory,
            "messages": len(self.messages()),
            "template": self.template.name,
        }

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
        """Feed the turns not yet in the cache in one decode, dropping the oldest turns (cached
        ones first, then the oldest of these) when they do not fit; returns the tokens fed."""
        head = chunks[0].pinned if chunks else []
        if head:
            self.layout.pinned = len(head)
        self.layout.messages += sum(len(chunk.group) for chunk in chunks)
        reserve = self._generation_reserve() if chunks and chunks[-1].prompt else 0
        if self.memory is not None:
            return self._feed_with_memory(head, chunks, reserve)
        kept = list(chunks)

        def needed() -> int:
            return len(head) + sum(len(chunk.tokens) for chunk in kept) + reserve

        self._make_room(needed())
        if len(self.seq) + needed() - reserve > self.n_ctx:
            self._drop_memory_region()
        while kept and len(self.seq) + needed() - (reserve if len(kept) == 1 else 0) > self.n_ctx:
            kept.pop(0)  # a turn never fed: the transcript has it
            self.layout.dropped += 1
        tokens = head + [token for chunk in kept for token in chunk.tokens]
        self.seq.feed(tokens)
        self.layout.turns.extend(len(chunk.tokens) for chunk in kept)
        return len(tokens)

    def _feed_with_memory(self, head: list[int], chunks: list[_Chunk], reserve: int) -> int:
        """Feed turn by turn, consolidating the oldest turns whenever the next would pass the
        budget; dropping only what consolidation cannot make room for."""
        assert self.memory is not None
        fed = 0
        for i, chunk in enumerate(chunks):
            tokens = (head if i == 0 else []) + chunk.tokens
            last = i == len(chunks) - 1
            self._consolidate_for(len(tokens) + (reserve if last else 0))
            self._make_room(len(tokens) + (reserve if last else 0))
            if len(self.seq) + len(tokens) > self.n_ctx:
                self._drop_memory_region()
            fits = len(self.seq) + len(tokens) <= self.n_ctx
            if not fits:  # a turn never fed (never the user's own: _check_fits)
                tokens = tokens[: len(head)] if i == 0 else []
                self.layout.dropped += 1
            if tokens:
                self.seq.feed(tokens)
                self.memory.note_decode()
            if fits:
                self.layout.turns.append(len(chunk.tokens))
            fed += len(tokens)
        return fed

    def _consolidate_for(self, needed: int) -> None:
        """Fold the oldest turns into memory until `needed` more tokens fit the budget; when the
        memory itself outgrows half the budget, fold it too. Sinks (the first tokens) and the
        pinned head stay as they are."""
        assert self.memory is not None
        layout, options = self.layout, self.memory.options
        count = turns_to_consolidate(
            layout.pinned + layout.memory,
            layout.turns,
            needed,
            self.memory.budget,
            options.keep_ratio,
            self.memory.latents_at_budget,
        )
        if count:
            start = max(layout.pinned + layout.memory, DEFAULT_SINKS)
            end = layout.pinned + layout.memory + sum(layout.turns[:count])
            self._consolidate(start, end, turns=count)
        if layout.memory > self.memory.budget // 2:
            self._consolidate(max(layout.pinned, DEFAULT_SINKS), layout.pinned + layout.memory)

    def _consolidate(self, start: int, end: int, turns: int = 0) -> None:
        """Fold positions [start, end) - the memory region's end or whole turns - into memory."""
        assert self.memory is not None
        layout = self.layout
        if end - start <= self.memory.latents_at_budget:
            return
        before = len(self.seq)
        event = self.memory.consolidate(self.seq, start, end, "turns" if turns else "memory")
        removed = before - len(self.seq)
        # what stays of the span joins the memory region, which ends where the span ended
        layout.memory = end - removed - layout.pinned
        del layout.turns[:turns]
        layout.consolidated += turns
        event["turns"] = turns
        self.session.append({"event": "memory", **event})

    def _generation_reserve(self) -> int:
        limit = self.n_ctx // 4
        return min(self.options.n_predict, limit) if self.options.n_predict > 0 else limit

    def _make_room(self, needed: int, keep_last: bool = False) -> None:
        """Drop the oldest whole turns until `needed` more tokens fit (the transcript keeps them)."""
        keep = 1 if keep_last else 0
        while len(self.layout.turns) > keep and len(self.seq) + needed > self.n_ctx:
            start, end = self.layout.oldest_turn_span()
            if self.memory is not None:
                self.memory.drop(self.seq, start, end)
            else:
                self.seq.drop(start, end)
            self.layout.turns.pop(0)
            self.layout.dropped += 1

    def _drop_memory_region(self) -> None:
        """The last resort before a message could not be fed: memory leaves the cache too."""
        start, end = self.layout.pinned, self.layout.pinned + self.layout.memory
        if start < end:
            if self.memory is not None:
                self.memory.drop(self.seq, start, end)
            else:
                self.seq.drop(start, end)
            self.layout.memory = 0

    def generate(
        self, turn: PendingTurn, on_text: Callable[[str], None] | None = None
    ) -> tuple[str, float]:
        """Stream the reply into the cache; returns (finish reason, ms to first token)."""
        start = turn.start
        first_token_ms: float | None = None
        finish = "stop"
        sampler = Sampler(self.options.sampling)
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
                    if response.text and on_text:
                        on_text(response.text)
                    finish = response.finish_reason or finish
                    if ctrl_c.pressed:
                        finish = "interrupted"
                        break
        except KeyboardInterrupt:
            finish = "interrupted"
        finally:
            sampler.close()
        return finish, first_token_ms or _ms(start)

    def _after_reply_token(self, step: int) -> None:
        """The Cognitive Monitor: entropy of each reply token; latents where it fires (when
        in-reply insertion is on and they fit)."""
        assert self.memory is not None
        self.memory.note_decode()
        if not self.memory.observe_token(step) or not self.memory.options.inject_in_reply:
            return
        if self.memory.latents_in_reply == 0:
            return
        if self.seq.free > self.memory.latents_in_reply + 1:
            self.session.append({"event": "memory", **self.memory.inject(self.seq, step)})

    def _close_reply(self, messages: list[Message], generated: int) -> None:
        """Feed the template's end-of-reply text now, so the next turn feeds only its own."""
        closing = rendering.tokenize(self.model, rendering.reply_closing(self.template, messages))
        self._make_room(len(closing), keep_last=True)
        if len(closing) <= self.seq.free and self.layout.turns:
            self.seq.feed(closing)
            if self.memory is not None:
                self.memory.note_decode()
            self.layout.turns[-1] += generated + len(closing)
        else:  # no room even alone: this turn leaves the cache too (the transcript keeps it)
            self._remove_tail(self.layout.pinned)
            self.layout.turns = []
            self.layout.memory = 0
            self.layout.dropped += 1
        self.layout.messages += 1

    def _replay(self, messages: list[Message]) -> None:
        """Feed a transcript's turns into an empty cache (a first start, --rebuild)."""
        self.seq.clear()
        self.layout = KVLayout()
        if self.memory is not None:
            self.memory.reset()
        self._feed(self._chunks([], messages, None))

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
        """Commit the KV state, its memory and their record in one step (store/sessions.py)."""
        if self.layout.n_tokens != len(self.seq):
            raise EngineError(
                f"internal: layout counts {self.layout.n_tokens} tokens, cache holds {len(self.seq)}"
            )
        model = self.loaded.file
        self.session.meta["model"] = {
            "name": model.name,
            "path": str(model.path),
            "fingerprint": model.fingerprint,
        }
        self.session.meta["n_ctx"] = self.n_ctx
        kv = {
            "model": model.name,
            "fingerprint": model.fingerprint,
            "n_ctx": self.n_ctx,
            "n_tokens": len(self.seq),
            "digest": tokens_digest(self.seq.tokens),
            "layout": self.layout.to_dict(),
        }
        memory = self.memory
        write_memory = None if memory is None else (lambda path: memory.save(path, self.seq))
        self.session.commit_kv(kv, self.seq.save, write_memory)


class CtrlC:
    """While a reply streams, Ctrl-C sets a flag checked between tokens instead of raising.

    A KeyboardInterrupt raised while llama.cpp runs the memory tap's Python callback can land
    outside any handler (ctypes prints and drops it, and the graph stops half-way), so on the
    main thread the signal is only noted. Elsewhere (no signal handlers) this does nothing."""

    def __init__(self) -> None:
        self.pressed = False
        self._installed = False
        self._previous: Any = signal.default_int_handler

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def _note(self, signum: int, frame: object) -> None:
        self.pressed = True


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


@dataclass
class _Chunk:
    group: list[Message]
    text: str
    pinned: list[int]  # the never-dropped head, only on a conversation's first chunk
    tokens: list[int]
    prompt: bool  # ends in the generation prompt


def latent_blocks(tokens: list[int]) -> list[dict[str, int]]:
    """Runs of latent cells in the cache: index, first position, length."""
    blocks: list[dict[str, int]] = []
    for position, token in enumerate(tokens):
        if token != LATENT:
            continue
        if blocks and blocks[-1]["start"] + blocks[-1]["length"] == position:
            blocks[-1]["length"] += 1
        else:
            blocks.append({"index": len(blocks), "start": position, "length": 1})
    return blocks


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token] - top - np.log(np.exp(logits - top).sum()))


def chat_template_for(model: Model) -> ChatTemplate:
    info_arch = model.meta("general.architecture") or "unknown"
    return select_template(
        model.chat_template(), info_arch, model.token_text(model.bos), model.token_text(model.eos)
    )


def load_model(file: ModelFile, n_gpu_layers: int | None) -> LoadedModel:
    start = time.perf_counter()
    model = Model(file.path, n_gpu_layers=n_gpu_layers)
    return LoadedModel(file, model, _ms(start))


def open_conversation(
    store: SessionStore, name: str, options: ChatOptions, system: str | None = None
) -> Conversation:
    """Lock the session, load its model (`-m`, else the one it was made with), restore its KV.
    A session created here is removed again if this fails before anything was said in it."""
    created = not store.exists(name)
    session = store.open(name)
    try:
        stored_model = (session.meta.get("model") or {}).get("path")
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
