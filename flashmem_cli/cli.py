"""The `flashmem` command: parses flags, calls the library, renders with rich. No model logic."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperOption

from flashmem_cli import models
from flashmem_cli.batch import runner as batch_runner
from flashmem_cli.batch.cluster import RayOptions, WorkerStats
from flashmem_cli.batch.runner import RunPlan, default_paths
from flashmem_cli.batch.scheduler import BatchSettings
from flashmem_cli.bench.recall import POLICIES
from flashmem_cli.bench.report import Section
from flashmem_cli.chat.conversation import (
    ChatOptions,
    Conversation,
    TurnResult,
    open_conversation,
)
from flashmem_cli.chat.events import MemoryEvent
from flashmem_cli.chat.memory import MemoryOptions, resolve_tau, weights_status
from flashmem_cli.chat.reports import TurnMemory
from flashmem_cli.config import (
    DEFAULT_CTX,
    DEFAULT_N_PREDICT,
    models_dir,
    sessions_dir,
)
from flashmem_cli.engine.sampling import MAX_SEED, RANDOM_SEED, SamplingParams
from flashmem_cli.errors import FlashmemError, SessionCorrupt
from flashmem_cli.memory.budget import KEEP_SCORES, POOL
from flashmem_cli.memory.weights import weights_path
from flashmem_cli.repl import repl, report_notices, stream_turn
from flashmem_cli.store.meta import read_meta
from flashmem_cli.store.sessions import (
    SessionStore,
    is_session_dir,
    read_transcript,
    validate_name,
)

app = typer.Typer(
    help="Local LLM chat whose memory lives on disk: a turn costs only its own tokens.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
sessions_app = typer.Typer(
    help="List, show, export and remove chat sessions.", no_args_is_help=True
)
models_app = typer.Typer(help="The GGUF models flashmem can use.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluations of flashmem's memory.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")

_typer_display_type_rich = getattr(TyperOption, "display_type_rich", None)


def flag_display_type(self: TyperOption, ctx: Any) -> str | None:
    """No type column for a flag, which takes no value. typer 0.29.2's rich help shows `<bool>`
    for every flag, --help included (its plain help already leaves flags without a type), and
    no setting turns that off."""
    if self.is_flag or self.count:
        return None
    assert _typer_display_type_rich is not None
    return _typer_display_type_rich(self, ctx)


if _typer_display_type_rich is not None:  # a typer without the method: nothing to patch
    setattr(TyperOption, "display_type_rich", flag_display_type)  # noqa: B010 - mypy: method-assign


def version_text() -> str:
    """flashmem's version and that of the llama.cpp bindings it runs on, as installed."""

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"flashmem {installed('flashmem-cli')}\nllama-cpp-python {installed('llama-cpp-python')}"


def show_version(value: bool) -> None:
    if value:
        console.out(version_text(), highlight=False)
        raise typer.Exit()


@app.callback()
def app_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the versions of flashmem and llama-cpp-python, and exit.",
            callback=show_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Local LLM chat whose memory lives on disk: a turn costs only its own tokens."""


MAX_CTX = 1 << 20
MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS: more aborts inside llama.cpp

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "-m",
        "--model",
        help="GGUF path or name in models/ (env FLASHMEM_MODEL; default: the "
        "session's model, else gemma-3-270m-q4_k_m)",
        show_default=False,
    ),
]


GpuLayersOpt = Annotated[
    int | None,
    typer.Option(
        "-ngl",
        "--n-gpu-layers",
        help="Layers to offload (default: all when the build has GPU offload)",
    ),
]


def finite(rule: str = "must be a finite number") -> Callable[[float | None], float | None]:
    """The callback of every float option: NaN and infinities are usage errors (click's
    FloatRange lets NaN through, and `inf` passes any lower bound)."""

    def check(value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise typer.BadParameter(f"{rule}, not {value}")
        return value

    return check


def check_n_predict(value: int) -> int:
    """The callback of every -n: -1 (no limit) or a positive number of tokens."""
    if value != -1 and value < 1:
        raise typer.BadParameter(
            f"must be -1 (no limit) or a positive number of tokens, not {value}"
        )
    return value


def check_keep_score(value: str) -> str:
    """The callback of every --keep-score."""
    if value not in KEEP_SCORES:
        raise typer.BadParameter(f"unknown keep score {value!r}: use {', '.join(KEEP_SCORES)}")
    return value


ThreadsOpt = Annotated[
    int | None, typer.Option("-t", "--threads", help="CPU threads.", min=1, max=MAX_THREADS)
]
TopKOpt = Annotated[
    int, typer.Option("--top-k", help="Sample among the K most likely tokens (0: all).", min=0)
]
TopPOpt = Annotated[
    float,
    typer.Option(
        "--top-p",
        help="Nucleus sampling: the smallest set of tokens whose probability adds up to P "
        "(1.0: off).",
        min=0.0,
        max=1.0,
        callback=finite(),
    ),
]
MinPOpt = Annotated[
    float,
    typer.Option(
        "--min-p",
        help="Drop tokens less likely than P times the most likely one (0.0: off).",
        min=0.0,
        max=1.0,
        callback=finite(),
    ),
]


LatentsOpt = Annotated[
    int,
    typer.Option("--latents", help="Latent memory tokens per consolidation (K).", min=0, max=64),
]
ChatLatentsOpt = Annotated[
    int | None,
    typer.Option(
        "--latents",
        help="Latent memory tokens per consolidation (K). Default: 8 once the model's "
        "consolidator is trained; 0 while it is untrained (its latents lowered recall: README).",
        min=0,
        max=64,
        show_default=False,
    ),
]
BudgetOpt = Annotated[
    float,
    typer.Option(
        "--budget",
        help="Consolidate when the KV cache would pass this: a fraction of -c (<= 1) or tokens.",
        min=0.05,
        callback=finite("must be a fraction of -c (up to 1) or a number of tokens"),
    ),
]
KeepScoreOpt = Annotated[
    str,
    typer.Option(
        "--keep-score",
        help="What decides a consolidation's kept positions: reconstruction (the attention they "
        "get while the model repeats the span, KVzip's score), attention (accumulated while "
        "read: ~50x cheaper), attention-per-query, mix.",
        callback=check_keep_score,
    ),
]
KeepRatioOpt = Annotated[
    float,
    typer.Option(
        "--keep-ratio",
        help="Share of a consolidated span left in the cache: its best-scored positions "
        "plus the latents.",
        min=0.0,
        max=1.0,
        callback=finite(),
    ),
]


def sampling_params(
    temp: float, top_k: int, top_p: float, min_p: float, seed: int
) -> SamplingParams:
    """llama.cpp's flags to sampler settings; a seed of -1 means random."""
    return SamplingParams(
        temperature=temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=RANDOM_SEED if seed < 0 else seed,
    )


