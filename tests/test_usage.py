"""Usage, cost and limits per user: every model call counted once against the user it served, priced; a daily budget
answered politely, the messages kept; `companion usage`. (Through Telegram: the rate limit, /usage and an unlimited
user, in test_telegram.)"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from datetime import time as clock
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.companion import CompanionActivities
from activities.reply import ReplyActivities
from activities.usage import UsageRecorder
from cli.usage import usage_report
from core.settings import load_settings
from core.usage import ModelPrice
from schemas.memory import Role
from schemas.turn import ChatUser, GeneratedReply, GenerateReplyInput, TimezoneChange, TimezoneSource
from schemas.usage import UsageCreate
from storage.models import Usage
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from tests.conftest import Stack, chat_model, new_telegram_id, own_time_skipping_server
from tests.fake_openai import FakeOpenAI
from worker import build_worker
from workflows.client import send_message, set_timezone
from workflows.companion import OVER_BUDGET
from workflows.contract import workflow_id

PRICES = {"stub-model": ModelPrice(input=2.0, cached_input=1.0, output=8.0)}  # USD a million tokens


async def usage_rows(repo: MemoryRepository, telegram_id: int) -> list[Usage]:
    async with repo.sessions() as session:  # the rows as stored
        return list((await session.execute(select(Usage).where(Usage.telegram_id == telegram_id)
                                           .order_by(Usage.id))).scalars())


def tokens_of(body: dict[str, Any], answer: str) -> tuple[int, int]:
    """The usage the OpenAI-compatible server reports for a request and its answer (a word a token)."""
    return sum(len(str(m.get("content", "")).split()) for m in body["messages"]), len(answer.split())


def with_extraction(repository: MemoryRepository, chat: Any, memory: MemoryIndex | None) -> CompanionActivities:
    return CompanionActivities.create(repository, chat, memory=memory, extract=True, prices=PRICES)


@pytest.mark.parametrize("make_activities", [with_extraction])
async def test_usage_rows_match_what_the_model_reported_for_streamed_and_structured_calls(
        stack: Stack, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ada = new_telegram_id()
    reply = await stack.say(ada, "I adopted a cat called Miso")  # the remember step runs after every turn here
    answered = next(body for body in stack.llm.requests if body.get("stream"))
    extraction = next(body for body in stack.llm.requests if body.get("response_format"))

    rows = await usage_rows(stack.repo, ada)
    assert [(row.kind, row.model) for row in rows] == [("reply", "stub-model"), ("extraction", "stub-model")]
    streamed, structured = rows
    # The streamed reply's usage came in its last chunk; the extraction's in the response.
    assert (streamed.prompt_tokens, streamed.completion_tokens) == tokens_of(answered, reply.text)
    assert (structured.prompt_tokens, structured.completion_tokens) == tokens_of(
        extraction, json.dumps({"facts": [], "events": [], "milestones": [], "reminders": [], "summary": ""}))
    for row in rows:
        assert row.priced and row.cost_usd == pytest.approx((row.prompt_tokens * 2 + row.completion_tokens * 8) / 1e6)

    settings = load_settings(database_url=database_url)
    assert await usage_report(settings, ada, None, "kind") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"usage of user {ada}, by kind"
    total = out[-1].split()
    assert total[:2] == ["total", "2"]
    assert total[-1] == f"${sum(row.cost_usd for row in rows):.4f}"


class LosingTheFirstCompletion(ReplyActivities):
    """generate_reply's first attempt writes and stores the reply, then its completion is lost (the worker died
    before Temporal heard of it): the next attempt runs."""

    lost: set[str] = set()

    @activity.defn(name="generate_reply")
    async def generate_reply(self, data: GenerateReplyInput) -> GeneratedReply:
        reply = await super().generate_reply(data)
        if data.reply_key not in self.lost:
            self.lost.add(data.reply_key)
            raise ApplicationError("the completion was lost")
        return reply


def losing_the_first_completion(repository: MemoryRepository, chat: Any,
                                memory: MemoryIndex | None) -> CompanionActivities:
    usage = UsageRecorder(repository, PRICES)
    return CompanionActivities.create(repository, chat, memory=memory, prices=PRICES,
                                      reply=LosingTheFirstCompletion(repository, chat, memory, None, usage))


@pytest.mark.parametrize("make_activities", [losing_the_first_completion])
async def test_a_retried_generate_reply_is_counted_once(stack: Stack) -> None:
    ada = new_telegram_id()
    reply = await stack.say(ada, "hello there")
    assert reply.text == "I hear you: hello there" and not reply.fallback
    assert len([body for body in stack.llm.requests if body.get("stream")]) == 1  # paid once
    assert [row.kind for row in await usage_rows(stack.repo, ada)] == ["reply"]  # and counted once


async def test_a_usage_row_is_stored_once_by_its_key(repo: MemoryRepository) -> None:
    ada = new_telegram_id()
    row = UsageCreate(idempotency_key=f"run-{uuid.uuid4()}/7/0", telegram_id=ada, kind="reply", model="m",
                      prompt_tokens=10, completion_tokens=5, cost_usd=0.5)
    assert await repo.record_usage([row, row.model_copy(update={"idempotency_key": row.idempotency_key + "1"})]) == 2
    assert await repo.record_usage([row]) == 0
    assert (await repo.usage_totals(ada, datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC")))).calls == 2


async def test_over_the_daily_budget_the_user_is_told_when_it_resets_and_answered_again_after_their_midnight(
        repo: MemoryRepository, fake_llm: FakeOpenAI) -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    settings = load_settings(temporal_task_queue=f"test-{uuid.uuid4()}", checkin_after_days=0,
                             remember_after_quiet_seconds=600, user_daily_budget_usd=0.0001)
    chat = chat_model(fake_llm)
    ada = new_telegram_id()
    user = ChatUser(telegram_id=ada, first_name="Ada")
    stack = Stack(None, settings, repo, fake_llm, None)  # type: ignore[arg-type]
    async with own_time_skipping_server() as env:
        stack.client, stack.env = env.client, env
        try:
            async with build_worker(env.client, settings.temporal_task_queue, CompanionActivities.create(
                    repo, chat, prices={"stub-model": ModelPrice(input=10.0, output=10.0)},
                    limits=settings.limits)):
                await set_timezone(env.client, settings, user, TimezoneChange(zone="Asia/Tokyo",
                                                                              source=TimezoneSource.COMMAND))
                first = await send_message(env.client, settings, stack.message(ada, "tell me about the sea"))
                assert first.text.startswith("I hear you")  # ~20 tokens at $10 a million: over $0.0001
                asked = len(fake_llm.requests)

                refused = await send_message(env.client, settings, stack.message(ada, "and the mountains?"))
                assert refused.text == OVER_BUDGET.format(zone="Asia/Tokyo") and refused.limited
                assert len(fake_llm.requests) == asked  # no model call

                now = (await env.get_current_time()).astimezone(tokyo)
                midnight = datetime.combine(now.date() + timedelta(days=1), clock(0), tzinfo=tokyo)
                await env.sleep(midnight + timedelta(minutes=1) - await env.get_current_time())
                again = await send_message(env.client, settings, stack.message(ada, "good morning"))
                assert again.text == "I hear you: good morning"
        finally:
            await env.client.get_workflow_handle(workflow_id(ada)).terminate("test finished")
            await chat.close()
    stored = await repo.recent_messages((await repo.get_user_by_telegram_id(ada)).id, limit=10)
    assert [m.content for m in stored if m.role == Role.USER] == ["tell me about the sea", "and the mountains?",
                                                                  "good morning"]  # every message kept
