"""A Ray head node on 127.0.0.1, for `flashmem bench ray` and the tests of `flashmem run --ray`:
`ray start --head --block` in a child process, stopped with SIGTERM (which stops the Ray
processes it started)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A head in token mode (Ray 2.5x's default) writes a token to ~/.ray/auth_token; Ray's own CLI
# sends it only in that mode too, so `ray status` runs with the head's RAY_AUTH_MODE.
START_TIMEOUT_S = 90.0


def ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if found is None:
        raise RuntimeError("no `ray` command: pip install 'flashmem[ray]'")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_head(cpus: int, auth: str = "token") -> Iterator[str]:
    """Its address (127.0.0.1:PORT) once it answers `ray status`; `auth`: RAY_AUTH_MODE."""
    ray = ray_command()
    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="fmray", dir="/tmp"))  # Ray's socket paths: short
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": auth}
    with open(temp_dir / "head.log", "w") as log:
        head = subprocess.Popen(
            [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--num-cpus", str(cpus), "--include-dashboard=false",
             "--disable-usage-stats", "--temp-dir", str(temp_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        try:
            wait_ready(head, ray, address, env, temp_dir / "head.log")
            yield address
        finally:
            head.send_signal(signal.SIGTERM)
            head.wait(timeout=60)
            shutil.rmtree(temp_dir, ignore_errors=True)


def wait_ready(
    head: subprocess.Popen, ray: str, address: str, env: dict[str, str], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
        status = subprocess.run(
            [ray, "status", "--address", address], capture_output=True, text=True, env=env
        )
        if status.returncode == 0 and "CPU" in status.stdout:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head at {address} did not start in {START_TIMEOUT_S} s")
        time.sleep(0.5)