def store() -> SessionStore:
    return SessionStore(sessions_dir())


@app.command()
def chat(
    session: Annotated[
        str | None,
        typer.Option("--session", "-s", help="Session name ([A-Za-z0-9._-], 1-64); new if absent."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("-p", "--prompt", help="One message, print the reply, exit.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One-shot: print one JSON object.")
    ] = False,
    model: ModelOpt = None,
    ctx_size: Annotated[
        int | None,
        typer.Option(
            "-c",
            "--ctx-size",
            help=f"Context tokens (default: the session's, else {DEFAULT_CTX})",
            min=64,
            max=MAX_CTX,
        ),
    ] = None,
    n_gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    n_predict: Annotated[
        int,
        typer.Option(
            "-n",
            "--n-predict",
            help="Most tokens per reply (-1: until the model stops).",
            callback=check_n_predict,
        ),
    ] = DEFAULT_N_PREDICT,
    temp: Annotated[
        float, typer.Option("--temp", help="Temperature; 0 is greedy.", min=0.0, callback=finite())
    ] = 0.8,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    seed: Annotated[
        int, typer.Option("--seed", help="Sampling seed; -1 is random.", min=-1, max=MAX_SEED)
    ] = -1,
    system: Annotated[
        str | None, typer.Option("-sys", "--system", help="System prompt of a new session.")
    ] = None,
    stateless: Annotated[
        bool,
        typer.Option(
            "--stateless",
            help="Ignore the stored KV state and re-process the whole transcript (the baseline other CLIs are).",
        ),
    ] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Re-process the transcript into a fresh KV state.")
    ] = False,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="FlashMem memory: the attention monitor, and consolidation instead of dropping "
            "turns when the context fills.",
        ),
    ] = True,
    latents: ChatLatentsOpt = None,
    tau: Annotated[
        float | None,
        typer.Option(
            "--tau", help="Monitor threshold (default: the model's calibration).", callback=finite()
        ),
    ] = None,
    tau_percentile: Annotated[
        float | None,
        typer.Option(
            "--tau-percentile",
            help="τ as this percentile of the calibration.",
            min=0,
            max=100,
            callback=finite(),
        ),
    ] = None,
    max_consolidations: Annotated[
        int,
        typer.Option("--max-consolidations", help="Monitor insertions per reply, at most.", min=0),
    ] = 3,
    budget: BudgetOpt = 0.85,
    keep_ratio: KeepRatioOpt = 0.25,
    keep_score: KeepScoreOpt = MemoryOptions.keep_score,
    inject: Annotated[
        bool,
        typer.Option(
            "--inject/--no-inject",
            help="Insert latents into a reply where the monitor fires (untrained latents "
            "lower reply likelihood: off by default).",
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="After each reply: tokens/s, cached and new tokens (/verbose)."
        ),
    ] = False,
) -> None:
    """Chat in a session that lives on disk and resumes from its saved KV cache.

    Flash attention is off: the memory monitor reads attention probabilities.
    Standard input that is not a terminal is read as one message.
    """
    name = validate_name(session) if session else store().new_name()
    if stateless and rebuild:
        raise FlashmemError("--stateless and --rebuild exclude each other")
    if prompt is not None:
        prompt = utf8_text(prompt, "the message")
    elif not sys.stdin.isatty():
        prompt = read_stdin_message()
    if system is not None:
        system = utf8_text(system, "the system prompt")
    options = ChatOptions(
        model=model,
        n_ctx=ctx_size,
        n_gpu_layers=n_gpu_layers,
        n_predict=n_predict,
        sampling=sampling_params(temp, top_k, top_p, min_p, seed),
        stateless=stateless,
        rebuild=rebuild,
        memory=MemoryOptions(
            enabled=memory,
            n_latents=latents,
            keep_ratio=keep_ratio,
            keep_score=keep_score,
            budget=budget,
            tau=tau,
            tau_percentile=tau_percentile,
            max_insertions=max_consolidations,
            inject_in_reply=inject,
        ),
    )
    if threads:
        options = replace(options, n_threads=threads)
    if session is None and not as_json:
        err_console.print(f"[dim]new session:[/] [bold]{name}[/]")
    with open_conversation(store(), name, options, system) as conversation:
        if prompt is not None:
            one_shot(conversation, prompt, as_json)
        else:
            repl(conversation, verbose)


def one_shot(conversation: Conversation, prompt: str, as_json: bool) -> None:
    if as_json:
        result = conversation.send(prompt)
        console.print_json(data=turn_json(conversation, result))
        return
    stream_turn(conversation, prompt, verbose=True, label=False)


