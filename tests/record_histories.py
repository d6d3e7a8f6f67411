"""Record workflow histories from real runs into tests/histories/, for the replay tests.

    uv run python -m tests.record_histories

Runs the real worker against the Temporal dev server, an embedded PostgreSQL and the scripted OpenAI server, and
saves: a plain conversation, one whose activities failed and were retried, a run that continued as new, and one
with a nudge that fired and one that was cancelled.
Re-record only on purpose: committed histories are what guards old runs against incompatible workflow changes.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from openai import AsyncOpenAI
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.llm import ChatModel
from activities.nudges import CompanionActivities
from cli.dev import dev_server_config_args
from core.settings import load_settings
from schemas.memory import Channel, NudgeStatus
from schemas.turn import ChatUser, IncomingMessage, Nudge
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres
from storage.repository import MemoryRepository
from tests.fake_openai import Fail, FakeOpenAI
from tests.test_workflow import FailingAfterWrite
from worker import build_worker
from workflows.client import cancel_nudge, schedule_nudge, send_message, signal_message
from workflows.companion import USER_ID_ATTRIBUTE, CompanionWorkflow, workflow_id

HISTORIES = Path(__file__).parent / "histories"
BIN = Path(sys.executable).parent


def _message(telegram_id: int, n: int, text: str) -> IncomingMessage:
    return IncomingMessage(message_key=f"console:{telegram_id}:{n}", user=ChatUser(telegram_id=telegram_id,
                                                                                   first_name="Simon"),
                           chat_id=telegram_id, channel=Channel.CONSOLE, text=text, sent_at=datetime.now(UTC))


async def _save(client: Client, telegram_id: int, name: str, run_id: str | None = None) -> None:
    history = await client.get_workflow_handle(workflow_id(telegram_id), run_id=run_id).fetch_history()
    (HISTORIES / f"{name}.json").write_text(history.to_json())
    print(f"recorded {name}.json ({len(history.events)} events)")


async def _scenarios(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    settings = load_settings(temporal_task_queue="record-histories")
    plain = ["Hi, I'm Simon", "I have a job interview at Acme tomorrow", "Wish me luck!"]
    async with build_worker(client, settings.temporal_task_queue, FailingAfterWrite(repository, _chat(llm))):
        llm.script(Fail(500))  # the first LLM call fails once; record_message fails twice after writing
        await send_message(client, settings, _message(1002, 0, "Something went wrong yesterday"))
        await _save(client, 1002, "retried_activities")

    async with build_worker(client, settings.temporal_task_queue, CompanionActivities(repository, _chat(llm))):
        for n, text in enumerate(plain):
            await send_message(client, settings, _message(1001, n, text))
        await _save(client, 1001, "plain_conversation")

        short = settings.model_copy(update={"workflow_turns_per_run": 2})
        for n in range(3):
            await signal_message(client, short, _message(1003, n, f"message {n}"))
        handle = client.get_workflow_handle(workflow_id(1003))
        first_run = (await handle.describe()).run_id
        while (await handle.query(CompanionWorkflow.state)).turns < 3:
            await asyncio.sleep(0.1)
        await _save(client, 1003, "continued_as_new", run_id=first_run)

        await send_message(client, settings, _message(1004, 0, "Remind me to stretch"))
        soon = Nudge(nudge_id="stretch-1", at=datetime.now(UTC) + timedelta(seconds=2), text="Time to stretch!")
        await schedule_nudge(client, settings, 1004, soon)
        later = Nudge(nudge_id="later-1", at=datetime.now(UTC) + timedelta(hours=1), text="never sent")
        await schedule_nudge(client, settings, 1004, later)
        await cancel_nudge(client, 1004, "later-1")
        while (await repository.get_scheduled_message("stretch-1")).status != NudgeStatus.SENT:
            await asyncio.sleep(0.2)
        await _save(client, 1004, "nudges")


def _chat(llm: FakeOpenAI) -> ChatModel:
    return ChatModel(AsyncOpenAI(base_url=llm.url, api_key="test-key", max_retries=0), "stub-model")


async def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="companion-record-"))
    postgres = EmbeddedPostgres(folder / "pg")
    llm = FakeOpenAI()
    llm.start()
    try:
        engine = create_engine(postgres.start())
        await migrate.upgrade(engine)
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(BIN / "temporal"), data_converter=pydantic_data_converter,
            search_attributes=[USER_ID_ATTRIBUTE], dev_server_extra_args=dev_server_config_args())
        async with env:
            HISTORIES.mkdir(exist_ok=True)
            await _scenarios(env.client, MemoryRepository(create_session_factory(engine)), llm)
        await engine.dispose()
    finally:
        llm.stop()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
