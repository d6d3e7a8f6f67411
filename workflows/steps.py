"""The steps CompanionWorkflow takes, one function each: which activity, where it runs, its timeouts, retries and the
summary the Temporal UI shows for it. Workflow code: call them from the workflow only.

Storage steps and the Telegram delivery are local activities (short, in the workflow task that asks for them);
the LLM steps are regular activities on the LLM task queue; the remember step is a regular activity on the
workflow's own task queue.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.conversation import DB_RETRY, DB_TIMEOUT, ConversationActivities
    from activities.delivery import TELEGRAM_RETRY, DeliveryActivities
    from activities.media import MediaActivities
    from activities.nudges import NudgeActivities
    from activities.remember import REMEMBER_RETRY, REMEMBER_TIMEOUT, RememberActivities
    from activities.reply import LLM_HEARTBEAT, LLM_RETRY, LLM_TIMEOUT, ReplyActivities
    from activities.sending import TELEGRAM_TIMEOUT
    from schemas.memory import Channel, NudgeStatus, Role
    from schemas.turn import (
        ChatUser,
        CheckLimitsInput,
        DeliverInput,
        EnsureUserInput,
        Exported,
        FiredNudge,
        FireNudgeInput,
        ForgetInput,
        ForgetItemInput,
        Forgotten,
        GeneratedReply,
        GenerateReplyInput,
        IncomingMessage,
        ListMemoryInput,
        MemoryListing,
        Nudge,
        PersonaChange,
        PlanCheckinInput,
        PreparedTurn,
        PrepareTurnInput,
        RecordMessageInput,
        RecordNudgeInput,
        Remembered,
        RememberInput,
        SendExportInput,
        SetNudgeStatusInput,
        SetPersonaInput,
        SetTimezoneInput,
        SetUserActiveInput,
        Standing,
        TimezoneChange,
        TimezoneChanged,
        UnderstandInput,
        Understood,
        UsageInput,
        UserRef,
        reply_key_of,
    )
    from schemas.usage import UsageSummary

LLM_QUEUE_SUFFIX = "-llm"
_STORE = {"start_to_close_timeout": DB_TIMEOUT, "retry_policy": DB_RETRY}


def llm_task_queue(task_queue: str) -> str:
    """The task queue of the LLM steps of the workflows on ``task_queue``."""
    return f"{task_queue}{LLM_QUEUE_SUFFIX}"


async def prepare_turn(message: IncomingMessage) -> PreparedTurn:
    """Store the user's message (and the user, if need be); read the reminder or event it mentions."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.prepare_turn, PrepareTurnInput(message=message, now=workflow.now()),
        summary="prepare_turn: store the message", **_STORE)


async def understand(message: IncomingMessage, deadline: timedelta) -> Understood:
    """What the message's voice note said (transcribe) or its photo showed (describe_image), as its text; capped
    attempts, all within ``deadline``."""
    attachment = message.attachment
    assert attachment is not None
    step, name = ((MediaActivities.transcribe, "transcribe") if attachment.kind.heard
                  else (MediaActivities.describe_image, "describe_image"))
    seconds = f", {attachment.duration_s} s" if attachment.duration_s is not None else ""
    return await workflow.execute_activity_method(
        step, UnderstandInput(message_key=message.message_key, attachment=attachment),
        task_queue=llm_task_queue(workflow.info().task_queue), start_to_close_timeout=LLM_TIMEOUT,
        schedule_to_close_timeout=deadline, retry_policy=LLM_RETRY,
        summary=f"{name}: the {attachment.kind.value.replace('_', ' ')}{seconds}")


async def generate_reply(data: GenerateReplyInput, deadline: timedelta) -> GeneratedReply:
    """The LLM's reply, stored; capped attempts, all of them within ``deadline``."""
    return await workflow.execute_activity_method(
        ReplyActivities.generate_reply, data, task_queue=llm_task_queue(workflow.info().task_queue),
        start_to_close_timeout=LLM_TIMEOUT, schedule_to_close_timeout=deadline, heartbeat_timeout=LLM_HEARTBEAT,
        retry_policy=LLM_RETRY, summary="generate_reply: the LLM writes the reply")


async def store_fallback(user_id: int, message: IncomingMessage, text: str) -> None:
    """Store the fallback reply under the reply's key."""
    await workflow.execute_local_activity_method(
        ConversationActivities.record_message,
        RecordMessageInput(user_id=user_id, message_key=message.reply_key, role=Role.ASSISTANT, text=text,
                           channel=message.channel, sent_at=workflow.now(), fallback=True),
        summary="store the fallback reply", **_STORE)


async def deliver(user_id: int, chat_id: int, message_key: str) -> None:
    """Send a stored message to a Telegram chat, waiting out flood control."""
    await workflow.execute_local_activity_method(
        DeliveryActivities.deliver, DeliverInput(user_id=user_id, chat_id=chat_id, message_key=message_key),
        start_to_close_timeout=TELEGRAM_TIMEOUT, retry_policy=TELEGRAM_RETRY, summary="deliver to Telegram")


async def check_limits(telegram_id: int, zone: str) -> Standing:
    """Whether the user is exempt from limits, and until when their daily budget is spent."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.check_limits, CheckLimitsInput(telegram_id=telegram_id, zone=zone, now=workflow.now()),
        summary="check the user's limits", **_STORE)


async def usage_summary(telegram_id: int | None, zone: str) -> UsageSummary:
    """The user's usage (everyone's, for None) today and this month."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.usage_summary, UsageInput(telegram_id=telegram_id, zone=zone, now=workflow.now()),
        summary="read everyone's usage" if telegram_id is None else "read the user's usage", **_STORE)


