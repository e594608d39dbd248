"""Continuous batching: many requests in one llama.cpp context, one token of each live
sequence per decode, a free slot refilled as soon as a request finishes.

Requests whose prompts start with the same system prompt share its KV cells: the prefix is
decoded once into a prefix sequence and tagged onto each slot with `llama_memory_seq_cp`.
Requests with a `session` run through the session store, one at a time per session.

Every sequence gets the same number of cells (`kv_slot_size`): what the longest request can
fill, at most `-c`, so short requests do not pay for `-c` x (--parallel + 2) cells.
"""

from __future__ import annotations

import codecs
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from flashmem_cli.batch.requests import BatchRequest, LineError
from flashmem_cli.batch.results import Completion
from flashmem_cli.chat.conversation import ChatOptions, Conversation, PendingTurn
from flashmem_cli.config import default_threads
from flashmem_cli.engine import prompt as rendering
from flashmem_cli.engine.backend import BatchEntry, Context, ContextParams, Model
from flashmem_cli.engine.sampling import Sampler, SamplingParams
from flashmem_cli.engine.sequence import KVSequence
from flashmem_cli.engine.stops import stop_index, tokens_before
from flashmem_cli.engine.templates import ChatTemplate
from flashmem_cli.errors import (
    ContextOverflow,
    EngineError,
    InvalidSessionName,
    SessionInUse,
    TemplateError,
)
from flashmem_cli.memory.architecture import describe
from flashmem_cli.models import LoadedModel, chat_template_for
from flashmem_cli.store.sessions import SessionStore

PREFIX_SLOTS = 2
MIN_SHARED_PREFIX = 4
THREADS_CHECK_S = 2.0  # how often a run without -t re-reads the load
SLOT_ROUNDING = 256  # llama.cpp pads a KV cache to a multiple of 256 cells
ResultHandler = Callable[[BatchRequest, "Completion | LineError"], None]
StepHook = Callable[[int], None]


class RequestFeed(Protocol):
    def take(self, wait: bool) -> list[BatchRequest] | None:
        """Requests that arrived since the last call, None once none will come; `wait`: the
        caller is idle, so block a while for some."""


class FixedFeed:
    """A feed of a list known in advance: all of it at once, then closed."""

    def __init__(self, requests: Iterable[BatchRequest]):
        self.requests: list[BatchRequest] | None = list(requests)

    def take(self, wait: bool) -> list[BatchRequest] | None:
        requests, self.requests = self.requests, None
        return requests


@dataclass(frozen=True)
class BatchSettings:
    n_ctx: int  # per sequence
    parallel: int
    n_predict: int
    sampling: SamplingParams
    n_threads: int | None = None  # None: the free cores, asked again every THREADS_CHECK_S
    n_batch: int = 512


@dataclass
class Job:
    request: BatchRequest
    slot: KVSequence
    sampler: Sampler
    to_feed: list[int]  # prompt tokens not yet decoded
    prompt_tokens: int
    max_tokens: int
    started: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    pending: int | None = None  # sampled, not yet decoded
    finish: str | None = None
    first_token_ms: float | None = None
    conversation: Conversation | None = None
    turn: PendingTurn | None = None
    replayed: Completion | None = None  # a session turn an earlier, killed run finished
    cut_at_stop: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )


class PrefixCache:
    """A few sequences holding shared prompt heads, least recently used evicted first."""

    def __init__(self, sequences: list[KVSequence]):
        self.free = list(sequences)
        self.entries: OrderedDict[tuple[int, ...], KVSequence] = OrderedDict()
        self.hits = 0
        self.builds = 0

    def get(self, tokens: list[int]) -> KVSequence:
        key = tuple(tokens)
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.builds += 1
        if self.free:
            seq = self.free.pop()
        else:
            _, seq = self.entries.popitem(last=False)
            seq.clear()
        seq.feed(tokens)
        self.entries[key] = seq
        return seq


