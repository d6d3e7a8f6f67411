"""The worker: runs users' workflows and the activities of their turns until asked to stop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import timedelta

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Interceptor, UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.llm import ChatModel, LocalModelServer, create_chat_model
from activities.nudges import CompanionActivities
from activities.telegram import TelegramChannel
from core import payload_passes
from core.logging import get_logger
from core.settings import Settings, WorkerRole
from storage.database import create_engine, create_session_factory
from storage.repository import MemoryRepository
from storage.semantic import create_memory_index
from workflows.client import connect
from workflows.companion import USER_ID_ATTRIBUTE, CompanionWorkflow

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


def build_worker(client: Client, task_queue: str, activities: CompanionActivities,
                 max_cached_workflows: int = 1000, sandbox: bool = True, role: WorkerRole = "all",
                 interceptors: Sequence[Interceptor] = ()) -> Worker:
    """A worker for the companion's workflow and activities on one task queue (its workflows in the sandbox unless
    ``sandbox`` is false): all of them, or only a turn's part or only the background part (``role``)."""
    payload_passes.install()
    return Worker(client, task_queue=task_queue, workflows=[] if role == "background" else [CompanionWorkflow],
                  activities=activities.all(), no_remote_activities=role == "turns",
                  max_cached_workflows=max_cached_workflows, graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
                  workflow_runner=WORKFLOW_RUNNER if sandbox else UNSANDBOXED_RUNNER, interceptors=interceptors)


def metrics_runtime(address: str | None) -> Runtime | None:
    """A Temporal runtime serving Prometheus metrics at ``address`` (SDK metrics and the companion's own)."""
    if address is None:
        return None
    _log.info("worker.metrics", address=address)
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))


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
                     chat_model: ChatModel | None = None) -> None:
    """Run a worker until ``stop`` is set, then let in-flight activities finish and close every connection."""
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
    try:
        client = await connect(settings, metrics_runtime(settings.metrics_address),
                               [TracingInterceptor()] if tracer is not None else [])
        await ensure_search_attributes(client)
        if chat_model is None:
            chat_model = create_chat_model(settings, local_model.start() if local_model else None)
        sessions = create_session_factory(engine)
        memory = create_memory_index(settings, sessions)
        await memory.store.check(memory.embedder.dimension)
        activities = CompanionActivities(MemoryRepository(sessions), chat_model, telegram, settings.quiet_hours,
                                         memory=memory, extract=settings.extracts_memories)
        worker = build_worker(client, settings.temporal_task_queue, activities,
                              settings.worker_max_cached_workflows, settings.workflow_sandbox, settings.worker_role)
        async with worker:
            _log.info("worker.started", task_queue=settings.temporal_task_queue,
                      namespace=settings.temporal_namespace, address=settings.temporal_address,
                      sandbox=settings.workflow_sandbox, role=settings.worker_role)
            await stop.wait()
            _log.info("worker.stopping")
    finally:
        if telegram is not None:
            await telegram.close()
        if memory is not None:
            await memory.close()
        if own_chat_model and chat_model is not None:
            await chat_model.close()
        if tracer is not None:
            tracer.shutdown()  # sends the spans still queued
        await engine.dispose()
    _log.info("worker.stopped")
