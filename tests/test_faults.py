"""Faults with real processes: the worker (`companion worker`) killed with SIGKILL in the middle of a turn; the
Temporal dev server killed and restarted in the middle of a conversation, with the messages written meanwhile sent
directly and through the Telegram gateway, or kept down until the gateway gives up; PostgreSQL stopped as a crash
stops it and started again. Nothing accepted is lost, nothing is answered or stored twice, and what the gateway
could not take in the user is asked to send again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from pgserver._commands import pg_ctl
from pgserver.postgres_server import PostgresServer
from temporalio.client import Client
from temporalio.service import RPCError

from activities.companion import CompanionActivities
from activities.conversation import DB_TIMEOUT
from bot_gateway import BUSY
from cli.dev import TemporalDevServer
from core.settings import Settings, load_settings
from schemas.memory import Channel
from schemas.turn import ChatUser, CompanionState, IncomingMessage
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres
from storage.repository import MemoryRepository
from tests.conftest import (
    OPENAI_TEST_KEY,
    SharedDevServer,
    chat_model,
    fresh_telegram_id,
    histories_with_secrets,
    history_text,
    leaked,
)
from tests.fake_openai import FakeOpenAI, Reply
from tests.fake_telegram import BOT_USERNAME, TOKEN, Fail, FakeBotAPI, message_update
from tests.local_http import free_port
from tests.processes import running_worker, stop
from tests.test_telegram import running_gateway
from tests.test_workflow import eventually
from worker import build_worker
from workflows.client import signal_message
from workflows.companion import CompanionWorkflow
from workflows.contract import workflow_id


def worker_env(database_url: str, address: str, task_queue: str, llm: FakeOpenAI) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "TEMPORAL_ADDRESS": address, "TEMPORAL_TASK_QUEUE": task_queue,
            "OPENAI_BASE_URL": llm.url, "OPENAI_API_KEY": OPENAI_TEST_KEY, "NUDGE_QUIET_HOURS": "off",
            "CHECKIN_AFTER_DAYS": "0", "MEMORY_EXTRACTION": "off", "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}


def message(telegram_id: int, n: int, text: str, channel: Channel = Channel.CONSOLE) -> IncomingMessage:
    return IncomingMessage(message_key=f"{channel}:{telegram_id}:{n}", user=ChatUser(telegram_id=telegram_id),
                           chat_id=telegram_id, channel=channel, text=text, sent_at=datetime.now(UTC))


async def state(client: Client, telegram_id: int) -> CompanionState:
    return await client.get_workflow_handle(workflow_id(telegram_id)).query(CompanionWorkflow.state)


async def rows(repo: MemoryRepository, telegram_id: int) -> list[tuple[str, str]]:
    user = await repo.get_user_by_telegram_id(telegram_id)
    return [(m.message_key, m.content) for m in await repo.recent_messages(user.id, limit=100)]


async def test_a_worker_killed_mid_turn_is_replaced_and_the_turn_completes_once(
        tmp_path: Path, dev_server: SharedDevServer, database_url: str, repo: MemoryRepository,
        fake_llm: FakeOpenAI) -> None:
    client = (await dev_server.get()).client
    address, task_queue = client.service_client.config.target_host, f"test-{uuid.uuid4()}"
    settings = load_settings(temporal_task_queue=task_queue, temporal_address=address)
    env, log = worker_env(database_url, address, task_queue, fake_llm), tmp_path / "worker.log"
    ada = fresh_telegram_id()
    try:
        with running_worker(log, env) as first:
            fake_llm.script(Reply("an answer the killed worker never gets", delay_s=20))
            asked = _chat_requests(fake_llm)
            await signal_message(client, settings, message(ada, 1, "are you there?"))
            await eventually(lambda: _chat_requests(fake_llm), lambda n: n > asked)  # the LLM is thinking
            first.send_signal(signal.SIGKILL)  # the worker dies mid-call, its reply not yet stored
            first.wait(10)
        # The replacement runs workflows outside the sandbox (WORKFLOW_SANDBOX=false, as an operator might set it on
        # a restart): it takes over a conversation the sandboxed worker began, replaying its history.
        with running_worker(log, {**env, "WORKFLOW_SANDBOX": "false"}):
            started = [json.loads(line) for line in log.read_text().splitlines() if '"worker.started"' in line]
            assert [line["sandbox"] for line in started] == [True, False]
            # The workflow task the reply step runs in times out (10 s); the step runs again on the new worker.
            done = await eventually(lambda: state(client, ada), lambda s: len(s.replies) == 1, timeout_s=60)
            assert done.replies[0].text == "I hear you: are you there?" and not done.replies[0].fallback
            assert await rows(repo, ada) == [(f"console:{ada}:1", "are you there?"),
                                             (f"console:{ada}:1:reply", "I hear you: are you there?")]
            await signal_message(client, settings, message(ada, 2, "good"))  # the new worker carries on
            await eventually(lambda: state(client, ada), lambda s: len(s.replies) == 2)
            assert len(await rows(repo, ada)) == 4
            # Neither the workers' logs nor anything Temporal keeps (inputs, results, failures) holds a secret.
            history = await client.get_workflow_handle(workflow_id(ada)).fetch_history()
            assert "llm.request" in log.read_text() and len(history.events) > 10
            assert not leaked(log.read_text()) and not leaked(history_text(history))
    finally:
        await _terminate(client, ada)


async def test_a_worker_killed_after_storing_the_reply_is_replaced_and_the_reply_is_sent_without_a_new_llm_call(
        tmp_path: Path, dev_server: SharedDevServer, database_url: str, repo: MemoryRepository,
        fake_llm: FakeOpenAI) -> None:
    """The reply is stored, Telegram is failing, and the worker dies while it waits to send again. The worker that
    takes over runs the turn's steps again from their first attempt: it finds the stored reply and sends that one."""
    client = (await dev_server.get()).client
    address, task_queue, api, env = _telegram_worker(client, database_url, fake_llm)
    log = tmp_path / "worker.log"
    ada = fresh_telegram_id()
    try:
        with running_worker(log, env) as first:
            fake_llm.script(Reply("the reply the lost worker stored"))
            api.fail_next("sendMessage", Fail(500, "Internal Server Error"), Fail(500, "Internal Server Error"))
            asked = _chat_requests(fake_llm)
            await signal_message(client, load_settings(temporal_task_queue=task_queue, temporal_address=address),
                                 message(ada, 1, "are you there?", Channel.TELEGRAM))
            await eventually(lambda: _sends(api, ada), lambda n: n >= 1)  # stored, and the first send failed
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        assert await rows(repo, ada) == [(f"telegram:{ada}:1", "are you there?"),
                                         (f"telegram:{ada}:1:reply", "the reply the lost worker stored")]
        with running_worker(log, env):
            sent = await api.wait_for(ada, 1, timeout=60)
            assert [m.text for m in sent] == ["the reply the lost worker stored"]
            assert _chat_requests(fake_llm) == asked + 1  # the LLM was asked once, by the lost worker
            assert len(await rows(repo, ada)) == 2
            await asyncio.sleep(1)  # a second delivery would arrive by now
            assert len(api.messages(ada)) == 1
    finally:
        api.stop()
        await _terminate(client, ada)


