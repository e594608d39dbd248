"""The body of a --ray actor without Ray (batch/worker.py): the model-file check each node makes,
and requests handed in from several threads while others decode, on the real default model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from flashmem_cli import models
from flashmem_cli.batch.requests import BatchRequest, LineError
from flashmem_cli.batch.results import Completion
from flashmem_cli.batch.scheduler import BatchScheduler, BatchSettings, kv_slot_size
from flashmem_cli.batch.worker import BatchWorker, ModelSpec, model_problem
from flashmem_cli.engine.backend import Model
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.store.sessions import SessionStore

SETTINGS = BatchSettings(
    n_ctx=256, parallel=2, n_predict=8, sampling=SamplingParams(temperature=0), n_threads=2
)


def spec_of(path, fingerprint=None) -> ModelSpec:
    return ModelSpec(str(path), fingerprint or models.fingerprint(path), n_gpu_layers=0)


def test_the_model_check_names_the_node_and_what_is_wrong(model_path, tmp_path):
    assert model_problem(spec_of(model_path), "node-a") is None
    missing = model_problem(spec_of(tmp_path / "m.gguf", "f" * 16), "node-a")
    assert (
        missing
        == f"node node-a has no model file at {tmp_path / 'm.gguf'}: copy it there on every node"
    )
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(100))
    problem = model_problem(spec_of(other, "f" * 16), "node-b")
    assert problem is not None and problem.startswith(f"node node-b has another file at {other}")
    assert f"(fingerprint {models.fingerprint(other)}, the driver's ffffffffffffffff)" in problem


def test_a_worker_with_another_file_loads_nothing_and_refuses_work(model_path):
    worker = BatchWorker(spec_of(model_path, "0" * 16), SETTINGS, 256)
    info = worker.info()
    assert info.problem and "another file" in info.problem and info.kv_cells == 0
    with pytest.raises(RuntimeError, match="another file"):
        worker.submit(BatchRequest(1, "a", "completion", prompt="Hi"))


@pytest.mark.model
def test_requests_from_many_threads_get_the_replies_of_a_plain_run(home, model_path):
    one_at_a_time = replace(SETTINGS, parallel=1)  # each decoded alone: the same logits
    requests = [
        BatchRequest(i, f"r{i}", "completion", prompt=f"Question {i}: what is {i} plus 1?")
        for i in range(1, 5)
    ]
    too_long = BatchRequest(5, "long", "completion", prompt="word " * 400)
    worker = BatchWorker(spec_of(model_path), one_at_a_time, 256)
    assert worker.info().problem is None and worker.info().kv_cells == 256 * 3
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(worker.submit, [*requests, too_long]))
    worker.close()
    assert not worker.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(requests[0])
    assert isinstance(results[4], LineError) and results[4].code == "context_length_exceeded"

    loaded = models.load_model(models.describe(model_path), 0)
    plain: dict[str, Completion | LineError] = {}
    scheduler = BatchScheduler(loaded, one_at_a_time, SessionStore(home / "s"), 256)
    scheduler.run(requests, lambda request, result: plain.__setitem__(request.id, result))
    scheduler.close()
    loaded.model.close()
    for request, result in zip(requests, results, strict=False):
        assert isinstance(result, Completion) and result.completion_tokens > 0
        assert result.text == plain[request.id].text  # type: ignore[union-attr]


@pytest.mark.model
def test_the_drivers_vocabulary_only_model_sizes_slots_as_the_full_model(model_path):
    """--ray sizes every worker's sequences on the driver without loading the weights."""
    requests = [
        BatchRequest(1, "a", "completion", prompt="word " * 300, max_tokens=20),
        BatchRequest(2, "b", "chat", messages=[{"role": "user", "content": "Hi " * 50}]),
    ]
    settings = replace(SETTINGS, n_ctx=2048, n_predict=100)
    sizes = []
    for vocab_only in (True, False):
        with Model(model_path, n_gpu_layers=0, vocab_only=vocab_only) as model:
            template = models.chat_template_for(model)
            sizes.append(kv_slot_size(model, template, settings, requests))
    assert sizes[0] == sizes[1] == 512  # the longest line (~320 cells), rounded up to 256
