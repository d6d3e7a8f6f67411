"""Conversations left on an earlier build, under `companion dev`.

A change to `workflows/` or `schemas/` (yours, or one a `git pull` brings) is a new build, and `companion dev` makes
it current. Conversations already running stay PINNED to the build they run on, which no worker serves any more: only
a worker of that build can replay their histories. So `companion dev` keeps the code of each build it runs, in
COMPANION_DATA_DIR/builds/<build id>, and a later start on another build runs a worker of that code beside its own and
wakes those conversations: each continues as new onto the current build, as an upgrade moves it (docs/operations.md,
"Upgrading"). A build's code goes once no conversation is left on it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from temporalio.api.workflowservice.v1 import DescribeWorkerDeploymentRequest
from temporalio.client import Client
from temporalio.common import WorkerDeploymentVersion
from temporalio.service import RPCError

from core.logging import get_logger
from core.settings import Settings
from workflows.contract import WAKE, WORKFLOW_TYPE

_log = get_logger(__name__)

# What a worker runs: the packages and modules the wheel holds (pyproject.toml's only-include).
SOURCES = ("activities", "bot_gateway.py", "cli", "clients", "core", "schemas", "storage", "workflows", "worker.py")
SOURCE_ROOT = Path(__file__).resolve().parents[1]
# How long the worker of an earlier build may take to start and move its conversations.
MOVE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LeftBehind:
    """The conversations of one earlier build: how many moved onto the current build, how many are still on it."""

    build_id: str
    moved: int
    left: int


def kept_code(settings: Settings, build_id: str) -> Path:
    """Where the code of a build is kept."""
    return settings.companion_data_dir / "builds" / build_id


def keep_code(settings: Settings, build_id: str) -> None:
    """Keep the code a build runs, once, so that a later start on another build can run a worker of it."""
    target = kept_code(settings, build_id)
    if target.is_dir():
        return
    partial = target.with_name(f"{build_id}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in SOURCES:
        source = SOURCE_ROOT / name
        if source.is_dir():
            shutil.copytree(source, partial / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, partial / name)
    partial.rename(target)


def _on_build(version: WorkerDeploymentVersion, build_id: str) -> str:
    return (f'WorkflowType = "{WORKFLOW_TYPE}" AND ExecutionStatus = "Running" '
            f'AND TemporalWorkerDeploymentVersion = "{version.deployment_name}:{build_id}"')


async def conversations_elsewhere(client: Client, version: WorkerDeploymentVersion) -> dict[str, int]:
    """The running conversations pinned to another build of ``version``'s deployment, counted by build."""
    info = (await client.workflow_service.describe_worker_deployment(DescribeWorkerDeploymentRequest(
        namespace=client.namespace, deployment_name=version.deployment_name))).worker_deployment_info
    counted: dict[str, int] = {}
    for summary in info.version_summaries:
        build = summary.deployment_version.build_id
        if build != version.build_id and (running := (await client.count_workflows(_on_build(version, build))).count):
            counted[build] = running
    return counted


async def move_from(client: Client, settings: Settings, version: WorkerDeploymentVersion, build_id: str,
                    count: int, watch: Callable[[int], None], ended: Callable[[int], None]) -> LeftBehind:
    """Move the conversations still on ``build_id`` onto ``version`` (the current build) with a worker of its kept
    code (keep_code), woken one by one. ``watch`` is given the worker's pid as it starts (stopped with `companion
    dev` even if that is killed), ``ended`` once it has ended. When the worker fails, they stay where they are."""
    code = kept_code(settings, build_id)
    query = _on_build(version, build_id)
    # The kept code first on the path; -P: not the working directory's (it is the current code when run from the
    # repository), which stays the working directory for `.env` and COMPANION_DATA_DIR.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(code), os.environ.get("PYTHONPATH")))),
           "COMPANION_BUILD_ID": build_id}
    env.pop("METRICS_ADDRESS", None)  # the current worker serves it
    with (settings.companion_data_dir / "earlier-builds.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-P", "-m", "cli", "worker"], env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    watch(process.pid)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MOVE_TIMEOUT_S
    left = count
    try:
        async for execution in client.list_workflows(query):
            await client.get_workflow_handle(execution.id, run_id=execution.run_id).signal(WAKE)
        while (left := (await client.count_workflows(query)).count) and process.poll() is None \
                and loop.time() < deadline:
            await asyncio.sleep(0.5)
    except RPCError as exc:
        _log.warning("dev.earlier_build_not_moved", build_id=build_id, error=str(exc))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        ended(process.pid)
    _log.info("dev.earlier_build_moved", build_id=build_id, moved=count - left, left=left,
              worker_returncode=process.returncode)
    return LeftBehind(build_id, moved=count - left, left=left)


def forget_code(settings: Settings, keep: set[str]) -> None:
    """Remove the kept code of every build but those in ``keep`` (the current one, those with conversations left)."""
    builds = settings.companion_data_dir / "builds"
    for path in builds.iterdir() if builds.is_dir() else ():
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