def kv_slot_size(
    model: Model, template: ChatTemplate, settings: BatchSettings, requests: list[BatchRequest]
) -> int:
    """Cells per sequence that every request fits in: the longest need, rounded up to a
    multiple of SLOT_ROUNDING, at most -c."""
    need = max((slot_need(model, template, settings, r) for r in requests), default=1)
    return min(-(-need // SLOT_ROUNDING) * SLOT_ROUNDING, settings.n_ctx)


def slot_need(
    model: Model, template: ChatTemplate, settings: BatchSettings, request: BatchRequest
) -> int:
    """The cells one request can fill; 0 for one that fails when admitted, and -c for a
    session line (its history is unknown until the session is opened)."""
    if request.session is not None:
        return settings.n_ctx
    try:
        head, rest = prompt_tokens(model, template, request)
    except Exception:
        return 0
    prompt = len(head) + len(rest)
    if prompt >= settings.n_ctx:
        return 0
    return cells_needed(prompt, max_tokens(settings, request), settings.n_ctx)


def cells_needed(prompt: int, max_tokens: int, n_ctx: int) -> int:
    """A stateless request's prompt, its longest reply and one cell to spare, at most -c (the
    reply ends when the sequence is full)."""
    return min(prompt + max_tokens + 1, n_ctx)


def max_tokens(settings: BatchSettings, request: BatchRequest) -> int:
    limit = request.max_tokens if request.max_tokens is not None else settings.n_predict
    return limit if limit >= 0 else settings.n_ctx


def prompt_tokens(
    model: Model, template: ChatTemplate, request: BatchRequest
) -> tuple[list[int], list[int]]:
    """(shareable head, the rest) of a stateless request: the head ends after the system
    prompt."""
    if request.kind == "completion":
        tokens = model.tokenize(request.prompt)
        if model.add_bos and tokens[:1] != [model.bos]:
            tokens = [model.bos] + tokens
        return [], tokens
    rendered = rendering.render(template, request.messages, add_generation_prompt=True)
    if request.messages[0]["role"] == "system":
        return rendering.tokenize_head(model, rendered, 0, template.bos_token)
    tokens = rendering.tokenize(model, rendered)
    if model.add_bos and tokens[:1] != [model.bos]:
        tokens = [model.bos] + tokens
    return [], tokens


class BatchScheduler:
    """`slot_tokens`: the cells of each sequence (`kv_slot_size`); -c when not given."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: BatchSettings,
        store: SessionStore,
        slot_tokens: int | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.settings = settings
        self.store = store
        self.slot_tokens = min(slot_tokens or settings.n_ctx, settings.n_ctx)
        n_seq = settings.parallel + PREFIX_SLOTS
        params = ContextParams(
            n_ctx=self.slot_tokens * n_seq,  # every slot and every cached prefix at full length
            n_batch=settings.n_batch,
            n_threads=settings.n_threads or default_threads(),
            n_seq_max=n_seq,
        )
        self.ctx = Context(self.model, params)
        shifts = describe(self.model.info()).shifts  # a Gemma 3 with no global layer cannot

        def sequence(i: int) -> KVSequence:
            return KVSequence(self.ctx, i, self.slot_tokens, shifts=shifts)

        self.slots = [sequence(i) for i in range(settings.parallel)]
        self.prefixes = PrefixCache([sequence(i) for i in range(settings.parallel, n_seq)])
        self.template = chat_template_for(self.model)
        self.decode_s = 0.0

    def close(self) -> None:
        self.ctx.close()

    def run(
        self,
        requests: Iterable[BatchRequest],
        on_result: ResultHandler,
        on_step: StepHook | None = None,
    ) -> None:
        """Every request ends in one `on_result` call. `on_step` gets, after each decode, the
        tokens generated so far by requests not yet reported: progress between results, which
        a long generation may be minutes apart."""
        self.serve(FixedFeed(requests), on_result, on_step)

    def serve(
        self, feed: RequestFeed, on_result: ResultHandler, on_step: StepHook | None = None
    ) -> None:
        """`run` for requests that arrive while others decode (a Ray worker's inbox): returns
        once the feed is closed and every request it gave has ended in `on_result`."""
        pending: deque[BatchRequest] = deque()
        active: dict[int, Job] = {}
        threads_checked = time.perf_counter()
        feed_open = True
        while feed_open or pending or active:
            if feed_open:
                arrived = feed.take(wait=not pending and not active)
                feed_open = arrived is not None
                pending.extend(arrived or ())
            self._admit(pending, active, on_result)
            if not active:
                continue
            if (
                self.settings.n_threads is None
                and time.perf_counter() - threads_checked > THREADS_CHECK_S
            ):
                self.ctx.set_threads(default_threads())
                threads_checked = time.perf_counter()
            try:
                self._step(active)
            except EngineError as exc:  # not expected: the context is sized for every slot
                self._fail_all(active, exc, on_result)
                continue
            self._retire(active, on_result)
            if on_step:
                on_step(sum(len(job.generated) for job in active.values()))

    def _fail_all(self, active: dict[int, Job], exc: EngineError, on_result: ResultHandler) -> None:
        """A failed decode leaves the cache uncertain: report the requests in flight as failed,
        empty every sequence, and go on with the rest."""
        for job in active.values():
            job.sampler.close()
            if job.conversation:
                job.conversation.close()
            request = job.request
            on_result(request, LineError(request.line, request.id, "request_failed", str(exc)))
        active.clear()
        sequences = self.slots + list(self.prefixes.entries.values()) + self.prefixes.free
        for seq in sequences:
            seq.clear()
        self.prefixes = PrefixCache(sequences[len(self.slots) :])

    # -- admission ------------------------------------------------------------------------------

    def _admit(
        self, pending: deque[BatchRequest], active: dict[int, Job], on_result: ResultHandler
    ) -> None:
        free = [i for i in range(len(self.slots)) if i not in active]
        while free and pending:
            request = self._next_admissible(pending, active)
            if request is None:
                return
            slot = self.slots[free[0]]
            try:
                job = self._start(request, slot)
            except Exception as exc:  # one request's failure never stops the run
                slot.clear()
                on_result(request, LineError(request.line, request.id, error_code(exc), str(exc)))
                continue
            if job.finish:
                self._finish(job, on_result)
                continue
            active[free.pop(0)] = job

    def _next_admissible(
        self, pending: deque[BatchRequest], active: dict[int, Job]
    ) -> BatchRequest | None:
        """The first request whose session (if any) has no request in flight."""
        busy = {job.request.session for job in active.values() if job.request.session}
        for i, request in enumerate(pending):
            if request.session is None or request.session not in busy:
                del pending[i]
                return request
            busy.add(request.session)  # later lines of a busy session wait behind it
        return None

    def _start(self, request: BatchRequest, slot: KVSequence) -> Job:
        sampler = Sampler(self._sampling(request))
        try:
            if request.session:
                return self._start_session_turn(request, slot, sampler)
            return self._start_stateless(request, slot, sampler)
        except BaseException:
            sampler.close()
            raise

    def _sampling(self, request: BatchRequest) -> SamplingParams:
        base = self.settings.sampling
        return SamplingParams(
            temperature=base.temperature if request.temperature is None else request.temperature,
            top_k=base.top_k,
            top_p=base.top_p if request.top_p is None else request.top_p,
            min_p=base.min_p,
            seed=base.seed if request.seed is None else request.seed,
        )

    def _max_tokens(self, request: BatchRequest) -> int:
        return max_tokens(self.settings, request)

    def _start_stateless(self, request: BatchRequest, slot: KVSequence, sampler: Sampler) -> Job:
        head, rest = prompt_tokens(self.model, self.template, request)
        total = len(head) + len(rest)
        n_ctx = self.settings.n_ctx
        if total >= n_ctx:
            raise ContextOverflow(f"the prompt is {total} tokens; -c {n_ctx} allows {n_ctx - 1}")
        check_fits(slot, cells_needed(total, self._max_tokens(request), n_ctx))
        slot.clear()
        if len(head) >= MIN_SHARED_PREFIX and rest:
            slot.copy_prefix_from(self.prefixes.get(head), len(head))
            to_feed = rest
        else:
            to_feed = head + rest
        return Job(request, slot, sampler, to_feed, total, self._max_tokens(request))

    def _start_session_turn(self, request: BatchRequest, slot: KVSequence, sampler: Sampler) -> Job:
        text, system = session_message(request)
        options = ChatOptions(n_ctx=self.settings.n_ctx, n_predict=self._max_tokens(request))
        check_fits(slot, self.settings.n_ctx)
        slot.clear()
        session = self.store.open(request.session or "")
        earlier = answered_turn(session.records(), request.id)
        if earlier is not None:  # the session has this turn: a killed run did not report it
            session.close()
            job = Job(request, slot, sampler, [], 0, 0, finish=earlier.finish_reason)
            job.replayed = earlier
            return job
        try:
            conversation = Conversation(session, self.loaded, options, seq=slot)
        except BaseException:
            session.close()
            raise
        try:
            if system is not None:
                conversation.set_system_prompt(system)
            turn = conversation.begin_turn(text, tags={"batch_id": request.id})
        except BaseException:
            conversation.close()
            raise
        job = Job(request, slot, sampler, [], turn.reply_start, self._max_tokens(request))
        job.conversation, job.turn, job.started = conversation, turn, turn.start
        self._accept(job, sampler.sample(self.ctx, -1))  # begin_turn left the logits current
        return job

    # -- decoding -------------------------------------------------------------------------------

    def _step(self, active: dict[int, Job]) -> None:
        """One decode: the pending token of every generating job, then prompt chunks."""
        entries: list[BatchEntry] = []
        fed: list[tuple[Job, list[int], bool]] = []  # (job, tokens, from its prompt)
        budget = self.ctx.n_batch
        for job in active.values():
            if job.pending is not None:
                entries.append(BatchEntry(job.slot.seq_id, len(job.slot), [job.pending], True))
                fed.append((job, [job.pending], False))
                budget -= 1
        for job in active.values():
            if job.to_feed and budget > 0:
                chunk = job.to_feed[:budget]
                done = len(chunk) == len(job.to_feed)
                entries.append(BatchEntry(job.slot.seq_id, len(job.slot), chunk, done))
                fed.append((job, chunk, True))
                budget -= len(chunk)
        start = time.perf_counter()
        indices = self.ctx.decode_batch(entries)
        self.decode_s += time.perf_counter() - start
        for (job, tokens, from_prompt), index in zip(fed, indices, strict=True):
            job.slot.extend_decoded(tokens)
            if from_prompt:
                job.to_feed = job.to_feed[len(tokens) :]
            else:
                job.pending = None
            if index >= 0:
                self._accept(job, job.sampler.sample(self.ctx, index))

    def _stops(self, request: BatchRequest) -> tuple[str, ...]:
        """The request's own stop strings, and the template's where the template renders it
        (a base model's next `User:` line)."""
        templated = request.kind != "completion" or request.session is not None
        return request.stop + (self.template.stop if templated else ())

    def _accept(self, job: Job, token: int) -> None:
        if job.first_token_ms is None:
            job.first_token_ms = ms_since(job.started)
        if self.model.is_eog(token):
            job.finish = "stop"
            return
        job.generated.append(token)
        job.pending = token
        job.text += job.decoder.decode(self.model.token_bytes(token))
        cut = stop_index(job.text, self._stops(job.request))
        if cut is not None:
            job.text = job.text[:cut]
            job.finish = "stop"
            job.cut_at_stop = True
        elif len(job.generated) >= job.max_tokens or job.slot.free <= 1:
            job.finish = "length"

    # -- retiring -------------------------------------------------------------------------------

    def _retire(self, active: dict[int, Job], on_result: ResultHandler) -> None:
        for index in [i for i, job in active.items() if job.finish]:
            self._finish(active.pop(index), on_result)

    def _finish(self, job: Job, on_result: ResultHandler) -> None:
        result: Completion | LineError
        try:
            if job.replayed is not None:
                result = job.replayed
            elif job.conversation:
                result = self._session_result(job)
            else:
                result = self._plain_result(job)
        except Exception as exc:
            result = LineError(job.request.line, job.request.id, error_code(exc), str(exc))
        finally:
            job.sampler.close()
            if job.conversation:
                job.conversation.close()
            job.slot.clear()
        on_result(job.request, result)

    def _plain_result(self, job: Job) -> Completion:
        job.text += job.decoder.decode(b"", final=True)
        return Completion(
            text=job.text,
            finish_reason=job.finish or "stop",
            prompt_tokens=job.prompt_tokens,
            completion_tokens=len(job.generated),
            timings_ms={"ttft": job.first_token_ms or 0.0, "total": ms_since(job.started)},
        )

    def _session_result(self, job: Job) -> Completion:
        """The conversation records and saves the reply: every token sampled, or those before
        a stop string."""
        assert job.conversation is not None and job.turn is not None
        turn, reply = job.turn, job.generated
        if job.cut_at_stop:
            reply = reply[: tokens_before(self.model.token_bytes, job.generated, job.text)]
        finish, ttft = job.finish or "stop", job.first_token_ms or 0.0
        result = job.conversation.finish_turn(turn, finish, ttft, reply=reply)
        return Completion(
            text=result.reply,
            finish_reason=result.finish_reason,
            prompt_tokens=turn.reply_start,
            completion_tokens=result.generated_tokens,
            timings_ms=result.timings_ms,
            extra={
                "session": job.request.session,
                "cached_tokens": result.cached_tokens,
                "dropped_turns": result.dropped_turns,
                "notices": result.notices,
            },
        )


def check_fits(slot: KVSequence, need: int) -> None:
    """A request never runs in a sequence smaller than it needs (a shorter reply would pass
    for a finished one): kv_slot_size sized the sequences for every request."""
    if need > slot.limit:
        raise EngineError(f"this request needs {need} KV cells; its sequence has {slot.limit}")


def session_message(request: BatchRequest) -> tuple[str, str | None]:
    """The user's message of a session line (the parser checked it is last), and a system
    prompt for a new session."""
    if request.kind == "completion":
        return request.prompt, None
    last = request.messages[-1]
    system = next((m["content"] for m in request.messages if m["role"] == "system"), None)
    return last["content"], system


def answered_turn(records: list[dict], request_id: str) -> Completion | None:
    """The reply a session already holds for batch request `request_id`, if any."""
    for record in records:
        if record.get("batch_id") == request_id and record.get("role") == "assistant":
            usage = record.get("usage") or {}
            return Completion(
                text=record["content"],
                finish_reason=record.get("finish_reason", "stop"),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                extra={"recovered_from_session": True},
            )
    return None


def error_code(exc: Exception) -> str:
    if isinstance(exc, ContextOverflow):
        return "context_length_exceeded"
    if isinstance(exc, InvalidSessionName):
        return "invalid_session"
    if isinstance(exc, SessionInUse):
        return "session_in_use"
    if isinstance(exc, TemplateError):
        return "template_error"
    return "request_failed"


def ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
