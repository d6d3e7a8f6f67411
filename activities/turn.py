"""The activities of one turn: store the message, gather the user's memory, ask the LLM, store the reply.

Named timeouts and retry policies live here, next to the activities they govern; the workflow imports them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.llm import ChatModel
from activities.remember import Rememberer, derived_key
from activities.reminders import Reminder, follow_up_time, parse_event, parse_reminder
from activities.sending import DELIVERY_CLAIM, TELEGRAM_TIMEOUT, TelegramSender
from activities.telegram import TelegramChannel
from core.concurrency import alongside
from core.errors import CompanionError, OpenAIServiceError
from core.logging import get_logger
from schemas.context import RecalledMemory, UserContextSchema, quote
from schemas.memory import (
    Channel,
    MessageCreate,
    MessageRead,
    NudgeCreator,
    NudgeKind,
    Role,
    TimelineEventCreate,
    UserCreate,
)
from schemas.turn import (
    ChatTurn,
    ComposedReply,
    ComposeReplyInput,
    EnsureUserInput,
    Nudge,
    RecordedMessage,
    RecordMessageInput,
    Remembered,
    RememberInput,
    TurnContext,
    UserRef,
)
from storage.recall import MemoryHit, MemoryIndex
from storage.repository import MemoryRepository

# PostgreSQL steps run as local activities: short, retried until the database is back (writes are idempotent).
DB_TIMEOUT = timedelta(seconds=10)
DB_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), backoff_coefficient=2.0,
                       maximum_interval=timedelta(seconds=10),
                       non_retryable_error_types=["InvalidMemoryDataError", "UserNotFoundError",
                                                  "ConstraintViolationError", "DuplicateRecordError"])
# Steps that ask the LLM (the reply, a nudge written from its purpose) are capped: each attempt may be paid for.
LLM_TIMEOUT = timedelta(seconds=90)
LLM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                        maximum_interval=timedelta(seconds=10), maximum_attempts=3)
# Histories from before the reply step ran locally run it as a regular activity that heartbeats while the LLM
# thinks: a worker that dies mid-call is noticed within LLM_HEARTBEAT and the step retried on another worker.
LLM_HEARTBEAT = timedelta(seconds=10)
HEARTBEAT_EVERY_S = 2.0

# The remember step: storing and embedding is retried until it lands; the extraction call inside it is paid, so
# after this many attempts the step finishes without it.
REMEMBER_TIMEOUT = timedelta(seconds=120)
REMEMBER_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                             maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                             non_retryable_error_types=["InvalidMemoryDataError", "UserNotFoundError",
                                                        "ConstraintViolationError"])
REMEMBER_EXTRACT_ATTEMPTS = 3
RECALL_K = 8
RECALL_BUDGET_CHARS = 2_400  # ~600 tokens of recalled memories in the prompt

HISTORY_TURNS = 12
PERSONA = (
    "You are Companion, a warm and attentive friend who talks with the user on Telegram. You remember what they "
    "have told you and bring it up naturally. Keep replies short and conversational, ask about their life, and "
    "never claim to have done things you cannot do."
)

_log = get_logger(__name__)


class TurnActivities:
    """The side effects of a turn, over an injected repository and chat model."""

    def __init__(self, repository: MemoryRepository, chat_model: ChatModel, telegram: TelegramChannel | None = None,
                 memory: MemoryIndex | None = None, extract: bool = False):
        self._repository = repository
        self._chat_model = chat_model
        self._telegram = telegram
        self._sender = TelegramSender(repository, telegram) if telegram is not None else None
        self._memory = memory
        self._rememberer = Rememberer(repository, memory, chat_model if extract else None) if memory else None

    @activity.defn(name="ensure_user")
    @translate_errors
    async def ensure_user(self, data: EnsureUserInput) -> UserRef:
        """The stored user for a channel user, created on first contact."""
        user = await self._repository.get_or_create_user(UserCreate(**data.user.model_dump()))
        return UserRef(user_id=user.id, display_name=user.display_name, timezone=user.timezone)

    @activity.defn(name="record_message")
    @translate_errors
    async def record_message(self, data: RecordMessageInput) -> RecordedMessage:
        """Store one message of the conversation; a retry stores nothing twice."""
        return await self._record(data)

    async def _record(self, data: RecordMessageInput) -> RecordedMessage:
        stored = await self._repository.add_message(data.user_id, MessageCreate(
            message_key=data.message_key, role=data.role, content=data.text, channel=data.channel,
            sent_at=data.sent_at, meta={"fallback": True} if data.fallback else {}))
        return RecordedMessage(message_id=stored.id)

    async def build_context(self, user_id: int, message_key: str) -> TurnContext:
        """The prompt of the turn: persona and quoted memory, then the recent conversation as chat turns."""
        return _prompt(await self._repository.get_user_context(user_id, message_limit=HISTORY_TURNS + 1), message_key)

    @activity.defn(name="compose_reply")
    @translate_errors
    async def compose_reply(self, data: ComposeReplyInput) -> ComposedReply:
        """Ask the LLM for the reply to the user's message and store it under the reply key.

        An attempt that finds the reply already stored (an earlier attempt stored it, then its completion was
        lost) returns that reply: the user gets one reply, and the paid call is not made twice. The context is
        gathered here, not in a step of its own, which keeps the prompt out of the workflow history. A reminder
        the message asks for, or a coming event it mentions, is read here too (the reply can confirm a reminder);
        the workflow schedules the nudges they give rise to. With ``record_sent_at`` the step stores the user's
        message first, and with ``deliver`` it sends the reply to Telegram last, which spares the turn the steps of
        their own.
        """
        info = activity.info()
        turn = await self.prompt_for(data)
        follow_up = await self._follow_up(data, turn.zone)
        reminder = _reminder(turn.reminder, data.message_key) if turn.reminder else None
        if turn.stored_reply is not None:
            # An earlier run stored it: a retry whose completion was lost, or the worker that takes over a turn
            # from a lost one (a local step starts again there from its first attempt).
            stored_reply = ComposedReply(text=turn.stored_reply.content, reminder=reminder, follow_up=follow_up)
            return await self._sent(data, stored_reply)
        _log.info("llm.request", user_id=data.user_id, message_key=data.message_key, attempt=info.attempt,
                  workflow_id=info.workflow_id)
        async with self._typing(data), _heartbeating(info):
            reply = await self._chat_model.reply(turn.prompt, data.text)
        row = MessageCreate(message_key=data.reply_key, role=Role.ASSISTANT, content=reply.text, channel=data.channel,
                            sent_at=datetime.now(UTC))
        held = None
        if self._sends(data):  # stored claimed for sending, which spares the send a statement to claim it
            stored, claimed = await self._repository.add_claimed_message(data.user_id, row, DELIVERY_CLAIM,
                                                                         TELEGRAM_TIMEOUT)
            held = stored if claimed else None
        else:
            stored = await self._repository.add_message(data.user_id, row)
        composed = reply.model_copy(update={"text": stored.content, "reminder": reminder, "follow_up": follow_up})
        return await self._sent(data, composed, held)

    def _sends(self, data: ComposeReplyInput) -> bool:
        """Whether the reply step sends the reply to Telegram too."""
        return data.deliver and data.chat_id is not None and self._sender is not None

    async def _sent(self, data: ComposeReplyInput, reply: ComposedReply,
                    held: MessageRead | None = None) -> ComposedReply:
        """The reply, sent to Telegram when the step is asked to (``held``: stored claimed by this attempt).

        A failure to send is reported rather than raised: the reply is stored, the LLM's attempts are not spent on
        Telegram, and the workflow leaves the sending to the deliver step, which waits Telegram out.
        """
        if not self._sends(data):
            return reply
        assert self._sender is not None and data.chat_id is not None
        try:
            # No send outlives the claim's lease, which the step's own timeout (the LLM's) would allow.
            async with asyncio.timeout(TELEGRAM_TIMEOUT.total_seconds()):
                await self._sender.send(data.user_id, data.chat_id, data.reply_key, held=held)
        except (CompanionError, TimeoutError) as exc:
            error = exc if isinstance(exc, CompanionError) else None
            after = error.context.get("retry_after_s") if error is not None else None
            _log.warning("telegram.delivery_deferred", user_id=data.user_id, message_key=data.reply_key,
                         error=error.code if error is not None else "TIMEOUT",
                         detail=error.message if error is not None else "sending took too long")
            return reply.model_copy(update={"undelivered": type(exc).__name__,
                                             "deliver_after_s": float(after) if after else None})
        return reply.model_copy(update={"delivered": True})

    async def prompt_for(self, data: ComposeReplyInput) -> PreparedTurn:
        """The prompt the LLM gets for the message (persona, the user's quoted memory and what recall found for the
        message, the recent conversation), with what else the turn needs from the same reads."""
        # Recall runs once the context is in, for a user with memories: a new user's first turns (until a remember
        # step has run) skip the embeddings call and the search. Memories of the recent turns are dropped.
        context = await self._context(data)
        found = await self._recall(data) if context.has_memories else []
        context.summary = data.summary
        context.recalled = _within_budget(found, {m.message_key for m in context.recent_messages})
        zone = context.user.timezone_info
        reminder = _read_reminder(data, zone)
        stored = next((m for m in context.recent_messages if m.message_key == data.reply_key), None)
        return PreparedTurn(_prompt(context, data.message_key, _reminder_note(reminder, zone) if reminder else None),
                            zone, reminder, stored)

    async def _context(self, data: ComposeReplyInput) -> UserContextSchema:
        """The user's context; when the step stores the message (``record_sent_at``), read by the statement that
        stores it. The prompt leaves the message out of the conversation either way."""
        if data.record_sent_at is None:
            return await self._repository.get_user_context(data.user_id, message_limit=HISTORY_TURNS + 1)
        try:
            return await self._recorded_context(data, data.record_sent_at)
        except CompanionError as exc:
            # Not retried here, where the attempts are the LLM's: the workflow stores the message in a step of its
            # own, retried as storage steps are, then asks for the reply again.
            exc.retryable = False
            raise

    async def _recorded_context(self, data: ComposeReplyInput, sent_at: datetime) -> UserContextSchema:
        """Store the user's message (once by its key) and read their context, in one statement."""
        message = MessageCreate(message_key=data.message_key, role=Role.USER, content=data.text, channel=data.channel,
                                sent_at=sent_at)
        return await self._repository.get_user_context(data.user_id, message_limit=HISTORY_TURNS + 1, record=message)

    async def _recall(self, data: ComposeReplyInput) -> list[MemoryHit]:
        """Memories that bear on the message, best first; none when memory search fails (the turn goes on)."""
        if self._memory is None:
            return []
        try:
            # Enough candidates that dropping those made of the recent turns still leaves RECALL_K.
            found = await self._memory.search(data.user_id, data.text, k=RECALL_K + HISTORY_TURNS + 1)
        except CompanionError as exc:
            _log.warning("memory.recall_failed", user_id=data.user_id, error=exc.code, detail=exc.message)
            return []
        _log.info("memory.recalled", user_id=data.user_id, candidates=len(found.hits), degraded=found.degraded,
                  duration_ms=round(found.elapsed_ms, 1))
        return found.hits

    @activity.defn(name="remember")
    @translate_errors
    async def remember(self, data: RememberInput) -> Remembered:
        """Keep what the turn said: its messages as searchable memories, then (when on) the LLM's extraction.

        Off the reply's critical path: the workflow runs it after the reply is out. An extraction that fails leaves
        the indexed messages in place; the turn is remembered either way.
        """
        if self._rememberer is None:
            return Remembered()
        user = await self._repository.get_user(data.user_id)
        keys = [key for turn in data.turns for key in turn]  # a key with no stored message is passed over
        indexed, stored = await self._rememberer.index_messages(user, keys)
        said = {message for message, _ in data.turns}
        messages = [message for message in stored if message.message_key in said]  # the user's, not the replies
        if not self._rememberer.extracts or not messages or activity.info().attempt > REMEMBER_EXTRACT_ATTEMPTS:
            return Remembered(memories=indexed)  # past its attempts, the paid call is not made again
        try:
            found = await self._rememberer.extract(user, keys, data.now, data.summary)
        except OpenAIServiceError as exc:
            if exc.retryable and activity.info().attempt < REMEMBER_EXTRACT_ATTEMPTS:
                raise
            _log.warning("memory.extraction_failed", user_id=data.user_id, message_key=data.message_key,
                         error=exc.code, detail=exc.message)
            return Remembered(memories=indexed)
        remembered = await self._rememberer.apply(user, data.message_key, found, data.now)
        _log.info("memory.remembered", user_id=data.user_id, message_key=data.message_key, turns=len(data.turns),
                  memories=indexed, facts=remembered.facts, events=remembered.events,
                  milestones=remembered.milestones, reminders=len(remembered.reminders))
        # A reminder the plain parser already set for one of these messages (compose_reply) is not set twice.
        parsed = any(parse_reminder(message.content, data.now, user.timezone_info) for message in messages)
        reminders = [] if parsed else remembered.reminders
        return remembered.model_copy(update={"memories": indexed, "reminders": reminders, "extracted": True})

    async def _follow_up(self, data: ComposeReplyInput, zone: ZoneInfo) -> Nudge | None:
        """A coming event the message mentions: stored on the timeline (once), and a nudge to ask how it went."""
        event = parse_event(data.text, data.now, zone) if data.now is not None else None
        if event is None:
            return None
        key = derived_key("event", data.message_key)
        await self._repository.add_timeline_event(data.user_id, TimelineEventCreate(
            title=event.what, event_at=event.at, source_keys=[data.message_key], idempotency_key=key))
        local = event.at.astimezone(zone)
        return Nudge(nudge_id=derived_key("follow", data.message_key), at=follow_up_time(event.at, zone),
                     purpose=f"ask how the user's {event.what} on {local:%A %d %B} went",
                     kind=NudgeKind.FOLLOW_UP, created_by=NudgeCreator.COMPANION)

    def _typing(self, data: ComposeReplyInput) -> AbstractAsyncContextManager[None]:
        if data.channel == Channel.TELEGRAM and data.chat_id is not None and self._telegram is not None:
            return self._telegram.typing(data.chat_id)
        return nullcontext()

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [self.ensure_user, self.record_message, self.compose_reply, self.remember]


