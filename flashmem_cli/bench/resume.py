"""Benchmark: time to first token of a turn at growing history sizes, three ways: resumed in a
new process (restore state.bin, feed only the new message), `--stateless` in a new process
(re-process the whole transcript, as other local CLIs do), and warm in this process (the
conversation already in memory). All three run interleaved on copies of the same session."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flashmem_cli.bench.method import BenchOptions, Summary, interleaved, paired_ratio
from flashmem_cli.bench.report import Column, Plot, Section
from flashmem_cli.chat.conversation import ChatOptions, Conversation, open_conversation
from flashmem_cli.chat.memory import MemoryOptions
from flashmem_cli.config import HOME_ENV, MODELS_DIR_ENV, models_dir
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.store.sessions import LOCK, SessionStore

Say = Callable[[str], None]

SIZES = (512, 1024, 2048, 4096, 8192)
QUICK_SIZES = (64, 160)
RUNS = 2
LARGE = 4096  # a stateless turn here takes 20-60 s on 2 cores: LARGE_RUNS rounds, not RUNS
LARGE_RUNS = 1
N_PREDICT = 8
SEND_TOKENS = 1000  # filler per send, at most: ~9 sends reach 8192 tokens
TURN_OVERHEAD = 32  # the template and the N_PREDICT reply tokens around a filler message
SENTENCES = (
    "Here is another note for the record: the meeting moved to Thursday afternoon.",
    "The budget for the garden project is four hundred euros, paid in two parts.",
    "The tomatoes need water every second day, and the basil wants shade at noon.",
    "Anna will bring the ladder on Saturday; the shed key is under the blue pot.",
    "The plumber said the kitchen tap needs a new washer before the winter comes.",
)
QUESTION = "Summarise the notes above in one sentence."
METHODS = ("restored", "stateless", "warm")


@dataclass(frozen=True)
class Setup:
    """Where the bench's sessions live and how every conversation of it runs."""

    home: Path
    options: BenchOptions
    n_ctx: int

    @property
    def store(self) -> SessionStore:
        return SessionStore(self.home / "sessions")

    def chat_options(self) -> ChatOptions:
        chat = ChatOptions(
            model=self.options.model,
            n_ctx=self.n_ctx,
            n_gpu_layers=self.options.n_gpu_layers,
            n_predict=N_PREDICT,
            sampling=SamplingParams(0),
            memory=MemoryOptions(),  # on, as `flashmem chat` has it by default
        )
        return replace(chat, n_threads=self.options.thread_count())

    def cli_flags(self) -> list[str]:
        flags = ["--json", "--temp", "0", "-n", str(N_PREDICT), "-c", str(self.n_ctx)]
        if self.options.model:
            flags += ["-m", self.options.model]
        flags += ["-t", str(self.options.thread_count())]
        if self.options.n_gpu_layers is not None:
            flags += ["-ngl", str(self.options.n_gpu_layers)]
        return flags

    def env(self) -> dict[str, str]:
        """This process's environment, the sessions moved here (and the models left where this
        process finds them, which may depend on the home)."""
        return {**os.environ, HOME_ENV: str(self.home), MODELS_DIR_ENV: str(models_dir())}


@dataclass(frozen=True)
class Prepared:
    """A snapshot of the grown conversation at one target size."""

    name: str
    target: int
    tokens: int
    state_bytes: int


def run(options: BenchOptions, say: Say) -> Section:
    sizes = QUICK_SIZES if options.quick else SIZES
    with tempfile.TemporaryDirectory(prefix="flashmem-bench-resume-") as tmp:
        setup = Setup(Path(tmp), options, ctx_for(max(sizes)))
        prepared = prepare_sessions(setup, sizes, say)
        rows = [measure(setup, snapshot, i == 0, say) for i, snapshot in enumerate(prepared)]
    return section(rows, sizes[-1], options)


def ctx_for(largest: int) -> int:
    """A context twice the largest history (a power of two), so that nothing is dropped or
    consolidated; the same -c in every run, since a state saved at another -c is not restored."""
    return max(1024, 1 << math.ceil(math.log2(2 * largest)))


