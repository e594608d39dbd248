"""Batch output files: the lock one run holds on them, and what --resume runs again. No model:
the runner's model and scheduler are replaced by fakes where a run is needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from flashmem_cli.batch import runner
from flashmem_cli.batch.requests import BatchRequest, LineError, parse_lines
from flashmem_cli.batch.results import (
    RETRIED_ON_RESUME,
    Completion,
    error_line,
    scan_done,
)
from flashmem_cli.batch.runner import RunPlan, lock_path
from flashmem_cli.batch.scheduler import BatchSettings, error_code
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.errors import (
    ContextOverflow,
    EngineError,
    FlashmemError,
    SessionInUse,
    TemplateError,
)
from flashmem_cli.models import ModelFile
from flashmem_cli.store.files import try_lock

IDS = ["a", "b", "c", "d", "e"]


def write_jsonl(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def write_source(path: Path, ids: list[str] = IDS) -> Path:
    return write_jsonl(path, [{"id": i, "prompt": f"prompt {i}", "max_tokens": 4} for i in ids])


def failed(line: int, request_id: str, code: str) -> dict:
    return error_line(LineError(line, request_id, code, "it failed"))


def succeeded(request_id: str) -> dict:
    return {"custom_id": request_id, "response": {"status_code": 200}, "error": None}


def plan_for(source: Path, out: Path | None, errors: Path | None, resume: bool = False) -> RunPlan:
    settings = BatchSettings(
        n_ctx=256, parallel=2, n_predict=4, sampling=SamplingParams(), n_threads=1
    )
    return RunPlan(source, out, errors, None, None, settings, resume=resume)


class FakeModel:
    """Stands in for models.resolve and run_requests: records what it was asked to run, checks
    the outputs are locked meanwhile, and answers every request."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.ran: list[str] = []
        self.locked_during_run: list[bool] = []
        self.locks: list[Path] = []
        fake_file = ModelFile("fake", Path("fake.gguf"), 0, "0")
        monkeypatch.setattr(runner.models, "resolve", lambda spec: fake_file)
        monkeypatch.setattr(runner, "run_requests", self.run_requests)

    def run_requests(
        self, plan, file_model, requests: list[BatchRequest], report, stats, on_step=None
    ) -> None:
        for path in self.locks:
            lock = try_lock(path)
            self.locked_during_run.append(lock is None)
            if lock is not None:
                lock.release()
        for request in requests:
            self.ran.append(request.id)
            report(request, Completion(f"reply {request.id}", "stop", 3, 2))