class PreparedTurn(NamedTuple):
    """What the reply step reads before it asks the LLM."""

    prompt: TurnContext
    zone: ZoneInfo  # the user's time zone
    reminder: Reminder | None  # the reminder the message asks for
    stored_reply: MessageRead | None  # the reply, when an earlier run of the step stored it


@asynccontextmanager
async def _heartbeating(info: activity.Info) -> AsyncIterator[None]:
    """Heartbeat every HEARTBEAT_EVERY_S while the block runs (the worker is alive and the step in hand); a local
    step does not heartbeat (the workflow task it runs in is its lease).

    The first beat comes after HEARTBEAT_EVERY_S, not at once: the heartbeat timeout counts from the start anyway,
    and a reply that comes quickly then costs the server no heartbeat at all.
    """
    if info.is_local:
        yield
        return

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY_S)
            activity.heartbeat()

    async with alongside(beat()):
        yield


def _prompt(context: UserContextSchema, message_key: str, note: str | None = None) -> TurnContext:
    # Fallback replies are failure notices, not conversation: a model shown them tends to repeat them.
    history = [ChatTurn(role=message.role, content=message.content) for message in context.recent_messages
               if message.message_key != message_key and message.role != Role.SYSTEM
               and not message.meta.get("fallback")]
    system_prompt = f"{PERSONA}\n\n{context.to_prompt_context(include_messages=False)}"
    if note:
        system_prompt += f"\n\n{note}"
    return TurnContext(system_prompt=system_prompt, history=history[-HISTORY_TURNS:])


