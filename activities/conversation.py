"""The conversation's storage steps: the user and their messages, reachability, and /forget.

They run as local activities, in the workflow task that asks for them: short PostgreSQL writes, each idempotent by
its key, retried until the database is back. Named timeouts and retry policies live here; the workflow imports them.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.prompt import HEARD_NOTE, SEEN_NOTE, reminder_note
from activities.remember import derived_key
from activities.reminders import follow_up_time, parse_event, parse_reminder, same_time_of_day
from core.errors import RecordNotFoundError, UserNotFoundError
from core.logging import get_logger
from schemas.memory import (
    PERSONA,
    TIMEZONE_ASKED,
    UNLIMITED,
    MessageCreate,
    NudgeCreator,
    NudgeKind,
    Role,
    TimelineEventCreate,
    UserCreate,
    UserRead,
)
from schemas.turn import (
    ATTACHMENT,
    CheckLimitsInput,
    EnsureUserInput,
    ForgetInput,
    ForgetItemInput,
    Forgotten,
    ListMemoryInput,
    MemoryListing,
    Nudge,
    PreparedTurn,
    PrepareTurnInput,
    RecordMessageInput,
    SetPersonaInput,
    SetTimezoneInput,
    SetUserActiveInput,
    Standing,
    TimezoneChanged,
    UsageInput,
    UserRef,
)
from schemas.usage import Limits, UsageSummary
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository

DB_TIMEOUT = timedelta(seconds=10)
DB_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), backoff_coefficient=2.0,
                       maximum_interval=timedelta(seconds=10),
                       non_retryable_error_types=["InvalidMemoryDataError", "UserNotFoundError",
                                                  "ConstraintViolationError", "DuplicateRecordError"])

_log = get_logger(__name__)


class ConversationActivities:
    """Storage steps of a conversation, over an injected repository (and the memory index /forget erases)."""

    def __init__(self, repository: MemoryRepository, memory: MemoryIndex | None = None,
                 limits: Limits | None = None):
        self._repository = repository
        self._memory = memory
        self._limits = limits or Limits()

    @activity.defn(name="ensure_user")
    @translate_errors
    async def ensure_user(self, data: EnsureUserInput) -> UserRef:
        """The stored user for a channel user, created on first contact."""
        return _ref(await self._repository.get_or_create_user(UserCreate(**data.user.model_dump())))

    @activity.defn(name="prepare_turn")
    @translate_errors
    async def prepare_turn(self, data: PrepareTurnInput) -> PreparedTurn:
        """Store the user's message once (creating the user, or creating them again when their rows are gone), and
        read the reminder or coming event it mentions: an event goes on the timeline here, once."""
        message = data.message
        # A voice note or photo: its file id and what Telegram said of it, beside the transcript or description.
        meta = {ATTACHMENT: message.attachment.model_dump(mode="json", exclude_none=True)} if message.attachment else {}
        user = await self.store_user_message(UserCreate(**message.user.model_dump()), MessageCreate(
            message_key=message.message_key, role=Role.USER, content=message.text, channel=message.channel,
            sent_at=message.sent_at, meta=meta))
        zone = user.timezone_info
        prepared = PreparedTurn(user=_ref(user))
        found = parse_reminder(message.text, data.now, zone)
        if found is not None and found.at > data.now:
            prepared.reminder = Nudge(nudge_id=derived_key("remind", message.message_key), at=found.at,
                                      text=f"⏰ Reminder: {found.what}", kind=NudgeKind.REMINDER,
                                      created_by=NudgeCreator.USER, local_time=found.local_time)
            # Asked once: a user who never said where they live is asked at their first reminder at a time of day.
            ask_zone = found.local_time and not user.timezone_known and not user.preferences.get(TIMEZONE_ASKED)
            prepared.note = reminder_note(found.what, found.at, zone, ask_zone)
            if ask_zone:
                await self._repository.set_preferences(user.id, {TIMEZONE_ASKED: True})
        if message.attachment is not None:  # the model is told how the message came, before any reminder's note
            heard = HEARD_NOTE if message.attachment.kind.heard else SEEN_NOTE
            prepared.note = f"{heard}\n\n{prepared.note}" if prepared.note else heard
        event = parse_event(message.text, data.now, zone)
        if event is not None:
            await self._repository.add_timeline_event(user.id, TimelineEventCreate(
                title=event.what, event_at=event.at, source_keys=[message.message_key],
                idempotency_key=derived_key("event", message.message_key)))
            prepared.follow_up = Nudge(
                nudge_id=derived_key("follow", message.message_key), at=follow_up_time(event.at, zone),
                purpose=f"ask how the user's {event.what} on {event.at.astimezone(zone):%A %d %B} went",
                kind=NudgeKind.FOLLOW_UP, created_by=NudgeCreator.COMPANION, local_time=True)
        return prepared

    @activity.defn(name="record_message")
    @translate_errors
    async def record_message(self, data: RecordMessageInput) -> None:
        """Store one message of the conversation (the fallback reply); a retry stores nothing twice."""
        await self.store(data)

    async def store(self, data: RecordMessageInput) -> None:
        """Store a message once by its key."""
        await self._repository.add_message(data.user_id, MessageCreate(
            message_key=data.message_key, role=data.role, content=data.text, channel=data.channel,
            sent_at=data.sent_at, meta={"fallback": True} if data.fallback else {}))

    async def store_user_message(self, user: UserCreate, message: MessageCreate) -> UserRead:
        """Store the user (created, or created again, as need be) and their message once by its key."""
        return await self._repository.add_user_message(user, message)

    @activity.defn(name="set_user_active")
    @translate_errors
    async def set_user_active(self, data: SetUserActiveInput) -> int:
        """Mark the user reachable or not; returns how many pending nudges were cancelled."""
        cancelled = await self._repository.set_user_active(data.user_id, data.active, data.reason)
        _log.info("user.reachability", user_id=data.user_id, active=data.active, nudges_cancelled=cancelled)
        return cancelled

    @activity.defn(name="set_timezone")
    @translate_errors
    async def set_timezone(self, data: SetTimezoneInput) -> TimezoneChanged:
        """Store the user's time zone, and move their reminders and follow-ups to the same time of day there."""
        moved = same_time_of_day(data.pending, ZoneInfo(data.previous), ZoneInfo(data.change.zone), data.now)
        await self._repository.set_timezone(data.user_id, data.change.zone, data.change.source.value,
                                            {nudge.nudge_id: nudge.at for nudge in moved})
        _log.info("user.timezone_set", user_id=data.user_id, zone=data.change.zone, source=data.change.source.value,
                  nudges_moved=len(moved))
        return TimezoneChanged(zone=data.change.zone, previous=data.previous, moved=moved)

    @activity.defn(name="set_persona")
    @translate_errors
    async def set_persona(self, data: SetPersonaInput) -> str | None:
        """Set, drop or only read how the user asked the companion to be with them; returns it as it now is."""
        if data.change.text is None and not data.change.reset:
            return (await self._repository.get_user(data.user_id)).persona
        user = await self._repository.set_preferences(data.user_id, {PERSONA: data.change.text})
        _log.info("user.persona_set", user_id=data.user_id, persona=user.persona is not None)
        return user.persona

    @activity.defn(name="list_memory")
    @translate_errors
    async def list_memory(self, data: ListMemoryInput) -> MemoryListing:
        """What the companion remembers of the user, as /memory shows it."""
        user = await self._repository.get_user(data.user_id)
        return MemoryListing(timezone=user.timezone, items=await self._repository.memory_items(user.id, data.now))

    @activity.defn(name="forget_item")
    @translate_errors
    async def forget_item(self, data: ForgetItemInput) -> bool:
        """Forget one fact, event or diary entry, with the memories that repeat it; False when it was gone."""
        try:
            memories = await self._repository.forget_memory_item(data.user_id, data.ref)
        except RecordNotFoundError:
            return False
        if self._memory is not None:
            await self._memory.store.delete(data.user_id, memories)  # their rows went with the item
        _log.info("memory.item_forgotten", user_id=data.user_id, ref=data.ref, memories=len(memories))
        return True

    @activity.defn(name="forget_user")
    @translate_errors
    async def forget_user(self, data: ForgetInput) -> Forgotten:
        """Erase the user's vectors, then their row and, by cascade, every memory and nudge record of them.

        Vectors go first: if the store fails, the activity is retried with the rows still there to find them by.
        """
        if self._memory is not None:
            try:
                user = await self._repository.get_user_by_telegram_id(data.telegram_id)
            except UserNotFoundError:
                user = None
            if user is not None:
                await self._memory.forget_user(user.id)
        had_memories = await self._repository.delete_user_by_telegram_id(data.telegram_id)
        _log.info("user.forgotten", telegram_id=data.telegram_id, had_memories=had_memories)
        return Forgotten(had_memories=had_memories)

    @activity.defn(name="check_limits")
    @translate_errors
    async def check_limits(self, data: CheckLimitsInput) -> Standing:
        """Whether the user is exempt from limits, and whether today's usage (since midnight in their zone) has
        reached the daily budget: then until when."""
        unlimited = await self._unlimited(data.telegram_id)
        if unlimited or not self._limits.any:
            return Standing(unlimited=unlimited)
        start = day_start(data.now, ZoneInfo(data.zone))
        used = await self._repository.usage_totals(data.telegram_id, start)
        if not self._limits.reached(used):
            return Standing()
        _log.info("usage.over_budget", telegram_id=data.telegram_id, cost_usd=round(used.cost_usd, 6),
                  tokens=used.tokens)
        return Standing(over_budget_until=day_start(start + timedelta(days=1, hours=1), ZoneInfo(data.zone)))

    @activity.defn(name="usage_summary")
    @translate_errors
    async def usage_summary(self, data: UsageInput) -> UsageSummary:
        """The user's usage (everyone's, for None) today and this month, in ``zone``, with the limits."""
        zone = ZoneInfo(data.zone)
        today = day_start(data.now, zone)
        month = today.replace(day=1)
        unlimited = data.telegram_id is not None and await self._unlimited(data.telegram_id)
        return UsageSummary(
            telegram_id=data.telegram_id, zone=data.zone, day_started=today, unlimited=unlimited,
            today=await self._repository.usage_totals(data.telegram_id, today),
            month=await self._repository.usage_totals(data.telegram_id, month),
            daily_budget_usd=self._limits.daily_budget_usd, daily_tokens=self._limits.daily_tokens,
            users=await self._repository.usage_users(month) if data.telegram_id is None else None)

    async def _unlimited(self, telegram_id: int) -> bool:
        """Whether an operator exempted the user from the limits (a user not stored yet is not)."""
        try:
            user = await self._repository.get_user_by_telegram_id(telegram_id)
        except UserNotFoundError:
            return False
        return bool(user.preferences.get(UNLIMITED))

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [self.ensure_user, self.prepare_turn, self.record_message, self.set_user_active, self.set_timezone,
                self.set_persona, self.list_memory, self.forget_item, self.forget_user, self.check_limits,
                self.usage_summary]


def day_start(moment: datetime, zone: ZoneInfo) -> datetime:
    """Midnight of the day ``moment`` falls on, where the user is."""
    return datetime.combine(moment.astimezone(zone).date(), time(0), tzinfo=zone)


def _ref(user: UserRead) -> UserRef:
    return UserRef(user_id=user.id, display_name=user.display_name, timezone=user.timezone)