def rounds(options: BenchOptions, target: int, first: bool) -> tuple[int, int]:
    """(runs, warm-ups) at one size. A warm-up round at the first size only: later sizes find
    the model file cached and this process warm, so a discarded round would only cost time."""
    runs = options.runs(LARGE_RUNS if target >= LARGE else RUNS)
    return runs, options.warmups() if first else 0


# -- preparing the sessions ----------------------------------------------------------------------


def prepare_sessions(setup: Setup, sizes: tuple[int, ...], say: Say) -> list[Prepared]:
    """One conversation grown by filler turns; a copy of its directory at each size."""
    say(f"resume: growing one conversation to {sizes[-1]} tokens")
    snapshots = []
    with open_conversation(setup.store, "base", setup.chat_options()) as conversation:
        for target in sizes:
            grow(conversation, target)
            check_whole(conversation)
            name = f"h{target}"
            copy_session(conversation.session.dir, setup.store.root / name)
            kv = conversation.session.meta.kv
            size = kv.state.size if kv else 0
            snapshots.append(Prepared(name, target, len(conversation.seq), size))
    return snapshots


def grow(conversation: Conversation, target: int) -> None:
    while len(conversation.seq) < target:
        conversation.send(filler(conversation, target - len(conversation.seq)))


def filler(conversation: Conversation, remaining: int) -> str:
    """Sentences of notes, about `remaining` tokens of them with the turn around them (at least
    one, at most SEND_TOKENS)."""
    per_sentence = max(len(conversation.model.tokenize(s)) for s in SENTENCES) + 1
    wanted = math.ceil((remaining - TURN_OVERHEAD) / per_sentence)
    count = min(max(1, wanted), SEND_TOKENS // per_sentence)
    return " ".join(SENTENCES[i % len(SENTENCES)] for i in range(count))


def check_whole(conversation: Conversation) -> None:
    layout = conversation.layout
    if layout.dropped or layout.consolidated:
        raise RuntimeError(
            f"resume bench: the conversation lost turns to make room at -c {conversation.n_ctx}"
        )


def copy_session(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(LOCK))


# -- measuring -----------------------------------------------------------------------------------


def measure(setup: Setup, snapshot: Prepared, first: bool, say: Say) -> dict[str, Any]:
    """The three methods interleaved at one size; restore times come from the restored runs."""
    runs, warmups = rounds(setup.options, snapshot.target, first)
    restores: list[float] = []
    progress = Progress(snapshot.target, warmups + runs, say)
    with warm_conversation(setup, snapshot) as conversation:
        methods = {
            "restored": progress.wrap("restored", lambda: restored_run(setup, snapshot, restores)),
            "stateless": progress.wrap("stateless", lambda: stateless_run(setup, snapshot)),
            "warm": progress.wrap("warm", lambda: warm_ttft(conversation)),
        }
        samples = interleaved(methods, runs, warmups)
    samples["restore_ms"] = restores[warmups:]
    return row(snapshot, samples)


class Progress:
    """Progress lines: each method's run number at one size, warm-up rounds included."""

    def __init__(self, target: int, total: int, say: Say):
        self.target = target
        self.total = total
        self.say = say
        self.counts: dict[str, int] = {}

    def wrap(self, name: str, method: Callable[[], float]) -> Callable[[], float]:
        def counted() -> float:
            count = self.counts[name] = self.counts.get(name, 0) + 1
            self.say(f"resume: {name} at {self.target} tokens, run {count}/{self.total}")
            return method()

        return counted


@contextmanager
def warm_conversation(setup: Setup, snapshot: Prepared) -> Iterator[Conversation]:
    """A copy of the session open in this process, one un-timed turn already taken."""
    name = f"{snapshot.name}-warm"
    copy_session(setup.store.root / snapshot.name, setup.store.root / name)
    try:
        with open_conversation(setup.store, name, setup.chat_options()) as conversation:
            conversation.send(QUESTION)
            yield conversation
    finally:
        shutil.rmtree(setup.store.root / name, ignore_errors=True)


def warm_ttft(conversation: Conversation) -> float:
    return float(conversation.send(QUESTION).timings_ms["ttft"])


def restored_run(setup: Setup, snapshot: Prepared, restores: list[float]) -> float:
    turn = chat_turn(setup, snapshot, stateless=False)
    if turn["tokens"]["cached"] < snapshot.tokens:
        raise RuntimeError(f"resume bench: {snapshot.name} was not restored: {turn['notices']}")
    restores.append(float(turn["timings_ms"]["restore"]))
    return float(turn["timings_ms"]["ttft"])


def stateless_run(setup: Setup, snapshot: Prepared) -> float:
    turn = chat_turn(setup, snapshot, stateless=True)
    if turn["tokens"]["new_prompt"] < snapshot.tokens:
        raise RuntimeError(f"resume bench: {snapshot.name} was not re-processed whole")
    return float(turn["timings_ms"]["ttft"])


def chat_turn(setup: Setup, snapshot: Prepared, stateless: bool) -> dict[str, Any]:
    """One `flashmem chat --json` turn in a new process, on a fresh copy of the snapshot."""
    name = f"{snapshot.name}-run"
    copy = setup.store.root / name
    copy_session(setup.store.root / snapshot.name, copy)
    command = [sys.executable, "-m", "flashmem_cli", "chat", "-s", name, *setup.cli_flags()]
    command += ["-p", QUESTION] + (["--stateless"] if stateless else [])
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=setup.env(), timeout=600)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"resume bench: `flashmem chat` failed: {proc.stderr.strip()}")
    turn: dict[str, Any] = json.loads(proc.stdout)
    return turn


