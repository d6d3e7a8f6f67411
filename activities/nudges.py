"""Activities of proactive nudges: their audit records in scheduled_messages, and firing one.

The schedule itself is a timer in the user's workflow; these only record and deliver.
"""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio import activity

from activities.errors import translate_errors
from activities.delivery import DeliveryActivities
from core.logging import get_logger
from schemas.memory import MessageCreate, NudgeStatus, Role, ScheduledMessageCreate, ScheduledMessageUpdate
from schemas.turn import FiredNudge, FireNudgeInput, RecordNudgeInput, SetNudgeStatusInput

NUDGE_PROMPT = ("Write one short, warm message to start a conversation with the user. Its purpose: {purpose}. "
                "Reply with the message only.")

_log = get_logger(__name__)


def nudge_message_key(nudge_id: str) -> str:
    """The message key a fired nudge is stored under."""
    return f"nudge:{nudge_id}"


class CompanionActivities(DeliveryActivities):
    """Every activity of the companion: a turn's, delivery's and the nudges'.

    fire_nudge may call the LLM, so the workflow runs it with a turn's LLM timeout and capped retries.
    """

    @activity.defn(name="record_nudge")
    @translate_errors
    async def record_nudge(self, data: RecordNudgeInput) -> None:
        """Write the nudge's audit record as pending; a retry finds it written."""
        nudge = data.nudge
        await self._repository.create_scheduled_message(data.user_id, ScheduledMessageCreate(
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
    async def fire_nudge(self, data: FireNudgeInput) -> FiredNudge:
        """The nudge's text (given, or written by the LLM from its purpose), stored once and marked sent."""
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

    async def _write(self, data: FireNudgeInput) -> str:
        context = await self.build_context(data.user_id, nudge_message_key(data.nudge.nudge_id))
        reply = await self._chat_model.reply(context, NUDGE_PROMPT.format(purpose=data.nudge.purpose))
        return reply.text

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [*super().all(), self.record_nudge, self.set_nudge_status, self.fire_nudge]
