"""Run a command and write its peak RSS (ru_maxrss as wait4 gives it) into a file.

    python flashmem_cli/bench/peak_rss.py RSS_FILE COMMAND [ARGS...]

Linux carries a process's peak RSS across fork and exec: a child of the bench, which holds a
model, reports at least the bench's own peak. This small process starts the command instead,
so the figure is the command's. Run as a script, not `-m`: importing flashmem_cli would set
flashmem's OpenMP spin count for the command too.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    rss_file, command = argv[0], argv[1:]
    proc = subprocess.Popen(command)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    with open(rss_file, "w", encoding="ascii") as f:
        f.write(f"{usage.ru_maxrss}\n")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
