"""The --ray driver's dealing (batch/cluster.py Dealer) against a stand-in for Ray whose workers
answer at once or die on cue: session order, re-dealing, giving up, every worker dead. The
real cluster runs in test_batch_ray.py."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from flashmem_cli.batch import cluster
from flashmem_cli.batch.cluster import Dealer, WorkerStats
from flashmem_cli.batch.requests import BatchRequest, LineError
from flashmem_cli.batch.results import Completion
from flashmem_cli.batch.worker import WorkerInfo
from flashmem_cli.errors import FlashmemError


class RayError(Exception):
    pass


class RayActorError(RayError):
    pass


class ActorUnavailableError(RayActorError):
    pass


class ActorDiedError(RayActorError):
    pass


class WorkerCrashedError(RayError):
    pass


PENDING = object()  # a ref that never resolves (a worker Ray cannot place again)


class Ref:
    def __init__(self, value: object):
        self.value = value


Behaviour = Callable[[BatchRequest], Completion | LineError | Exception]


class Remote:
    def __init__(self, call: Callable[..., object]):
        self.call = call

    def remote(self, *args: object) -> Ref:
        return Ref(self.call(*args))


class Worker:
    """A handle: `behaviour` answers each request; `alive` decides what a ping gets."""

    def __init__(self, index: int, log: list[str], behaviour: Behaviour):
        self.index = index
        self.alive = True
        self.behaviour = behaviour
        self.submit = Remote(self._submit)
        self.info = Remote(self._info)
        self.in_flight_tokens = Remote(lambda: 0)
        self.log = log
        self.pid = 1
        self.pinged: object = None  # what a ping gets instead, if set

    def _submit(self, request: BatchRequest) -> object:
        self.log.append(f"w{self.index} got {request.id}")
        return self.behaviour(request)

    def _info(self) -> object:
        if isinstance(self.pinged, list):
            return self.pinged.pop(0)
        if self.pinged is not None:
            return self.pinged
        self.pid += 1  # asked after a loss: a new process
        return WorkerInfo("node", self.pid, None) if self.alive else ActorDiedError("gone")


class FakeRay:
    exceptions = SimpleNamespace(
        RayError=RayError,
        RayActorError=RayActorError,
        ActorUnavailableError=ActorUnavailableError,
        WorkerCrashedError=WorkerCrashedError,
    )

    def wait(self, refs: list[Ref], num_returns: int, timeout: float) -> tuple[list, list]:
        ready = [ref for ref in refs if ref.value is not PENDING]
        return ready, [ref for ref in refs if ref.value is PENDING]

    def get(self, ref: Ref) -> object:
        if isinstance(ref.value, Exception):
            raise ref.value
        return ref.value


def answer(request: BatchRequest) -> Completion:
    return Completion(text=f"reply to {request.id}", finish_reason="stop", prompt_tokens=3,
                      completion_tokens=2)  # fmt: skip


def request(line: int, session: str | None = None) -> BatchRequest:
    return BatchRequest(line=line, id=f"r{line}", kind="completion", prompt="x", session=session)


def deal(
    requests: list[BatchRequest], behaviours: list[Behaviour], parallel: int = 1
) -> tuple[list[tuple[str, object]], list[str], list[WorkerStats], list[Worker]]:
    log: list[str] = []
    workers = [Worker(i, log, b) for i, b in enumerate(behaviours)]
    stats = [WorkerStats(f"w-{i}", pid=1, state="running") for i in range(len(workers))]
    reported: list[tuple[str, object]] = []

    def report(request: BatchRequest, result: object) -> None:
        log.append(f"reported {request.id}")
        reported.append((request.id, result))

    dealer = Dealer(FakeRay(), workers, stats, parallel, report, None)
    dealer.run(requests)
    return reported, log, stats, workers


def test_every_request_is_reported_once_across_workers():
    requests = [request(i) for i in range(1, 11)]
    reported, log, stats, _ = deal(requests, [answer, answer])
    assert sorted(rid for rid, _ in reported) == sorted(r.id for r in requests)
    assert all(isinstance(result, Completion) for _, result in reported)
    assert stats[0].done > 0 and stats[1].done > 0  # both workers got work
    assert sum(s.generated_tokens for s in stats) == 2 * len(requests)


def test_a_sessions_lines_go_to_one_worker_one_at_a_time_in_order():
    requests = [request(1, "a"), request(2), request(3, "a"), request(4), request(5, "a")]
    reported, log, _, _ = deal(requests, [answer, answer], parallel=2)
    order = [entry for entry in log if entry.endswith(("r1", "r3", "r5"))]
    worker = order[0].split()[0]
    assert order == [f"{worker} got r1", "reported r1", f"{worker} got r3", "reported r3",
                     f"{worker} got r5", "reported r5"]  # fmt: skip
    assert [rid for rid, _ in reported if rid in ("r1", "r3", "r5")] == ["r1", "r3", "r5"]


def test_a_dead_workers_request_is_dealt_again_and_written_once():
    deaths = {"r2": 1}  # r2's worker dies under it once

    def dies_once(request: BatchRequest) -> object:
        if deaths.get(request.id):
            deaths[request.id] -= 1
            return ActorUnavailableError("the actor died")
        return answer(request)

    requests = [request(i) for i in range(1, 5)]
    reported, log, stats, _ = deal(requests, [dies_once, dies_once])
    assert sorted(rid for rid, _ in reported) == ["r1", "r2", "r3", "r4"]
    assert sum(1 for entry in log if entry.endswith("got r2")) == 2
    assert sum(s.lost for s in stats) == 1 and sum(s.restarts for s in stats) == 1
    assert all(s.state == "running" for s in stats)


def test_a_request_that_kills_every_worker_fails_after_max_attempts():
    def poison(request: BatchRequest) -> object:
        return WorkerCrashedError("OOM") if request.id == "r1" else answer(request)

    reported, log, _, _ = deal([request(1), request(2)], [poison, poison])
    results = dict(reported)
    assert isinstance(results["r1"], LineError) and results["r1"].code == "request_failed"
    assert f"died {cluster.MAX_ATTEMPTS} times" in results["r1"].message
    assert isinstance(results["r2"], Completion)
    assert sum(1 for entry in log if entry.endswith("got r1")) == cluster.MAX_ATTEMPTS


def test_when_every_worker_is_dead_the_rest_is_left_for_resume():
    workers_log: list[Worker] = []

    def dies(request: BatchRequest) -> object:
        for worker in workers_log:
            worker.alive = False
        return ActorDiedError("node lost")

    log: list[str] = []
    workers = [Worker(i, log, dies) for i in range(2)]
    workers_log.extend(workers)
    stats = [WorkerStats(f"w-{i}", state="running") for i in range(2)]
    reported: list[str] = []
    dealer = Dealer(FakeRay(), workers, stats, 1, lambda r, _: reported.append(r.id), None)
    with pytest.raises(FlashmemError, match="every Ray worker died.*--resume"):
        dealer.run([request(i) for i in range(1, 6)])
    assert reported == [] and all(s.state == "dead" for s in stats)


def test_a_requests_own_error_is_its_line_not_a_worker_loss():
    def raises(request: BatchRequest) -> object:
        return RayError("Traceback ...\nValueError: bad template")

    reported, _, stats, _ = deal([request(1)], [raises])
    result = reported[0][1]
    assert isinstance(result, LineError) and result.message == "ValueError: bad template"
    assert stats[0].lost == 0 and stats[0].failed == 1


def test_a_session_waits_for_its_restarting_worker_and_moves_only_when_it_is_dead():
    lost_once = {"r1": True}

    def dies_on_r1(request: BatchRequest) -> object:
        if lost_once.pop(request.id, False):
            return ActorUnavailableError("the actor died")
        return answer(request)

    requests = [request(1, "a"), request(2, "a"), request(3), request(4)]
    reported, log, stats, _ = deal(requests, [dies_on_r1, dies_on_r1])
    session_log = [entry.split()[0] for entry in log if entry.endswith(("got r1", "got r2"))]
    assert len(set(session_log)) == 1 and len(session_log) == 3  # r1 twice, then r2: one worker
    assert [rid for rid, _ in reported if rid in ("r1", "r2")] == ["r1", "r2"]

    def dead_for_good(request: BatchRequest) -> object:
        workers[0].alive = False
        return ActorDiedError("node lost")

    log2: list[str] = []
    workers = [Worker(0, log2, dead_for_good), Worker(1, log2, answer)]
    stats2 = [WorkerStats(f"w-{i}", state="running") for i in range(2)]
    dealer = Dealer(
        FakeRay(), workers, stats2, 1, lambda r, _: log2.append(f"reported {r.id}"), None
    )
    dealer.session_owner["a"] = 0
    dealer.run([request(1, "a"), request(2, "a")])
    assert stats2[0].state == "dead"
    assert log2 == ["w0 got r1", "w1 got r1", "reported r1", "w1 got r2", "reported r2"]


def lost_once(ids: set[str]) -> Behaviour:
    def behaviour(request: BatchRequest) -> Completion | LineError | Exception:
        if request.id in ids:
            ids.discard(request.id)
            return ActorUnavailableError("the actor is unavailable")
        return answer(request)

    return behaviour


def dealer_for(workers: list[Worker], reported: list[str]) -> tuple[Dealer, list[WorkerStats]]:
    stats = [WorkerStats(f"w-{i}", pid=1, state="running") for i in range(len(workers))]
    return Dealer(FakeRay(), workers, stats, 1, lambda r, _: reported.append(r.id), None), stats


def test_a_worker_out_of_reach_but_not_restarted_counts_no_restart():
    log: list[str] = []
    behaviour = lost_once({"r1"})
    workers = [Worker(0, log, behaviour)]
    workers[0].pinged = WorkerInfo("node", 1, None)  # the same process answers the ping
    reported: list[str] = []
    dealer, stats = dealer_for(workers, reported)
    dealer.run([request(1), request(2)])
    assert sorted(reported) == ["r1", "r2"] and stats[0].restarts == 0 and stats[0].lost == 1


def test_a_worker_restarted_on_a_node_with_another_file_fails_the_run():
    log: list[str] = []
    workers = [Worker(0, log, lost_once({"r1"}))]
    workers[0].pinged = WorkerInfo("node-b", 7, "node node-b has another file at /m.gguf")
    dealer, _ = dealer_for(workers, [])
    with pytest.raises(FlashmemError, match="node-b has another file"):
        dealer.run([request(1)])


def test_a_worker_ray_cannot_bring_back_counts_as_dead(monkeypatch):
    monkeypatch.setattr(cluster, "RESTART_TIMEOUT_S", 0.0)
    log: list[str] = []
    workers = [Worker(0, log, lost_once({"r1"})), Worker(1, log, answer)]
    workers[0].pinged = PENDING  # no node has room for it
    reported: list[str] = []
    dealer, stats = dealer_for(workers, reported)
    dealer.session_owner["a"] = 0
    dealer.run([request(1, "a"), request(2, "a"), request(3)])
    assert stats[0].state == "dead" and sorted(reported) == ["r1", "r2", "r3"]
    assert [e for e in log if e.endswith(("got r1", "got r2"))] == [
        "w0 got r1", "w1 got r1", "w1 got r2"
    ]  # fmt: skip


def test_a_worker_still_restarting_is_asked_again_at_the_next_poll(monkeypatch):
    monkeypatch.setattr(cluster, "POLL_S", 0.0)
    log: list[str] = []
    workers = [Worker(0, log, lost_once({"r1"}))]
    workers[0].pinged = [ActorUnavailableError("restarting"), WorkerInfo("node", 9, None)]
    reported: list[str] = []
    dealer, stats = dealer_for(workers, reported)
    dealer.run([request(1), request(2)])
    assert sorted(reported) == ["r1", "r2"] and stats[0].restarts == 1
    assert workers[0].pinged == []  # asked twice


def test_a_request_that_kills_its_worker_runs_alone_before_it_is_failed():
    """Every request in flight dies with the worker: r1 kills it; the others shared it."""
    log: list[str] = []
    doomed = [False]  # r1 is on the worker: whatever is dealt with it dies too

    def poison_on_board(request: BatchRequest) -> object:
        doomed[0] = doomed[0] or request.id == "r1"
        return WorkerCrashedError("OOM") if doomed[0] else answer(request)

    worker = Worker(0, log, poison_on_board)
    restarted = worker._info

    def restart() -> object:
        doomed[0] = False
        return restarted()

    worker.info = Remote(restart)
    reported: list[str] = []
    results: dict[str, object] = {}
    stats = [WorkerStats("w-0", pid=1, state="running")]

    def report(request: BatchRequest, result: object) -> None:
        log.append(f"reported {request.id}")
        reported.append(request.id)
        results[request.id] = result

    Dealer(FakeRay(), [worker], stats, 2, report, None).run([request(i) for i in range(1, 5)])
    assert sorted(reported) == ["r1", "r2", "r3", "r4"]
    assert isinstance(results["r1"], LineError) and results["r1"].code == "request_failed"
    assert all(isinstance(results[r], Completion) for r in ("r2", "r3", "r4"))
    assert log == ["w0 got r1", "w0 got r2", "w0 got r3", "w0 got r4"] * 2 + [
        "w0 got r1",
        "reported r1",
        "w0 got r2",
        "reported r2",
        "w0 got r3",
        "reported r3",
        "w0 got r4",
        "reported r4",
    ]  # fmt: skip  (all four together twice, then each alone)
