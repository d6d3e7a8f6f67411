"""Record workflow histories from real runs into tests/histories/, for the replay tests.

    uv run python -m tests.record_histories [SCENARIO ...]

Runs the real worker against the Temporal dev server, an embedded PostgreSQL, the scripted OpenAI server and the
local Bot API server, and saves: a plain conversation; steps that failed and were retried, and an LLM that never
answered (the fallback reply); a run that continued as new; a nudge that fired and one that was cancelled; a
Telegram conversation (delivery, flood control, a nudge delivered, the bot blocked, a voice note transcribed, a
photo the vision model refused, /memory and two items forgotten from it, /persona, /export, /forget); the
companion's own nudges (a reminder asked for, a follow-up, check-ins, quiet hours, a new time zone); remember steps
with an extraction and the summary carried over continue-as-new; remember steps that wait for a pause (or five
turns), the turns still waiting remembered before continue-as-new; and limits (a daily budget spent, too many
messages a minute, /usage). Name scenarios to record only those.
Re-record on purpose only, with a new workflow design: committed histories are what guards the conversations running
on a build against changes to its workflow code.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from telegram import Bot
from temporalio.client import Client

from activities.companion import CompanionActivities
from clients.http import openai_client
from clients.media import MediaModel
from clients.telegram import TelegramChannel, file_base_url
from core.settings import Settings, load_settings
from schemas.memory import Channel, FactCategory, MemoryItemKind, NudgeKind, NudgeStatus, ProfileFactCreate
from schemas.turn import (
    Attachment,
    ChatUser,
    IncomingMessage,
    MediaKind,
    Nudge,
    PersonaChange,
    TimezoneChange,
    TimezoneSource,
)
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from storage.semantic import local_embedder
from storage.vectors import PgVectorStore
from tests.conftest import chat_model, close_chat_models
from tests.fake_openai import Fail, FakeOpenAI, Reply
from tests.fake_telegram import TOKEN, FakeBotAPI
from tests.fake_telegram import Fail as BotAPIFail
from tests.processes import start_dev_server
from tests.test_workflow import failing_after_write
from worker import build_worker
from workflows.client import (
    cancel_nudge,
    export,
    forget,
    forget_item,
    memory,
    persona,
    schedule_nudge,
    send_message,
    set_timezone,
    signal_message,
    usage,
)
from workflows.companion import CompanionWorkflow
from workflows.contract import workflow_id

HISTORIES = Path(__file__).parent / "histories"
Fail429 = BotAPIFail(429, "Too Many Requests: retry after 1", retry_after=1)


def _message(telegram_id: int, n: int, text: str) -> IncomingMessage:
    return IncomingMessage(message_key=f"console:{telegram_id}:{n}", user=ChatUser(telegram_id=telegram_id,
                                                                                   first_name="Simon"),
                           chat_id=telegram_id, channel=Channel.CONSOLE, text=text, sent_at=datetime.now(UTC))


async def _save(client: Client, telegram_id: int, name: str, run_id: str | None = None) -> None:
    history = await client.get_workflow_handle(workflow_id(telegram_id), run_id=run_id).fetch_history()
    (HISTORIES / f"{name}.json").write_text(history.to_json())
    print(f"recorded {name}.json ({len(history.events)} events)")


# The scenarios recorded before the remember step waited for a pause remember after every turn.
SETTINGS = load_settings(temporal_task_queue="record-histories", remember_after_quiet_seconds=0)


async def _retried(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    settings, simon = SETTINGS, 1002
    async with build_worker(client, settings.temporal_task_queue,
                            failing_after_write(repository, chat_model(llm), None)):
        llm.script(Fail(500))  # the first LLM call fails once; storing the message fails after writing
        await send_message(client, settings, _message(simon, 0, "Something went wrong yesterday"))
        llm.script(Fail(500), Fail(502), Fail(500))  # every attempt fails: the fallback reply
        await send_message(client, settings, _message(simon, 1, "Are you still there?"))
        await _save(client, simon, "retried_activities")


async def _console(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    settings = SETTINGS
    plain = ["Hi, I'm Simon", "I have a job interview at Acme tomorrow", "Wish me luck!"]
    async with build_worker(client, settings.temporal_task_queue,
                            CompanionActivities.create(repository, chat_model(llm))):
        for n, text in enumerate(plain):
            await send_message(client, settings, _message(1001, n, text))
        await _save(client, 1001, "plain_conversation")


async def _more(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    """continued_as_new and nudges."""
    settings = SETTINGS
    async with build_worker(client, settings.temporal_task_queue,
                            CompanionActivities.create(repository, chat_model(llm))):
        short = settings.model_copy(update={"workflow_turns_per_run": 2})
        for n in range(3):
            await signal_message(client, short, _message(1003, n, f"message {n}"))
        handle = client.get_workflow_handle(workflow_id(1003))
        first_run = (await handle.describe()).run_id
        while (await handle.query(CompanionWorkflow.state)).turns < 3:
            await asyncio.sleep(0.1)
        await _save(client, 1003, "continued_as_new", run_id=first_run)

        await send_message(client, settings, _message(1004, 0, "Remind me to stretch"))
        await _one_nudge_sent_one_cancelled(client, settings, repository, 1004, "stretch-1", "Time to stretch!",
                                            "later-1")
        await _save(client, 1004, "nudges")


async def _one_nudge_sent_one_cancelled(client: Client, settings: Settings, repository: MemoryRepository,
                                        telegram_id: int, sent: str, text: str, cancelled: str) -> None:
    """A nudge due in 2 s, waited for until it is sent, and one due in an hour, cancelled at once."""
    soon = Nudge(nudge_id=sent, at=datetime.now(UTC) + timedelta(seconds=2), text=text)
    await schedule_nudge(client, settings, telegram_id, soon)
    later = Nudge(nudge_id=cancelled, at=datetime.now(UTC) + timedelta(hours=1), text="never sent")
    await schedule_nudge(client, settings, telegram_id, later)
    await cancel_nudge(client, telegram_id, cancelled)
    while (await repository.get_scheduled_message(sent)).status != NudgeStatus.SENT:
        await asyncio.sleep(0.2)


async def _telegram(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    ada = 1005
    api = FakeBotAPI()
    api.start()
    settings = SETTINGS.model_copy(update={"telegram_api_base_url": api.url})
    channel = TelegramChannel(Bot(TOKEN, base_url=api.url, base_file_url=file_base_url(api.url)))
    media_client = openai_client(llm.url, "test", max_retries=0, timeout=30)
    user = ChatUser(telegram_id=ada, first_name="Ada")

    def message(n: int, text: str) -> IncomingMessage:
        return IncomingMessage(message_key=f"tg:{ada}:{n}", user=user, chat_id=ada, channel=Channel.TELEGRAM,
                               text=text, sent_at=datetime.now(UTC))

    async def delivered(count: int) -> None:
        while len(api.messages(ada)) < count:
            await asyncio.sleep(0.1)

    try:
        async with build_worker(client, settings.temporal_task_queue, CompanionActivities.create(
                repository, chat_model(llm), channel, media=MediaModel(media_client, "stub-transcribe", media_client,
                                                                       "stub-vision"))):
            await signal_message(client, settings, message(1, "Hi, I'm Ada"))
            await delivered(1)
            api.fail_next("sendMessage", Fail429)
            await signal_message(client, settings, message(2, "I climb on Sundays"))
            await delivered(2)
            await schedule_nudge(client, settings, ada, Nudge(
                nudge_id="climb-1", at=datetime.now(UTC) + timedelta(seconds=2), text="How was the climb?"))
            await delivered(3)
            api.block(ada)
            await schedule_nudge(client, settings, ada, Nudge(
                nudge_id="later-2", at=datetime.now(UTC) + timedelta(hours=1), text="cancelled by the block"))
            await signal_message(client, settings, message(3, "bye for now"))
            handle = client.get_workflow_handle(workflow_id(ada))
            while not (await handle.query(CompanionWorkflow.state)).blocked:
                await asyncio.sleep(0.1)
            api.blocked.clear()
            await signal_message(client, settings, message(4, "I'm back"))
            await delivered(4)
            # a voice note, transcribed (its file downloaded by its id), then a photo the vision model fails on
            audio = b"OggS voice note: remind me tomorrow at 9 to call mom"
            llm.speech[audio] = "remind me tomorrow at 9 to call mom"
            voice = api.add_file(audio, "voice/file_1.oga")
            await signal_message(client, settings, message(5, "[voice message, 0:03]").model_copy(update={
                "attachment": Attachment(kind=MediaKind.VOICE, file_id=voice["file_id"], duration_s=3,
                                         file_unique_id=voice["file_unique_id"], mime_type="audio/ogg")}))
            await delivered(5)
            photo = api.add_file(b"\xff\xd8\xff\xe0 a photo", "photos/file_2.jpg")
            llm.script(Fail(400, "You uploaded an unsupported image."))  # refused for good: the polite answer
            await signal_message(client, settings, message(6, "[photo]").model_copy(update={
                "attachment": Attachment(kind=MediaKind.PHOTO, file_id=photo["file_id"], mime_type="image/jpeg",
                                         file_unique_id=photo["file_unique_id"])}))
            await delivered(6)
            # /memory, and one fact and one nudge forgotten from it
            stored = await repository.get_user_by_telegram_id(ada)
            await repository.upsert_profile_fact(stored.id, ProfileFactCreate(
                category=FactCategory.HOBBIES, key="sport", value="climbing", source_keys=[f"tg:{ada}:2"]))
            await schedule_nudge(client, settings, ada, Nudge(
                nudge_id="tea-3", at=datetime.now(UTC) + timedelta(hours=1), text="Tea time?"))
            listing = await memory(client, settings, user)
            chosen = [item for item in listing.items if item.kind == MemoryItemKind.FACT or item.ref == "nudge:tea-3"]
            assert len(chosen) == 2
            for item in chosen:
                assert await forget_item(client, settings, user, item.ref)
            assert await persona(client, settings, user, PersonaChange(text="You are Max")) == "You are Max"
            assert (await export(client, settings, user)).rows > 0 and len(api.documents) == 2
            run_id = (await handle.describe()).run_id
            # Then it continues as new: the erased turns leave the open run (whose deletion is left out: the run
            # that erased them is the one recorded here).
            await forget(client, settings, user, delete_runs=False)
            await _save(client, ada, "telegram", run_id=run_id)
    finally:
        await channel.close()
        await media_client.close()
        api.stop()


async def _own_nudges(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    """A reminder asked for, a follow-up on an event, check-ins planned and moved, a nudge postponed by quiet hours,
    and a new time zone, which moves the follow-up (at 10:00 the user's time) and not the reminder (in 2 hours)."""
    settings = SETTINGS.model_copy(update={"checkin_after_days": 3})
    now = datetime.now(UTC)
    quiet = ((now - timedelta(hours=1)).time().replace(second=0, microsecond=0),
             (now + timedelta(hours=1)).time().replace(second=0, microsecond=0))  # quiet hours around now (UTC)
    async with build_worker(client, settings.temporal_task_queue,
                            CompanionActivities.create(repository, chat_model(llm), quiet_hours=quiet)):
        await send_message(client, settings, _message(1006, 0, "Hi, I'm Simon"))
        await send_message(client, settings, _message(1006, 1, "Remind me in 2 hours to stretch"))
        await send_message(client, settings, _message(1006, 2, "I have a dentist appointment tomorrow at 10"))
        await schedule_nudge(client, settings, 1006, Nudge(nudge_id="late-1", at=datetime.now(UTC) + timedelta(
            seconds=2), text="postponed by quiet hours"))
        handle = client.get_workflow_handle(workflow_id(1006))
        while (await repository.get_scheduled_message("late-1")).scheduled_for < now + timedelta(minutes=30):
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # the workflow task after the postponement
        assert len(await handle.query(CompanionWorkflow.nudges)) == 4  # reminder, follow-up, check-in, late-1
        changed = await set_timezone(client, settings, ChatUser(telegram_id=1006),
                                     TimezoneChange(zone="Asia/Tokyo", source=TimezoneSource.COMMAND))
        assert [nudge.kind for nudge in changed.moved] == [NudgeKind.FOLLOW_UP]
        await _save(client, 1006, "own_nudges")


async def _remember(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    """The remember step after each turn: memories indexed, an extraction with a reminder and a summary, and the
    summary carried over continue-as-new (which waits for the step in flight)."""
    settings = SETTINGS.model_copy(update={"workflow_turns_per_run": 2})
    memory = MemoryIndex(repository.sessions, local_embedder(), PgVectorStore(repository.sessions))
    soon = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0, tzinfo=None)
    llm.script_json({"facts": [{"category": "work", "key": "employer", "value": "Acme"}],
                     "events": [], "milestones": [], "reminders": [{"what": "call the bank", "when": soon.isoformat()}],
                     "summary": "Simon works at Acme."})
    async with build_worker(client, settings.temporal_task_queue,
                            CompanionActivities.create(repository, chat_model(llm), memory=memory, extract=True)):
        handle = client.get_workflow_handle(workflow_id(1007))
        await send_message(client, settings, _message(1007, 0, "I work at Acme, please don't let me forget the bank"))
        first_run = (await handle.describe()).run_id
        await send_message(client, settings, _message(1007, 1, "What do you remember about me?"))
        await send_message(client, settings, _message(1007, 2, "Thanks!"))  # in the next run
        while (await handle.describe()).run_id == first_run:
            await asyncio.sleep(0.1)
        assert (await handle.query(CompanionWorkflow.state)).summary
        await _save(client, 1007, "remember", run_id=first_run)


async def _remember_when_quiet(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    """Remember steps that wait for a pause: three turns remembered after 2 s of quiet; five turns without a pause
    remembered at once, by a slow step; and the two turns answered meanwhile remembered before the run continues as
    new."""
    settings = SETTINGS.model_copy(update={"remember_after_quiet_seconds": 2, "workflow_turns_per_run": 10})
    memory = MemoryIndex(repository.sessions, local_embedder(), PgVectorStore(repository.sessions))
    empty = {"facts": [], "events": [], "milestones": [], "reminders": []}
    llm.script_json({**empty, "summary": "Simon has a cat."},
                    Reply(json.dumps({**empty, "summary": "Simon has a cat called Pixel."}), delay_s=3),
                    {**empty, "summary": "Simon has a cat called Pixel, who is three."})
    async with build_worker(client, settings.temporal_task_queue,
                            CompanionActivities.create(repository, chat_model(llm), memory=memory, extract=True)):
        handle = client.get_workflow_handle(workflow_id(1009))
        for n in range(3):
            await send_message(client, settings, _message(1009, n, f"About my cat, part {n}"))
        first_run = (await handle.describe()).run_id
        while "cat." not in (await handle.query(CompanionWorkflow.state)).summary:
            await asyncio.sleep(0.1)
        for n in range(3, 10):
            await signal_message(client, settings, _message(1009, n, f"More about Pixel, part {n}"))
        while (await handle.describe()).run_id == first_run:
            await asyncio.sleep(0.1)
        assert "three" in (await handle.query(CompanionWorkflow.state)).summary
        await _save(client, 1009, "remember_when_quiet", run_id=first_run)


async def _limits(client: Client, repository: MemoryRepository, llm: FakeOpenAI) -> None:
    """A daily budget of tokens spent by the first message (the second is told when it resets) and a limit of two
    messages a minute (the third is asked to slow down); then /usage."""
    settings, lena = SETTINGS.model_copy(update={"user_daily_tokens": 5, "user_messages_per_minute": 2}), 1010
    llm.reset()  # nothing an earlier scenario scripted is left for these replies
    async with build_worker(client, settings.temporal_task_queue,
                            CompanionActivities.create(repository, chat_model(llm), limits=settings.limits)):
        for n, text in enumerate(["Hello, I'm Lena", "Are you still there?", "Hello?"]):
            reply = await send_message(client, settings, _message(lena, n, text))
            assert reply.limited == (n > 0), (n, reply)
        assert (await usage(client, settings, ChatUser(telegram_id=lena))).today.calls == 1
        await _save(client, lena, "limits")


SCENARIOS = {"plain_conversation": _console, "retried_activities": _retried, "continued_as_new": _more,
             "telegram": _telegram, "own_nudges": _own_nudges, "remember": _remember,
             "remember_when_quiet": _remember_when_quiet, "limits": _limits}


async def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="companion-record-"))
    postgres = EmbeddedPostgres(folder / "pg")
    llm = FakeOpenAI()
    llm.start()
    try:
        engine = create_engine(postgres.start())
        await migrate.upgrade(engine)
        env = await start_dev_server()
        async with env:
            HISTORIES.mkdir(exist_ok=True)
            repository = MemoryRepository(create_session_factory(engine))
            for name in sys.argv[1:] or SCENARIOS:
                await SCENARIOS[name](env.client, repository, llm)
            await close_chat_models()
        await engine.dispose()
    finally:
        llm.stop()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