def turn_json(conversation: Conversation, result: TurnResult) -> dict[str, Any]:
    return {
        "session": conversation.session.name,
        "reply": result.reply,
        "prompt_text": result.prompt_text,
        "finish_reason": result.finish_reason,
        "tokens": {
            "new_prompt": result.new_prompt_tokens,
            "cached": result.cached_tokens,
            "generated": result.generated_tokens,
            "reprocessed": result.reprocessed_tokens,
        },
        "dropped_turns": result.dropped_turns,
        "notices": result.notices,
        "timings_ms": {"load_model": conversation.loaded.load_ms, **result.timings_ms},
        "memory": {
            "enabled": result.memory is not None,
            **(result.memory or TurnMemory([], [], [])).to_dict(),
        },
    }


def not_utf8(what: str, offset: int) -> FlashmemError:
    return FlashmemError(f"{what} is not UTF-8: invalid byte at offset {offset}")


def utf8_text(data: bytes | str, what: str) -> str:
    """`data` as text; refused, with the offset of the first bad byte, unless it is UTF-8.
    A str comes from the command line or the terminal, where Python keeps bytes it could not
    decode as surrogate escapes: those are turned back into the bytes first."""
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:  # a lone surrogate that is no escape (Windows argv)
            raw = data[: exc.start].encode("utf-8", "surrogateescape")
            utf8_text(raw, what)  # a bad byte before it comes first
            raise not_utf8(what, len(raw)) from None
    else:
        raw = data
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(what, exc.start) from None


def read_stdin_message() -> str:
    """Standard input as one message, read as bytes so that invalid UTF-8 is refused."""
    stream = getattr(sys.stdin, "buffer", None)
    text = utf8_text(stream.read() if stream else sys.stdin.read(), "standard input")
    if sys.platform == "win32":  # what text-mode stdin did there
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.removesuffix("\n")


# -- run ------------------------------------------------------------------------------------


