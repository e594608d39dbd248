"""The interactive chat: reads messages and slash commands, streams replies, says what memory
did in plain words. Rendering only: every change to a conversation is the library's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flashmem_cli.chat.conversation import Conversation, TurnResult
from flashmem_cli.chat.events import INSERTION
from flashmem_cli.chat.interrupt import CtrlC
from flashmem_cli.chat.reports import MemoryReport
from flashmem_cli.engine.sampling import MAX_SEED, RANDOM_SEED
from flashmem_cli.errors import FlashmemError
from flashmem_cli.line_editor import LineEditor

console = Console(highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

REPL_HELP = """[bold]/help[/]            this list
[bold]/exit[/]            leave (also Ctrl-D, or Ctrl-C twice)
[bold]/retry[/]           take back the last reply and generate it again
[bold]/undo[/]            take back the last exchange (the transcript keeps it)
[bold]/system[/] [TEXT]    show the system prompt, or set it (--clear removes it); re-processes the chat
[bold]/set[/] [NAME VALUE] show or change temp, top_k, top_p, min_p, n_predict, seed
[bold]/verbose[/]         tokens/s, cached and new tokens after each reply (on/off)
[bold]/reset[/]           start the conversation over (the transcript keeps everything)
[bold]/stats[/]           what the KV cache holds
[bold]/memory[/]          latent blocks in the cache, consolidation events, monitor settings
Up/Down: earlier messages · Alt-Enter: new line · a line of \"\"\" starts or ends a block."""


@dataclass
class ReplState:
    verbose: bool = False


# -- one turn -------------------------------------------------------------------------------


def report_notices(notices: list[str]) -> None:
    for notice in notices:
        err_console.print(f"[yellow]note:[/] {escape(notice)}", highlight=False)


