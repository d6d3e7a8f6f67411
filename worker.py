"""The worker: runs users' workflows and the activities of their turns until asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import anyio
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from temporalio.api.deployment.v1 import WorkerDeploymentVersion as VersionMessage
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.enums.v1.task_queue_pb2 import ROUTING_CONFIG_UPDATE_STATE_COMPLETED, RoutingConfigUpdateState
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    DescribeWorkerDeploymentRequest,
    DescribeWorkerDeploymentVersionRequest,
    SetWorkerDeploymentCurrentVersionRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import LogForwardingConfig, LoggingConfig, PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Interceptor, UnsandboxedWorkflowRunner, Worker, WorkerDeploymentConfig
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import schemas
import workflows
from activities.companion import CompanionActivities
from clients.llm import ChatModel, LocalModelServer, create_chat_model
from clients.media import create_media_model
from clients.telegram import TelegramChannel
from core import payload_passes
from core.logging import get_logger
from core.settings import Settings, WorkerRole
from storage.database import create_engine, create_session_factory
from storage.repository import MemoryRepository
from storage.semantic import create_memory_index
from workflows.client import connect
from workflows.companion import CompanionWorkflow
from workflows.contract import USER_ID_ATTRIBUTE
from workflows.steps import llm_task_queue

# In-flight activities get this long to finish when the worker is asked to stop.
GRACEFUL_SHUTDOWN = timedelta(seconds=15)
# The sandbox still refuses nondeterministic calls (datetime.now, random, I/O) in workflow code, but no longer
# re-imports modules for every workflow run: a cached workflow then costs ~87 KB instead of ~178 KB, and starting
# one is ~1.7x faster (measured with 500 workflows on the dev server). The workflow module keeps no mutable
# module-level state, which is what per-run imports would protect.
WORKFLOW_RUNNER = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_all_modules())
# WORKFLOW_SANDBOX=false: load runs' workers spent 5-17% less CPU a turn without the sandbox, most of it the SDK's
# lookup of a serialization context for every payload of an activation and its completion, each run through the
# sandbox. The worker now skips those lookups where they cannot change a payload (core.payload_passes); since then
# the two differ little (worker CPU a turn, three alternating pairs: 28.4, 31.8, 28.0 ms sandboxed; 28.9, 27.1,
# 26.0 ms without).
UNSANDBOXED_RUNNER = UnsandboxedWorkflowRunner()
# A background worker (WORKER_ROLE=background) runs at this niceness: on a busy host the processes that answer turns
# (turn workers, Temporal, PostgreSQL) get the CPU first, and the remember steps take what is left.
BACKGROUND_NICENESS = 10

_log = get_logger(__name__)


class Workers:
    """The worker of the workflow's task queue and the worker of its LLM task queue, started and stopped together."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self._running = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Workers:
        for worker in self.workers:
            await self._running.enter_async_context(worker)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._running.aclose()


def build_worker(client: Client, task_queue: str, activities: CompanionActivities,
                 max_cached_workflows: int = 1000, sandbox: bool = True, role: WorkerRole = "all",
                 interceptors: Sequence[Interceptor] = (), version: WorkerDeploymentVersion | None = None,
                 llm_per_second: float | None = None) -> Workers:
    """Workers for the companion on ``task_queue`` and its LLM task queue: all of it, or only a turn's part
    (the workflows, their local steps and the LLM steps) or only the background part (the remember step).

    Workflows run in the sandbox unless ``sandbox`` is false. With ``version`` the workers join that Worker
    Deployment version, and a conversation is PINNED to the version it runs on (it moves at continue-as-new).
    ``llm_per_second`` caps the LLM steps a second: the task queue's limit holds across every worker that polls it,
    and each worker's own limit smooths the burst the server's bucket allows when it is full.
    """
    payload_passes.install()
    deployment = WorkerDeploymentConfig(version=version, use_worker_versioning=True,
                                        default_versioning_behavior=VersioningBehavior.PINNED) if version else None
    common = {"client": client, "graceful_shutdown_timeout": GRACEFUL_SHUTDOWN, "interceptors": interceptors,
              "deployment_config": deployment}
    turns = role != "background"
    workers = [Worker(task_queue=task_queue, workflows=[CompanionWorkflow] if turns else [],
                      activities=[*(activities.local() if turns else []),
                                  *(activities.background() if role != "turns" else [])],
                      no_remote_activities=role == "turns", max_cached_workflows=max_cached_workflows,
                      workflow_runner=WORKFLOW_RUNNER if sandbox else UNSANDBOXED_RUNNER, **common)]
    if turns:
        workers.append(Worker(task_queue=llm_task_queue(task_queue), activities=activities.llm(),
                              max_task_queue_activities_per_second=llm_per_second,
                              max_activities_per_second=llm_per_second, **common))
    return Workers(workers)