@app.command("run")
def run_batch(
    file: Annotated[str, typer.Argument(help="JSONL input; - reads standard input.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Results (default: FILE.out.jsonl)")
    ] = None,
    errors: Annotated[
        Path | None, typer.Option("--errors", help="Failed lines (default: FILE.errors.jsonl)")
    ] = None,
    parallel: Annotated[
        int, typer.Option("--parallel", "-np", help="Sequences decoded together.", min=1, max=64)
    ] = 4,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip ids already in OUT or ERR.")
    ] = False,
    shard: Annotated[
        str, typer.Option("--shard", help="I/N: only ids that hash to shard I (0-based) of N.")
    ] = "0/1",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")
    ] = False,
    on_ray: Annotated[
        bool,
        typer.Option(
            "--ray", help="Deal the lines to Ray workers, each loading the model once (ray extra)."
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="The Ray cluster (default: $RAY_ADDRESS, one started here, else a new local one).",
        ),
    ] = None,
    ray_workers: Annotated[
        int | None,
        typer.Option("--workers", help="Ray workers (default: one per node).", min=1, max=4096),
    ] = None,
    model: ModelOpt = None,
    ctx_size: Annotated[
        int,
        typer.Option("-c", "--ctx-size", help="Context tokens per sequence.", min=64, max=MAX_CTX),
    ] = DEFAULT_CTX,
    n_gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    n_predict: Annotated[
        int,
        typer.Option(
            "-n",
            "--n-predict",
            help="Most tokens per reply unless a line sets max_tokens (-1: until the model stops).",
            callback=check_n_predict,
        ),
    ] = DEFAULT_N_PREDICT,
    temp: Annotated[
        float,
        typer.Option(
            "--temp",
            help="Temperature unless a line sets one; 0 is greedy.",
            min=0.0,
            callback=finite(),
        ),
    ] = 0.8,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed unless a line sets one; -1 is random.", min=-1, max=MAX_SEED
        ),
    ] = -1,
) -> None:
    """Run a JSONL file of prompts (OpenAI batch format or simple lines) through one model.

    Exit status: 0 when every line succeeded, 2 when some failed (see ERR), 1 on a fatal error.
    """
    if not on_ray and (ray_address is not None or ray_workers is not None):
        raise FlashmemError("--address and --workers are for --ray runs")
    source = None if file == "-" else Path(file)
    default_out, default_err = default_paths(source) if source else (None, None)
    plan = RunPlan(
        source=source,
        out=output or default_out,
        errors=errors or default_err,
        model=model,
        n_gpu_layers=n_gpu_layers,
        settings=BatchSettings(
            n_ctx=ctx_size,
            parallel=parallel,
            n_predict=n_predict,
            sampling=sampling_params(temp, top_k, top_p, min_p, seed),
            n_threads=threads,
        ),
        resume=resume,
        shard=parse_shard(shard),
        ray=RayOptions(ray_address, ray_workers) if on_ray else None,
    )
    show_progress = not quiet and err_console.is_terminal
    with BatchProgress(err_console, enabled=show_progress) as progress:
        stats = batch_runner.run(plan, progress.update)
    if not quiet:
        print_summary(stats, plan)
    if stats.failed or stats.failed_before:
        raise typer.Exit(2)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise FlashmemError(f"--shard {text!r}: use I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise FlashmemError(f"--shard {text!r}: I must be in 0..N-1")
    return index, count


def time_columns() -> tuple[ProgressColumn, ...]:
    """Elapsed and remaining time, each labelled: two bare `0:00:12`s do not say which is which."""
    return (
        TextColumn("[dim]elapsed[/]"),
        TimeElapsedColumn(),
        TextColumn("[dim]ETA[/]"),
        TimeRemainingColumn(),
    )


class RunRowOnly(ProgressColumn):
    """A column shown on the run's row and left blank on the workers' rows (--ray): a worker's
    elapsed time and ETA would only repeat or mislead."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task: Task) -> RenderableType:
        return Text("") if task.fields.get("worker") else self.column.render(task)


class BatchProgress:
    """A rich progress bar on stderr: done/failed/total, tokens/s, elapsed time and ETA. It
    redraws itself (rich's refresh thread); the numbers change when the runner reports, which
    it does at least once a second while decoding."""

    def __init__(self, console: Console, enabled: bool):
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} done · {task.fields[failed]} failed"),
            TextColumn("· {task.fields[rate]:.1f} tok/s"),
            *(RunRowOnly(column) for column in time_columns()),
            console=console,
            disable=not enabled,
        )
        self.task = self.bar.add_task("run", total=None, failed=0, rate=0.0)
        self.worker_tasks: list[TaskID] = []  # --ray: a row per worker under the run's

    def __enter__(self) -> BatchProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def update(self, stats: batch_runner.RunStats) -> None:
        total = stats.total - stats.skipped
        self.bar.update(
            self.task,
            total=total,
            completed=stats.done,
            failed=stats.failed,
            rate=stats.tokens_per_s,
        )
        while len(self.worker_tasks) < len(stats.workers):
            task = self.bar.add_task("", total=None, failed=0, rate=0.0, worker=True)
            self.worker_tasks.append(task)
        for task, worker in zip(self.worker_tasks, stats.workers, strict=False):
            self.bar.update(
                task,
                description=worker_label(worker) + (f" ↻{worker.restarts}" * bool(worker.restarts)),
                total=total,
                completed=worker.done + worker.failed,
                failed=worker.failed,
                rate=worker.tokens_per_s,
            )


def worker_label(worker: WorkerStats) -> str:
    """`w0 node-a`, with the worker's state when it is not running."""
    label = f"w{worker.name.rsplit('-', 1)[-1]} {worker.node}"
    return label if worker.state == "running" else f"{label} ({worker.state})"


def print_summary(stats: batch_runner.RunStats, plan: batch_runner.RunPlan) -> None:
    table = Table(show_header=False, box=None)
    rows = [
        ("lines", stats.total),
        ("skipped (--resume)", stats.skipped),
        ("failed in earlier runs", stats.failed_before),
        ("succeeded", stats.succeeded),
        ("failed", stats.failed),
        ("prompt tokens", stats.prompt_tokens),
        ("generated tokens", stats.generated_tokens),
        ("generated tokens/s", f"{stats.tokens_per_s:.1f}"),
        ("wall time", f"{stats.elapsed_s:.1f} s"),
        ("model load", f"{stats.setup_s:.1f} s"),
        ("KV cache", f"{stats.kv_cells} cells"),
        *((f"worker {worker_label(w)}", worker_summary(w)) for w in stats.workers),
        ("results", plan.out or "stdout"),
        ("errors", plan.errors or "stderr"),
    ]
    for key, value in rows:
        table.add_row(f"[dim]{key}[/]", str(value))
    err_console.print(table)


def worker_summary(worker: WorkerStats) -> str:
    plural = "s" if worker.restarts > 1 else ""
    restarts = f", {worker.restarts} restart{plural}" if worker.restarts else ""
    return (
        f"{worker.done} succeeded, {worker.failed} failed, "
        f"{worker.tokens_per_s:.1f} tok/s{restarts}"
    )


# -- sessions ---------------------------------------------------------------------------------


@sessions_app.command("list")
def sessions_list(
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the sessions as a JSON array (absolute timestamps)."),
    ] = False,
) -> None:
    """Every session, newest activity last."""
    summaries = store().list()
    if as_json:
        console.print_json(data=[s.__dict__ for s in summaries])
        return
    if not summaries:
        console.print(f"[dim]no sessions in {sessions_dir()}[/]")
        return
    now = datetime.now(timezone.utc)
    rows: list[tuple[str, ...]] = [
        (
            s.name,
            str(s.messages),
            short_model_name(s.model),
            human_bytes(s.state_bytes),
            relative_time(s.updated, now),
            s.preview,
        )
        for s in summaries
    ]
    console.print(sessions_table(rows, console.width))


LISTING_HEADERS = ("session", "msgs", "model", "KV", "updated", "first message")
MESSAGES, MODEL, KV, PREVIEW = 1, 2, 3, 5
GIVE_WAY = (KV, MODEL)  # dropped in turn while the first message has under PREVIEW_ROOM
PREVIEW_ROOM = 24
MODEL_WIDTH = 14
QUANT_SUFFIX = re.compile(r"[-._](i?q\d\w*|f16|bf16|f32)$", re.IGNORECASE)
COLUMN_GAP = 2  # a SIMPLE_HEAD divider and the padding right of each cell


def sessions_table(rows: list[tuple[str, ...]], width: int) -> Table:
    """The listing, one line per session within `width` columns: names whole (other commands
    take them), the model cut to MODEL_WIDTH and the first message to the room left, with an
    ellipsis; on a narrow terminal the KV size goes, then the model. The widths are set here
    because rich, given a table too wide, narrows the name column first."""
    natural = [
        max(cell_len(cell) for cell in column)
        for column in zip(LISTING_HEADERS, *rows, strict=True)
    ]
    natural[MODEL] = min(natural[MODEL], MODEL_WIDTH)
    shown = [i for i in range(len(LISTING_HEADERS)) if i != PREVIEW]

    def room() -> int:
        return width - sum(natural[i] + COLUMN_GAP for i in shown)

    for column in GIVE_WAY:
        if room() < PREVIEW_ROOM:
            shown.remove(column)
    if room() >= len(LISTING_HEADERS[PREVIEW]):
        natural[PREVIEW] = min(natural[PREVIEW], room())
        shown.append(PREVIEW)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i in shown:
        table.add_column(
            LISTING_HEADERS[i],
            width=natural[i],
            no_wrap=True,
            overflow="ellipsis",
            justify="right" if i in (MESSAGES, KV) else "left",
            style="dim" if i == PREVIEW else None,
        )
    for row in rows:
        table.add_row(*(Text(row[i]) for i in shown))
    return table


def short_model_name(name: str) -> str:
    """A model's name without its quantization (`gemma-3-270m-q4_k_m`: `gemma-3-270m`), which
    a listing has no room for."""
    return QUANT_SUFFIX.sub("", name) or name


def relative_time(iso: str, now: datetime) -> str:
    """An ISO timestamp as how long before `now` it is: "3 min ago", "yesterday", "5 days ago";
    the local date once it is a month old. "-" when there is none or it cannot be read."""
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return "-"
    if then.tzinfo is None:  # written by hand or by another tool: take it as local time
        then = then.astimezone()
    seconds = (now - then).total_seconds()
    minutes, hours, days = int(seconds // 60), int(seconds // 3600), int(seconds // 86400)
    if minutes < 1:
        return "just now"
    if hours < 1:
        return f"{minutes} min ago"
    if days < 1:
        return f"{hours} h ago"
    if days == 1:
        return "yesterday"
    if days < 30:
        return f"{days} days ago"
    return then.astimezone().date().isoformat()


@sessions_app.command("show")
def sessions_show(
    name: str,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the settings and the transcript as one JSON object."),
    ] = False,
) -> None:
    """A session's settings and its conversation."""
    meta, records = load_session_files(name)
    if as_json:
        console.print_json(data={"meta": meta, "transcript": records})
        return
    kv = meta.get("kv") or {}
    console.print(
        f"[bold]{name}[/] · model {(meta.get('model') or {}).get('name', '-')} · "
        f"-c {meta.get('n_ctx')} · {kv.get('n_tokens', 0)} tokens cached · "
        f"{(kv.get('layout') or {}).get('consolidated', 0)} turns consolidated, "
        f"{(kv.get('layout') or {}).get('dropped', 0)} dropped from the cache"
    )
    for record in records:
        show_record(record)


def show_record(record: dict[str, Any]) -> None:
    """One transcript line as `sessions show` prints it: messages, and in dim lines what
    happened between them."""
    event = record.get("event")
    if "role" in record:
        console.print(f"[bold]{escape(str(record['role']))}>[/] ", end="")
        console.out(str(record.get("content", "")), highlight=False)
    elif event == "memory":
        console.print(f"[magenta]{escape(MemoryEvent.from_record(record).headline())}[/]")
    elif event == "undo":
        took_back = "retried the last reply" if record.get("for") == "retry" else "undo"
        console.print(f"[dim]({took_back}: the last exchange was taken back)[/]")
    elif event == "system":
        console.print(f"[dim](system prompt changed to: {escape(str(record.get('content')))})[/]")
    elif event == "reset":
        console.print("[dim](reset: the conversation started over)[/]")


@sessions_app.command("export")
def sessions_export(
    name: str,
    fmt: Annotated[str, typer.Option("--format", "-f", help="md or json")] = "md",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File; default stdout.")
    ] = None,
) -> None:
    """The whole transcript (resets included) as Markdown or JSON."""
    if fmt not in ("md", "json"):
        raise FlashmemError(f"unknown format {fmt!r}: use md or json")
    meta, records = load_session_files(name)
    text = export_json(name, meta, records) if fmt == "json" else export_markdown(name, records)
    if output:
        output.write_text(text, encoding="utf-8")
        err_console.print(f"[dim]wrote {output}[/]")
    else:
        sys.stdout.write(text)


