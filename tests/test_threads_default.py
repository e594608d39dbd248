"""Without -t, chat and batch follow the free cores as the load changes; with -t they do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashmem_cli.batch import runner, scheduler
from flashmem_cli.batch.runner import RunPlan
from flashmem_cli.batch.scheduler import BatchSettings
from flashmem_cli.chat import conversation as chat
from flashmem_cli.chat.conversation import ChatOptions, open_conversation
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.store.sessions import SessionStore


def counting(values: list[int]):  # noqa: ANN201
    """A default_threads stand-in that answers `values` in turn (the last one after)."""
    calls: list[int] = []

    def threads() -> int:
        calls.append(1)
        return values[min(len(calls), len(values)) - 1]

    return threads, calls


@pytest.mark.parametrize("fixed", [None, 2])
def test_chat_asks_again_each_turn_unless_told(
    home: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch, fixed: int | None
) -> None:
    threads, _ = counting([2, 1, 2])
    monkeypatch.setattr(chat, "default_threads", threads)
    options = ChatOptions(
        model=str(model_path), n_ctx=512, n_predict=2, sampling=SamplingParams(0), n_threads=fixed
    )
    seen = []
    with open_conversation(SessionStore(home / "sessions"), "t", options) as conversation:
        for text in ("Hello.", "And again."):
            conversation.send(text)
            seen.append(conversation.ctx.n_threads)
    assert seen == ([2, 2] if fixed else [1, 2])


def test_batch_without_t_rereads_the_load(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads, calls = counting([2, 1])
    monkeypatch.setattr(scheduler, "default_threads", threads)
    monkeypatch.setattr(scheduler, "THREADS_CHECK_S", 0.0)
    source = tmp_path / "in.jsonl"
    lines = [{"id": f"r{i}", "prompt": f"Count to {i}:", "max_tokens": 4} for i in range(3)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = BatchSettings(n_ctx=256, parallel=2, n_predict=4, sampling=SamplingParams(0))
    plan = RunPlan(
        source, tmp_path / "out.jsonl", tmp_path / "err.jsonl", str(model_path), None, settings
    )
    stats = runner.run(plan)
    assert stats.succeeded == 3
    assert len(calls) >= 3  # once for the context, then at every step past THREADS_CHECK_S
