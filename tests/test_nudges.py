"""Nudges: proactive messages scheduled as timers in the user's workflow, under operator control.

Time-skipping server: days pass in moments, so "three days ahead" is tested as such.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from temporalio.client import WorkflowUpdateFailedError

from activities.companion import CompanionActivities
from activities.prompt import ASK_ZONE
from clients.llm import ChatModel
from schemas.memory import NudgeCreator, NudgeKind, NudgeStatus, UserUpdate
from schemas.turn import Nudge, TimezoneChange, TimezoneSource
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from tests.conftest import Stack, chat_model, new_telegram_id
from tests.fake_openai import FakeOpenAI
from tests.test_workflow import eventually, transcript
from worker import build_worker
from workflows.companion import CompanionWorkflow

pytestmark = pytest.mark.parametrize("stack", ["time-skipping", "time-skipping-uncached"], indirect=True)


async def schedule(stack: Stack, telegram_id: int, after: timedelta, **fields: object) -> Nudge:
    now = await stack.env.get_current_time()
    request = Nudge(nudge_id=f"n-{uuid.uuid4().hex[:8]}", at=now + after, **{"text": "How did it go?",
                                                                                     **fields})
    return await stack.handle(telegram_id).execute_update(CompanionWorkflow.schedule_nudge, request)


async def status(stack: Stack, nudge_id: str) -> NudgeStatus:
    return (await stack.repo.get_scheduled_message(nudge_id)).status


async def test_a_nudge_three_days_ahead_fires_exactly_once(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "I am preparing for a job interview")
    nudge = await schedule(stack, simon, timedelta(days=3), text="How did the interview go?")
    assert await status(stack, nudge.nudge_id) == NudgeStatus.PENDING
    assert [n.nudge_id for n in await stack.handle(simon).query(CompanionWorkflow.nudges)] == [nudge.nudge_id]

    await stack.env.sleep(timedelta(days=2))
    assert await status(stack, nudge.nudge_id) == NudgeStatus.PENDING
    await stack.env.sleep(timedelta(days=1, minutes=1))
    await eventually(lambda: status(stack, nudge.nudge_id), lambda s: s == NudgeStatus.SENT)
    await stack.env.sleep(timedelta(days=3))

    assert (await transcript(stack, simon))[-1] == ("assistant", "How did the interview go?")
    assert [text for _, text in await transcript(stack, simon)].count("How did the interview go?") == 1
    assert await stack.handle(simon).query(CompanionWorkflow.nudges) == []
    assert (await stack.repo.get_scheduled_message(nudge.nudge_id)).sent_at is not None


async def test_a_nudge_with_a_purpose_is_written_by_the_llm(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "hi")
    nudge = await schedule(stack, simon, timedelta(hours=2), text=None, purpose="ask how the trip to Lisbon was")
    await stack.env.sleep(timedelta(hours=3))
    await eventually(lambda: status(stack, nudge.nudge_id), lambda s: s == NudgeStatus.SENT)
    role, text = (await transcript(stack, simon))[-1]
    assert role == "assistant" and "ask how the trip to Lisbon was" in text  # the stub echoes its instruction


async def test_a_cancelled_nudge_is_never_sent(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "hi")
    nudge = await schedule(stack, simon, timedelta(hours=1), text="drink water")
    cancelled = await stack.handle(simon).execute_update(CompanionWorkflow.cancel_nudge, nudge.nudge_id)
    assert cancelled.nudge_id == nudge.nudge_id
    await stack.env.sleep(timedelta(hours=2))
    assert await status(stack, nudge.nudge_id) == NudgeStatus.CANCELLED
    assert "drink water" not in [text for _, text in await transcript(stack, simon)]
    with pytest.raises(WorkflowUpdateFailedError) as twice:
        await stack.handle(simon).execute_update(CompanionWorkflow.cancel_nudge, nudge.nudge_id)
    assert "not pending any more" in str(twice.value.cause)


async def test_bad_nudge_requests_get_clear_errors(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "hi")
    with pytest.raises(WorkflowUpdateFailedError) as unknown:
        await stack.handle(simon).execute_update(CompanionWorkflow.cancel_nudge, "no-such-nudge")
    assert "this user has no nudge no-such-nudge" in str(unknown.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as past:
        await schedule(stack, simon, -timedelta(minutes=5))
    assert "is in the past" in str(past.value.cause)
    nudge = await schedule(stack, simon, timedelta(hours=1))
    with pytest.raises(WorkflowUpdateFailedError) as duplicate:
        now = await stack.env.get_current_time()
        await stack.handle(simon).execute_update(CompanionWorkflow.schedule_nudge, Nudge(
            nudge_id=nudge.nudge_id, at=now + timedelta(hours=2), text="again"))
    assert "exists already" in str(duplicate.value.cause)
    assert len(await stack.handle(simon).query(CompanionWorkflow.nudges)) == 1


async def test_a_nudge_survives_continue_as_new(stack: Stack) -> None:
    stack.settings = stack.settings.model_copy(update={"workflow_turns_per_run": 1})
    simon = new_telegram_id()
    await stack.say(simon, "first")
    first_run = (await stack.handle(simon).describe()).run_id
    nudge = await schedule(stack, simon, timedelta(days=1), text="checking in")
    await stack.say(simon, "second")
    await stack.say(simon, "third")
    # Between turns, once the remember step in flight has landed, the workflow continues as new.
    await eventually(lambda: stack.handle(simon).describe(), lambda described: described.run_id != first_run)
    await stack.env.sleep(timedelta(days=1, minutes=1))
    await eventually(lambda: status(stack, nudge.nudge_id), lambda s: s == NudgeStatus.SENT)
    assert [text for _, text in await transcript(stack, simon)].count("checking in") == 1


async def test_a_nudge_fires_on_a_worker_that_replaced_the_one_that_scheduled_it(stack: Stack,
                                                                                 fake_llm: FakeOpenAI) -> None:
    simon = new_telegram_id()
    queue = f"replaced-{uuid.uuid4()}"
    settings = stack.settings.model_copy(update={"temporal_task_queue": queue})
    chat = chat_model(fake_llm)
    replaced = Stack(stack.client, settings, stack.repo, fake_llm, stack.env, started=stack.started)
    # No sticky cache on the first worker: on the time-skipping server a task left on a dead worker's sticky queue
    # would hold the clock until its real-time timeout. The timer itself lives in Temporal either way.
    async with build_worker(stack.client, queue, CompanionActivities.create(stack.repo, chat), max_cached_workflows=0):
        await replaced.say(simon, "hi")
        nudge = await schedule(replaced, simon, timedelta(hours=5), text="still there?")
    async with build_worker(stack.client, queue, CompanionActivities.create(stack.repo, chat), max_cached_workflows=10):
        await stack.env.sleep(timedelta(hours=6))
        await eventually(lambda: status(stack, nudge.nudge_id), lambda s: s == NudgeStatus.SENT)
    assert (await transcript(stack, simon))[-1] == ("assistant", "still there?")


def quiet_nights(repository: MemoryRepository, chat: ChatModel, memory: MemoryIndex | None) -> CompanionActivities:
    """The worker's activities with NUDGE_QUIET_HOURS=22:00-08:00."""
    return CompanionActivities.create(repository, chat, quiet_hours=(time(22), time(8)), memory=memory)