@sessions_app.command("rm")
def sessions_rm(name: str) -> None:
    """Move a session to the trash folder beside the sessions folder."""
    target = store().remove(name)
    console.print(f"moved session {name} to {target}")


def load_session_files(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A session's meta.json and transcript, read without locking or changing anything; a
    damaged meta.json is reported and left for the next chat to renew."""
    directory = store().path(name)
    if not is_session_dir(directory):
        raise FlashmemError(f"no session named {name!r} (flashmem sessions list)")
    try:
        meta = read_meta(directory).to_dict()
    except SessionCorrupt as exc:
        report_notices([f"{exc} (the next chat in it renews it from the transcript)"])
        meta = {}
    return meta, read_transcript(directory)


def export_markdown(name: str, records: list[dict[str, Any]]) -> str:
    parts = [f"# {name}\n"]
    for record in records:
        if record.get("event") == "reset":
            parts.append("---\n\n*conversation reset*\n")
        elif record.get("event") == "undo":
            parts.append("*the exchange above was taken back (undo)*\n")
        elif record.get("event") == "system":
            parts.append(f"*system prompt changed to:* {record.get('content', '')}\n")
        elif "role" in record:
            parts.append(f"## {record['role']}\n\n{record['content']}\n")
    return "\n".join(parts)


def export_json(name: str, meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    return json.dumps({"session": name, "meta": meta, "transcript": records}, indent=2) + "\n"


# -- models -----------------------------------------------------------------------------------


@models_app.command("list")
def models_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the models as a JSON array (sizes in bytes).")
    ] = False,
) -> None:
    """GGUF files in models/."""
    paths = models.available()
    rows = [
        {"name": p.name.removesuffix(".gguf"), "path": str(p), "size": p.stat().st_size}
        for p in paths
    ]
    if as_json:
        console.print_json(data=rows)
        return
    table = Table("name", "size", "path")
    for path in paths:
        name = path.name.removesuffix(".gguf")
        default = " [dim](default)[/]" if name == models.DEFAULT_MODEL else ""
        table.add_row(f"{name}{default}", human_bytes(path.stat().st_size), str(path))
    console.print(table if rows else f"[dim]no GGUF files in {models_dir()}[/]")


@models_app.command("pull")
def models_pull(
    spec: Annotated[
        str,
        typer.Argument(
            help="OWNER/NAME[:QUANT] or OWNER/NAME/FILE.gguf, as llama.cpp's -hf spells it",
            show_default=False,
        ),
    ],
) -> None:
    """Download a GGUF from the Hugging Face Hub into the models folder (resumable: run the
    same command again after an interruption). $HF_TOKEN for gated repos, $HF_ENDPOINT for
    a mirror."""
    from flashmem_cli import pull as hub  # lazy: importing huggingface_hub takes ~0.5 s

    remote = hub.resolve(spec)
    dest = models_dir()
    if hub.is_present(remote, dest):
        console.print(f"{remote.local_name} is already in {dest}")
        return
    with download_progress(remote.local_name, remote.size) as on_progress:
        path = hub.download(remote, dest, on_progress)
    name = path.name.removesuffix(".gguf")
    console.print(f"pulled {path}\nchat with it: flashmem chat -m {name}")


class download_progress:  # noqa: N801 - used as a function in `with`
    """A download bar on stderr; yields `on_progress(done, total)`. Bytes a resumed download
    already had are shown as done but not counted in its speed."""

    def __init__(self, label: str, total: int | None):
        self.bar = Progress(
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            *time_columns(),
            console=err_console,
            disable=not err_console.is_terminal,
        )
        self.task = self.bar.add_task(label, total=total)
        self.first = True

    def __enter__(self) -> Callable[[int, int | None], None]:
        self.bar.__enter__()
        return self.update

    def update(self, done: int, total: int | None) -> None:
        if self.first:
            self.bar.reset(self.task, total=total, completed=done)
            self.first = False
        else:
            self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)


@models_app.command("info")
def models_info(
    model: Annotated[
        str | None, typer.Argument(help="Name or path (default: the default model)")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the details as one JSON object.")
    ] = False,
) -> None:
    """Path, size, architecture, layers, context length, chat template, fingerprint."""
    file = models.resolve(model)
    info = models.inspect(file)
    info["consolidator"] = weights_status(file)
    tau = resolve_tau(file, MemoryOptions())
    info["monitor_tau"] = "not calibrated (flashmem calibrate)" if tau is None else round(tau, 4)
    if as_json:
        console.print_json(data=info)
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        shown = human_bytes(value) if isinstance(value, int) and key == "size" else str(value)
        table.add_row(f"[dim]{key}[/]", shown)
    console.print(table)


# -- calibrate and eval -----------------------------------------------------------------------


@app.command("calibrate")
def calibrate_command(
    model: ModelOpt = None,
    corpus: Annotated[
        Path | None,
        typer.Option("--corpus", help="UTF-8 text to read (default: a built-in corpus)."),
    ] = None,
    percentile: Annotated[
        float,
        typer.Option(
            "--percentile", help="τ as this percentile.", min=0, max=100, callback=finite()
        ),
    ] = 85.0,
    n_gpu_layers: GpuLayersOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object; no progress bar.")
    ] = False,
) -> None:
    """Measure the memory monitor's τ for a model; stored beside it in models/."""
    from flashmem_cli.calibrate import calibrate
    from flashmem_cli.memory.calibration import builtin_corpus

    file = models.resolve(model)
    text, name = (read_text_file(corpus), str(corpus)) if corpus else (builtin_corpus(), "built-in")
    loaded = models.load_model(file, n_gpu_layers)
    try:
        with steps_progress("calibrate", enabled=not as_json) as advance:
            calibration, path = calibrate(loaded.model, file, text, name, percentile, advance)
    finally:
        loaded.model.close()
    record = {
        "model": file.name,
        "tau": round(calibration.tau, 4),
        "percentile": percentile,
        "tokens": len(calibration.entropies),
        "corpus": name,
        "path": path,
    }
    if as_json:
        console.print_json(data=record)
    else:
        console.print(
            f"τ = [bold]{record['tau']}[/] (percentile {percentile:g} of {record['tokens']} "
            f"token entropies) for {file.name}, saved to {path}"
        )


@app.command("train-consolidator")
def train_consolidator(
    model: ModelOpt = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Recall-case JSONL to train on (default: built-in generator)."),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.", min=1)] = 500,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Weights file (default: models/<model>.consolidator.npz)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Go on from the checkpoint beside --out.")
    ] = False,
    lr: Annotated[
        float,
        typer.Option(
            "--lr",
            help="Peak learning rate: linear warm-up to it, then cosine decay to a tenth of it.",
            min=0,
            callback=finite(),
        ),
    ] = 3e-4,
    latents: Annotated[int, typer.Option("--latents", help="K latents per span.", min=1)] = 8,
    keep_ratio: KeepRatioOpt = 0.25,
    restate_weight: Annotated[
        float, typer.Option("--restate-weight", help="Loss weight of restating the span.", min=0)
    ] = 0.5,
    continue_weight: Annotated[
        float, typer.Option("--continue-weight", help="Loss weight of the next turn.", min=0)
    ] = 0.25,
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Held-out loss every N steps.", min=1)
    ] = 100,
    held_out: Annotated[
        int, typer.Option("--held-out", help="Held-out examples (from the dev split).", min=1)
    ] = 24,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed of the training examples: generated ones, or --data's order."
        ),
    ] = 0,
    threads: Annotated[
        int | None,
        typer.Option("-t", "--threads", help="CPU threads (default: torch's choice).", min=1),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the training record as one JSON object; no progress bar."
        ),
    ] = False,
) -> None:
    """Train the Shared-KV Consolidator (backbone frozen); needs the `train` extra (torch)."""
    try:
        from flashmem_cli.train.loop import TrainConfig
        from flashmem_cli.train.run import RunPaths, TrainingRun
    except ModuleNotFoundError as exc:
        raise FlashmemError(
            f"training needs the train extra ({exc.name} is missing): make install-train, "
            "or pip install 'flashmem-cli[train]'"
        ) from None
    if resume and out is not None and not RunPaths(out).checkpoint.is_file():
        raise FlashmemError(f"--resume: no checkpoint at {RunPaths(out).checkpoint}")
    file = models.resolve(model)
    paths = RunPaths(out or weights_path(models_dir(), file.path.stem))
    if resume and not paths.checkpoint.is_file():
        raise FlashmemError(f"--resume: no checkpoint at {paths.checkpoint}")
    mix = {"answer": 1.0, "restate": restate_weight, "continue": continue_weight}
    config = TrainConfig(
        steps=steps,
        lr=lr,
        n_latents=latents,
        keep_ratio=keep_ratio,
        mix=mix,
        eval_every=eval_every,
        seed=seed,
    )
    run = TrainingRun(file, config, paths, data, threads)
    try:
        if resume:
            run.resume()
        state = train_with_progress(run, run.held_out(held_out), as_json)
        record = run.export(state, ["flashmem", *sys.argv[1:]])
    finally:
        run.close()
    if as_json:
        console.print_json(data=record)
        return
    last = record["learning_curve"][-1]
    console.print(
        f"trained {record['steps']} steps in {record['train_seconds'] / 60:.1f} min; held-out "
        f"gap recovered {last['gap_recovered']['flashmem']} (keep-only "
        f"{last['gap_recovered']['keep-only']}); weights: {paths.weights}; record: {paths.record}"
    )


