"""The batch context is sized to its requests: each sequence holds the longest request's prompt
and reply (rounded up to 256 cells, at most -c), not -c whatever the requests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flashmem_cli.batch.requests import BatchRequest, parse_lines
from flashmem_cli.batch.results import Completion
from flashmem_cli.batch.scheduler import PREFIX_SLOTS, BatchScheduler, BatchSettings, kv_slot_size
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.models import LoadedModel, chat_template_for, describe, load_model
from flashmem_cli.store.sessions import SessionStore

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def loaded(model_path: Path) -> Iterator[LoadedModel]:
    model = load_model(describe(model_path), n_gpu_layers=0)
    yield model
    model.model.close()


def settings(n_ctx: int, parallel: int, n_predict: int = 16) -> BatchSettings:
    sampling = SamplingParams(temperature=0)
    return BatchSettings(n_ctx, parallel, n_predict, sampling, n_threads=2)


def requests(lines: list[dict]) -> list[BatchRequest]:
    parsed = parse_lines(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert all(isinstance(r, BatchRequest) for r in parsed)
    return [r for r in parsed if isinstance(r, BatchRequest)]


def short_prompts(n: int, tokens: int = 16) -> list[dict]:
    return [
        {"id": f"s{i}", "prompt": f"Story {i}: once upon a time there was", "max_tokens": tokens}
        for i in range(n)
    ]


def slot_size(loaded: LoadedModel, batch: BatchSettings, lines: list[dict]) -> int:
    template = chat_template_for(loaded.model)
    return kv_slot_size(loaded.model, template, batch, requests(lines))


def run(
    loaded: LoadedModel, batch: BatchSettings, lines: list[dict], home: Path, sized: bool = True
) -> tuple[int, dict[str, object]]:
    """(the context's cells, each id's result); `sized` False: every sequence at -c."""
    todo = requests(lines)
    slot_tokens = slot_size(loaded, batch, lines) if sized else None
    scheduler = BatchScheduler(loaded, batch, SessionStore(home / "sessions"), slot_tokens)
    results: dict[str, object] = {}
    try:
        scheduler.run(todo, lambda request, result: results.update({request.id: result}))
        return scheduler.ctx.n_ctx, results
    finally:
        scheduler.close()


def replies(results: dict[str, object]) -> dict[str, tuple]:
    """Each id's reply without its timings."""
    return {
        key: (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens)
        for key, r in results.items()
        if isinstance(r, Completion)
    }


def test_short_requests_get_a_small_context(loaded, home):
    batch = settings(n_ctx=4096, parallel=4)
    cells, results = run(loaded, batch, short_prompts(8), home)
    assert cells == 256 * (4 + PREFIX_SLOTS)
    assert all(isinstance(r, Completion) and r.completion_tokens > 0 for r in results.values())
    assert len(results) == 8


def test_a_session_line_gives_every_sequence_the_whole_context(loaded):
    session = {"id": "chat", "prompt": "Hello", "session": "ada", "max_tokens": 4}
    assert slot_size(loaded, settings(4096, 4), short_prompts(3) + [session]) == 4096


def test_an_unlimited_reply_gives_every_sequence_the_whole_context(loaded):
    unlimited = settings(4096, 4, n_predict=-1)  # -n -1: a line's own max_tokens is positive
    assert slot_size(loaded, unlimited, short_prompts(3) + [{"id": "u", "prompt": "Hi"}]) == 4096
    assert slot_size(loaded, unlimited, short_prompts(3)) == 256  # their own max_tokens


def test_the_size_is_the_longest_need_rounded_up_and_at_most_n_ctx(loaded):
    n_prompt = len(loaded.model.tokenize("word " * 300))
    long = {"id": "long", "prompt": "word " * 300, "max_tokens": 8}
    assert 256 < n_prompt + 8 + 1 <= 512
    assert slot_size(loaded, settings(4096, 4), short_prompts(3) + [long]) == 512
    assert slot_size(loaded, settings(400, 4), short_prompts(3) + [long]) == 400


def test_a_prompt_too_long_for_n_ctx_fails_alone_and_does_not_grow_the_context(loaded, home):
    too_long = {"id": "huge", "prompt": "word " * 600, "max_tokens": 4}
    lines = short_prompts(3, tokens=4) + [too_long]
    cells, results = run(loaded, settings(n_ctx=512, parallel=2), lines, home)
    assert cells == 256 * (2 + PREFIX_SLOTS)
    failure = results.pop("huge")
    assert getattr(failure, "code", None) == "context_length_exceeded"
    assert all(isinstance(r, Completion) for r in results.values())


def test_a_long_prompt_beside_short_ones_gets_the_same_reply_as_in_a_full_context(loaded, home):
    long = {"id": "long", "prompt": "The history of the city: " + "stone and river, " * 120}
    lines = short_prompts(3, tokens=12) + [{**long, "max_tokens": 12}]
    batch = settings(n_ctx=1024, parallel=1)
    sized_cells, sized = run(loaded, batch, lines, home)
    full_cells, full = run(loaded, batch, lines, home, sized=False)
    assert sized_cells < full_cells
    assert replies(sized) == replies(full)
    reply = sized["long"]
    assert isinstance(reply, Completion) and reply.prompt_tokens > 300
    assert reply.finish_reason == "length" and reply.completion_tokens == 12
