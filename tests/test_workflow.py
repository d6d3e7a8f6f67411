"""The per-user workflow, end to end: real Temporal (time-skipping and dev server), real PostgreSQL, the real openai
client against a scripted OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from temporalio import activity
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowExecutionStatus, WorkflowHistory, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.companion import CompanionActivities
from activities.conversation import ConversationActivities
from activities.prompt import PERSONA
from activities.reply import ReplyActivities
from clients.llm import ChatModel
from core.errors import DatabaseConnectionError
from core.settings import load_settings
from schemas.memory import MessageCreate, Role, UserCreate, UserRead
from schemas.turn import GeneratedReply, GenerateReplyInput, Nudge
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from tests.conftest import OPENAI_TEST_KEY, SharedDevServer, Stack, chat_model, new_telegram_id
from tests.fake_openai import Fail, FakeOpenAI, Reply
from worker import build_worker
from workflows.companion import FAILED_REPLY, FALLBACK_REPLY, CompanionWorkflow
from workflows.contract import USER_ID_ATTRIBUTE

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T] | T], check: Callable[[T], bool], timeout_s: float = 20) -> T:
    """Poll ``probe`` (a query, or a plain read) until ``check`` holds on its result, asserting at the deadline; a
    failed query is a "not yet"."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except RPCError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        else:
            if check(value):
                return value
            assert asyncio.get_running_loop().time() < deadline, value
        await asyncio.sleep(0.05)


async def transcript(stack: Stack, telegram_id: int) -> list[tuple[str, str]]:
    user = await stack.repo.get_user_by_telegram_id(telegram_id)
    return [(m.role.value, m.content) for m in await stack.repo.recent_messages(user.id, limit=1000)]


async def replies_by_key(stack: Stack, telegram_id: int) -> dict[str, str]:
    user = await stack.repo.get_user_by_telegram_id(telegram_id)
    messages = await stack.repo.recent_messages(user.id, limit=1000)
    assert len({m.message_key for m in messages}) == len(messages)
    return {m.message_key.removesuffix(":reply"): m.content for m in messages if m.role == Role.ASSISTANT}


async def test_a_turn_end_to_end(stack: Stack) -> None:
    simon = new_telegram_id()
    reply = await stack.say(simon, "Hi, I'm Simon")

    assert reply.text == "I hear you: Hi, I'm Simon" and not reply.fallback
    assert await transcript(stack, simon) == [("user", "Hi, I'm Simon"), ("assistant", "I hear you: Hi, I'm Simon")]
    (request,) = stack.llm.requests
    assert request["messages"][0]["role"] == "system" and request["messages"][0]["content"].startswith(PERSONA)
    assert '"User' in request["messages"][0]["content"]  # the user's memory block names them
    assert request["messages"][-1] == {"role": "user", "content": "Hi, I'm Simon"}

    description = await stack.handle(simon).describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
    assert description.typed_search_attributes.get(USER_ID_ATTRIBUTE) == simon
    assert (await description.memo())["user_name"] == f"User{simon}"
    state = await stack.state(simon)
    assert state.turns == 1 and state.queue == [] and state.user_id is not None
    assert state.transcript == [f"**User{simon}**: Hi, I'm Simon", "**companion**: I hear you: Hi, I'm Simon"]
    # what the Temporal UI shows as the workflow's current details
    metadata = await stack.handle(simon).query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert metadata.current_details == "\n\n".join(state.transcript)
    # The turn reads as its steps in the history the Temporal UI shows: the LLM step on the LLM task queue.
    history = await stack.handle(simon).fetch_history()
    assert [name for name, _ in turn_steps(history)][:2] == ["prepare_turn", "generate_reply"]
    assert dict(turn_steps(history))["generate_reply"] == "generate_reply: the LLM writes the reply"
    (scheduled,) = [event.activity_task_scheduled_event_attributes for event in history.events
                    if event.activity_task_scheduled_event_attributes.activity_type.name == "generate_reply"]
    assert scheduled.task_queue.name == f"{stack.settings.temporal_task_queue}-llm"


def turn_steps(history: WorkflowHistory) -> list[tuple[str, str | None]]:
    """The steps a history holds, in order, as the Temporal UI lists them: (activity type, summary)."""
    steps = []
    for event in history.events:
        summary = (pydantic_data_converter.payload_converter.from_payload(event.user_metadata.summary, str)
                   if event.user_metadata.HasField("summary") else None)
        if event.HasField("activity_task_scheduled_event_attributes"):
            steps.append((event.activity_task_scheduled_event_attributes.activity_type.name, summary))
        elif event.marker_recorded_event_attributes.marker_name == "core_local_activity":
            data = json.loads(event.marker_recorded_event_attributes.details["data"].payloads[0].data)
            steps.append((data["activity_type"], summary))
    return steps


