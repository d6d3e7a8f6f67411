"""The embedded stack the process-level benchmarks run on, with the real worker as a process of its own.

pgserver PostgreSQL (migrated), the Temporal dev server tuned by temporal-config/development.yaml, an
OpenAI-compatible stub answering at once in its own process, and `companion worker` started against them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from cli.dev import dev_server_config_args
from core.settings import Settings, load_settings
from storage import migrate
from storage.database import create_engine
from storage.embedded import EmbeddedPostgres
from tests.fake_openai import serve_in_subprocess
from tests.processes import start_worker
from workflows.companion import USER_ID_ATTRIBUTE

@dataclass
class BenchStack:
    """What a benchmark talks to: a client of the dev server, the settings the worker runs with, the database."""

    client: Client
    settings: Settings
    database_url: str
    worker: subprocess.Popen[bytes]


@asynccontextmanager
async def embedded_stack(task_queue: str, worker_env: dict[str, str] | None = None) -> AsyncIterator[BenchStack]:
    """Start everything, run the worker with ``worker_env`` added to its settings, and stop it all afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="companion-bench-"))
    postgres = EmbeddedPostgres(folder / "pg")
    llm_url, llm = serve_in_subprocess()
    worker: subprocess.Popen[bytes] | None = None
    try:
        database_url = postgres.start()
        engine = create_engine(database_url)
        await migrate.upgrade(engine)
        await engine.dispose()
        async with await WorkflowEnvironment.start_local(
                dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
                data_converter=pydantic_data_converter, search_attributes=[USER_ID_ATTRIBUTE],
                dev_server_extra_args=dev_server_config_args()) as env:
            address = env.client.service_client.config.target_host
            worker = start_worker(folder / "worker.log", {
                "DATABASE_URL": database_url, "TEMPORAL_ADDRESS": address, "TEMPORAL_TASK_QUEUE": task_queue,
                "OPENAI_BASE_URL": llm_url, "OPENAI_API_KEY": "bench", "NUDGE_QUIET_HOURS": "off",
                "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", **(worker_env or {})})
            yield BenchStack(env.client, load_settings(temporal_task_queue=task_queue, temporal_address=address),
                             database_url, worker)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        llm.terminate()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)
