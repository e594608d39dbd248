"""`flashmem run --ray` on a real local Ray cluster (`ray start --head` on 127.0.0.1, 2 CPUs)
and the real default model: every id once, the local run's replies, a worker killed, the
driver killed and resumed, another model file on a node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import run_cli
from test_batch import read_jsonl, write_lines

from flashmem_cli import models
from flashmem_cli.batch import cluster, runner
from flashmem_cli.batch.cluster import RayOptions
from flashmem_cli.batch.scheduler import BatchSettings
from flashmem_cli.batch.worker import ModelSpec
from flashmem_cli.bench.ray_head import free_port, local_head
from flashmem_cli.engine.sampling import SamplingParams
from flashmem_cli.errors import FlashmemError

pytestmark = pytest.mark.model

GREEDY = ["--temp", "0", "-c", "256", "-t", "1", "-q"]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A head node of 2 CPUs on 127.0.0.1 for this module."""
    with local_head(cpus=2) as address:
        yield address


def mixed_lines() -> list:
    return [
        {"id": f"q{i}", "prompt": f"Question {i}: what is {i} plus {i * 3}? Answer:",
         "max_tokens": 12}
        for i in range(6)
    ] + [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]}},
        {"id": "a1", "prompt": "My name is Ada.", "session": "ada", "max_tokens": 6},
        {"id": "b1", "prompt": "My name is Bo.", "session": "bo", "max_tokens": 6},
        {"id": "a2", "prompt": "I keep bees.", "session": "ada", "max_tokens": 6},
        {"id": "a3", "prompt": "What is my name?", "session": "ada", "max_tokens": 6},
        b"not json",
    ]  # fmt: skip


def replies(path: Path) -> dict[str, str]:
    texts = {}
    for record in read_jsonl(path):
        choice = record["response"]["body"]["choices"][0]
        texts[record["custom_id"]] = choice.get("text") or choice["message"]["content"]
    return texts


def session_replies(home: Path, name: str) -> list[str]:
    """The batch ids of the session's replies, in transcript order. (A user record can repeat:
    a turn cut off before its reply stays in the transcript, and the turn is taken again.)"""
    transcript = home / "sessions" / name / "transcript.jsonl"
    return [r["batch_id"] for r in read_jsonl(transcript) if r.get("role") == "assistant"]


def lines_written(path: Path) -> int:
    """Whole lines in a file another process may be writing."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_ray_run_gives_the_local_runs_replies_each_id_once(
    home, model_path, tmp_path, ray_address, monkeypatch
):
    source = write_lines(tmp_path / "m.jsonl", mixed_lines())
    local = run_cli("run", str(source), "-o", str(tmp_path / "local.out"), "--errors",
                    str(tmp_path / "local.err"), *GREEDY, "-np", "1")  # fmt: skip
    assert local.returncode == 2, local.stderr
    monkeypatch.setenv("FLASHMEM_HOME", str(tmp_path / "ray-home"))  # sessions start afresh
    on_ray = run_cli("run", str(source), "--ray", "--address", ray_address, "--workers", "2",
                     *GREEDY, "-np", "1")  # fmt: skip
    assert on_ray.returncode == 2, on_ray.stderr
    assert "Traceback" not in on_ray.stderr
    out, errors = read_jsonl(tmp_path / "m.out.jsonl"), read_jsonl(tmp_path / "m.errors.jsonl")
    ids = [record["custom_id"] for record in out]
    assert sorted(ids) == sorted(replies(tmp_path / "local.out"))  # each id once
    assert replies(tmp_path / "m.out.jsonl") == replies(tmp_path / "local.out")
    assert [e["error"]["code"] for e in errors] == ["invalid_json"]
    assert session_replies(tmp_path / "ray-home", "ada") == ["a1", "a2", "a3"]  # in file order
    assert session_replies(tmp_path / "ray-home", "bo") == ["b1"]


def plan_for(source: Path, address: str, parallel: int = 2) -> runner.RunPlan:
    out, errors = runner.default_paths(source)
    settings = BatchSettings(
        n_ctx=256, parallel=parallel, n_predict=12, sampling=SamplingParams(temperature=0),
        n_threads=1,
    )  # fmt: skip
    return runner.RunPlan(source, out, errors, None, None, settings,
                          ray=RayOptions(address, workers=2))  # fmt: skip


@pytest.fixture()
def ray_here(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Ray in this process, imported as the driver imports it (cluster.import_ray sets
    RAY_AUTH_MODE before the import); the variable is gone again after the test."""
    monkeypatch.setenv("RAY_AUTH_MODE", "recorded")  # so that monkeypatch restores it after
    monkeypatch.delenv("RAY_AUTH_MODE")
    return cluster.import_ray()