async def test_the_conversation_carries_into_the_next_prompt(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "I have a job interview tomorrow")
    await stack.say(simon, "I'm nervous")
    second = stack.llm.requests[1]["messages"]
    assert [(m["role"], m["content"]) for m in second[1:]] == [
        ("user", "I have a job interview tomorrow"), ("assistant", "I hear you: I have a job interview tomorrow"),
        ("user", "I'm nervous")]


async def test_the_same_message_sent_twice_gets_one_reply(stack: Stack) -> None:
    simon = new_telegram_id()
    first = await stack.say(simon, "hello", key="console:dup:1")
    again = await stack.say(simon, "hello", key="console:dup:1")
    assert again == first
    message = stack.message(simon, "signalled twice", key="tg:dup:2")
    await stack.signal(message)
    await stack.signal(message)
    await stack.say(simon, "and a new one")
    await eventually(lambda: stack.state(simon), lambda s: s.turns == 3)
    assert len(stack.llm.requests) == 3
    user = await stack.repo.get_user_by_telegram_id(simon)
    keys = sorted(m.message_key for m in await stack.repo.recent_messages(user.id, limit=100))
    user_keys = [key for key in keys if not key.endswith(":reply")]
    assert len(user_keys) == 3 and "tg:dup:2" in user_keys and "console:dup:1" in user_keys
    assert keys == sorted([*user_keys, *(f"{key}:reply" for key in user_keys)])


class FailingAfterWrite(ConversationActivities):
    """Storing the user's message writes its row, then fails its first two attempts, as a dropped connection would."""

    async def store_user_message(self, user: UserCreate, message: MessageCreate) -> UserRead:
        stored = await super().store_user_message(user, message)
        if activity.info().attempt <= 2:
            raise DatabaseConnectionError("connection lost after the write")
        return stored


def failing_after_write(repo: MemoryRepository, chat: ChatModel, memory: MemoryIndex | None) -> CompanionActivities:
    return CompanionActivities.create(repo, chat, memory=memory, conversation=FailingAfterWrite(repo, memory))


@pytest.mark.parametrize("make_activities", [failing_after_write])
async def test_an_activity_that_fails_twice_then_succeeds_writes_one_row_per_message(stack: Stack) -> None:
    simon = new_telegram_id()
    stack.llm.script(Fail(500), Fail(503, retry_after_s=0.1))
    reply = await stack.say(simon, "I got the job!")
    assert reply.text == "I hear you: I got the job!" and not reply.fallback
    assert len(stack.llm.requests) == 3
    assert await transcript(stack, simon) == [("user", "I got the job!"), ("assistant", reply.text)]


class RefusingOneMessage(ConversationActivities):
    """Storing a message is refused for good (a non-retryable storage error), as PostgreSQL refuses bad data."""

    async def store_user_message(self, user: UserCreate, message: MessageCreate) -> UserRead:
        if "refuse me" in message.content:
            raise ApplicationError("the database refused the message", type="DatabaseError", non_retryable=True)
        return await super().store_user_message(user, message)


def refusing_one_message(repo: MemoryRepository, chat: ChatModel, memory: MemoryIndex | None) -> CompanionActivities:
    return CompanionActivities.create(repo, chat, memory=memory, conversation=RefusingOneMessage(repo, memory))


@pytest.mark.parametrize("make_activities", [refusing_one_message])
async def test_a_storage_step_that_fails_for_good_ends_its_turn_not_the_conversation(stack: Stack) -> None:
    # The storage steps are local activities, whose failures reach the workflow unwrapped.
    simon = new_telegram_id()
    refused = await stack.say(simon, "please refuse me")
    assert refused.text == FAILED_REPLY and refused.fallback
    reply = await stack.say(simon, "and now?")
    assert reply.text == "I hear you: and now?"
    assert await transcript(stack, simon) == [("user", "and now?"), ("assistant", reply.text)]


class LosingCompletion(ReplyActivities):
    """generate_reply stores its reply, then its first attempt fails as if the worker died before reporting."""

    @activity.defn(name="generate_reply")
    async def generate_reply(self, data: GenerateReplyInput) -> GeneratedReply:
        reply = await super().generate_reply(data)
        if activity.info().attempt == 1:
            raise RuntimeError("worker lost before completing")
        return reply


