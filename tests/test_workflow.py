"""The per-user workflow, end to end: real Temporal (time-skipping and dev server), real PostgreSQL, the real openai
client against a scripted OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from temporalio import activity
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.worker import (
    HandleQueryInput,
    Interceptor,
    Replayer,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from activities.llm import ChatModel
from activities.nudges import CompanionActivities
from activities.turn import PERSONA
from core.errors import DatabaseConnectionError
from core.settings import Settings, load_settings
from schemas.context import UserContextSchema
from schemas.memory import Role
from schemas.turn import (
    ComposedReply,
    ComposeReplyInput,
    IncomingMessage,
    RecordedMessage,
    RecordMessageInput,
)
from storage.repository import MemoryRepository
from tests.conftest import OPENAI_TEST_KEY, SharedDevServer, Stack, chat_model, new_telegram_id
from tests.fake_openai import Fail, FakeOpenAI, Reply
from worker import build_worker
from workflows.client import send_message, signal_message
from workflows.companion import (
    FAILED_REPLY,
    FALLBACK_REPLY,
    USER_ID_ATTRIBUTE,
    CompanionWorkflow,
    workflow_id,
)

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
    # One workflow task for the whole turn; the reply step stored the user's message too, in no step of its own.
    steps = local_steps(await stack.handle(simon).fetch_history())
    assert "compose_reply" in steps and "record_message" not in steps and len(set(steps.values())) == 1


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


class FailingAfterWrite(CompanionActivities):
    """Storing the user's message writes its row, then fails its first two attempts, as a dropped connection would
    (in record_message, or in the reply step that stores the message itself)."""

    async def _record(self, data: RecordMessageInput) -> RecordedMessage:
        stored = await super()._record(data)
        if activity.info().attempt <= 2:
            raise DatabaseConnectionError("connection lost after the write")
        return stored

    async def _recorded_context(self, data: ComposeReplyInput, sent_at: datetime) -> UserContextSchema:
        context = await super()._recorded_context(data, sent_at)
        if activity.info().attempt <= 2:
            raise DatabaseConnectionError("connection lost after the write")
        return context


@pytest.mark.parametrize("turn_activities_class", [FailingAfterWrite])
async def test_an_activity_that_fails_twice_then_succeeds_writes_one_row_per_message(stack: Stack) -> None:
    simon = new_telegram_id()
    stack.llm.script(Fail(500), Fail(503, retry_after_s=0.1))
    reply = await stack.say(simon, "I got the job!")
    assert reply.text == "I hear you: I got the job!" and not reply.fallback
    assert len(stack.llm.requests) == 3
    assert await transcript(stack, simon) == [("user", "I got the job!"), ("assistant", reply.text)]


class RefusingOneMessage(CompanionActivities):
    """Storing a message is refused for good (a non-retryable storage error), as PostgreSQL refuses bad data."""

    async def _record(self, data: RecordMessageInput) -> RecordedMessage:
        if "refuse me" in data.text:
            raise ApplicationError("the database refused the message", type="DatabaseError", non_retryable=True)
        return await super()._record(data)

    async def _recorded_context(self, data: ComposeReplyInput, sent_at: datetime) -> UserContextSchema:
        if "refuse me" in data.text:
            raise ApplicationError("the database refused the message", type="DatabaseError", non_retryable=True)
        return await super()._recorded_context(data, sent_at)


@pytest.mark.parametrize("turn_activities_class", [RefusingOneMessage])
async def test_a_storage_step_that_fails_for_good_ends_its_turn_not_the_conversation(stack: Stack) -> None:
    # The storage steps are local activities, whose failures reach the workflow unwrapped.
    simon = new_telegram_id()
    refused = await stack.say(simon, "please refuse me")
    assert refused.text == FAILED_REPLY and refused.fallback
    reply = await stack.say(simon, "and now?")
    assert reply.text == "I hear you: and now?"
    assert await transcript(stack, simon) == [("user", "and now?"), ("assistant", reply.text)]


class LosingCompletion(CompanionActivities):
    """compose_reply stores its reply, then its first attempt fails as if the worker died before reporting."""

    @activity.defn(name="compose_reply")
    async def compose_reply(self, data: ComposeReplyInput) -> ComposedReply:
        reply = await super().compose_reply(data)
        if activity.info().attempt == 1:
            raise RuntimeError("worker lost before completing")
        return reply


@pytest.mark.parametrize("turn_activities_class", [LosingCompletion])
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


class ImpatientLLM(CompanionActivities):
    """The worker's activities with an LLM client that gives up on a request after 0.5 s (60 s in production)."""

    def __init__(self, repository, chat, memory=None):  # type: ignore[no-untyped-def]
        super().__init__(repository, ChatModel(chat._client.with_options(timeout=0.5), chat.model), memory=memory)


