"""Privacy at rest: with PAYLOAD_KEYS, what users write reaches Temporal encrypted (keys rotate); operators decode it
through the codec server (the Temporal CLI's own --codec-endpoint here); /forget deletes the closed runs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from temporalio.client import Client, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Replayer

from activities.companion import CompanionActivities
from cli.codec_server import codec_app
from core.codec import KEY_ID, new_key_line, parse_keys
from core.settings import Settings, load_settings
from schemas.memory import Channel
from schemas.turn import ChatUser, IncomingMessage
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from tests.conftest import SharedDevServer, chat_model, new_telegram_id
from tests.fake_openai import FakeOpenAI
from tests.local_http import free_port
from tests.test_workflow import eventually
from worker import build_worker
from workflows.client import data_converter, forget, send_message
from workflows.companion import CompanionWorkflow
from workflows.contract import workflow_id

SECRET = "my bank PIN hint is the blue giraffe"
NAME = "Zephyrine"
TEMPORAL = str(Path(sys.executable).parent / "temporal")


def keyed(task_queue: str, keys: str) -> Settings:
    return load_settings(temporal_task_queue=task_queue, payload_keys=keys, checkin_after_days=0,
                         remember_after_quiet_seconds=0, workflow_turns_per_run=2)


def message(telegram_id: int, text: str) -> IncomingMessage:
    return IncomingMessage(message_key=f"console:{telegram_id}:{uuid.uuid4().hex[:12]}", chat_id=telegram_id,
                           user=ChatUser(telegram_id=telegram_id, first_name=NAME), channel=Channel.CONSOLE,
                           text=text, sent_at=datetime.now(UTC))


def client_for(raw: Client, settings: Settings) -> Client:
    """A client of the same server with the settings' data converter (encrypting with their keys)."""
    return Client(raw.service_client, namespace=raw.namespace, data_converter=data_converter(settings))


async def runs_of(client: Client, query: str) -> list:
    return [run async for run in client.list_workflows(query)]


def raw_bytes(history: WorkflowHistory) -> bytes:
    """Every event of a history as the server stores it (no codec applied)."""
    return b"".join(event.SerializeToString() for event in history.events)


def payloads(value: object) -> Iterator[dict]:
    """Every payload (a dict with metadata and data) in a history as JSON."""
    if isinstance(value, dict):
        if isinstance(value.get("metadata"), dict) and "data" in value:
            yield value
        for item in value.values():
            yield from payloads(item)
    elif isinstance(value, list):
        for item in value:
            yield from payloads(item)


def payload_text(shown: str) -> str:
    """The data of every payload of a history the Temporal CLI printed as JSON, as text."""
    return "\n".join(base64.b64decode(p["data"]).decode(errors="replace") for p in payloads(json.loads(shown)))


def key_ids(history: WorkflowHistory) -> set[str]:
    """The key ids of the encrypted payloads of a history."""
    return {base64.b64decode(p["metadata"][KEY_ID]).decode() for p in payloads(json.loads(history.to_json()))
            if KEY_ID in p["metadata"]}


@pytest.fixture
async def raw_client(dev_server: SharedDevServer) -> Client:
    return (await dev_server.get()).client


@contextlib.asynccontextmanager
async def conversing(raw: Client, settings: Settings, repo: MemoryRepository, llm: FakeOpenAI,
                     memory: MemoryIndex) -> AsyncIterator[Client]:
    """A worker with the settings' keys, and a client with them, for the block."""
    client = client_for(raw, settings)
    chat = chat_model(llm)
    async with build_worker(client, settings.temporal_task_queue,
                            CompanionActivities.create(repo, chat, memory=memory)):
        yield client


async def converse(raw: Client, settings: Settings, repo: MemoryRepository, llm: FakeOpenAI, memory: MemoryIndex,
                   telegram_id: int, texts: list[str]) -> None:
    async with conversing(raw, settings, repo, llm, memory) as client:
        for text in texts:
            reply = await send_message(client, settings, message(telegram_id, text))
            assert reply.text == f"I hear you: {text}"


async def history_gone(client: Client, workflow: str, run_id: str) -> bool:
    try:
        await client.get_workflow_handle(workflow, run_id=run_id).fetch_history()
    except RPCError as exc:
        return exc.status == RPCStatusCode.NOT_FOUND
    return False