@pytest.mark.parametrize("make_activities", [quiet_nights])
async def test_quiet_hours_in_the_users_time_zone_postpone_a_nudge_to_their_end(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "hi")
    paris = ZoneInfo("Europe/Paris")
    await stack.repo.update_user((await stack.repo.get_user_by_telegram_id(simon)).id,
                                 UserUpdate(timezone="Europe/Paris"))
    local_now = (await stack.env.get_current_time()).astimezone(paris)
    late = datetime.combine(local_now.date() + timedelta(days=1), time(23, 30), tzinfo=paris)
    morning = datetime.combine(late.date() + timedelta(days=1), time(8), tzinfo=paris)
    nudge = Nudge(nudge_id=f"n-{uuid.uuid4().hex[:8]}", at=late, text="sleep well?")
    await stack.handle(simon).execute_update(CompanionWorkflow.schedule_nudge, nudge)

    await stack.env.sleep(late + timedelta(minutes=30) - await stack.env.get_current_time())
    [pending] = await eventually(lambda: stack.handle(simon).query(CompanionWorkflow.nudges),
                                 lambda nudges: len(nudges) == 1 and nudges[0].at == morning)
    record = await stack.repo.get_scheduled_message(nudge.nudge_id)
    assert record.status == NudgeStatus.PENDING and record.scheduled_for == morning
    assert "sleep well?" not in [text for _, text in await transcript(stack, simon)]

    await stack.env.sleep(morning - timedelta(minutes=1) - await stack.env.get_current_time())
    assert await status(stack, nudge.nudge_id) == NudgeStatus.PENDING  # not a minute before the quiet hours end
    await stack.env.sleep(timedelta(minutes=2))
    await eventually(lambda: status(stack, nudge.nudge_id), lambda s: s == NudgeStatus.SENT)
    sent = await stack.repo.get_message((await stack.repo.get_user_by_telegram_id(simon)).id,
                                        f"nudge:{nudge.nudge_id}")
    assert sent is not None and sent.content == "sleep well?"