async def test_a_worker_killed_mid_stream_in_a_group_leaves_one_complete_message(
        tmp_path: Path, dev_server: SharedDevServer, database_url: str, repo: MemoryRepository,
        fake_llm: FakeOpenAI) -> None:
    """The reply shows in the group as it is written, and the worker dies mid-stream. The worker that takes over
    writes the reply again into the message the first one started: the group gets one message, the whole reply."""
    client = (await dev_server.get()).client
    address, task_queue, api, env = _telegram_worker(client, database_url, fake_llm)
    settings = load_settings(temporal_task_queue=task_queue, temporal_address=address, telegram_bot_token=TOKEN,
                             telegram_api_base_url=api.url)
    log, ada, group = tmp_path / "worker.log", fresh_telegram_id(), -fresh_telegram_id()
    words = " ".join(f"w{n}" for n in range(60))
    fake_llm.tokens_per_s = 15.0  # about 4 s of writing
    mention, asked = f"@{BOT_USERNAME}", _chat_requests(fake_llm)
    try:
        async with running_gateway(settings, client):
            with running_worker(log, env) as first:
                api.push(message_update(ada, f"{mention} {words}", chat_id=group, chat_type="group",
                                        entities=[{"type": "mention", "offset": 0, "length": len(mention)}]))
                # The preview has grown by an edit: the worker is mid-stream.
                await eventually(lambda: api.edits, lambda edits: any(e.chat_id == group for e in edits))
                first.send_signal(signal.SIGKILL)
                first.wait(10)
            [preview] = api.messages(group)
            assert preview.parse_mode is None and not preview.text.endswith("w59")
            with running_worker(log, env):
                # The reply step's heartbeat times out (10 s) and it runs again on the new worker.
                await eventually(lambda: api.messages(group), lambda sent: sent[0].parse_mode == "HTML", timeout_s=60)
                await asyncio.sleep(1)  # a second message would arrive by now
        [reply] = api.messages(group)
        assert reply.message_id == preview.message_id and reply.text == f"I hear you: {words}"
        assert [content for key, content in await rows(repo, ada) if key.endswith(":reply")] == [reply.text]
        assert _chat_requests(fake_llm) == asked + 2 and not api.deleted  # the lost worker's call, and the new one
    finally:
        fake_llm.tokens_per_s = 0.0
        api.stop()
        await _terminate(client, ada)