async def listed(*args: str) -> list[dict]:
    status, out = await run_cli(*args)
    assert status == 0, out
    return json.loads(out)


async def run_cli(*args: str) -> tuple[int, str]:
    """The Temporal CLI, without blocking this event loop (the codec server it may call runs on it)."""
    process = await asyncio.create_subprocess_exec(TEMPORAL, *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


async def test_with_keys_no_message_text_nor_name_reaches_temporal_and_the_history_still_replays(
        raw_client: Client, repo: MemoryRepository, fake_llm: FakeOpenAI, memory: MemoryIndex) -> None:
    clear, sealed = new_telegram_id(), new_telegram_id()
    queue = f"test-{uuid.uuid4()}"
    # Without keys (as in development) the text is there for anyone who reads Temporal's database.
    await converse(raw_client, load_settings(temporal_task_queue=queue, checkin_after_days=0), repo, fake_llm,
                   memory, clear, [SECRET])
    assert SECRET.encode() in raw_bytes(await raw_client.get_workflow_handle(workflow_id(clear)).fetch_history())

    settings = keyed(queue, new_key_line())
    await converse(raw_client, settings, repo, fake_llm, memory, sealed, [SECRET, "and my sister is Ines"])
    stored = await raw_client.get_workflow_handle(workflow_id(sealed)).fetch_history()  # as the server keeps it
    assert SECRET.encode() not in raw_bytes(stored) and b"Ines" not in raw_bytes(stored)
    assert NAME.encode() not in raw_bytes(stored)  # neither in the memo nor in the summaries the UI shows
    assert key_ids(stored) == {settings.payload_codec.key_id}

    replayer = Replayer(workflows=[CompanionWorkflow], data_converter=data_converter(settings))
    await replayer.replay_workflow(stored)  # with the key, it decodes and replays
    with pytest.raises(RuntimeError, match="which PAYLOAD_KEYS does not hold"):
        await Replayer(workflows=[CompanionWorkflow], data_converter=data_converter(
            keyed(queue, new_key_line()))).replay_workflow(stored)  # with another key, it doesn't


async def test_history_written_under_an_old_key_decodes_and_the_conversation_goes_on_under_a_new_one(
        raw_client: Client, repo: MemoryRepository, fake_llm: FakeOpenAI, memory: MemoryIndex) -> None:
    ada, queue = new_telegram_id(), f"test-{uuid.uuid4()}"
    old, new = new_key_line(), new_key_line()
    await converse(raw_client, keyed(queue, old), repo, fake_llm, memory, ada, ["written under the old key"])
    rotated = keyed(queue, f"{new},{old}")  # the new key first: it encrypts; the old one still decrypts
    async with conversing(raw_client, rotated, repo, fake_llm, memory) as client:
        reply = await send_message(client, rotated, message(ada, "and this under the new one"))
        assert reply.text == "I hear you: and this under the new one"
        state = await client.get_workflow_handle(workflow_id(ada)).query(CompanionWorkflow.state)
    assert [line.split(": ", 1)[1] for line in state.transcript if line.startswith(f"**{NAME}**")] == [
        "written under the old key", "and this under the new one"]
    ids = set()
    async for run in raw_client.list_workflows(f"WorkflowId = '{workflow_id(ada)}'"):
        ids |= key_ids(await raw_client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history())
    assert ids == {next(iter(parse_keys(old))), next(iter(parse_keys(new)))}


@pytest.fixture
async def codec_server() -> AsyncIterator[tuple[str, Settings]]:
    settings = load_settings(payload_keys=new_key_line(), codec_server_token="codec-token-for-tests-0451")
    runner = web.AppRunner(codec_app(settings.payload_codec, "codec-token-for-tests-0451",
                                     ("http://localhost:8233",)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", settings
    await runner.cleanup()


async def test_the_codec_server_answers_the_uis_decode_request_and_refuses_a_wrong_token(
        codec_server: tuple[str, Settings]) -> None:
    url, settings = codec_server
    [sealed] = await data_converter(settings).encode(["Zephyrine's diary"])
    body = {"payloads": [{"metadata": {k: base64.b64encode(v).decode() for k, v in sealed.metadata.items()},
                          "data": base64.b64encode(sealed.data).decode()}]}
    ui = {"Origin": "http://localhost:8233", "X-Namespace": "default", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.options(f"{url}/decode", headers={**ui, "Access-Control-Request-Method": "POST"}) as preflight:
            assert preflight.status == 200
            assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:8233"
            assert "X-Namespace" in preflight.headers["Access-Control-Allow-Headers"]
        async with http.post(f"{url}/decode", json=body,
                             headers={**ui, "Authorization": "Bearer codec-token-for-tests-0451"}) as decoded:
            assert decoded.status == 200 and decoded.headers["Access-Control-Allow-Origin"] == "http://localhost:8233"
            [payload] = (await decoded.json())["payloads"]
        assert base64.b64decode(payload["metadata"]["encoding"]) == b"json/plain"
        assert json.loads(base64.b64decode(payload["data"])) == "Zephyrine's diary"
        for token in ("Bearer wrong", None):
            async with http.post(f"{url}/decode", json=body,
                                 headers={**ui, **({"Authorization": token} if token else {})}) as refused:
                assert refused.status == 401
        async with http.post(f"{url}/decode", json=body, headers={"Origin": "https://evil.example",
                                                                  "Authorization": "Bearer codec-token-for-tests-0451"}
                             ) as elsewhere:
            assert "Access-Control-Allow-Origin" not in elsewhere.headers  # a browser elsewhere can't read it


async def test_the_temporal_cli_shows_the_conversation_through_the_codec_server(
        raw_client: Client, repo: MemoryRepository, fake_llm: FakeOpenAI, memory: MemoryIndex,
        codec_server: tuple[str, Settings]) -> None:
    url, keys = codec_server
    ada = new_telegram_id()
    settings = keyed(f"test-{uuid.uuid4()}", keys.payload_keys.get_secret_value())
    await converse(raw_client, settings, repo, fake_llm, memory, ada, [SECRET])
    show = ["workflow", "show", "-w", workflow_id(ada), "--address", raw_client.service_client.config.target_host,
            "-o", "json"]
    status, sealed = await run_cli(*show)
    assert status == 0 and SECRET not in payload_text(sealed)
    status, decoded = await run_cli(*show, "--codec-endpoint", url, "--codec-auth", "Bearer codec-token-for-tests-0451")
    assert status == 0, decoded
    assert SECRET in payload_text(decoded) and NAME in payload_text(decoded)


async def test_forget_deletes_the_closed_runs_and_the_open_one_holds_nothing_erased(
        raw_client: Client, repo: MemoryRepository, fake_llm: FakeOpenAI, memory: MemoryIndex) -> None:
    ada = new_telegram_id()
    # In clear (no keys), so that what the histories hold can be read here as the server stores it.
    settings = load_settings(temporal_task_queue=f"test-{uuid.uuid4()}", checkin_after_days=0,
                             remember_after_quiet_seconds=0, workflow_turns_per_run=2)
    texts = [SECRET, "my sister is Ines", "we grew up in Porto"]  # two turns a run: this spans two runs
    query = f"CompanionUserId = {ada}"
    async with conversing(raw_client, settings, repo, fake_llm, memory) as client:
        for text in texts:
            await send_message(client, settings, message(ada, text))
        runs = await eventually(lambda: runs_of(raw_client, query), lambda runs: len(runs) >= 2)  # visibility lags
        held = [raw_bytes(await raw_client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history())
                for run in runs]
        assert any(SECRET.encode() in history for history in held)

        forgotten = await forget(client, settings, ChatUser(telegram_id=ada))
        assert forgotten.runs_deleted == len(runs) >= 2
        for old in runs:  # their histories go from the server (it deletes in the background: ~30 s here)
            await eventually(lambda old=old: history_gone(raw_client, old.id, old.run_id), lambda gone: gone,
                             timeout_s=90)

        listing = ("workflow", "list", "-q", query, "--address", raw_client.service_client.config.target_host,
                   "-o", "json")
        # The server deletes a run in the background, and its visibility follows.
        [run] = await eventually(lambda: listed(*listing), lambda runs: len(runs) == 1, timeout_s=30)  # fresh only
        assert run["status"] == "WORKFLOW_EXECUTION_STATUS_RUNNING" and run["execution"]["runId"] != forgotten.run_id
        fresh = await raw_client.get_workflow_handle(workflow_id(ada)).fetch_history()
        assert [text for text in [*texts, NAME] if text.encode() in raw_bytes(fresh)] == []
        again = await send_message(client, settings, message(ada, "hello again"))
        assert again.text == "I hear you: hello again"  # the conversation starts afresh on the fresh run