def ids_in(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


# -- what --resume counts as done ----------------------------------------------------------------


def test_retried_codes_are_those_error_code_gives_for_failures_of_the_moment():
    assert {"session_in_use", "request_failed"} == RETRIED_ON_RESUME
    assert error_code(SessionInUse("busy")) in RETRIED_ON_RESUME
    assert error_code(EngineError("decode failed")) in RETRIED_ON_RESUME
    assert error_code(RuntimeError("anything else")) in RETRIED_ON_RESUME
    assert error_code(ContextOverflow("too long")) not in RETRIED_ON_RESUME
    assert error_code(TemplateError("bad template")) not in RETRIED_ON_RESUME


def test_scan_done_leaves_transient_failures_to_run_again(tmp_path):
    out = write_jsonl(tmp_path / "o.jsonl", [succeeded("a")])
    err = write_jsonl(
        tmp_path / "e.jsonl",
        [
            failed(2, "b", "session_in_use"),
            failed(3, "c", "request_failed"),
            failed(4, "d", "context_length_exceeded"),
            failed(9, "line-9", "invalid_json"),
            {"custom_id": "f", "flashmem": {"line": 6}},  # no error code: done, as before
            {"error": "not an object", "flashmem": [7]},  # malformed: ignored, no crash
            {"error": {"code": ["session_in_use"]}, "flashmem": {"line": 8}},
        ],
    )
    done = scan_done(out, err)
    assert done.ids == {"a"}
    assert done.error_lines == {4, 6, 8, 9}
    items = parse_lines(write_source(tmp_path / "s.jsonl").read_bytes())
    assert [item.id for item in items if not done.has(item)] == ["b", "c", "e"]


def test_an_error_line_is_matched_by_its_line_not_its_id(tmp_path):
    first, second = parse_lines(b'{"id": "x", "prompt": "1"}\n{"id": "x", "prompt": "2"}\n')
    assert isinstance(first, BatchRequest) and isinstance(second, LineError)
    err = write_jsonl(tmp_path / "e.jsonl", [error_line(second)])  # the duplicate_id of line 2
    done = scan_done(tmp_path / "o.jsonl", err)
    assert done.has(second) and not done.has(first)  # line 1, with the same id, still runs


def test_resume_runs_transient_failures_again_and_does_not_count_them_failed(
    home, tmp_path, monkeypatch
):
    fake = FakeModel(monkeypatch)
    source = write_source(tmp_path / "s.jsonl")
    out = write_jsonl(tmp_path / "s.out.jsonl", [succeeded("a")])
    err = write_jsonl(
        tmp_path / "s.errors.jsonl",
        [
            failed(2, "b", "session_in_use"),
            failed(3, "c", "request_failed"),
            failed(4, "d", "context_length_exceeded"),
        ],
    )
    stats = runner.run(plan_for(source, out, err, resume=True))
    assert fake.ran == ["b", "c", "e"]
    assert (stats.total, stats.skipped, stats.failed_before) == (5, 2, 1)
    assert (stats.succeeded, stats.failed) == (3, 0)
    assert ids_in(out) == ["a", "b", "c", "e"]

    again = runner.run(plan_for(source, out, err, resume=True))  # b and c are done now
    assert fake.ran == ["b", "c", "e"]
    assert (again.skipped, again.failed_before) == (5, 1)


# -- the lock on output files ----------------------------------------------------------------


def test_a_run_holds_its_outputs_locked_and_lets_go_after(home, tmp_path, monkeypatch):
    fake = FakeModel(monkeypatch)
    source = write_source(tmp_path / "s.jsonl")
    out, err = tmp_path / "s.out.jsonl", tmp_path / "s.errors.jsonl"
    fake.locks = [tmp_path / "s.out.jsonl.lock", tmp_path / "s.errors.jsonl.lock"]
    assert [lock_path(out), lock_path(err)] == [p.resolve() for p in fake.locks]

    stats = runner.run(plan_for(source, out, err))
    assert stats.succeeded == 5
    assert fake.locked_during_run == [True, True]
    for path in fake.locks:
        lock = try_lock(path)
        assert lock is not None, f"{path} still held after the run"
        lock.release()
        assert path.exists()  # kept on purpose: deleting a lock file races with a new run


def test_the_lock_is_let_go_when_a_run_fails(home, tmp_path, monkeypatch):
    FakeModel(monkeypatch)
    source = write_source(tmp_path / "s.jsonl")
    out = write_jsonl(tmp_path / "s.out.jsonl", [succeeded("a")])
    with pytest.raises(FlashmemError, match="--resume"):
        runner.run(plan_for(source, out, tmp_path / "s.errors.jsonl"))
    lock = try_lock(lock_path(out))
    assert lock is not None
    lock.release()


@pytest.mark.parametrize("held", ["out", "errors"])
def test_a_second_run_stops_before_reading_or_writing_the_outputs(
    home, tmp_path, monkeypatch, held
):
    fake = FakeModel(monkeypatch)
    source = write_source(tmp_path / "s.jsonl")
    out = write_jsonl(tmp_path / "s.out.jsonl", [succeeded("a")], tail='{"custom_id": "b", "re')
    err = write_jsonl(tmp_path / "s.errors.jsonl", [failed(2, "b", "session_in_use")], tail="{")
    before = out.read_bytes(), err.read_bytes()
    busy = out if held == "out" else err
    other_run = try_lock(lock_path(busy))
    assert other_run is not None
    try:
        with pytest.raises(FlashmemError) as caught:
            runner.run(plan_for(source, out, err, resume=True))
    finally:
        other_run.release()
    assert str(caught.value) == f"{busy} is being written by another flashmem run"
    assert (out.read_bytes(), err.read_bytes()) == before  # the torn lines were not even cut
    assert fake.ran == []
    free = try_lock(lock_path(out if held == "errors" else err))  # the one it did take: let go
    assert free is not None
    free.release()


def test_the_cli_reports_a_locked_output_in_one_line(home, tmp_path):
    source = write_source(tmp_path / "s.jsonl")
    out = write_jsonl(tmp_path / "s.out.jsonl", [succeeded("a")])
    before = out.read_bytes()
    other_run = try_lock(lock_path(out))
    assert other_run is not None
    try:
        proc = run_cli("run", str(source), "--resume", "-q")
    finally:
        other_run.release()
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {out} is being written by another flashmem run"
    assert proc.stdout == ""
    assert out.read_bytes() == before
    assert not (tmp_path / "s.errors.jsonl").exists()


def test_one_file_for_results_and_errors_is_locked_once(home, tmp_path, monkeypatch):
    fake = FakeModel(monkeypatch)
    source = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "x"}])
    with open(source, "a") as f:
        f.write("not json\n")
    both = tmp_path / "all.jsonl"
    stats = runner.run(plan_for(source, both, both))
    assert (stats.succeeded, stats.failed) == (1, 1) and fake.ran == ["a"]
    assert ids_in(both) == ["line-2", "a"]


@pytest.mark.skipif(sys.platform == "win32", reason="no /dev/null")
def test_a_device_as_output_is_not_locked(home, tmp_path, monkeypatch):
    fake = FakeModel(monkeypatch)
    locked: list[Path] = []
    monkeypatch.setattr(runner, "try_lock", lambda path: locked.append(path) or try_lock(path))
    source = write_source(tmp_path / "s.jsonl", ["a"])
    err = tmp_path / "s.errors.jsonl"
    stats = runner.run(plan_for(source, Path("/dev/null"), err))  # and no fsync on it
    assert stats.succeeded == 1 and fake.ran == ["a"]
    assert locked == [lock_path(err)]


def test_an_output_in_a_missing_directory_is_refused_without_creating_it(home, tmp_path):
    source = write_source(tmp_path / "s.jsonl", ["a"])
    out = tmp_path / "missing" / "out.jsonl"
    with pytest.raises(FlashmemError, match="cannot write"):
        runner.run(plan_for(source, out, tmp_path / "s.errors.jsonl"))
    assert not out.parent.exists()


def test_standard_streams_need_no_lock(home, tmp_path, monkeypatch, capsys):
    fake = FakeModel(monkeypatch)
    source = write_source(tmp_path / "s.jsonl", ["a"])
    stats = runner.run(plan_for(source, None, None))
    assert stats.succeeded == 1 and fake.ran == ["a"]
    assert json.loads(capsys.readouterr().out)["custom_id"] == "a"
    assert list(tmp_path.glob("*.lock")) == []