def _telegram_worker(client: Client, database_url: str,
                     fake_llm: FakeOpenAI) -> tuple[str, str, FakeBotAPI, dict[str, str]]:
    """A task queue of its own on the dev server, a local Bot API server (started), and the environment of a worker
    that delivers to it: (address, task queue, Bot API server, environment)."""
    address, task_queue = client.service_client.config.target_host, f"test-{uuid.uuid4()}"
    api = FakeBotAPI()
    api.start()
    env = {**worker_env(database_url, address, task_queue, fake_llm), "TELEGRAM_BOT_TOKEN": TOKEN,
           "TELEGRAM_API_BASE_URL": api.url}
    return address, task_queue, api, env


def _sends(api: FakeBotAPI, chat_id: int) -> int:
    return sum(method == "sendMessage" and params["chat_id"] == str(chat_id) for method, params in api.calls)


async def test_the_temporal_server_killed_and_restarted_mid_conversation_loses_no_message(
        tmp_path: Path, database_url: str, repo: MemoryRepository, fake_llm: FakeOpenAI) -> None:
    async with restartable_stack(tmp_path, database_url, fake_llm) as (server, client, settings):
        ada = fresh_telegram_id()
        await signal_message(client, settings, message(ada, 1, "first"))
        await eventually(lambda: state(client, ada), lambda s: len(s.replies) == 1, timeout_s=30)

        _kill(server)
        # While it is down, the user writes twice; the sender retries each in turn, as the gateway does for one
        # chat, until the server is back.
        async def send_both() -> None:
            await _send_until_taken(client, settings, message(ada, 2, "second"))
            await _send_until_taken(client, settings, message(ada, 3, "third"))

        sending = asyncio.create_task(send_both())
        await asyncio.sleep(1)
        server.start()
        await sending

        done = await eventually(lambda: state(client, ada), lambda s: len(s.replies) == 3, timeout_s=60)
        assert [reply.text for reply in done.replies] == ["I hear you: first", "I hear you: second",
                                                          "I hear you: third"]
        stored = await rows(repo, ada)
        assert len(stored) == len({key for key, _ in stored}) == 6