async def send_export(telegram_id: int) -> Exported:
    """Send the user everything kept of them, to their private chat."""
    return await workflow.execute_local_activity_method(
        DeliveryActivities.send_export, SendExportInput(telegram_id=telegram_id, chat_id=telegram_id),
        start_to_close_timeout=TELEGRAM_TIMEOUT, retry_policy=TELEGRAM_RETRY, summary="send the user's export")


async def set_user_active(user_id: int, active: bool, reason: str | None) -> None:
    """Mark the user reachable again, or out of reach."""
    await workflow.execute_local_activity_method(
        ConversationActivities.set_user_active, SetUserActiveInput(user_id=user_id, active=active, reason=reason),
        summary="the user can be reached" if active else f"out of reach: {reason}", **_STORE)


async def ensure_user(telegram_id: int) -> UserRef:
    """The stored user, created if need be."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.ensure_user, EnsureUserInput(user=ChatUser(telegram_id=telegram_id)),
        summary="find the user", **_STORE)


async def set_timezone(user_id: int, change: TimezoneChange, previous: str, pending: list[Nudge]) -> TimezoneChanged:
    """Store the user's time zone, and the new times of the pending nudges that move with it."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.set_timezone,
        SetTimezoneInput(user_id=user_id, change=change, previous=previous, pending=pending, now=workflow.now()),
        summary=f"time zone {change.zone} (from {previous}, by {change.source.value})", **_STORE)


async def set_persona(user_id: int, change: PersonaChange) -> str | None:
    """Set, drop or only read the user's persona; it as it now is."""
    what = "reset the persona" if change.reset else "set the persona" if change.text is not None else "read the persona"
    return await workflow.execute_local_activity_method(
        ConversationActivities.set_persona, SetPersonaInput(user_id=user_id, change=change), summary=what, **_STORE)


async def list_memory(user_id: int) -> MemoryListing:
    """What the companion remembers of the user, as /memory shows it."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.list_memory, ListMemoryInput(user_id=user_id, now=workflow.now()),
        summary="list what is remembered", **_STORE)


async def forget_item(user_id: int, ref: str) -> bool:
    """Forget one fact, event or diary entry, with the memories that repeat it; False when it was gone."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.forget_item, ForgetItemInput(user_id=user_id, ref=ref), summary=f"forget {ref}",
        **_STORE)


async def forget_user(telegram_id: int) -> Forgotten:
    """Erase the user's rows and vectors."""
    return await workflow.execute_local_activity_method(
        ConversationActivities.forget_user, ForgetInput(telegram_id=telegram_id), summary="forget the user",
        **_STORE)


async def record_nudge(user_id: int, nudge: Nudge) -> None:
    """Write a nudge's audit record, pending."""
    await workflow.execute_local_activity_method(
        NudgeActivities.record_nudge, RecordNudgeInput(user_id=user_id, nudge=nudge),
        summary=f"schedule {nudge.kind.value} nudge {nudge.nudge_id}", **_STORE)


async def set_nudge_status(nudge_id: str, status: NudgeStatus, error: str | None = None) -> None:
    """Mark a nudge's audit record cancelled or failed."""
    await workflow.execute_local_activity_method(
        NudgeActivities.set_nudge_status, SetNudgeStatusInput(nudge_id=nudge_id, status=status, error=error),
        summary=f"nudge {nudge_id} {status.value}", **_STORE)


async def plan_checkin(user_id: int, replaces: Nudge | None, nudge: Nudge, days: int) -> None:
    """Record the next check-in, cancelling the one it replaces."""
    await workflow.execute_local_activity_method(
        NudgeActivities.plan_checkin,
        PlanCheckinInput(user_id=user_id, replaces=replaces.nudge_id if replaces else None, nudge=nudge),
        summary=f"check in after {days} days of silence", **_STORE)


async def fire_nudge(user_id: int, nudge: Nudge, channel: Channel) -> FiredNudge:
    """Write (or take) a nudge's text and store it; in the user's quiet hours, postpone it."""
    return await workflow.execute_activity_method(
        NudgeActivities.fire_nudge, FireNudgeInput(user_id=user_id, nudge=nudge, channel=channel, now=workflow.now()),
        task_queue=llm_task_queue(workflow.info().task_queue), start_to_close_timeout=LLM_TIMEOUT,
        retry_policy=LLM_RETRY, summary=f"fire_nudge {nudge.nudge_id} ({nudge.kind.value})")


async def remember(user_id: int, turns: list[str], now: datetime, summary: str) -> Remembered:
    """Memories from turns (message keys, oldest first), and the reminders and running summary found in them."""
    latest = turns[-1]
    return await workflow.execute_activity_method(
        RememberActivities.remember,
        RememberInput(user_id=user_id, message_key=latest, reply_key=reply_key_of(latest), earlier=turns[:-1],
                      now=now, summary=summary),
        start_to_close_timeout=REMEMBER_TIMEOUT, retry_policy=REMEMBER_RETRY,
        summary=f"remember {len(turns)} turn{'s' if len(turns) > 1 else ''}")