def losing_completion(repo: MemoryRepository, chat: ChatModel, memory: MemoryIndex | None) -> CompanionActivities:
    return CompanionActivities.create(repo, chat, memory=memory, reply=LosingCompletion(repo, chat, memory))


@pytest.mark.parametrize("make_activities", [losing_completion])
async def test_a_retried_reply_is_the_stored_one_and_the_llm_is_not_paid_twice(stack: Stack) -> None:
    simon = new_telegram_id()
    stack.llm.script(Reply("the first and only reply"))
    reply = await stack.say(simon, "hello?")
    assert reply.text == "the first and only reply"
    assert len(stack.llm.requests) == 1
    assert await transcript(stack, simon) == [("user", "hello?"), ("assistant", "the first and only reply")]


async def test_llm_down_gives_an_honest_fallback_that_is_recorded(stack: Stack) -> None:
    simon = new_telegram_id()
    stack.llm.script(Fail(500), Fail(502), Fail(500))
    reply = await stack.say(simon, "are you there?")
    assert reply.fallback and reply.text == FALLBACK_REPLY
    assert len(stack.llm.requests) == 3  # capped: paid calls are not retried forever
    assert await transcript(stack, simon) == [("user", "are you there?"), ("assistant", FALLBACK_REPLY)]
    user = await stack.repo.get_user_by_telegram_id(simon)
    assert (await stack.repo.recent_messages(user.id))[-1].meta == {"fallback": True}

    stack.llm.script(Fail(401, "Incorrect API key provided"))
    again = await stack.say(simon, "still there?")
    assert again.fallback and len(stack.llm.requests) == 4  # an auth error is not retried at all
    assert (await stack.say(simon, "and now?")).text == "I hear you: and now?"
    assert (await stack.state(simon)).fallbacks == 2


def impatient_llm(repo: MemoryRepository, chat: ChatModel, memory: MemoryIndex | None) -> CompanionActivities:
    """The worker's activities with an LLM client that gives up on a request after 0.5 s (60 s in production)."""
    return CompanionActivities.create(repo, ChatModel(chat._client.with_options(timeout=0.5), chat.model),
                                      memory=memory)


@pytest.mark.parametrize("make_activities", [impatient_llm])
async def test_an_llm_that_times_out_or_is_rate_limited_gets_capped_retries_then_the_fallback(stack: Stack) -> None:
    simon = new_telegram_id()
    stack.llm.script(Reply("too late", delay_s=2), Fail(429, "Rate limit reached", retry_after_s=1),
                     Reply("too late", delay_s=2))
    reply = await stack.say(simon, "are you there?")
    assert reply.fallback and reply.text == FALLBACK_REPLY
    assert len(stack.llm.requests) == 3  # two timeouts and a 429: three attempts, no more
    assert "too late" not in [text for _, text in await transcript(stack, simon)]
    assert (await stack.say(simon, "and now?")).text == "I hear you: and now?"


async def test_continue_as_new_keeps_state_and_loses_no_queued_message(stack: Stack) -> None:
    stack.settings = stack.settings.model_copy(update={"workflow_turns_per_run": 2})
    simon = new_telegram_id()
    first_run = None
    stack.llm.script(*(Reply(f"reply {n}", delay_s=0.05) for n in range(7)))
    for n in range(7):
        await stack.signal(stack.message(simon, f"message {n}", key=f"tg:can:{n}"))
        if first_run is None:
            first_run = (await stack.handle(simon).describe()).run_id
    state = await eventually(lambda: stack.state(simon), lambda s: s.turns == 7)

    assert (await stack.handle(simon).describe()).run_id != first_run
    assert state.turns_this_run <= 2 and state.user_id is not None
    # answered in the order sent, each message exactly once, each reply stored under its message's key
    assert [request["messages"][-1]["content"] for request in stack.llm.requests] == [f"message {n}"
                                                                                      for n in range(7)]
    assert await replies_by_key(stack, simon) == {f"tg:can:{n}": f"reply {n}" for n in range(7)}
    await stack.signal(stack.message(simon, "message 3", key="tg:can:3"))  # seen before the new runs began
    assert (await stack.say(simon, "last")).text == "I hear you: last"
    assert len(stack.llm.requests) == 8


async def test_a_message_for_another_user_is_rejected(stack: Stack) -> None:
    simon, eve = new_telegram_id(), new_telegram_id()
    await stack.say(simon, "hi")
    intruder = stack.message(eve, "let me in")
    with pytest.raises(WorkflowUpdateFailedError):
        await stack.handle(simon).execute_update("send", intruder)
    assert (await stack.state(simon)).turns == 1


