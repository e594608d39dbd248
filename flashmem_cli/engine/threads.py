"""How many threads llama.cpp gets when the user gives no -t: the cores free right now.

A laptop is never idle. llama.cpp splits every graph node across its threads and waits for all
of them at a barrier after each node (hundreds per token), so one thread that loses its core to
another process stalls the others at every barrier: with more threads than free cores a turn
gets slower, not faster. So the default is the usable cores minus the other runnable tasks,
sampled from /proc/loadavg, never more than the old rule (all cores up to 4, half above) and
never less than 1. Chat and batch re-check it as they go (Context.set_threads).

The other half of the cure is how the threads wait. Linux builds of llama-cpp-python use GCC's
OpenMP, whose barrier spins 300000 times (about 3 ms) before it sleeps: beside a busy process
that spinning eats the very core the late thread needs. `short_openmp_spins` cuts it to 1000
spins; it must run before llama_cpp is imported, since libgomp reads its settings as it loads.
Without /proc/loadavg (macOS, Windows) the default is the old rule alone.
Measured on 2 cores (a 64-token turn after 200 prompt tokens, 2 threads): idle 2.7 s spinning
300000, 2.8 s at 1000, 3.4 s never spinning (OMP_WAIT_POLICY=passive); beside a CPU-bound
process 7.8 s, 5.4 s and 5.0 s (1 thread: 4.4 s, which the load-aware default picks there).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

LOADAVG = Path("/proc/loadavg")
OWN_TASKS = Path("/proc/self/task")
SAMPLES = 3
SAMPLE_INTERVAL_S = 0.001
OPENMP_WAIT_ENV = "OMP_WAIT_POLICY"
OPENMP_SPIN_ENV = "GOMP_SPINCOUNT"
SPINS_MARK_ENV = "FLASHMEM_SET_GOMP_SPINCOUNT"  # children know the spin count is ours
OPENMP_SPINS = "1000"  # about 10-30 us: idle turns as fast as spinning longer, busy ones not


def short_openmp_spins() -> None:
    """Have llama.cpp's OpenMP threads spin briefly at a barrier, then sleep; a wait policy
    or spin count the user set stays. Call it before llama_cpp is first imported."""
    if OPENMP_WAIT_ENV not in os.environ and OPENMP_SPIN_ENV not in os.environ:
        os.environ[OPENMP_SPIN_ENV] = OPENMP_SPINS
        os.environ[SPINS_MARK_ENV] = "1"


def stock_openmp_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without the spin count flashmem set itself: for a program measured as it ships
    (llama.cpp's own tools), so that it is not run with flashmem's setting."""
    if env.get(SPINS_MARK_ENV) != "1":
        return dict(env)
    return {k: v for k, v in env.items() if k not in (OPENMP_SPIN_ENV, SPINS_MARK_ENV)}


def online_cores() -> int:
    return os.cpu_count() or 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return online_cores()


def ceiling_threads(usable: int) -> int:
    """The most threads by default: every core on small machines, half (about the physical
    cores) on large ones, where hyper-threads add little."""
    return usable if usable <= 4 else usable // 2


def free_cores(usable: int, runnable_others: float) -> int:
    """Threads for `usable` cores of which `runnable_others` tasks of other processes want
    some: the rest, at least 1, at most `ceiling_threads`."""
    free = usable - int(runnable_others + 0.5)
    return max(1, min(ceiling_threads(usable), free))


def parse_running(loadavg: str) -> int | None:
    """The runnable-task count ("3" of "0.52 0.58 0.59 3/467 12345"), None if not there."""
    fields = loadavg.split()
    if len(fields) < 4 or "/" not in fields[3]:
        return None
    running = fields[3].split("/", 1)[0]
    return int(running) if running.isdigit() else None


def own_running(tasks: Path = OWN_TASKS) -> int:
    """Threads of this process that are runnable now (the caller among them): llama.cpp's
    workers may still be spinning after the last decode, and they are not someone else."""
    count = 0
    for stat in tasks.glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the thread ended
        if thread_state(text) == "R":
            count += 1
    return max(1, count)


def thread_state(stat: str) -> str:
    """The state letter of a /proc/<pid>/task/<tid>/stat line; the name in parentheses may
    hold spaces and parentheses, so the state is the field after its last ')'."""
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    return fields[0] if paren and fields else "?"


def sample_others(
    read_loadavg: Callable[[], str],
    read_own: Callable[[], int],
    samples: int = SAMPLES,
    interval_s: float = SAMPLE_INTERVAL_S,
) -> float | None:
    """Median over a few quick samples of runnable tasks that are not ours; None if the
    load file cannot be parsed."""
    counts: list[int] = []
    for i in range(samples):
        running = parse_running(read_loadavg())
        if running is None:
            return None
        counts.append(max(0, running - read_own()))
        if i + 1 < samples:
            time.sleep(interval_s)
    return statistics.median(counts)


def runnable_others() -> float:
    """Runnable tasks of other processes that compete for this process's cores; 0 where
    /proc/loadavg is missing (macOS, Windows): the 1-minute load average there counts our own
    recent turns too, and would make the count swing turn by turn."""
    others = linux_others()
    if others is None:
        return 0.0
    return others * usable_cores() / max(usable_cores(), online_cores())


def linux_others() -> float | None:
    """From /proc/loadavg; None where there is none."""
    try:
        return sample_others(LOADAVG.read_text, own_running)
    except OSError:
        return None


def adaptive_threads() -> int:
    """The default thread count: the usable cores that no other process is using now."""
    return free_cores(usable_cores(), runnable_others())
