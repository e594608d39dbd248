"""`flashmem bench` from the command line: one entry point, JSON for scripts, files in --out."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def test_an_unknown_benchmark_is_one_line_and_exit_1(home: Path) -> None:
    done = run_cli("bench", "nonsense")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: unknown benchmark 'nonsense': use resume, consolidation, decode, monitor, "
        "batch, threads, recall, ray or all"
    ]
    assert "Traceback" not in done.stderr


def test_quick_monitor_writes_json_markdown_and_plots(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = run_cli("bench", "monitor", "--quick", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    written = json.loads((out / "results.json").read_text())
    assert printed["sections"].keys() == written["sections"].keys() == {"monitor"}
    assert printed["command"].startswith("flashmem bench monitor --quick")
    assert "CPU" in written["machine"]["llama.cpp build"]
    assert written["machine"]["gpu offload"]
    rows = written["sections"]["monitor"]["rows"]
    assert rows, "the monitor bench returned no rows"
    markdown = (out / "results.md").read_text()
    assert markdown.count("\n| ") >= 2 + len(rows)  # a machine table and the section's
    assert "### " in markdown


def test_an_unwritable_out_fails_before_the_run(home: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = run_cli("bench", "monitor", "--quick", "--out", str(blocker / "results"))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "error:" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