# -- the section ---------------------------------------------------------------------------------


def row(snapshot: Prepared, samples: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "history_tokens": snapshot.tokens,
        **{name: Summary.of(samples[name]).as_dict() for name in (*METHODS, "restore_ms")},
        "state_bytes": snapshot.state_bytes,
        "state_mib": snapshot.state_bytes / (1 << 20),
        "stateless_over_restored": paired_ratio(
            samples["stateless"], samples["restored"]
        ).as_dict(),
        "samples": samples,
    }


def section(rows: list[dict[str, Any]], largest: int, options: BenchOptions) -> Section:
    last = rows[-1]
    return Section(
        name="resume",
        title="Resuming a session: time to first token",
        method=method_text(options),
        columns=[
            Column("history_tokens", "history tokens"),
            Column("restored.median", "restored TTFT (ms)", "{:.1f}"),
            Column("warm.median", "warm TTFT (ms)", "{:.1f}"),
            Column("stateless.median", "stateless TTFT (ms)", "{:.1f}"),
            Column("restore_ms.median", "restore (ms)", "{:.1f}"),
            Column("state_mib", "state.bin (MiB)", "{:.1f}"),
            Column("stateless_over_restored.median", "stateless/restored", "{:.1f}x"),
        ],
        rows=rows,
        headline={
            f"stateless_over_restored_at_{largest}": last["stateless_over_restored"]["median"],
            f"restored_ttft_ms_at_{largest}": last["restored"]["median"],
        },
        plots=[
            Plot(
                name="ttft",
                title="Time to first token vs history",
                x="history_tokens",
                x_label="history tokens",
                y_label="TTFT (ms)",
                lines=(
                    ("restored.median", "restored (new process)"),
                    ("warm.median", "warm (in memory)"),
                    ("stateless.median", "stateless (new process)"),
                ),
                log_y=True,
            )
        ],
    )


def method_text(options: BenchOptions) -> str:
    if options.quick:
        rounds_text = "One round per size (--quick)"
    else:
        rounds_text = (
            f"Medians of {RUNS} interleaved rounds ({LARGE_RUNS} from {LARGE} tokens, where one "
            "stateless turn takes ~20 s on 2 cores), after one discarded warm-up round at the "
            "first size"
        )
    return (
        "Restored TTFT: `flashmem chat --json` in a new process, on a fresh copy of a session "
        "grown to that size, restores state.bin and feeds only a one-line question (restore: "
        "that restore alone, from the same runs); stateless TTFT: the same with --stateless, "
        "which re-processes the whole transcript; warm TTFT: the question asked in the "
        "benchmark's own process with the conversation already in memory. Each is the turn's "
        "timings_ms.ttft (restore, prompt, first reply token; model load excluded), greedy, with "
        "one -c twice the largest history throughout so that nothing is dropped, memory on as "
        f"chat's default. {rounds_text}; stateless/restored is the median of per-round ratios, "
        "state.bin the size of the prepared session's KV state file."
    )
