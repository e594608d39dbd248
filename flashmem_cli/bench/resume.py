"""Benchmark: time to first token of a resumed turn vs `--stateless` at growing history sizes.

Each measured turn is a fresh `flashmem chat --json` process on a copy of a prepared session,
so the resumed case pays for restoring state.bin and the stateless case re-processes the whole
transcript, as other local CLIs do. Both run side by side, interleaved, in one run.

    python -m flashmem_cli.bench.resume [--sizes 500,1000,2000] [--runs 5] [-m MODEL]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flashmem_cli.chat.conversation import ChatOptions, Conversation, open_conversation
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.store.sessions import SessionStore

FILLER = (
    "Here is another note for the record: the meeting moved to Thursday, the budget for the "
    "garden project is four hundred euros, and the tomatoes need water every second day. "
)
QUESTION = "Summarise the notes above in one sentence."


def main() -> None:
    args = parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="flashmem-bench-") as tmp:
        home = Path(tmp)
        os.environ["FLASHMEM_HOME"] = str(home)
        store = SessionStore(home / "sessions")
        sizes = prepare_sessions(store, args)
        rows = [measure(home, name, tokens, args) for name, tokens in sizes]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"resumed turn vs --stateless: TTFT, median of {args.runs} (ms)")
    for column in ("history tokens", "resumed", "stateless", "stateless / resumed"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["history_tokens"]),
            f"{row['resumed_ttft_ms']:.1f}",
            f"{row['stateless_ttft_ms']:.1f}",
            f"{row['ratio']:.1f}x",
        )
    console.print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,2000", help="history sizes in tokens")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("-c", "--ctx-size", type=int, default=4096)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def prepare_sessions(store: SessionStore, args: argparse.Namespace) -> list[tuple[str, int]]:
    """One conversation grown turn by turn; a snapshot of its directory at each size."""
    targets = sorted(int(s) for s in args.sizes.split(","))
    options = ChatOptions(
        model=args.model, n_ctx=args.ctx_size, n_predict=16, sampling=SamplingParams(0)
    )
    snapshots = []
    with open_conversation(store, "base", options) as conversation:
        for target in targets:
            grow(conversation, target)
            name = f"h{target}"
            shutil.copytree(conversation.session.dir, store.root / name, ignore=_no_lock)
            snapshots.append((name, len(conversation.seq)))
    return snapshots


def grow(conversation: Conversation, target: int) -> None:
    while len(conversation.seq) < target:
        conversation.send(FILLER * 2)


def measure(home: Path, name: str, tokens: int, args: argparse.Namespace) -> dict:
    resumed: list[float] = []
    stateless: list[float] = []
    for run in range(args.runs):
        for mode, into in (("resumed", resumed), ("stateless", stateless)):
            copy = f"{name}-{mode}-{run}"
            shutil.copytree(home / "sessions" / name, home / "sessions" / copy, ignore=_no_lock)
            extra = ["--stateless"] if mode == "stateless" else []
            into.append(turn_ttft(copy, extra, args))
    resumed_ms, stateless_ms = statistics.median(resumed), statistics.median(stateless)
    return {
        "history_tokens": tokens,
        "resumed_ttft_ms": resumed_ms,
        "stateless_ttft_ms": stateless_ms,
        "ratio": stateless_ms / resumed_ms,
        "resumed_runs": resumed,
        "stateless_runs": stateless,
    }


def turn_ttft(session: str, extra: list[str], args: argparse.Namespace) -> float:
    command = [
        sys.executable,
        "-m",
        "flashmem_cli",
        "chat",
        "-s",
        session,
        "--json",
        "--temp",
        "0",
        "-n",
        "8",
        "-c",
        str(args.ctx_size),
        "-p",
        QUESTION,
        *extra,
    ]
    if args.model:
        command += ["-m", args.model]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(proc.stdout)["timings_ms"]["ttft"])


def _no_lock(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == ".lock"]


if __name__ == "__main__":
    main()