# What a build id is derived from: the workflow's code and the contracts its state and steps are made of.
CODE_FOLDERS = tuple(Path(package.__file__).parent for package in (workflows, schemas))


def code_build_id(folders: Sequence[Path] = CODE_FOLDERS) -> str:
    """A build id derived from the workflow's code: a changed workflow gets a new id by itself."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.glob("*.py")):
            digest.update(f"{folder.name}/{path.name}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def deployment_version(settings: Settings) -> WorkerDeploymentVersion:
    """The Worker Deployment version this worker joins: COMPANION_BUILD_ID, or one derived from the code."""
    return WorkerDeploymentVersion(deployment_name=settings.temporal_deployment_name,
                                   build_id=settings.companion_build_id or code_build_id())


# How long a version made current here waits for the server to report the new routing propagated before it takes
# every task queue of the version routing to it as enough. The server (1.32) can report "in progress" for good: the
# version's "propagation complete" is dropped when it arrives as the deployment's workflow continues as new.
PROPAGATION_REPORT_WAIT_S = 10.0


async def make_current(client: Client, version: WorkerDeploymentVersion, only_if_none: bool = False,
                       timeout_s: float = 60.0) -> bool:
    """Make ``version`` its deployment's current version once the server has seen its workers poll every task queue
    of the current one; new conversations start on it, and running ones move to it at their next message. With
    ``only_if_none``, only when the deployment has no current version yet (its first build). Returns whether it
    made it current."""
    describe = DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=version.deployment_name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    made_at: float | None = None
    seen = "nothing yet"
    while True:
        try:
            info = (await client.workflow_service.describe_worker_deployment(describe)).worker_deployment_info
            current = info.routing_config.current_deployment_version.build_id
            reported = RoutingConfigUpdateState.Name(info.routing_config_update_state)
            seen = f"current build {current or 'none'}, routing update {reported}"
            if current == version.build_id:
                # Made current (by this call, or before it): done once every task queue has the new routing, so
                # that the next message of a conversation pinned to another build moves it to this one.
                if info.routing_config_update_state == ROUTING_CONFIG_UPDATE_STATE_COMPLETED:
                    return made_at is not None
                if (made_at is None or loop.time() > made_at + PROPAGATION_REPORT_WAIT_S) \
                        and await routes_to(client, version):
                    _log.warning("worker.routing_update_still_reported", deployment=version.deployment_name,
                                 build_id=version.build_id, routing_update=reported,
                                 detail="every task queue of the build routes to it")
                    return made_at is not None
            elif only_if_none and current:
                return False
            elif any(summary.deployment_version.build_id == version.build_id for summary in info.version_summaries):
                await client.workflow_service.set_worker_deployment_current_version(
                    SetWorkerDeploymentCurrentVersionRequest(
                        namespace=client.namespace, deployment_name=version.deployment_name,
                        build_id=version.build_id, identity="companion worker"))
                _log.info("worker.made_current", deployment=version.deployment_name, build_id=version.build_id)
                made_at = loop.time()
                continue
        except RPCError as exc:
            # Not seen yet, or not yet polling every task queue the current version has.
            if exc.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                raise
            seen = f"{exc.status.name}: {exc.message}"
        if loop.time() > deadline:
            raise TimeoutError(f"build {version.build_id} could not be made current within {timeout_s:.0f} s "
                               f"(the server said last: {seen})")
        await asyncio.sleep(0.2)


async def routes_to(client: Client, version: WorkerDeploymentVersion) -> bool:
    """Whether every task queue the version's workers poll routes new work to it (as the server says of each)."""
    described = await client.workflow_service.describe_worker_deployment_version(
        DescribeWorkerDeploymentVersionRequest(namespace=client.namespace, deployment_version=VersionMessage(
            deployment_name=version.deployment_name, build_id=version.build_id)))
    for queue in described.version_task_queues:
        routing = (await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue.name), task_queue_type=queue.type))
        ).versioning_info
        if routing.current_deployment_version.build_id != version.build_id:
            return False
    return bool(described.version_task_queues)


