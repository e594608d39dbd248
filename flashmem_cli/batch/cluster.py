"""`flashmem run --ray`: the driver deals requests to Ray actors and writes every result itself.

Each actor is a `BatchWorker` (batch/worker.py): the model loaded once, its own continuous
batching. The driver keeps each worker a window of requests ahead, so it never idles between
results; a session's lines go to one worker, one line at a time, in file order. A worker that
dies is restarted by Ray (`max_restarts`) and the requests it had are dealt again; the driver
writes the first result of a request and no later one, so nothing is written twice.

Ray is imported only here and only when a run asks for it (the `ray` extra).
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from flashmem_cli import models
from flashmem_cli.batch.requests import BatchRequest, LineError
from flashmem_cli.batch.results import Completion
from flashmem_cli.batch.scheduler import BatchSettings, StepHook, kv_slot_size
from flashmem_cli.batch.worker import BatchWorker, ModelSpec, WorkerInfo
from flashmem_cli.engine.backend import Model
from flashmem_cli.errors import FlashmemError

if TYPE_CHECKING:
    from flashmem_cli.batch.runner import RunPlan, RunStats

NAMESPACE = "flashmem"
MAX_RESTARTS = 3  # per worker: Ray restarts a dead actor this many times, then gives up
MAX_ATTEMPTS = 3  # worker deaths under a request (the last with it alone) before it fails
START_TIMEOUT_S = 600.0  # workers load the model before they answer
RESTART_TIMEOUT_S = 600.0  # a worker not back this long after a loss counts as dead
POLL_S = 0.5  # how often the driver asks the workers for their in-flight tokens
REACH_TIMEOUT_S = 5.0
MAX_SKIPPED = 10_000  # lines of busy sessions looked past per deal, at most
Report = Callable[[BatchRequest, Completion | LineError], None]


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: $RAY_ADDRESS, a cluster started here, or a new local one
    workers: int | None = None  # None: one per node


@dataclass
class WorkerStats:
    name: str
    node: str = "?"
    pid: int = 0
    state: str = "starting"  # starting, running, restarting, dead
    done: int = 0
    failed: int = 0
    generated_tokens: int = 0
    in_flight_tokens: int = 0
    restarts: int = 0
    lost: int = 0  # requests it held when it died, dealt again
    kv_cells: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def tokens_per_s(self) -> float:
        elapsed = (self.finished or time.perf_counter()) - self.started
        tokens = self.generated_tokens + self.in_flight_tokens
        return tokens / elapsed if elapsed > 0 else 0.0


@dataclass
class Call:
    worker: int
    request: BatchRequest


def import_ray() -> ModuleType:
    use_auth_token()  # before the import: Ray reads its settings then
    try:
        import ray
    except ImportError:
        raise FlashmemError(
            "--ray needs Ray on the driver and on every node: pip install 'flashmem[ray]'"
        ) from None
    return ray


def run_requests(
    plan: RunPlan,
    file_model: models.ModelFile,
    requests: list[BatchRequest],
    report: Report,
    stats: RunStats,
    on_step: StepHook | None = None,
) -> None:
    """Every request ends in one `report` call, unless every worker dies first (FlashmemError;
    the requests not reported are left for --resume). `stats.workers` is kept current."""
    assert plan.ray is not None
    ray = import_ray()
    setup_started = time.perf_counter()
    settings = plan.settings
    slot_tokens = slot_size(file_model, settings, requests)
    spec = ModelSpec(str(file_model.path), file_model.fingerprint, plan.n_gpu_layers)
    with connected(ray, plan.ray.address):
        handles = start_workers(ray, plan.ray, spec, settings, slot_tokens, stats.workers)
        stats.kv_cells = sum(w.kv_cells for w in stats.workers)
        stats.setup_s = time.perf_counter() - setup_started
        try:
            dealer = Dealer(ray, handles, stats.workers, settings.parallel, report, on_step)
            dealer.run(requests)
        finally:
            stop_workers(ray, handles)
            stats.in_flight_tokens = 0
            for worker in stats.workers:
                worker.finished = time.perf_counter()
                worker.in_flight_tokens = 0


def slot_size(file_model: models.ModelFile, settings: BatchSettings, requests: list) -> int:
    """Every worker's cells per sequence, from the whole file (kv_slot_size), read here with
    the vocabulary alone."""
    with Model(file_model.path, vocab_only=True) as model:
        return kv_slot_size(model, models.chat_template_for(model), settings, requests)


@contextmanager
def connected(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Connected to the cluster (a caller already connected keeps its connection). Workers get
    the driver's FLASHMEM_* variables: the same sessions and models directories."""
    if ray.is_initialized():
        yield
        return
    env = {k: v for k, v in os.environ.items() if k.startswith("FLASHMEM_")}
    extra: dict[str, Any] = {} if address else {"include_dashboard": False}
    if address:
        check_reachable(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            logging_level=logging.ERROR,
            **extra,
        )
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        where = f"at {address}" if address else "(none found; starting one failed)"
        raise FlashmemError(f"cannot connect to a Ray cluster {where}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str) -> None:
    """Fail at once on a HOST:PORT nothing answers at (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host:
        return  # ray://, auto, local: Ray's own forms
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:6379
    elif ":" in host:
        raise FlashmemError(f"--address {address!r}: write an IPv6 host in brackets, [::1]:6379")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise FlashmemError(f"--address {address!r}: use HOST:PORT, e.g. 10.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:  # ValueError: a host name IDNA cannot encode
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise FlashmemError(f"cannot reach the Ray cluster at {address}: {reason}") from None


def use_auth_token() -> None:
    """A cluster from `ray start` (Ray 2.5x and later) wants a token, which it writes to
    ~/.ray/auth_token; Ray's driver sends it only with RAY_AUTH_MODE=token, else its connect
    fails after long retries. Send it when there is one and the user chose no mode (Ray's
    own `ray.init()` starting a cluster does the same)."""
    global token_mode_guessed
    has_token = any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if "RAY_AUTH_MODE" not in os.environ and (has_token or default_token().is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
        token_mode_guessed = True


token_mode_guessed = False  # use_auth_token chose token mode: a cluster without it fails


def default_token() -> Path:
    """Where `ray start` writes its token (a path that cannot be, without a home directory)."""
    try:
        return Path.home() / ".ray" / "auth_token"
    except RuntimeError:
        return Path("/nonexistent")


def auth_hint() -> str:
    """What to try when workers fail to start and the token mode was a guess: a cluster
    started with RAY_AUTH_MODE=disabled cannot reach a driver in token mode."""
    if not token_mode_guessed:
        return ""
    return (
        f" (flashmem used token authentication because {default_token()} or RAY_AUTH_TOKEN "
        "exists; for a cluster without it, set RAY_AUTH_MODE=disabled)"
    )


def start_workers(
    ray: ModuleType,
    options: RayOptions,
    spec: ModelSpec,
    settings: BatchSettings,
    slot_tokens: int,
    stats: list[WorkerStats],
) -> list[Any]:
    """The actors, each with the model loaded and checked; fails the run if any node holds
    another model file."""
    count = options.workers or len([n for n in ray.nodes() if n.get("Alive")])
    resources = ray.cluster_resources()
    if resources.get("CPU", 0) < count:
        raise FlashmemError(
            f"--workers {count} needs {count} CPUs in the Ray cluster; it has "
            f"{resources.get('CPU', 0):g}"
        )
    gpus = 1 if spec.n_gpu_layers != 0 and resources.get("GPU", 0) >= count else 0
    if gpus == 0 and spec.n_gpu_layers is None:  # no GPU reserved: none used unless -ngl says
        spec = replace(spec, n_gpu_layers=0)
    actor = ray.remote(BatchWorker)
    run_tag = uuid.uuid4().hex[:8]
    handles = []
    for i in range(count):
        name = f"flashmem-run-{run_tag}-{i}"
        handles.append(
            actor.options(
                name=name,
                namespace=NAMESPACE,
                max_restarts=MAX_RESTARTS,
                max_task_retries=0,
                max_concurrency=window(settings.parallel) + 4,
                num_cpus=1,
                num_gpus=gpus,
                scheduling_strategy="SPREAD",
            ).remote(spec, settings, slot_tokens)
        )
        stats.append(WorkerStats(name))
    if not handles:
        raise FlashmemError("the Ray cluster has no live node")
    try:
        infos = ray.get([h.info.remote() for h in handles], timeout=START_TIMEOUT_S)
        for worker, info in zip(stats, infos, strict=True):
            check_started(worker, info)
    except ray.exceptions.GetTimeoutError:
        stop_workers(ray, handles)
        raise FlashmemError(
            f"the Ray workers did not start within {START_TIMEOUT_S:.0f} s"
        ) from None
    except ray.exceptions.RayError as exc:
        stop_workers(ray, handles)
        raise FlashmemError(f"a Ray worker failed to start: {one_line(exc)}{auth_hint()}") from None
    except FlashmemError:
        stop_workers(ray, handles)
        raise
    return handles


def stop_workers(ray: ModuleType, handles: list[Any]) -> None:
    for handle in handles:
        ray.kill(handle, no_restart=True)


def check_started(worker: WorkerStats, info: WorkerInfo) -> None:
    if info.problem:
        raise FlashmemError(info.problem)
    if worker.state == "starting":
        worker.started = time.perf_counter()  # its tokens/s from here, not from its model load
    worker.node = info.node
    worker.pid = info.pid
    worker.kv_cells = info.kv_cells
    worker.state = "running"


def window(parallel: int) -> int:
    """Requests dealt to a worker ahead of its results: enough to refill every slot the moment
    one frees, without holding back work another worker could take."""
    return 2 * parallel


class Dealer:
    """Deals requests to workers and collects their results, re-dealing what a dead worker held."""

    def __init__(
        self,
        ray: ModuleType,
        handles: list[Any],
        workers: list[WorkerStats],
        parallel: int,
        report: Report,
        on_step: StepHook | None,
    ):
        self.ray = ray
        self.handles = handles
        self.workers = workers
        self.window = window(parallel)
        self.report = report
        self.on_step = on_step
        self.pending: list[BatchRequest] = []  # in file order
        self.calls: dict[Any, Call] = {}  # object ref -> the request it answers
        self.pings: dict[Any, int] = {}  # readiness of a worker after a loss
        self.polls: dict[Any, int] = {}  # in-flight tokens
        self.attempts: dict[int, int] = {}  # line -> times its worker died under it
        self.session_owner: dict[str, int] = {}
        self.busy_sessions: set[str] = set()
        self.reported: set[int] = set()  # lines
        self.polled = time.perf_counter()
        self.down_since: dict[int, float] = {}  # worker -> when it was lost
        self.repings: set[int] = set()  # restarting workers to ask again at the next poll

    def run(self, requests: list[BatchRequest]) -> None:
        self.pending = sorted(requests, key=lambda r: r.line)
        while self.pending or self.calls:
            self.give_up_on_restarts()
            self.deal()
            if not self.calls and not self.pings and not self.repings:
                raise FlashmemError(
                    "every Ray worker died; the lines not written are left for --resume"
                )
            self.poll()
            for ref in self.wait():
                self.collect(ref)
            if self.on_step:
                self.on_step(sum(w.in_flight_tokens for w in self.workers))

    # -- dealing --------------------------------------------------------------------------------

    def deal(self) -> None:
        room = {i: self.room(i) for i in self.running()}
        kept: list[BatchRequest] = []
        skipped = 0
        for position, request in enumerate(self.pending):
            if not any(n > 0 for n in room.values()) or skipped > MAX_SKIPPED:
                kept.extend(self.pending[position:])
                break
            worker = self.worker_for(request, room)
            if worker is None:
                if self.suspect(request):
                    self.drain_for(request, room)
                kept.append(request)
                skipped += 1
                continue
            self.send(worker, request)
            room[worker] = 0 if self.suspect(request) else room[worker] - 1
        self.pending = kept

    def running(self) -> list[int]:
        return [i for i, w in enumerate(self.workers) if w.state == "running"]

    def held(self, worker: int) -> list[BatchRequest]:
        return [call.request for call in self.calls.values() if call.worker == worker]

    def room(self, worker: int) -> int:
        """Requests the worker can take now: none while it runs a suspect."""
        held = self.held(worker)
        return 0 if any(map(self.suspect, held)) else self.window - len(held)

    def suspect(self, request: BatchRequest) -> bool:
        """A request that was in flight at MAX_ATTEMPTS - 1 worker deaths runs alone: a death
        under it then is its own doing, and requests that shared its worker are not charged."""
        return self.attempts.get(request.line, 0) >= MAX_ATTEMPTS - 1

    def worker_for(self, request: BatchRequest, room: dict[int, int]) -> int | None:
        """The worker with the most room (an empty one for a suspect); for a session line, the
        session's worker, one line at a time, waiting for it while Ray restarts it (its node
        holds the session), and another worker only once it is dead."""
        need = self.window if self.suspect(request) else 1
        session = request.session
        if session is not None:
            if session in self.busy_sessions:
                return None
            owner = self.session_owner.get(session)
            if owner is not None and self.workers[owner].state != "dead":
                return owner if room.get(owner, 0) >= need else None
        takers = [i for i in room if room[i] >= need]
        if not takers:
            return None
        worker = max(takers, key=lambda i: room[i])
        if session is not None:
            self.session_owner[session] = worker
        return worker

    def drain_for(self, request: BatchRequest, room: dict[int, int]) -> None:
        """Deal nothing more this round to the worker a waiting suspect will run on (its
        session's, else the emptiest), so that it empties instead of being kept busy."""
        owner = self.session_owner.get(request.session or "")
        worker = owner if owner in room else max(room, key=lambda i: room[i], default=None)
        if worker is not None:
            room[worker] = 0

    def send(self, worker: int, request: BatchRequest) -> None:
        ref = self.handles[worker].submit.remote(request)
        self.calls[ref] = Call(worker, request)
        if request.session is not None:
            self.busy_sessions.add(request.session)

    # -- collecting -----------------------------------------------------------------------------

    def wait(self) -> list[Any]:
        refs = [*self.calls, *self.pings, *self.polls]
        if not refs:  # only workers to ask again at the next poll
            time.sleep(POLL_S)
            return []
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=POLL_S)
        if ready:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def collect(self, ref: Any) -> None:
        if ref in self.polls:
            self.collect_poll(ref, self.polls.pop(ref))
        elif ref in self.pings:
            self.collect_ping(ref, self.pings.pop(ref))
        elif ref in self.calls:
            self.collect_call(ref, self.calls.pop(ref))

    def collect_call(self, ref: Any, call: Call) -> None:
        request = call.request
        if request.session is not None:
            self.busy_sessions.discard(request.session)
        exceptions = self.ray.exceptions
        try:
            result = self.ray.get(ref)
        except (exceptions.RayActorError, exceptions.WorkerCrashedError) as exc:
            self.lost(call, exc)
            return
        except exceptions.RayError as exc:  # the request's own failure, not the worker's
            result = LineError(request.line, request.id, "request_failed", one_line(exc))
        self.deliver(call.worker, request, result)

    def deliver(self, worker: int, request: BatchRequest, result: Completion | LineError) -> None:
        if request.line in self.reported:
            return  # ran twice (a worker thought lost was not): written once
        self.reported.add(request.line)
        stats = self.workers[worker]
        if isinstance(result, LineError):
            stats.failed += 1
        else:
            stats.done += 1
            stats.generated_tokens += result.completion_tokens
            stats.in_flight_tokens = max(0, stats.in_flight_tokens - result.completion_tokens)
        self.report(request, result)

    def lost(self, call: Call, exc: Exception) -> None:
        """The worker died or cannot be reached: deal its request again, or give up on it."""
        request = call.request
        self.workers[call.worker].lost += 1
        attempts = self.attempts.get(request.line, 0) + 1
        self.attempts[request.line] = attempts
        if attempts >= MAX_ATTEMPTS:
            message = f"its Ray worker died {attempts} times while running it: {one_line(exc)}"
            self.deliver(
                call.worker, request, LineError(request.line, request.id, "request_failed", message)
            )
        else:
            bisect.insort(self.pending, request, key=lambda r: r.line)
        self.worker_down(call.worker)

    def worker_down(self, worker: int) -> None:
        stats = self.workers[worker]
        if stats.state != "running":
            return
        stats.state = "restarting"
        stats.in_flight_tokens = 0
        self.down_since[worker] = time.perf_counter()
        self.pings[self.handles[worker].info.remote()] = worker

    def collect_ping(self, ref: Any, worker: int) -> None:
        stats = self.workers[worker]
        if stats.state != "restarting":
            return  # given up on meanwhile
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError:
            self.repings.add(worker)  # still restarting: asked again at the next poll
            return
        except self.ray.exceptions.RayError:
            self.worker_dead(worker)
            return
        if info.pid != stats.pid:
            stats.restarts += 1  # else it was out of reach, not restarted
        check_started(stats, info)

    def give_up_on_restarts(self) -> None:
        """A worker Ray has not brought back within RESTART_TIMEOUT_S (no node with room for it)
        counts as dead: its sessions move on, and with every worker dead the run stops."""
        now = time.perf_counter()
        for worker, stats in enumerate(self.workers):
            if stats.state == "restarting" and now - self.down_since[worker] > RESTART_TIMEOUT_S:
                self.worker_dead(worker)

    def worker_dead(self, worker: int) -> None:
        self.workers[worker].state = "dead"
        self.session_owner = {s: w for s, w in self.session_owner.items() if w != worker}
        self.pings = {ref: w for ref, w in self.pings.items() if w != worker}
        self.repings.discard(worker)

    def poll(self) -> None:
        if time.perf_counter() - self.polled < POLL_S:
            return
        self.polled = time.perf_counter()
        for worker in self.repings:
            if self.workers[worker].state == "restarting":
                self.pings[self.handles[worker].info.remote()] = worker
        self.repings.clear()
        polled = set(self.polls.values())
        for worker in self.running():
            if worker not in polled and self.held(worker):
                self.polls[self.handles[worker].in_flight_tokens.remote()] = worker

    def collect_poll(self, ref: Any, worker: int) -> None:
        try:
            tokens = self.ray.get(ref)
        except self.ray.exceptions.RayError:
            return  # a lost worker shows through its calls
        if self.workers[worker].state == "running":
            self.workers[worker].in_flight_tokens = tokens


def one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