async def test_a_reminder_the_user_asks_for_is_confirmed_and_fires_when_they_said(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "hi")
    asked_at = await stack.env.get_current_time()
    await stack.say(simon, "Remind me in 2 hours to stretch, please")

    [reminder] = await stack.handle(simon).query(CompanionWorkflow.nudges)
    assert reminder.kind == NudgeKind.REMINDER and reminder.created_by == NudgeCreator.USER
    assert reminder.text == "⏰ Reminder: stretch"
    assert timedelta(hours=2) <= reminder.at - asked_at < timedelta(hours=2, minutes=1)
    *_, note, message = stack.llm.requests[-1]["messages"]  # the note comes right before the message
    assert note["role"] == "system" and message["content"] == "Remind me in 2 hours to stretch, please"
    assert 'You have just set a reminder the user asked for: "stretch"' in note["content"]

    await stack.env.sleep(timedelta(hours=2, minutes=5))
    await eventually(lambda: status(stack, reminder.nudge_id), lambda s: s == NudgeStatus.SENT)
    assert (await transcript(stack, simon))[-1] == ("assistant", "⏰ Reminder: stretch")


async def test_a_check_in_follows_days_of_silence_and_every_message_resets_it(stack: Stack) -> None:
    stack.settings = stack.settings.model_copy(update={"checkin_after_days": 3})
    simon = new_telegram_id()
    await stack.say(simon, "I'm starting a new job on Monday")
    [first] = await stack.handle(simon).query(CompanionWorkflow.nudges)
    assert first.kind == NudgeKind.CHECK_IN and first.created_by == NudgeCreator.COMPANION

    await stack.env.sleep(timedelta(days=2))
    await stack.say(simon, "first day went fine")  # the silence starts again
    [second] = await stack.handle(simon).query(CompanionWorkflow.nudges)
    assert second.nudge_id != first.nudge_id and second.at > first.at
    assert await status(stack, first.nudge_id) == NudgeStatus.CANCELLED

    await stack.env.sleep(timedelta(days=2))  # three days after the first message: nothing
    assert await status(stack, second.nudge_id) == NudgeStatus.PENDING
    await stack.env.sleep(timedelta(days=1, hours=1))
    await eventually(lambda: status(stack, second.nudge_id), lambda s: s == NudgeStatus.SENT)
    role, text = (await transcript(stack, simon))[-1]
    assert role == "assistant" and "check in with the user" in text  # the stub echoes the purpose it was given
    assert await stack.handle(simon).query(CompanionWorkflow.nudges) == []  # one check-in per silence, no nagging


async def test_turning_check_ins_off_cancels_the_pending_one_and_plans_no_more(stack: Stack) -> None:
    stack.settings = stack.settings.model_copy(update={"checkin_after_days": 3})
    simon = new_telegram_id()
    await stack.say(simon, "hello")
    [checkin] = await stack.handle(simon).query(CompanionWorkflow.nudges)
    cancelled = await stack.handle(simon).execute_update(CompanionWorkflow.set_checkins, False)
    assert [nudge.nudge_id for nudge in cancelled] == [checkin.nudge_id]
    assert await status(stack, checkin.nudge_id) == NudgeStatus.CANCELLED
    await stack.say(simon, "still here")
    assert await stack.handle(simon).query(CompanionWorkflow.nudges) == []