def test_a_killed_worker_loses_nothing_and_writes_nothing_twice(
    home, model_path, tmp_path, ray_address, ray_here
):
    ray = ray_here
    lines: list = [{"id": f"q{i}", "prompt": f"Count to {i}:", "max_tokens": 16}
                   for i in range(18)]  # fmt: skip
    for i in range(3):  # session lines early in the file: dealt around the kill
        lines.insert(2 + 3 * i, {"id": f"s{i}", "prompt": f"Line {i}.", "session": "kept",
                                 "max_tokens": 4})  # fmt: skip
    source = write_lines(tmp_path / "k.jsonl", lines)
    plan = plan_for(source, ray_address)
    killed: list[str] = []

    def kill_first_worker(stats: runner.RunStats) -> None:
        if not killed and stats.done >= 2:
            name = stats.workers[0].name
            ray.kill(ray.get_actor(name, namespace=cluster.NAMESPACE), no_restart=False)
            killed.append(name)

    stats = runner.run(plan, kill_first_worker)
    assert killed
    worker = stats.workers[0]
    assert worker.lost >= 1  # it held requests when it died; they were dealt again
    # Ray restarted it, or was still restarting it when the other worker finished the rest
    assert (worker.restarts, worker.state) in {(1, "running"), (0, "restarting")}
    ids = [record["custom_id"] for record in read_jsonl(plan.out)]
    assert sorted(ids) == sorted(line["id"] for line in lines)  # none lost, none twice
    assert stats.succeeded == len(lines) and not read_jsonl(plan.errors)
    assert session_replies(home, "kept") == ["s0", "s1", "s2"]  # each turn answered once


def test_a_killed_driver_resumes_to_every_id_once(home, model_path, tmp_path, ray_address):
    lines = [{"id": f"q{i}", "prompt": f"Tell me about {i}:", "max_tokens": 16} for i in range(16)]
    lines += [{"id": f"s{i}", "prompt": f"Turn {i}.", "session": "long", "max_tokens": 4}
              for i in range(4)]  # fmt: skip
    source = write_lines(tmp_path / "d.jsonl", lines)
    command = [sys.executable, "-m", "flashmem_cli", "run", str(source), "--ray", "--address",
               ray_address, "--workers", "2", *GREEDY, "-np", "2"]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "d.out.jsonl"
    deadline = time.time() + 180
    while lines_written(out) < 3 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = lines_written(out)
    assert 3 <= written < len(lines)  # killed mid-run
    resumed = run_cli("run", str(source), "--ray", "--address", ray_address, "--workers", "2",
                      *GREEDY, "-np", "2", "--resume")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    ids = [record["custom_id"] for record in read_jsonl(out)]
    assert sorted(ids) == sorted(line["id"] for line in lines)
    assert session_replies(home, "long") == ["s0", "s1", "s2", "s3"]


