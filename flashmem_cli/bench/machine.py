"""The machine a benchmark ran on: CPU, cores, memory, the llama.cpp build and GPU offload."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

from flashmem_cli import __version__, models
from flashmem_cli.bench.method import BenchOptions
from flashmem_cli.engine.backend import Model, bindings_version, supports_gpu_offload, system_info
from flashmem_cli.engine.threads import usable_cores


def describe(options: BenchOptions) -> dict[str, Any]:
    """One flat dict: what results.md prints as its machine table."""
    file = models.resolve(options.model)
    with Model(file.path, n_gpu_layers=options.n_gpu_layers) as model:
        info = model.info()
        offload = gpu_offload(model.offloaded_layers, info.n_layer)
    return {
        "cpu": cpu_name(),
        "cores": f"{usable_cores()} usable of {os.cpu_count()}",
        "memory": memory_total(),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "flashmem": __version__,
        "llama-cpp-python": bindings_version(),
        "llama.cpp build": system_info(),
        "gpu offload": offload,
        "threads": str(options.thread_count()),
        "model": f"{file.name} ({file.path.stat().st_size / 2**20:.0f} MiB, {info.n_layer} layers)",
    }


def gpu_offload(offloaded: tuple[int, int] | None, n_layer: int) -> str:
    if not supports_gpu_offload():
        return "none: this llama.cpp build has no GPU backend"
    if offloaded is None:
        return f"supported; llama.cpp did not report the layer count ({n_layer} layers)"
    on_gpu, total = offloaded
    return f"{on_gpu}/{total} layers on the GPU"


def cpu_name() -> str:
    if sys.platform == "darwin":
        return sysctl("machdep.cpu.brand_string") or platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total() -> str:
    if sys.platform == "darwin":
        total = sysctl("hw.memsize")
        return f"{int(total) / 2**30:.1f} GiB" if total.isdigit() else "unknown"
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "unknown"
    return f"{pages * size / 2**30:.1f} GiB"


def sysctl(name: str) -> str:
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()