def _within_budget(hits: list[MemoryHit], shown: set[str]) -> list[RecalledMemory]:
    """The best hits not made only of messages the prompt already shows, up to RECALL_K and the prompt budget."""
    recalled, used = [], 0
    for hit in hits:
        if hit.source_keys and set(hit.source_keys) <= shown:
            continue
        if used + len(hit.content) > RECALL_BUDGET_CHARS or len(recalled) == RECALL_K:
            break
        used += len(hit.content)
        recalled.append(RecalledMemory(kind=hit.kind.value, content=hit.content, occurred_at=hit.occurred_at))
    return recalled


def _read_reminder(data: ComposeReplyInput, zone: ZoneInfo) -> Reminder | None:
    found = parse_reminder(data.text, data.now, zone) if data.now is not None else None
    return found if found is not None and found.at > data.now else None


def _reminder(found: Reminder, message_key: str) -> Nudge:
    return Nudge(nudge_id=derived_key("remind", message_key), at=found.at, text=f"⏰ Reminder: {found.what}",
                 kind=NudgeKind.REMINDER, created_by=NudgeCreator.USER)


def _reminder_note(found: Reminder, zone: ZoneInfo) -> str:
    local = found.at.astimezone(zone)
    return (f"You have just set a reminder the user asked for: {quote(found.what)} on {local:%A %d %B at %H:%M} "
            "(their time). Confirm it in one short sentence.")
