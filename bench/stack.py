"""The embedded stack the process-level benchmarks run on, with the real worker as a process of its own.

pgserver PostgreSQL (migrated), the Temporal dev server tuned by temporal-config/development.yaml, an
OpenAI-compatible stub answering at once in its own process, and `companion worker` started against them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client

from core.settings import Settings, load_settings
from storage import migrate
from storage.database import create_engine
from storage.embedded import EmbeddedPostgres
from tests.fake_openai import serve_in_subprocess
from tests.processes import start_dev_server, start_worker

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class BenchStack:
    """What a benchmark talks to: a client of the dev server, the settings the worker runs with, the database."""

    client: Client
    settings: Settings
    database_url: str
    workers: list[subprocess.Popen[bytes]]
    llm: subprocess.Popen[str]
    postgres_pid: int

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each part of the stack has used so far, from /proc: the worker, the Temporal
        dev server, PostgreSQL (its postmaster and every backend alive), the LLM stub, and this process (the load
        generator and whatever it hosts, such as the Bot API server)."""
        processes = _processes()
        temporal = [pid for pid, (ppid, name, _) in processes.items() if ppid == os.getpid() and name == "temporal"]
        roles = {"worker": [worker.pid for worker in self.workers], "temporal": temporal,
                 "postgres": [self.postgres_pid, *_children(processes, self.postgres_pid)],
                 "llm_stub": [self.llm.pid], "load_generator": [os.getpid()]}
        return {role: sum(processes[pid][2] for pid in pids if pid in processes) for role, pids in roles.items()}


def _processes() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, name, CPU seconds used)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from the state on: ppid is fields[1], utime and stime 11, 12
        found[int(entry.name)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return found


def _children(processes: dict[int, tuple[int, str, float]], parent: int) -> list[int]:
    return [pid for pid, (ppid, _, _) in processes.items() if ppid == parent]


@asynccontextmanager
async def embedded_stack(task_queue: str, worker_env: dict[str, str] | None = None, workers: int = 1,
                         background_workers: int = 0, llm_args: tuple[str, ...] = ()) -> AsyncIterator[BenchStack]:
    """Start everything, run ``workers`` worker processes with ``worker_env`` added to their settings (and, with
    ``background_workers``, that many more for the background: the first ones then answer turns only), and stop it
    all afterwards. ``llm_args`` go to the LLM stub's command line (`python -m tests.fake_openai --help`)."""
    folder = Path(tempfile.mkdtemp(prefix="companion-bench-"))
    postgres = EmbeddedPostgres(folder / "pg")
    llm_url, llm = serve_in_subprocess(*llm_args)
    started: list[subprocess.Popen[bytes]] = []
    try:
        database_url = postgres.start()
        engine = create_engine(database_url)
        await migrate.upgrade(engine)
        await engine.dispose()
        async with await start_dev_server() as env:
            address = env.client.service_client.config.target_host
            roles = ["turns" if background_workers else "all"] * workers + ["background"] * background_workers
            for n, role in enumerate(roles):
                started.append(start_worker(folder / f"worker-{n}.log", {
                    "DATABASE_URL": database_url, "TEMPORAL_ADDRESS": address, "TEMPORAL_TASK_QUEUE": task_queue,
                    "OPENAI_BASE_URL": llm_url, "OPENAI_API_KEY": "bench", "NUDGE_QUIET_HOURS": "off",
                    "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "WORKER_ROLE": role, **(worker_env or {})}))
            # The settings the workers run with, but the worker role: the same database, LLM server and embedder.
            settings = load_settings(temporal_task_queue=task_queue, temporal_address=address,
                                     database_url=database_url, openai_base_url=llm_url, openai_api_key="bench")
            yield BenchStack(env.client, settings, database_url, started, llm, postgres.pid)
    finally:
        for worker in started:
            worker.terminate()
        for worker in started:
            worker.wait(60)
        llm.terminate()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)