def test_a_node_with_another_model_file_fails_the_run(
    home, model_path, tmp_path, ray_address, ray_here
):
    ray = ray_here
    file = models.describe(model_path)
    settings = BatchSettings(n_ctx=256, parallel=1, n_predict=4, sampling=SamplingParams())
    other = ModelSpec(str(file.path), "0" * 16, None)
    missing = ModelSpec(str(tmp_path / "gone.gguf"), file.fingerprint, None)
    with cluster.connected(ray, ray_address):
        with pytest.raises(FlashmemError, match="has another file at .* every node needs"):
            cluster.start_workers(ray, RayOptions(workers=2), other, settings, 256, [])
        with pytest.raises(FlashmemError, match="has no model file at .*gone.gguf"):
            cluster.start_workers(ray, RayOptions(workers=1), missing, settings, 256, [])
        with pytest.raises(FlashmemError, match="--workers 3 needs 3 CPUs .* it has 2"):
            cluster.start_workers(ray, RayOptions(workers=3), other, settings, 256, [])


def test_without_ray_installed_the_error_says_how(home, model_path, tmp_path):
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    source = write_lines(tmp_path / "r.jsonl", [{"id": "x", "prompt": "Hi", "max_tokens": 2}])
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    proc = subprocess.run([sys.executable, "-m", "flashmem_cli", "run", str(source), "--ray"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --ray needs Ray")
    assert "pip install 'flashmem[ray]'" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreachable_cluster_fails_at_once(home, model_path, tmp_path):
    source = write_lines(tmp_path / "u.jsonl", [{"id": "x", "prompt": "Hi", "max_tokens": 2}])
    started = time.perf_counter()
    proc = run_cli("run", str(source), "--ray", "--address", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    assert "cannot reach the Ray cluster at 127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 60  # not Ray's minutes of retries
    assert not read_jsonl(tmp_path / "u.out.jsonl")  # nothing written, --resume has it all


def test_addresses_are_checked_before_ray_sees_them(home, tmp_path):
    source = write_lines(tmp_path / "a.jsonl", [{"id": "x", "prompt": "Hi"}])
    cases = {
        "head:99999": "--address 'head:99999': use HOST:PORT",
        "::1:6379": "write an IPv6 host in brackets",
        f"[::1]:{free_port()}": "cannot reach the Ray cluster at [::1]:",
        "head..lan:6379": "cannot reach the Ray cluster at head..lan:6379",
    }
    for address, message in cases.items():
        proc = run_cli("run", str(source), "--ray", "--address", address)
        assert proc.returncode == 1 and message in proc.stderr, (address, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_ray_options_need_ray(home, tmp_path):
    source = write_lines(tmp_path / "o.jsonl", [{"id": "x", "prompt": "Hi"}])
    for flag in (["--workers", "2"], ["--address", "127.0.0.1:6379"]):
        proc = run_cli("run", str(source), *flag)
        assert proc.returncode == 1
        assert "--address and --workers are for --ray runs" in proc.stderr


def test_the_ray_benchmark_runs_end_to_end(home, model_path, ray_address):
    from flashmem_cli.bench import ray_bench
    from flashmem_cli.bench.method import BenchOptions

    said: list[str] = []
    section = ray_bench.run_on(ray_address, BenchOptions(quick=True, threads=2), said.append)
    rows = {row["method"]: row for row in section.rows}
    assert list(rows) == list(ray_bench.METHODS)
    assert all(row["tokens_per_s"]["median"] > 0 for row in rows.values())
    assert rows["local"]["vs_local"] == 1.0
    assert section.headline["two_workers_vs_one"] == pytest.approx(
        rows["ray, 2 workers"]["tokens_per_s"]["median"]
        / rows["ray, 1 worker"]["tokens_per_s"]["median"]
    )  # one round: the paired ratio is the ratio of the medians
    assert said == [f"ray: {name}" for name in ray_bench.METHODS]


def test_a_cluster_without_token_auth_gets_a_hint_when_the_guess_was_token(
    home, model_path, tmp_path, monkeypatch
):
    source = write_lines(tmp_path / "t.jsonl", [{"id": "x", "prompt": "Hi", "max_tokens": 2}])
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 32)  # a token is around: flashmem guesses token
    with local_head(cpus=1, auth="disabled") as address:
        proc = run_cli("run", str(source), "--ray", "--address", address, "-q")
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a Ray worker failed to start")
    assert last.endswith("for a cluster without it, set RAY_AUTH_MODE=disabled)")