@pytest.mark.parametrize("turn_activities_class", [ImpatientLLM])
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


class ReplySetsAnEvent(CompanionActivities):
    """compose_reply sets ``replied`` once it has stored the reply."""

    def __init__(self, *args: Any, replied: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replied = replied

    @activity.defn(name="compose_reply")
    async def compose_reply(self, data: ComposeReplyInput) -> ComposedReply:
        reply = await super().compose_reply(data)
        self.replied.set()
        return reply


class LateQueries(Interceptor):
    """A worker that answers a query late, as a busy one does: only once compose_reply has stored the reply and the
    worker has taken the step's result. Workflow code runs in the worker's threads and activities in its event loop,
    so the wait holds up the query and nothing else."""

    def __init__(self, replied: threading.Event) -> None:
        self.replied = replied

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        replied = self.replied

        class AfterReply(WorkflowInboundInterceptor):
            def handle_query(self, input: HandleQueryInput) -> Any:
                replied.wait(timeout=10)
                time.sleep(0.2)
                return super().handle_query(input)

        return AfterReply


async def a_query_cuts_a_turn(client: Client, settings: Settings, repository: MemoryRepository, chat: ChatModel,
                              first: IncomingMessage, second: IncomingMessage) -> str:
    """Answer ``first``, which ends its run (continue-as-new), then ``second`` in the new run with a query waiting.

    The query waits at the server for the message's workflow task and reaches the worker with it; the worker answers
    it after compose_reply, and reporting the answer ends the workflow task there: the step's marker is recorded
    with that task, and the code after the step runs in the next one. Returns the new run's id."""
    settings = settings.model_copy(update={"workflow_turns_per_run": 1})
    handle = client.get_workflow_handle(workflow_id(first.user.telegram_id))
    async with build_worker(client, settings.temporal_task_queue, CompanionActivities(repository, chat)):
        await send_message(client, settings, first)
        await eventually(lambda: handle.query(CompanionWorkflow.state), lambda state: state.turns_this_run == 0)
        run_id = (await handle.describe()).run_id
    await signal_message(client, settings, second)  # no worker yet: its workflow task waits, and so does the query
    query = asyncio.create_task(handle.query(CompanionWorkflow.state, rpc_timeout=timedelta(seconds=30)))
    await asyncio.sleep(1)
    replied = threading.Event()
    async with build_worker(client, settings.temporal_task_queue, ReplySetsAnEvent(repository, chat, replied=replied),
                            interceptors=[LateQueries(replied)]):
        assert (await query).turns == 1  # answered in the middle of the turn
        await eventually(lambda: handle.query(CompanionWorkflow.state), lambda state: state.turns == 2)
    return run_id


def local_steps(history: WorkflowHistory) -> dict[str, int]:
    """Each local activity of a history -> the event id of the workflow task completion that recorded its marker."""
    steps = {}
    for event in history.events:
        if event.marker_recorded_event_attributes.marker_name == "core_local_activity":
            marker = event.marker_recorded_event_attributes
            data = json.loads(marker.details["data"].payloads[0].data)
            steps[data["activity_type"]] = marker.workflow_task_completed_event_id
    return steps


async def test_a_turn_a_query_cut_in_two_replays(dev_server: SharedDevServer, repo: MemoryRepository,
                                                 fake_llm: FakeOpenAI) -> None:
    env = await dev_server.get()
    settings = load_settings(temporal_task_queue=f"test-{uuid.uuid4()}", checkin_after_days=0,
                             remember_after_quiet_seconds=0, openai_api_key=OPENAI_TEST_KEY)
    stack = Stack(env.client, settings, repo, fake_llm, env)
    simon = new_telegram_id()
    fake_llm.script(Reply("first reply"), Reply("second reply"))
    try:
        run_id = await a_query_cuts_a_turn(env.client, settings, repo, chat_model(fake_llm),
                                           stack.message(simon, "first"), stack.message(simon, "second"))
        history = await stack.client.get_workflow_handle(workflow_id(simon), run_id=run_id).fetch_history()
        remember = next(event.activity_task_scheduled_event_attributes.workflow_task_completed_event_id
                        for event in history.events
                        if event.activity_task_scheduled_event_attributes.activity_type.name == "remember")
        assert local_steps(history)["compose_reply"] < remember  # the query ended a workflow task between them
        # What a worker does when it takes the conversation over, or after evicting it from its cache: replay it.
        await Replayer(workflows=[CompanionWorkflow], data_converter=pydantic_data_converter).replay_workflow(history)
        # (both messages were written before the first reply: their order by time is not the order of the turns)
        assert sorted(await transcript(stack, simon)) == [("assistant", "first reply"), ("assistant", "second reply"),
                                                          ("user", "first"), ("user", "second")]
    finally:
        await stack.handle(simon).terminate()


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