async def test_through_a_temporal_restart_the_gateway_takes_every_message_in_order(
        tmp_path: Path, database_url: str, repo: MemoryRepository, fake_llm: FakeOpenAI) -> None:
    """The Telegram path end to end: messages a user writes while the server is down wait in the gateway, which
    retries each in turn, and are answered once, in order, when it is back; the user is never told to resend."""
    async with gateway_after_a_first_reply(tmp_path, database_url, fake_llm) as (server, api, ada):
        _kill(server)
        api.push(message_update(ada, "second"))
        api.push(message_update(ada, "third"))
        await asyncio.sleep(2)  # the gateway has both and is retrying the first of them
        server.start()

        sent = await eventually(lambda: api.messages(ada), lambda sent: len(sent) >= 3, timeout_s=60)
        await asyncio.sleep(1)  # anything sent twice would arrive by now
        assert [m.text for m in api.messages(ada)] == ["I hear you: first", "I hear you: second",
                                                       "I hear you: third"], sent
        stored = await rows(repo, ada)  # (Telegram dates have whole seconds: compare rows, not their order)
        assert len({key for key, _ in stored}) == len(stored) == 6
        assert sorted(text for _, text in stored) == sorted(["first", "I hear you: first", "second",
                                                             "I hear you: second", "third", "I hear you: third"])


async def test_an_outage_longer_than_the_gateways_patience_asks_the_user_to_resend_and_keeps_nothing_of_it(
        tmp_path: Path, database_url: str, repo: MemoryRepository, fake_llm: FakeOpenAI) -> None:
    """When the server stays down past the gateway's retries (about half a minute), the user is told to send the
    message again; nothing of it is stored or answered later, and the message sent again is answered once."""
    async with gateway_after_a_first_reply(tmp_path, database_url, fake_llm) as (server, api, ada):
        _kill(server)
        api.push(message_update(ada, "lost in the outage"))
        await eventually(lambda: api.messages(ada), lambda sent: len(sent) == 2, timeout_s=90)
        server.start()
        api.push(message_update(ada, "sent again"))

        await eventually(lambda: api.messages(ada), lambda sent: len(sent) >= 3, timeout_s=60)
        await asyncio.sleep(1)  # a late answer to the refused message would arrive by now
        assert [m.text for m in api.messages(ada)] == ["I hear you: first", BUSY, "I hear you: sent again"]
        assert sorted(text for _, text in await rows(repo, ada)) == sorted(
            ["first", "I hear you: first", "sent again", "I hear you: sent again"])


async def test_postgresql_crashed_and_restarted_mid_conversation_loses_no_message(
        tmp_path: Path, dev_server: SharedDevServer, fake_llm: FakeOpenAI) -> None:
    """PostgreSQL stops as in a crash (no checkpoint, no goodbye to clients) while a message waits to be stored: the
    turn's first step fails and is retried until the server is back, then the message is answered once."""
    env = await dev_server.get()
    settings = load_settings(temporal_task_queue=f"test-{uuid.uuid4()}", checkin_after_days=0)
    chat = chat_model(fake_llm)
    async with own_postgres(tmp_path) as (postgres, repo), build_worker(
            env.client, settings.temporal_task_queue, CompanionActivities.create(repo, chat)):
        ada = fresh_telegram_id()
        try:
            await signal_message(env.client, settings, message(ada, 1, "first"))
            await eventually(lambda: state(env.client, ada), lambda s: len(s.replies) == 1, timeout_s=30)

            postgres.crash()
            await signal_message(env.client, settings, message(ada, 2, "second"))
            await asyncio.sleep(3)  # the step that stores the message fails, and is retried, meanwhile
            assert len((await state(env.client, ada)).replies) == 1
            postgres.restart()
            restarted = time.monotonic()

            done = await eventually(lambda: state(env.client, ada), lambda s: len(s.replies) == 2, timeout_s=60)
            assert [reply.text for reply in done.replies] == ["I hear you: first", "I hear you: second"]
            assert not done.fallbacks
            stored = await rows(repo, ada)
            assert len(stored) == len({key for key, _ in stored}) == 4
            # The SDK keeps each failed local-activity attempt's start-to-close timer running; a worker shut down
            # before the last one fires gets a panic from sdk-core when it does. Let them run out first.
            await asyncio.sleep(max(0.0, DB_TIMEOUT.total_seconds() - (time.monotonic() - restarted)))
        finally:
            await _terminate(env.client, ada)
    await chat.close()