def train_with_progress(run: Any, held_out: Any, as_json: bool) -> Any:
    """The training loop under a progress bar showing the loss and the held-out gap."""
    bar = Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("held-out gap {task.fields[gap]}"),
        *time_columns(),
        console=err_console,
        disable=as_json or not err_console.is_terminal,
    )
    with bar:
        task = bar.add_task("train", total=run.config.steps, loss="-", gap="-")
        recent: list[float] = []
        for report in run.run(held_out):
            recent = (recent + [report.loss])[-20:]
            loss = f"{sum(recent) / len(recent):.3f}"
            if report.held_out:
                gap = str(report.held_out["gap_recovered"]["flashmem"])
                bar.update(task, completed=report.step, loss=loss, gap=gap)
                if bar.disable and not as_json:  # a log file gets a line per evaluation
                    err_console.print(f"step {report.step}: loss {loss}, held-out gap {gap}")
            else:
                bar.update(task, completed=report.step, loss=loss)
    return run.state


@eval_app.command("recall")
def eval_recall(
    file: Annotated[Path, typer.Argument(help="JSONL recall cases ({id, turns, probes}).")],
    ctx_size: Annotated[
        int, typer.Option("-c", "--ctx-size", help="Context of every policy but full.", min=64)
    ],
    model: ModelOpt = None,
    n_gpu_layers: GpuLayersOpt = None,
    latents: LatentsOpt = 8,
    budget: BudgetOpt = 0.85,
    keep_ratio: KeepRatioOpt = 0.25,
    keep_score: KeepScoreOpt = MemoryOptions.keep_score,
    keep_pool: Annotated[
        int, typer.Option("--keep-pool", help="Kept positions come in runs this wide.", min=1)
    ] = POOL,
    policies: Annotated[
        str, typer.Option("--policies", help="Comma-separated subset of the policies.")
    ] = ",".join(POLICIES),
    limit: Annotated[int | None, typer.Option("--limit", help="First N cases only.", min=1)] = None,
    answers: Annotated[
        bool,
        typer.Option(
            "--answers/--no-answers", help="Also answer each probe greedily (the accuracy)."
        ),
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the results as one JSON object; no progress bar.")
    ] = False,
) -> None:
    """Teacher-forced recall of early facts under full / truncate / flashmem / ablations.

    gap_recovered = (flashmem - truncate) / (full - truncate), over the probes truncation hurt;
    accuracy: greedy replies that contain the answer. Both with bootstrap 95% intervals.
    """
    from flashmem_cli.bench.recall import RecallSettings, run_recall
    from flashmem_cli.bench.recall_cases import parse_cases

    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown or not chosen:
        raise FlashmemError(
            f"unknown policy {unknown[0] if unknown else ''!r}: use {', '.join(POLICIES)}"
        )
    cases = parse_cases(read_text_file(file).splitlines(), str(file))[:limit]
    memory = MemoryOptions(
        n_latents=latents,
        budget=budget,
        keep_ratio=keep_ratio,
        keep_score=keep_score,
        keep_pool=keep_pool,
    )
    settings = RecallSettings(ctx_size, memory, chosen, generate=answers)
    loaded = models.load_model(models.resolve(model), n_gpu_layers)
    try:
        with steps_progress("recall", enabled=not as_json) as advance:
            total = len(cases) * len(chosen)
            done = iter(range(1, total + 1))
            result = run_recall(
                loaded, cases, settings, lambda case, policy: advance(next(done) - 1, total)
            )
    finally:
        loaded.model.close()
    result["model"] = loaded.file.name
    if as_json:
        console.print_json(data=result)
    else:
        print_recall(result, chosen)