async def test_an_event_the_user_mentions_is_remembered_and_followed_up_the_day_after(stack: Stack) -> None:
    simon = new_telegram_id()
    reply = await stack.say(simon, "I have a job interview tomorrow at 10, wish me luck")
    said_at = await stack.env.get_current_time()
    interview = datetime.combine(said_at.date() + timedelta(days=1), time(10), tzinfo=UTC)
    user = await stack.repo.get_user_by_telegram_id(simon)

    [event] = await stack.repo.upcoming_events(user.id, now=said_at)
    assert (event.title, event.event_at) == ("job interview", interview)
    assert event.source_keys == [reply.message_key]  # provenance: the message it came from
    [follow_up] = await stack.handle(simon).query(CompanionWorkflow.nudges)
    assert follow_up.kind == NudgeKind.FOLLOW_UP and follow_up.at == interview + timedelta(days=1)

    await stack.env.sleep(follow_up.at + timedelta(minutes=1) - await stack.env.get_current_time())
    await eventually(lambda: status(stack, follow_up.nudge_id), lambda s: s == NudgeStatus.SENT)
    role, text = (await transcript(stack, simon))[-1]
    assert role == "assistant" and "ask how the user's job interview on" in text  # the stub echoes its purpose


async def test_a_reminder_fires_at_its_time_in_the_users_zone_and_moves_when_the_zone_changes(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "hi")
    paris, tokyo = ZoneInfo("Europe/Paris"), ZoneInfo("Asia/Tokyo")
    changed = await stack.handle(simon).execute_update(
        CompanionWorkflow.set_timezone, TimezoneChange(zone="Europe/Paris", source=TimezoneSource.COMMAND))
    assert (changed.zone, changed.previous, changed.moved) == ("Europe/Paris", "UTC", [])

    await stack.say(simon, "remind me tomorrow at 9 to call mom")
    await stack.say(simon, "and remind me in 3 hours to stretch")
    asked = (await stack.env.get_current_time()).astimezone(paris)
    call_mom = datetime.combine(asked.date() + timedelta(days=1), time(9), tzinfo=paris)
    reminder, stretch = sorted(await stack.handle(simon).query(CompanionWorkflow.nudges), key=lambda n: n.text != (
        "⏰ Reminder: call mom"))
    assert reminder.at == call_mom and reminder.local_time and not stretch.local_time

    # They move to Tokyo: 9:00 stays 9:00 there (the same day, Tokyo's), "in 3 hours" stays when it was.
    changed = await stack.handle(simon).execute_update(
        CompanionWorkflow.set_timezone, TimezoneChange(zone="Asia/Tokyo", source=TimezoneSource.COMMAND))
    in_tokyo = datetime.combine(call_mom.date(), time(9), tzinfo=tokyo)
    assert [(n.nudge_id, n.at) for n in changed.moved] == [(reminder.nudge_id, in_tokyo)]
    pending = {n.nudge_id: n.at for n in await stack.handle(simon).query(CompanionWorkflow.nudges)}
    assert pending == {reminder.nudge_id: in_tokyo, stretch.nudge_id: stretch.at}
    assert (await stack.repo.get_scheduled_message(reminder.nudge_id)).scheduled_for == in_tokyo
    user = await stack.repo.get_user_by_telegram_id(simon)
    assert user.timezone == "Asia/Tokyo" and user.timezone_known

    # Quiet hours are Tokyo's too (22:00-08:00): 9:00 there is not in them, and the reminder comes on the minute.
    await stack.env.sleep(in_tokyo - timedelta(minutes=1) - await stack.env.get_current_time())
    assert await status(stack, reminder.nudge_id) == NudgeStatus.PENDING
    await stack.env.sleep(timedelta(minutes=2))
    await eventually(lambda: status(stack, reminder.nudge_id), lambda s: s == NudgeStatus.SENT)
    assert ("assistant", "⏰ Reminder: call mom") in await transcript(stack, simon)


async def test_a_user_whose_zone_is_unknown_is_asked_for_it_at_their_first_reminder_only(stack: Stack) -> None:
    simon = new_telegram_id()
    await stack.say(simon, "remind me tomorrow at 9 to call mom")
    *_, note, _ = stack.llm.requests[-1]["messages"]
    assert ASK_ZONE in note["content"]
    await stack.say(simon, "remind me on friday at 18:00 to buy flowers")
    *_, note, _ = stack.llm.requests[-1]["messages"]
    assert "buy flowers" in note["content"] and ASK_ZONE not in note["content"]
