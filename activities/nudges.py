"""Activities of proactive nudges: their audit records in scheduled_messages, and firing one.

The schedule itself is a timer in the user's workflow; these only record and deliver.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from temporalio import activity

from activities.errors import translate_errors
from activities.prompt import HISTORY_TURNS, build_prompt, fit_memory
from activities.usage import UsageRecorder, records_usage
from clients.llm import ChatModel
from core.logging import get_logger
from schemas.memory import MessageCreate, NudgeStatus, Role, ScheduledMessageCreate, ScheduledMessageUpdate
from schemas.turn import (
    FiredNudge,
    FireNudgeInput,
    PlanCheckinInput,
    RecordNudgeInput,
    SetNudgeStatusInput,
    nudge_message_key,
)
from storage.repository import MemoryRepository

NUDGE_PROMPT = ("Write one short, warm message to start a conversation with the user. Its purpose: {purpose}. "
                "Reply with the message only.")

_log = get_logger(__name__)


def quiet_until(now: datetime, zone: ZoneInfo, hours: tuple[time, time]) -> datetime | None:
    """When the quiet hours around ``now`` (local times in ``zone``) end; None when ``now`` is not in them."""
    start, end = hours
    local = now.astimezone(zone)
    clock = local.time()
    overnight = start > end  # e.g. 22:00-08:00
    inside = (clock >= start or clock < end) if overnight else (start <= clock < end)
    if not inside:
        return None
    day = local.date() + timedelta(days=1) if overnight and clock >= start else local.date()
    # Built as a local wall time, then normalised: a DST gap or fold resolves the way ZoneInfo does.
    return datetime.combine(day, end, tzinfo=zone).astimezone(UTC)


class NudgeActivities:
    """The audit records of nudges and the firing of one, over an injected repository and chat model.

    fire_nudge may call the LLM: it runs on the LLM task queue, with a reply's timeouts and capped retries.
    """

    def __init__(self, repository: MemoryRepository, chat_model: ChatModel,
                 quiet_hours: tuple[time, time] | None = None, usage: UsageRecorder | None = None):
        self._repository, self._usage = repository, usage
        self._chat_model = chat_model
        self._quiet_hours = quiet_hours

    @activity.defn(name="record_nudge")
    @translate_errors
    async def record_nudge(self, data: RecordNudgeInput) -> None:
        """Write the nudge's audit record as pending; a retry finds it written."""
        nudge = data.nudge
        await self._repository.create_scheduled_message(data.user_id, ScheduledMessageCreate(
            nudge_id=nudge.nudge_id, scheduled_for=nudge.at, content=nudge.text, purpose=nudge.purpose,
            kind=nudge.kind, created_by=nudge.created_by))

    @activity.defn(name="plan_checkin")
    @translate_errors
    async def plan_checkin(self, data: PlanCheckinInput) -> None:
        """Record the next check-in and cancel the one it replaces; a retry finds both done."""
        nudge = data.nudge
        await self._repository.replace_scheduled_message(data.user_id, data.replaces, ScheduledMessageCreate(
            nudge_id=nudge.nudge_id, scheduled_for=nudge.at, content=nudge.text, purpose=nudge.purpose,
            kind=nudge.kind, created_by=nudge.created_by))

    @activity.defn(name="set_nudge_status")
    @translate_errors
    async def set_nudge_status(self, data: SetNudgeStatusInput) -> None:
        """Mark a nudge cancelled or failed in its audit record."""
        await self._repository.update_scheduled_message(data.nudge_id, ScheduledMessageUpdate(
            status=data.status, **({"error": data.error} if data.error else {})))

    @activity.defn(name="fire_nudge")
    @translate_errors
    @records_usage
    async def fire_nudge(self, data: FireNudgeInput) -> FiredNudge:
        """The nudge's text (given, or written by the LLM from its purpose), stored once and marked sent.

        In the user's quiet hours nothing is written or sent: the record moves to their end, which is returned.
        """
        if (until := await self._postponed(data)) is not None:
            return FiredNudge(text="", postponed_until=until)
        key = nudge_message_key(data.nudge.nudge_id)
        stored = await self._repository.get_message(data.user_id, key) if activity.info().attempt > 1 else None
        if stored is None:
            text = data.nudge.text or await self._write(data)
            stored = await self._repository.add_message(data.user_id, MessageCreate(
                message_key=key, role=Role.ASSISTANT, content=text, channel=data.channel, sent_at=datetime.now(UTC),
                meta={"nudge_id": data.nudge.nudge_id}))
        await self._repository.update_scheduled_message(data.nudge.nudge_id,
                                                        ScheduledMessageUpdate(status=NudgeStatus.SENT))
        _log.info("nudge.fired", user_id=data.user_id, nudge_id=data.nudge.nudge_id)
        return FiredNudge(text=stored.content)

    async def _postponed(self, data: FireNudgeInput) -> datetime | None:
        if self._quiet_hours is None or data.now is None:
            return None
        user = await self._repository.get_user(data.user_id)
        until = quiet_until(data.now, user.timezone_info, self._quiet_hours)
        if until is not None:
            await self._repository.update_scheduled_message(data.nudge.nudge_id,
                                                            ScheduledMessageUpdate(scheduled_for=until))
            _log.info("nudge.postponed", user_id=data.user_id, nudge_id=data.nudge.nudge_id, until=until.isoformat())
        return until

    async def _write(self, data: FireNudgeInput) -> str:
        context = await self._repository.get_user_context(data.user_id, message_limit=HISTORY_TURNS + 1)
        fit_memory(context, [], set(), self._chat_model.budget)
        prompt = build_prompt(context, nudge_message_key(data.nudge.nudge_id), budget=self._chat_model.budget)
        reply = await self._chat_model.reply(prompt, NUDGE_PROMPT.format(purpose=data.nudge.purpose))
        return reply.text

    def records(self) -> list:
        """The audit-record steps (local activities of the workflow), for registering with a worker."""
        return [self.record_nudge, self.plan_checkin, self.set_nudge_status]