def print_recall(result: dict[str, Any], policies: tuple[str, ...]) -> None:
    table = Table("case", *policies, title="mean log-prob per answer token (higher is better)")
    for case in result["cases"]:
        table.add_row(case["id"], *(_shown(case["policies"][p]["mean"]) for p in policies))
    summary = result["summary"]
    means = summary.get("mean_logprob", {})
    table.add_row("[bold]all[/]", *(f"[bold]{_shown(means.get(p))}[/]" for p in policies))
    console.print(table)
    console.print(recall_summary_table(summary, policies))
    for key, value in summary.items():
        if key.startswith("probes"):
            console.print(f"[dim]{key}:[/] {value}")


def recall_summary_table(summary: dict[str, Any], policies: tuple[str, ...]) -> Table:
    """Per policy: mean log-prob, gap recovered and accuracy with their 95% intervals, and the
    compression its consolidations reached."""
    table = Table("policy", "mean log-prob", "gap_recovered", "accuracy", "compression")
    for policy in policies:
        key = "gap_recovered" if policy == "flashmem" else f"gap_recovered_{policy}"
        gap = {"full": 1.0, "truncate": 0.0}.get(policy, summary.get(key))
        compression = summary.get("compression", {}).get(policy)
        table.add_row(
            policy,
            _shown(summary.get("mean_logprob", {}).get(policy)),
            _with_ci(gap, summary.get("gap_recovered_ci", {}).get(policy)),
            _with_ci(
                summary.get("accuracy", {}).get(policy),
                summary.get("accuracy_ci", {}).get(policy),
            ),
            "-" if compression is None else f"{compression:.2f}x",
        )
    return table


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    return _shown(value) + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