class _CrashablePostgres:
    """An embedded PostgreSQL of the test's own, stopped the way a crash stops it and started again."""

    def __init__(self, folder: Path):
        self._embedded = EmbeddedPostgres(folder)
        self.url = self._embedded.start()

    def crash(self) -> None:
        # pg_ctl's immediate mode: every process quits at once; the next start runs crash recovery.
        server = self._embedded._server  # type: ignore[attr-defined]
        pg_ctl(["-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)

    def restart(self) -> None:
        server = self._embedded._server  # type: ignore[attr-defined]
        with PostgresServer._lock:
            server.ensure_postgres_running()

    def stop(self) -> None:
        self._embedded.stop()


@contextlib.asynccontextmanager
async def own_postgres(tmp_path: Path) -> AsyncIterator[tuple[_CrashablePostgres, MemoryRepository]]:
    postgres = _CrashablePostgres(tmp_path / "postgres")
    engine = create_engine(postgres.url)
    try:
        await migrate.upgrade(engine)
        yield postgres, MemoryRepository(create_session_factory(engine))
    finally:
        await engine.dispose()
        postgres.stop()


@contextlib.asynccontextmanager
async def gateway_after_a_first_reply(tmp_path: Path, database_url: str, llm: FakeOpenAI
                                      ) -> AsyncIterator[tuple[TemporalDevServer, FakeBotAPI, int]]:
    """The Telegram path on a dev server of the test's own: the gateway, a worker, and a user whose first message
    ("first") has been answered."""
    api = FakeBotAPI()
    api.start()
    try:
        async with (restartable_stack(tmp_path, database_url, llm, telegram_api=api.url) as (server, client,
                                                                                           settings),
                    running_gateway(settings, client)):
            ada = fresh_telegram_id()
            api.push(message_update(ada, "first"))
            await eventually(lambda: api.messages(ada), lambda sent: len(sent) == 1, timeout_s=30)
            yield server, api, ada
    finally:
        api.stop()


def _kill(server: TemporalDevServer) -> None:
    """No goodbye: SIGKILL, and wait until it is gone."""
    server._process.kill()  # type: ignore[union-attr]
    server._process.wait()  # type: ignore[union-attr]


@contextlib.asynccontextmanager
async def restartable_stack(tmp_path: Path, database_url: str, llm: FakeOpenAI, telegram_api: str | None = None
                            ) -> AsyncIterator[tuple[TemporalDevServer, Client, Settings]]:
    """A dev server of this test's own (a SQLite file, so it can be killed and started again) and a worker process
    on it; with ``telegram_api``, the worker delivers there and the settings are the gateway's too."""
    telegram = {"telegram_bot_token": TOKEN, "telegram_api_base_url": telegram_api} if telegram_api else {}
    settings = load_settings(temporal_address=f"localhost:{free_port()}", companion_data_dir=tmp_path,
                             temporal_task_queue=f"test-{uuid.uuid4()}", checkin_after_days=0, **telegram)
    server = TemporalDevServer(settings)
    server.start()
    try:
        client = await server.wait_ready(settings)
        with running_worker(tmp_path / "worker.log", {
                **worker_env(database_url, settings.temporal_address, settings.temporal_task_queue, llm),
                **({"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE_URL": telegram_api} if telegram_api else {})
        }) as worker:
            yield server, client, settings
            # Nothing the worker logged and nothing the server kept (payloads decoded) holds a secret.
            stop(worker)
            assert not leaked((tmp_path / "worker.log").read_text(errors="replace")), "a secret in the worker's log"
            runs, holding = await histories_with_secrets(client)
            assert runs and not holding, f"a secret in the history of {holding}"
    finally:
        server.stop()


async def _send_until_taken(client: Client, settings: Settings, incoming: IncomingMessage,
                            timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await signal_message(client, settings, incoming)
            return
        except RPCError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)


async def _terminate(client: Client, telegram_id: int) -> None:
    try:
        await client.get_workflow_handle(workflow_id(telegram_id)).terminate("test finished")
    except RPCError:
        pass


def _chat_requests(llm: FakeOpenAI) -> int:
    return sum("messages" in body for body in llm.requests)  # embeddings requests are recorded too