class ReplyPrinter:
    """Streams a reply to the terminal without the space a transcript-style reply starts with,
    holding whitespace back until text follows it (a reply's trailing blank lines are not
    shown)."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body) :]
        if body:
            console.out(body, end="", highlight=False)


def stream_turn(
    conversation: Conversation, text: str, verbose: bool, label: bool = True
) -> TurnResult:
    """One turn on the terminal: what left the cache to make room (before the reply), the
    reply as it streams (after `model>` when `label`), then what else happened."""
    with CtrlC() as ctrl_c:  # a prefill is not cut half-way: Ctrl-C skips the reply instead
        turn = conversation.begin_turn(text)
    room = conversation.room_made(turn)
    for line in room.lines():
        err_console.print(f"[magenta]{escape(line)}[/]", highlight=False)
    if label:
        console.print("[bold cyan]model>[/] ", end="")
    if ctrl_c.pressed:
        finish, first_token_ms = "interrupted", 0.0
    else:
        finish, first_token_ms = conversation.generate(turn, ReplyPrinter())
    with CtrlC():  # recording and closing the reply is never cut half-way
        result = conversation.finish_turn(turn, finish, first_token_ms)
    console.out("")
    report_turn(result, result.dropped_turns - room.dropped_turns)
    if verbose:
        err_console.print(f"[dim]{turn_stats(result)}[/]", highlight=False)
    return result


def report_turn(result: TurnResult, dropped_after: int = 0) -> None:
    """What happened after the reply: notices, the monitor's insertions, a turn whose reply
    filled the context, how the reply ended."""
    report_notices(result.notices)
    if dropped_after:
        err_console.print(
            "[yellow]context full: this turn and its reply no longer fit and left the model's "
            "view; the transcript keeps them[/]",
            highlight=False,
        )
    for event in result.memory.consolidations if result.memory else []:
        if event.kind == INSERTION:
            err_console.print(f"[magenta]{escape(event.headline())}[/]", highlight=False)
    if result.finish_reason == "length":
        err_console.print("[dim](reply cut at the token limit)[/]", highlight=False)
    elif result.finish_reason == "interrupted":
        err_console.print("[dim](interrupted)[/]", highlight=False)


def turn_stats(result: TurnResult) -> str:
    """New, cached and generated tokens, speeds and time to first token, on one line."""
    timings = result.timings_ms
    decode_s = max(timings["total"] - timings["ttft"], 0.0) / 1000
    prefill_s = timings["prefill"] / 1000
    rewritten = (
        f"{result.reprocessed_tokens} re-processed (the template rewrote them), "
        if result.reprocessed_tokens
        else ""
    )
    return (
        f"{result.new_prompt_tokens} new prompt tokens ({_rate(result.new_prompt_tokens, prefill_s)}),"
        f" {result.cached_tokens} cached, {rewritten}{result.generated_tokens} generated "
        f"({_rate(result.generated_tokens - 1, decode_s)}) · first token after "
        f"{timings['ttft']:.0f} ms"
    )


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if tokens > 0 and seconds > 0 else "- tok/s"


# -- the loop -------------------------------------------------------------------------------


def repl(conversation: Conversation, verbose: bool = False) -> None:
    report_notices(conversation.notices)
    conversation.notices.clear()
    print_banner(conversation)
    state = ReplState(verbose=verbose)
    editor = LineEditor(conversation.session.input_history())
    if editor.history_warning:
        report_notices([editor.history_warning])
    while True:
        text = editor.read()
        if text is None or text.strip() == "/exit":
            return
        if not text.strip():
            continue
        try:
            if text.strip().startswith("/"):
                run_slash_command(conversation, text.strip(), state)
            else:
                stream_turn(conversation, text, state.verbose)
        except FlashmemError as exc:  # the session stays open: nothing was lost
            console.out("")
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        except KeyboardInterrupt:  # somewhere unguarded: the next turn rebuilds the cache
            conversation.recover()
            console.out("")
            err_console.print("[dim](interrupted)[/]", highlight=False)


def print_banner(conversation: Conversation) -> None:
    stats = conversation.stats()
    err_console.print(
        f"[dim]session[/] [bold]{escape(stats.session)}[/] [dim]· {escape(stats.model)} · "
        f"{stats.kv_tokens} tokens cached · /help[/]"
    )
    if conversation.template.base_model:
        err_console.print(
            "[dim]a base model (no chat template): turns are a plain User:/Assistant: transcript "
            "and replies may wander; for an instruct model see `flashmem models pull`[/]"
        )


# -- slash commands -------------------------------------------------------------------------


def run_slash_command(conversation: Conversation, command: str, state: ReplState) -> None:
    name, _, argument = command.partition(" ")
    argument = argument.strip()
    handler = SLASH_COMMANDS.get(name)
    if handler is None:
        console.print(f"[red]unknown command {escape(name)}[/] (/help lists them)")
        return
    handler(conversation, argument, state)


def _help(conversation: Conversation, argument: str, state: ReplState) -> None:
    console.print(REPL_HELP)


def _reset(conversation: Conversation, argument: str, state: ReplState) -> None:
    conversation.reset()
    console.print("[dim]conversation reset; the transcript keeps the old turns[/]")


def _stats(conversation: Conversation, argument: str, state: ReplState) -> None:
    print_table(conversation.stats().to_dict())


def _memory(conversation: Conversation, argument: str, state: ReplState) -> None:
    print_memory(conversation.memory_report())


def _undo(conversation: Conversation, argument: str, state: ReplState) -> None:
    with CtrlC():
        undone = conversation.undo()
    report_notices(conversation.notices)
    conversation.notices.clear()
    console.print(f"[dim]took back: {escape(_preview(undone['content']))}[/]")


def _retry(conversation: Conversation, argument: str, state: ReplState) -> None:
    with CtrlC():
        message = conversation.undo("retry")
    report_notices(conversation.notices)
    conversation.notices.clear()
    stream_turn(conversation, message["content"], state.verbose)


def _system(conversation: Conversation, argument: str, state: ReplState) -> None:
    if not argument:
        messages = conversation.messages()
        current = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        console.print(escape(current) if current else "[dim]no system prompt[/]")
        return
    system = "" if argument == "--clear" else argument
    with CtrlC():
        reprocessed = conversation.change_system_prompt(system)
    report_notices(conversation.notices)
    conversation.notices.clear()
    said = "system prompt removed" if not system else "system prompt set"
    console.print(f"[dim]{said} ({reprocessed} tokens re-processed)[/]")


def _verbose(conversation: Conversation, argument: str, state: ReplState) -> None:
    if argument not in ("", "on", "off"):
        raise FlashmemError(f"/verbose: use on, off, or nothing to switch, not {argument!r}")
    state.verbose = not state.verbose if argument == "" else argument == "on"
    console.print(f"[dim]verbose {'on' if state.verbose else 'off'}[/]")


def _set(conversation: Conversation, argument: str, state: ReplState) -> None:
    if not argument:
        print_table(current_settings(conversation))
        return
    name, _, value = argument.partition(" ")
    conversation.options = apply_setting(conversation.options, name, value.strip())
    console.print(f"[dim]{name} = {current_settings(conversation)[name]}[/]")


SLASH_COMMANDS: dict[str, Callable[[Conversation, str, ReplState], None]] = {
    "/help": _help,
    "/reset": _reset,
    "/stats": _stats,
    "/memory": _memory,
    "/undo": _undo,
    "/retry": _retry,
    "/system": _system,
    "/set": _set,
    "/verbose": _verbose,
}


# -- /set -----------------------------------------------------------------------------------


def current_settings(conversation: Conversation) -> dict[str, Any]:
    sampling = conversation.options.sampling
    return {
        "temp": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "n_predict": conversation.options.n_predict,
        "seed": "random" if sampling.seed == RANDOM_SEED else sampling.seed,
    }


def _number(name: str, value: str, kind: type) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise FlashmemError(
            f"/set {name}: {value!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if kind is float and not math.isfinite(number):
        raise FlashmemError(f"/set {name}: must be a finite number, not {value}")
    return number


def _check(name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise FlashmemError(f"/set {name}: {rule}")


def apply_setting(options: Any, name: str, value: str) -> Any:
    """`options` with one setting changed, checked as the command-line flag checks it."""
    sampling = options.sampling
    if name == "temp":
        temp = _number(name, value, float)
        _check(name, temp >= 0, "must be 0 (greedy) or more")
        return replace(options, sampling=replace(sampling, temperature=temp))
    if name == "top_k":
        top_k = _number(name, value, int)
        _check(name, top_k >= 0, "must be 0 (off) or more")
        return replace(options, sampling=replace(sampling, top_k=top_k))
    if name in ("top_p", "min_p"):
        share = _number(name, value, float)
        _check(name, 0 <= share <= 1, "must be between 0 and 1")
        return replace(options, sampling=replace(sampling, **{name: share}))
    if name == "n_predict":
        n = _number(name, value, int)
        _check(name, n == -1 or n >= 1, "must be -1 (no limit) or a positive number of tokens")
        return replace(options, n_predict=n)
    if name == "seed":
        seed = _number(name, value, int)
        _check(name, -1 <= seed <= MAX_SEED, f"must be -1 (random) to {MAX_SEED}")
        return replace(options, sampling=replace(sampling, seed=seed if seed >= 0 else RANDOM_SEED))
    raise FlashmemError(
        f"/set: unknown setting {name!r}: use temp, top_k, top_p, min_p, n_predict or seed"
    )


# -- tables ---------------------------------------------------------------------------------


def print_table(rows: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key, value in rows.items():
        table.add_row(f"[dim]{key}[/]", escape(str(value)))
    console.print(table)


def print_memory(report: MemoryReport) -> None:
    print_table(report.settings)
    blocks = Table("latent block", "positions", "tokens")
    for block in report.latent_blocks:
        end = block.start + block.length - 1
        blocks.add_row(str(block.index), f"{block.start}-{end}", str(block.length))
    console.print(blocks if report.latent_blocks else "[dim]no latents in the cache[/]")
    events = Table("when", "event")
    for event in report.events:
        events.add_row(event.ts, escape(event.describe()))
    console.print(events if report.events else "[dim]no consolidations yet[/]")


def _preview(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