async def test_workflow_state_stays_bounded(stack: Stack) -> None:
    simon = new_telegram_id()
    for n in range(24):
        await stack.say(simon, f"message {n} " + "x" * 500)
    state = await stack.state(simon)
    assert state.turns == 24
    assert len(state.replies) == 20 and len(state.transcript) == 8
    assert all(len(line) < 250 for line in state.transcript)
    assert len(state.model_dump_json()) < 20_000
    assert [role for role, _ in await transcript(stack, simon)].count(Role.ASSISTANT.value) == 24


@pytest.mark.parametrize("stack", ["dev-server"], indirect=True)
async def test_queries_and_updates_are_answered_while_the_llm_thinks(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "hello")
    handle = stack.handle(simon)
    later = Nudge(nudge_id="later", at=datetime.now(UTC) + timedelta(days=1), text="Later?")
    await handle.execute_update(CompanionWorkflow.schedule_nudge, later)
    stack.llm.script(Reply("a slow reply", delay_s=5))
    await stack.signal(stack.message(simon, "think it over"))
    await eventually(lambda: len(stack.llm.requests), lambda n: n == 2)  # generate_reply waits on the LLM

    started = time.perf_counter()
    state = await stack.state(simon)
    queried = time.perf_counter() - started
    started = time.perf_counter()
    cancelled = await handle.execute_update(CompanionWorkflow.cancel_nudge, "later")
    updated = time.perf_counter() - started
    assert state.turns == 1 and [message.text for message in state.queue] == ["think it over"]
    assert cancelled.nudge_id == "later" and queried < 1.0 and updated < 1.0, (queried, updated)
    assert len(stack.llm.requests) == 2  # still thinking
    assert (await eventually(lambda: stack.state(simon), lambda s: s.turns == 2)).nudges == []
    assert (await transcript(stack, simon))[-1] == ("assistant", "a slow reply")


async def test_the_llm_rate_limit_holds_across_users_and_every_one_is_answered(
        dev_server: SharedDevServer, repo: MemoryRepository, fake_llm: FakeOpenAI) -> None:
    env = await dev_server.get()
    settings = load_settings(temporal_task_queue=f"test-{uuid.uuid4()}", checkin_after_days=0,
                             remember_after_quiet_seconds=0, openai_api_key=OPENAI_TEST_KEY,
                             llm_max_requests_per_second=2)
    stack = Stack(env.client, settings, repo, fake_llm, env)
    users = [new_telegram_id() for _ in range(10)]
    activities = CompanionActivities.create(repo, chat_model(fake_llm))
    async with build_worker(env.client, settings.temporal_task_queue, activities,
                            llm_per_second=settings.llm_max_requests_per_second):
        replies = await asyncio.gather(*(stack.say(user, f"hello from {user}") for user in users))
    assert sorted(reply.text for reply in replies) == sorted(f"I hear you: hello from {user}" for user in users)
    arrivals = sorted(fake_llm.arrivals)
    assert len(arrivals) == 10
    busiest = max(sum(1 for other in arrivals if start <= other < start + 1.0) for start in arrivals)
    assert busiest <= 3, str([round(at - arrivals[0], 2) for at in arrivals])
    assert arrivals[-1] - arrivals[0] >= 3.0  # ten requests at two a second
    for user in users:
        await stack.handle(user).terminate("test finished")


@pytest.mark.parametrize("stack", ["dev-server"], indirect=True)
async def test_an_llm_that_never_answers_gets_the_fallback_within_the_reply_deadline(stack: Stack) -> None:
    stack.settings = stack.settings.model_copy(update={"reply_deadline_seconds": 5})
    simon = new_telegram_id()
    stack.llm.script(Reply("far too late", delay_s=30))
    started = time.perf_counter()
    reply = await stack.say(simon, "are you there?")
    assert reply.fallback and reply.text == FALLBACK_REPLY
    assert time.perf_counter() - started < 5 + 5
    assert await transcript(stack, simon) == [("user", "are you there?"), ("assistant", FALLBACK_REPLY)]


async def test_a_user_whose_rows_were_deleted_is_answered_and_remembered_anew(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "Hi, I'm Simon")
    before = await stack.repo.get_user_by_telegram_id(simon)
    await stack.repo.delete_user_by_telegram_id(simon)  # an operator's deletion, or a restored older backup
    reply = await stack.say(simon, "Still there?")
    assert reply.text == "I hear you: Still there?" and not reply.fallback
    after = await stack.repo.get_user_by_telegram_id(simon)
    assert after.id != before.id and (await stack.state(simon)).user_id == after.id
    assert await transcript(stack, simon) == [("user", "Still there?"), ("assistant", "I hear you: Still there?")]