def worker_runtime(metrics_address: str | None) -> Runtime:
    """A Temporal runtime whose Core SDK log lines go through the companion's logging (under `companion dev`, to its
    log file instead of onto the chat), serving Prometheus metrics (SDK metrics and the companion's own) at
    ``metrics_address`` when it is set."""
    forwarded = LoggingConfig(filter=LoggingConfig.default.filter,
                              forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")))
    metrics = None
    if metrics_address is not None:
        _log.info("worker.metrics", address=metrics_address)
        metrics = PrometheusConfig(bind_address=metrics_address)
    return Runtime(telemetry=TelemetryConfig(logging=forwarded, metrics=metrics))


def tracer_provider(endpoint: str | None) -> TracerProvider | None:
    """Traces of workflows and activities sent to an OTLP/HTTP collector, or None without an endpoint."""
    if endpoint is None:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": "companion-worker"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")))
    trace.set_tracer_provider(provider)
    _log.info("worker.tracing", endpoint=endpoint)
    return provider


async def ensure_search_attributes(client: Client) -> None:
    """Register the user-id search attribute operators filter by; a cluster that refuses is only warned about."""
    name = USER_ID_ATTRIBUTE.name
    try:
        await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
            namespace=client.namespace, search_attributes={name: IndexedValueType.INDEXED_VALUE_TYPE_INT}))
    except RPCError as exc:
        if exc.status != RPCStatusCode.ALREADY_EXISTS:  # e.g. Temporal Cloud manages attributes elsewhere
            _log.warning("temporal.search_attribute_unavailable", name=name, error=str(exc))


async def run_worker(settings: Settings, database_url: str, stop: asyncio.Event,
                     chat_model: ChatModel | None = None, make_current_now: bool = False,
                     ready: asyncio.Event | None = None) -> None:
    """Run a worker until ``stop`` is set, then let in-flight activities finish and close every connection.
    ``ready`` is set once the worker polls and its version is current where it should be: a message is answered.

    The worker joins the Worker Deployment version of its build. It makes that version current when told to
    (``make_current_now``) or when the deployment has none yet; otherwise an operator does
    (`temporal worker deployment set-current-version`)."""
    if settings.worker_role == "background":
        os.nice(BACKGROUND_NICENESS)  # before any thread starts: Linux sets a thread's niceness, new ones inherit it
    engine = create_engine(database_url, pool_size=settings.database_pool_size,
                           max_overflow=settings.database_max_overflow)
    # The embedded model's server stops when this object goes away: it must live as long as the worker.
    local_model = LocalModelServer() if chat_model is None and settings.uses_local_model else None
    telegram = TelegramChannel.from_settings(settings)
    tracer = tracer_provider(settings.otel_exporter_otlp_endpoint)
    memory = None
    own_chat_model = chat_model is None
    media = create_media_model(settings)
    try:
        client = await connect(settings, worker_runtime(settings.metrics_address),
                               [TracingInterceptor()] if tracer is not None else [])
        await ensure_search_attributes(client)
        if chat_model is None:
            chat_model = create_chat_model(settings, local_model.start() if local_model else None)
        sessions = create_session_factory(engine)
        memory = create_memory_index(settings, sessions)
        await memory.store.check(memory.embedder.dimension)
        activities = CompanionActivities.create(MemoryRepository(sessions), chat_model, telegram,
                                                settings.quiet_hours, memory=memory,
                                                extract=settings.extracts_memories, media=media,
                                                prices=settings.prices, limits=settings.limits)
        version = deployment_version(settings)
        # The openai SDK ends every stream under an anyio deadline, whose first use loads anyio's asyncio backend:
        # ~70 ms with the event loop stopped, amid the first replies a worker streams. Loaded now instead.
        anyio.current_time()
        # What start-up made (modules, the embedder, clients: ~200,000 objects) lives as long as the worker: out of
        # the collector's sight, a full collection no longer stops every turn in the process for ~100-200 ms.
        gc.freeze()
        worker = build_worker(client, settings.temporal_task_queue, activities,
                              settings.worker_max_cached_workflows, settings.workflow_sandbox, settings.worker_role,
                              version=version, llm_per_second=settings.llm_max_requests_per_second)
        async with worker:
            await make_current(client, version, only_if_none=not make_current_now)
            _log.info("worker.started", task_queue=settings.temporal_task_queue,
                      namespace=settings.temporal_namespace, address=settings.temporal_address,
                      sandbox=settings.workflow_sandbox, role=settings.worker_role,
                      deployment=version.deployment_name, build_id=version.build_id)
            if ready is not None:
                ready.set()
            await stop.wait()
            _log.info("worker.stopping")
    finally:
        if telegram is not None:
            await telegram.close()
        if memory is not None:
            await memory.close()
        if own_chat_model and chat_model is not None:
            await chat_model.close()
        await media.close()
        if tracer is not None:
            tracer.shutdown()  # sends the spans still queued
        await engine.dispose()
    _log.info("worker.stopped")
