"""The companion's own processes, started as an operator starts them, for the fault tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WORKER_START_S = 120


def start_worker(log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`companion worker` as a process of its own (``env`` added to ours), returned once it polls its task queue.
    Its log is appended to ``log``: a worker started again on the same file is waited for by its own start line."""
    started_before = log.read_text(errors="replace").count('"worker.started"') if log.exists() else 0
    process = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    deadline = time.monotonic() + WORKER_START_S
    while log.read_text(errors="replace").count('"worker.started"') == started_before:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return process


@contextmanager
def running_worker(log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`companion worker` (see start_worker) for the length of the block, stopped at its end unless it has stopped
    already (killed by the test, say)."""
    process = start_worker(log, env)
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ask a process to stop (SIGTERM) and wait for it, unless it has ended."""
    if process.poll() is None:
        process.terminate()
        process.wait(30)