# -- bench ------------------------------------------------------------------------------------


@app.command("bench")
def bench(
    which: Annotated[
        str,
        typer.Argument(
            help="resume, consolidation, decode, monitor, batch, threads, recall, or all; "
            "ray (not in all) needs the ray extra."
        ),
    ] = "all",
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny sizes, one run each: a smoke test, not numbers.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the results as one JSON object; no tables.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write results.json, results.md and PNG plots into DIR."),
    ] = None,
    model: ModelOpt = None,
    n_gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Measure what flashmem buys on this machine: each method beside its baseline, interleaved,
    medians with min/max (see README, Performance)."""
    from flashmem_cli.bench import machine, report, suite
    from flashmem_cli.bench.method import BenchOptions

    if which not in [*suite.BENCHES, "all"]:
        raise FlashmemError(f"unknown benchmark {which!r}: use {', '.join(suite.BENCHES)} or all")
    options = BenchOptions(quick, model, threads, n_gpu_layers)
    if out is not None:
        check_writable_dir(out)  # before the run, not after 15 minutes of it
    described = machine.describe(options)
    with bench_progress(len(suite.names(which)), enabled=not as_json) as (say, advance):

        def finished(results: report.Results) -> None:
            advance()
            if not as_json:
                print_section(results.sections[-1])
            if out is not None:  # every finished section is on disk, whatever comes next
                report.write(results, out)

        results = suite.run(which, options, described, say, on_section=finished)
    if as_json:
        console.print_json(data=results.as_dict())
    if out is not None:
        written = report.write(results, out)
        err_console.print(f"[dim]wrote {', '.join(str(p) for p in written)}[/]", highlight=False)
        if not report.matplotlib_available():
            err_console.print("[dim]no plots: pip install 'flashmem-cli[bench]' (matplotlib)[/]")
    failures = [s.name for s in results.sections if "failed" in s.headline]
    if failures:
        err_console.print(f"[red]error:[/] failed: {', '.join(failures)} (see the notes above)")
        raise typer.Exit(1)


def check_writable_dir(path: Path) -> None:
    """`path` is (or can be made) a directory this process can write into; OSError if not."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".flashmem-write-check"
    probe.write_bytes(b"")
    probe.unlink()


class bench_progress:  # noqa: N801 - used as a function in `with`
    """A bar over the benchmarks on stderr; yields (say(text), advance())."""

    def __init__(self, total: int, enabled: bool):
        self.bar = Progress(
            TextColumn("[bold]bench[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.description}"),
            *time_columns(),
            console=err_console,
            disable=not enabled or not err_console.is_terminal,
        )
        self.task = self.bar.add_task("", total=total)

    def __enter__(self) -> tuple[Callable[[str], None], Callable[[], None]]:
        self.bar.__enter__()
        return (
            lambda text: self.bar.update(self.task, description=escape(text)),
            lambda: self.bar.advance(self.task),
        )

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)


def print_section(section: Section) -> None:
    if not section.columns:
        console.print(f"[bold]{escape(section.title)}[/]: {escape(section.method)}")
        return
    header, *rows = section.table()
    table = Table(*header, title=section.title, title_justify="left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for key, value in section.headline.items():
        shown = "-" if value is None else f"{value:.3g}" if isinstance(value, float) else value
        console.print(f"[dim]{key}:[/] {shown}", highlight=False)
    for note in section.notes:
        console.print(f"[dim]{escape(note)}[/]")


class steps_progress:  # noqa: N801 - used as a function in `with`
    """A progress bar on stderr; yields `advance(done, total)`."""

    def __init__(self, label: str, enabled: bool):
        self.bar = Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            *time_columns(),
            console=err_console,
            disable=not enabled or not err_console.is_terminal,
        )
        self.task = self.bar.add_task(label, total=None)

    def __enter__(self) -> Any:
        self.bar.__enter__()
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)


def read_text_file(path: Path) -> str:
    """A UTF-8 file's text, newlines translated as text mode does."""
    text = utf8_text(path.read_bytes(), str(path))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def human_bytes(n: int) -> str:
    """A size in binary units, named as such (KiB, not KB: a KB is 1000 bytes)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def main() -> None:
    """Entry point: domain errors become one line on stderr and exit code 1."""
    models.set_assemble_hook(lambda line: err_console.print(f"[dim]{escape(line)}[/]"))
    try:
        app()
    except FlashmemError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except OSError as exc:  # a file flashmem was told to use: unwritable, missing, a directory
        where = f": {exc.filename}" if exc.filename else ""
        err_console.print(f"[red]error:[/] {escape(exc.strerror or str(exc))}{escape(where)}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
