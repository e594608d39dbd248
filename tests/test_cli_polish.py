"""The CLI's finish (issue 13): help without `<bool>`, a description for every option,
--version, labelled times on progress bars, a batch display that moves between results, the
sessions listing, and sizes in binary units. Only the one batch test loads the model."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from importlib import metadata
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from flashmem_cli import cli
from flashmem_cli.batch import runner as batch_runner
from flashmem_cli.batch.cluster import WorkerStats
from flashmem_cli.batch.runner import RunPlan, RunStats, step_reporter
from flashmem_cli.batch.scheduler import BatchSettings
from flashmem_cli.cli import app
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.store.sessions import PREVIEW_CHARS, SessionStore, preview

runner = CliRunner()


def invoke(*args: str, columns: int = 200) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def terminal(width: int = 100) -> Console:
    return Console(file=StringIO(), force_terminal=True, width=width, color_system=None)


# -- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["chat"], ["run"], ["sessions", "list"]])
def test_help_shows_no_bool_type_for_flags(command):
    text = invoke(*command, "--help")
    assert "<bool>" not in text
    assert "--help" in text


@pytest.mark.parametrize("command", ["chat", "run"])
def test_options_that_take_a_value_keep_their_type(command):
    text = invoke(command, "--help")
    assert "<int range>" in text and "<float range>" in text and "<str>" in text


def test_help_still_lists_both_sides_of_a_flag_pair():
    text = invoke("chat", "--help")
    assert "--memory" in text and "--no-memory" in text
    assert "--inject" in text and "--no-inject" in text
    assert "--stateless" in text


def leaf_commands(command, path=()):
    children = getattr(command, "commands", None)
    if not children:
        yield " ".join(path), command
        return
    for name, child in children.items():
        yield from leaf_commands(child, (*path, name))


def test_every_option_of_every_command_has_a_description():
    root = typer.main.get_command(app)
    missing = [
        f"{name or 'flashmem'} {'/'.join(param.opts)}"
        for name, command in [("", root), *leaf_commands(root)]
        for param in command.params
        if param.param_type_name == "option" and not (param.help or "").strip()
    ]
    assert missing == []


def test_sampler_flags_say_what_they_do_as_llama_cpp_does():
    text = invoke("run", "--help")
    assert "Sample among the K most likely tokens (0: all)" in text
    assert "Nucleus sampling" in text and "(1.0: off)" in text
    assert "Drop tokens less likely than P times the most likely one" in text


# -- --version ---------------------------------------------------------------------------------


def test_version_prints_flashmem_and_llama_cpp_python_versions():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        f"flashmem {metadata.version('flashmem-cli')}",
        f"llama-cpp-python {metadata.version('llama-cpp-python')}",
    ]


def test_version_needs_no_command_and_runs_none():
    result = runner.invoke(app, ["--version", "sessions", "rm", "nothing"])
    assert result.exit_code == 0 and result.output.startswith("flashmem ")


# -- progress bars -----------------------------------------------------------------------------


def test_batch_progress_labels_elapsed_time_and_eta():
    console = terminal()
    progress = cli.BatchProgress(console, enabled=True)
    progress.update(RunStats(total=10, succeeded=3, generated_tokens=120))
    console.print(progress.bar.get_renderable())
    line = console.file.getvalue()
    assert "3/10 done" in line
    assert "ETA " in line and "elapsed " in line


def test_ray_progress_has_a_row_per_worker_and_the_summary_lists_them(monkeypatch):
    workers = [
        WorkerStats("flashmem-run-ab12-0", node="node-a", state="running", done=4, restarts=2),
        WorkerStats("flashmem-run-ab12-1", node="node-b", state="restarting", done=3, failed=1),
    ]
    stats = RunStats(total=10, succeeded=7, failed=1, workers=workers)
    console = terminal()
    progress = cli.BatchProgress(console, enabled=True)
    progress.update(stats)
    console.print(progress.bar.get_renderable())
    rows = console.file.getvalue().splitlines()
    assert rows[0].startswith("run") and "8/10 done · 1 failed" in rows[0] and "ETA" in rows[0]
    assert rows[1].startswith("w0 node-a ↻2") and "4/10 done · 0 failed" in rows[1]
    assert rows[2].startswith("w1 node-b (restarting)") and "4/10 done · 1 failed" in rows[2]
    assert "ETA" not in rows[1] + rows[2]  # the run's times only
    monkeypatch.setattr(cli, "err_console", terminal())
    plan = SimpleNamespace(out=None, errors=None)
    cli.print_summary(stats, plan)  # type: ignore[arg-type]
    summary = cli.err_console.file.getvalue()
    assert "worker w0 node-a" in summary and "4 succeeded, 0 failed" in summary
    assert "2 restarts" in summary and "worker w1 node-b (restarting)" in summary


def test_steps_and_training_bars_label_their_eta(monkeypatch):
    console = terminal()
    monkeypatch.setattr(cli, "err_console", console)
    with cli.steps_progress("recall", enabled=True) as advance:
        advance(1, 4)
    reports = [SimpleNamespace(step=s, loss=1.0 / s, held_out=None) for s in (1, 2)]
    fake_run = SimpleNamespace(
        config=SimpleNamespace(steps=2), run=lambda held_out: iter(reports), state="done"
    )
    assert cli.train_with_progress(fake_run, None, as_json=False) == "done"
    text = console.file.getvalue()
    assert "recall" in text and "train" in text
    assert text.count("ETA ") >= 2 and text.count("elapsed ") >= 2


# -- batch progress between results ------------------------------------------------------------


def test_step_reporter_reports_once_per_interval_with_the_tokens_in_flight():
    now = [0.0]
    calls: list[tuple[float, int]] = []
    stats = RunStats()
    on_step = step_reporter(
        stats, lambda s: calls.append((now[0], s.in_flight_tokens)), 0.5, clock=lambda: now[0]
    )
    for step in range(1, 13):  # 12 decode steps of 0.25 s, no request finishing
        now[0] = step * 0.25
        on_step(step * 4)
    assert calls == [(0.5, 8), (1.0, 16), (1.5, 24), (2.0, 32), (2.5, 40), (3.0, 48)]
    assert stats.in_flight_tokens == 48


def test_step_reporter_reports_every_step_slower_than_the_interval():
    now = [0.0]
    calls: list[int] = []
    on_step = step_reporter(RunStats(), lambda s: calls.append(1), 0.5, clock=lambda: now[0])
    for step in range(1, 4):
        now[0] = step * 2.0
        on_step(step)
    assert len(calls) == 3


def test_tokens_per_s_counts_tokens_still_in_flight():
    stats = RunStats(generated_tokens=100, in_flight_tokens=50)
    stats.started, stats.finished = 0.0, 10.0
    assert stats.tokens_per_s == 15.0


@pytest.mark.model
def test_a_long_generation_reports_progress_before_it_finishes(home, model_path, monkeypatch):
    source = home.parent / "one.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "1, 2, 3, 4,", "max_tokens": 40}) + "\n")
    monkeypatch.setattr(batch_runner, "PROGRESS_EVERY_S", 0.0)  # every decode step
    seen: list[tuple[int, int, float]] = []
    plan = RunPlan(
        source=source,
        out=home.parent / "one.out.jsonl",
        errors=home.parent / "one.errors.jsonl",
        model=str(model_path),
        n_gpu_layers=0,
        settings=BatchSettings(
            n_ctx=256,
            parallel=1,
            n_predict=40,
            sampling=SamplingParams(temperature=0),
            n_threads=2,
        ),
    )
    stats = batch_runner.run(
        plan, lambda s: seen.append((s.done, s.in_flight_tokens, s.tokens_per_s))
    )
    before_done = [(tokens, rate) for done, tokens, rate in seen if done == 0]
    assert len(before_done) >= 5, seen
    assert [tokens for tokens, _ in before_done] == sorted(t for t, _ in before_done)
    assert before_done[-1][0] > 1 and before_done[-1][1] > 0
    assert stats.succeeded == 1 and stats.in_flight_tokens == 0 and stats.generated_tokens > 1


# -- sessions list -----------------------------------------------------------------------------

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("ago", "shown"),
    [
        (timedelta(seconds=20), "just now"),
        (timedelta(minutes=3, seconds=10), "3 min ago"),
        (timedelta(hours=5), "5 h ago"),
        (timedelta(hours=30), "yesterday"),
        (timedelta(days=2, hours=1), "2 days ago"),
        (timedelta(days=29), "29 days ago"),
        (timedelta(seconds=-30), "just now"),  # another machine's clock ahead
    ],
)
def test_relative_time(ago, shown):
    assert cli.relative_time((NOW - ago).isoformat(timespec="seconds"), NOW) == shown


def test_relative_time_of_an_old_or_missing_timestamp():
    old = datetime(2025, 1, 5, 12, 0, tzinfo=timezone.utc)
    assert cli.relative_time(old.isoformat(), NOW) == old.astimezone().date().isoformat()
    assert cli.relative_time("", NOW) == "-"
    assert cli.relative_time("yesterday-ish", NOW) == "-"


def test_short_model_name_drops_the_quantization():
    assert cli.short_model_name("gemma-3-270m-q4_k_m") == "gemma-3-270m"
    assert cli.short_model_name("Qwen2.5-1.5B-Instruct.Q8_0") == "Qwen2.5-1.5B-Instruct"
    assert cli.short_model_name("phi-3-f16") == "phi-3"
    assert cli.short_model_name("mistral-7b") == "mistral-7b"
    assert cli.short_model_name("-") == "-"


def test_preview_is_the_first_user_message_on_one_cut_line():
    records = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello\n\n  there"},
        {"role": "user", "content": "later"},
    ]
    assert preview(records) == "Hello there"
    long = preview([{"role": "user", "content": "x" * 100}])
    assert len(long) == PREVIEW_CHARS and long.endswith("…")
    assert preview([{"event": "reset"}]) == ""


def make_sessions(home: Path) -> dict[str, str]:
    """Three sessions last used 3 minutes, 30 hours and 2 days ago; returns their stored
    `updated` times."""
    store = SessionStore(home / "sessions")
    sessions = {
        "chat-20260310-115700": ("What is the capital of France? " * 4, timedelta(minutes=3)),
        "recipes": ("A [b]bread[/b] recipe", timedelta(hours=30)),
        "trip": ("Plan three days in Lisbon", timedelta(days=2, hours=2)),
    }
    updated = {}
    for name, (message, ago) in sessions.items():
        with store.open(name) as session:
            session.append({"role": "user", "content": message})
            session.append({"role": "assistant", "content": "Sure."})
        meta_path = home / "sessions" / name / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["updated"] = (datetime.now(timezone.utc) - ago).isoformat(timespec="seconds")
        meta["model"] = {"name": "gemma-3-270m-q4_k_m", "path": "", "fingerprint": ""}
        meta_path.write_text(json.dumps(meta))
        updated[name] = meta["updated"]
    return updated


def test_sessions_list_fits_80_columns_with_relative_times_and_previews(home):
    make_sessions(home)
    text = invoke("sessions", "list", columns=80)
    lines = text.splitlines()
    assert max(cell_len(line) for line in lines) <= 80, text
    assert "first message" in text and "updated" in text
    row = {line.split()[0]: line for line in lines if line.split()}
    assert "3 min ago" in row["chat-20260310-115700"]
    assert "What is the capital" in row["chat-20260310-115700"]
    assert row["chat-20260310-115700"].rstrip().endswith("…")
    assert "yesterday" in row["recipes"] and "A [b]bread[/b] recipe" in row["recipes"]
    assert "2 days ago" in row["trip"] and "Plan three days in Lisbon" in row["trip"]
    assert "gemma-3-270m" in row["trip"] and "q4_k_m" not in row["trip"]


@pytest.mark.parametrize("width", [40, 60, 100, 160])
def test_sessions_list_fits_other_widths_too(home, width):
    make_sessions(home)
    text = invoke("sessions", "list", columns=width)
    assert max(cell_len(line) for line in text.splitlines()) <= width, text
    assert "chat-20260310-115700" in text  # names are never cut


def test_sessions_list_json_keeps_absolute_timestamps(home):
    updated = make_sessions(home)
    listing = json.loads(invoke("sessions", "list", "--json"))
    assert {s["name"]: s["updated"] for s in listing} == updated
    trip = next(s for s in listing if s["name"] == "trip")
    assert trip == {
        "name": "trip",
        "messages": 2,
        "updated": updated["trip"],
        "model": "gemma-3-270m-q4_k_m",
        "state_bytes": 0,
        "preview": "Plan three days in Lisbon",
    }


# -- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (18 * 1024, "18.0 KiB"),
        (253_113_024, "241.4 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**4, "3072.0 GiB"),
    ],
)
def test_human_bytes_uses_binary_units(n, shown):
    assert cli.human_bytes(n) == shown
