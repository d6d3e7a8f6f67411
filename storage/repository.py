"""The memory manager: every read and write of a user's memory, speaking pydantic schemas.

Each write is one transaction, retried whole on transient failures (storage.database.run_transaction); reads, and
the writes of every turn whose statements each stand alone (storing a message, merging its meta), run in autocommit
on one connection, with no BEGIN or COMMIT round trips. Writes that a retried activity may repeat are idempotent by
key: a message key, an idempotency key, a nudge id.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar, Union

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    DateTime,
    Interval,
    ScalarSelect,
    Select,
    String,
    and_,
    bindparam,
    cast,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by, insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from core.errors import InvalidMemoryDataError, RecordNotFoundError, UserNotFoundError
from schemas.context import UserContextSchema
from schemas.memory import (
    TIMEZONE_SOURCE,
    DiaryEntryCreate,
    DiaryEntryRead,
    FactCategory,
    MemoryItem,
    MemoryItemKind,
    MemoryKind,
    MessageCreate,
    MessageRead,
    NudgeStatus,
    ProfileFactCreate,
    ProfileFactRead,
    ScheduledMessageCreate,
    ScheduledMessageRead,
    ScheduledMessageUpdate,
    TimelineEventCreate,
    TimelineEventRead,
    UserCreate,
    UserRead,
    UserUpdate,
)
from schemas.usage import UsageCreate, UsageLine, UsageTotals
from storage.database import run_transaction, translate
from storage.export import USER_TABLES, user_export
from storage.models import (
    Conversation,
    DiaryEntry,
    Memory,
    ProfileFact,
    ScheduledMessage,
    TimelineEvent,
    Usage,
    User,
)

T = TypeVar("T")
# A query builder's argument: a value, or a bound parameter when the statement is built once and executed with values.
Param = Union[T, BindParameter[T]]

# Context sizes: enough for a friend's memory, small enough for a prompt.
CONTEXT_MESSAGES = 20
CONTEXT_EVENTS = 10
CONTEXT_EVENT_HORIZON = timedelta(days=30)
CONTEXT_DIARY = 5
CONTEXT_NUDGES = 5
# What /memory lists of each kind at most: a phone screen's worth.
MEMORY_ITEMS = 30

# A nudge leaves "pending" once; a repeated transition to the same state is a retried write and allowed.
_NUDGE_TRANSITIONS = {
    NudgeStatus.PENDING: {NudgeStatus.PENDING, NudgeStatus.SENT, NudgeStatus.CANCELLED, NudgeStatus.FAILED},
    NudgeStatus.SENT: {NudgeStatus.SENT},
    NudgeStatus.CANCELLED: {NudgeStatus.CANCELLED},
    NudgeStatus.FAILED: {NudgeStatus.FAILED, NudgeStatus.PENDING},
}

# A user seen again: the names given refresh the stored ones. Built once: the `excluded` namespace of an INSERT
# costs ~1 ms of CPU to build for a table this wide, and a first contact built it four times.
_USER_EXCLUDED = insert(User).excluded
_USER_REFRESHED = {**{name: func.coalesce(getattr(_USER_EXCLUDED, name), getattr(User, name))
                      for name in ("username", "first_name", "last_name", "language_code")},
                   "last_seen_at": func.now()}


def _now() -> datetime:
    return datetime.now().astimezone()


def _same_value(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def _merge_keys(old: list[str], new: list[str]) -> list[str]:
    return old + [key for key in new if key not in old]


class MemoryRepository:
    """Reads and writes one PostgreSQL database of users and their memories."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]):
        self._sessions = sessions

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory, for stores that share this database (semantic memory)."""
        return self._sessions

    async def _tx(self, operation: str, work: Callable[[AsyncSession], Awaitable[T]], **context: Any) -> T:
        return await run_transaction(self._sessions, operation, work, **context)

    async def _read(self, operation: str, work: Callable[[AsyncSession], Awaitable[T]], **context: Any) -> T:
        return await run_transaction(self._sessions, operation, work, autocommit=True, **context)

    async def _write_alone(self, operation: str, work: Callable[[AsyncSession], Awaitable[T]], **context: Any) -> T:
        """A write whose statements each stand alone (an idempotent upsert): in autocommit, like a read."""
        return await self._read(operation, work, **context)

    # --- users --------------------------------------------------------------------------------------------------

    async def get_or_create_user(self, data: UserCreate) -> UserRead:
        """The user with this Telegram id, created on first sight; names given here refresh the stored ones."""
        statement = (insert(_USERS).values(**data.model_dump(), last_seen_at=func.now())
                     .on_conflict_do_update(index_elements=[User.telegram_id], set_=_USER_REFRESHED)
                     .returning(*_USERS.c))

        async def work(session: AsyncSession) -> UserRead:
            return UserRead.model_validate((await session.execute(statement)).one())

        # One statement: in autocommit, with no BEGIN and COMMIT around it.
        return await self._write_alone("get_or_create_user", work, telegram_id=data.telegram_id)

    async def add_user_message(self, user: UserCreate, message: MessageCreate) -> UserRead:
        """get_or_create_user and add_message in one statement: the user, created (or created again, when their rows
        are gone) and refreshed, and their message stored once by its key."""
        params = {**{f"u_{name}": value for name, value in user.model_dump().items()},
                  **{f"m_{name}": value for name, value in message.model_dump().items()}}

        async def work(session: AsyncSession) -> UserRead:
            return UserRead.model_validate((await session.execute(_USER_WITH_MESSAGE, params)).one())

        return await self._write_alone("add_user_message", work, telegram_id=user.telegram_id,
                                       message_key=message.message_key)

    async def get_user(self, user_id: int) -> UserRead:
        """The user with this internal id, or UserNotFoundError."""

        async def work(session: AsyncSession) -> UserRead:
            return UserRead.model_validate(await self._user_row(session, user_id))

        return await self._read("get_user", work, user_id=user_id)

    async def get_user_by_telegram_id(self, telegram_id: int) -> UserRead:
        """The user with this Telegram id, or UserNotFoundError."""

        async def work(session: AsyncSession) -> UserRead:
            row = (await session.execute(select(User).where(User.telegram_id == telegram_id))).scalar_one_or_none()
            if row is None:
                raise UserNotFoundError(f"no user with Telegram id {telegram_id}", context={"telegram_id": telegram_id})
            return UserRead.model_validate(row)

        return await self._read("get_user_by_telegram_id", work, telegram_id=telegram_id)

    async def update_user(self, user_id: int, data: UserUpdate) -> UserRead:
        """Apply the fields set in ``data`` to the user."""

        async def work(session: AsyncSession) -> UserRead:
            row = await self._user_row(session, user_id)
            for name, value in data.model_dump(exclude_unset=True).items():
                setattr(row, name, value)
            await session.flush()
            await session.refresh(row)
            return UserRead.model_validate(row)

        return await self._tx("update_user", work, user_id=user_id)

    async def set_timezone(self, user_id: int, zone: str, source: str, moved: dict[str, datetime]) -> UserRead:
        """Set the user's time zone (``source``, who said so, goes in their preferences: the zone is known from then
        on) and the new times of their pending nudges that move with it, in one transaction."""

        async def work(session: AsyncSession) -> UserRead:
            user = await _update_user(session, user_id, timezone=zone,
                                      preferences=_merged_preferences({TIMEZONE_SOURCE: source}))
            for nudge_id, at in moved.items():
                await session.execute(update(ScheduledMessage).where(
                    ScheduledMessage.nudge_id == nudge_id, ScheduledMessage.user_id == user_id,
                    ScheduledMessage.status == NudgeStatus.PENDING.value).values(scheduled_for=at))
            return user

        return await self._tx("set_timezone", work, user_id=user_id, zone=zone)

    async def set_preferences(self, user_id: int, changes: dict[str, Any]) -> UserRead:
        """Merge ``changes`` into the user's preferences (a None value drops its key), in one statement: a write
        never overtakes another's read of them."""

        async def work(session: AsyncSession) -> UserRead:
            return await _update_user(session, user_id, preferences=_merged_preferences(changes))

        return await self._tx("set_preferences", work, user_id=user_id, keys=sorted(changes))

    async def set_user_active(self, user_id: int, active: bool, reason: str | None = None) -> int:
        """Mark a user reachable or not; an unreachable user's pending nudges are cancelled. Returns how many."""

        async def work(session: AsyncSession) -> int:
            await session.execute(update(User).where(User.id == user_id).values(is_active=active))
            if active:
                return 0
            cancelled = await session.execute(
                update(ScheduledMessage)
                .where(ScheduledMessage.user_id == user_id, ScheduledMessage.status == NudgeStatus.PENDING.value)
                .values(status=NudgeStatus.CANCELLED.value, cancelled_at=_now(), error=reason))
            return cancelled.rowcount

        return await self._tx("set_user_active", work, user_id=user_id, active=active)

    async def delete_user_by_telegram_id(self, telegram_id: int) -> bool:
        """Erase a user and every row of theirs: the tables of storage.export.USER_TABLES, what /export hands them;
        False when there was no such user."""

        async def work(session: AsyncSession) -> bool:
            user_id = (await session.execute(select(User.id).where(User.telegram_id == telegram_id)
                                             .with_for_update())).scalar_one_or_none()
            if user_id is None:
                return False
            for model in USER_TABLES:
                await session.execute(delete(model).where(model.user_id == user_id))
            await session.execute(delete(User).where(User.id == user_id))
            return True

        return await self._tx("delete_user", work, telegram_id=telegram_id)

    async def export_user(self, telegram_id: int, now: datetime | None = None) -> dict[str, Any] | None:
        """Everything kept of the user (storage.export), as one JSON-ready document; None when there is no such
        user."""

        async def work(session: AsyncSession) -> dict[str, Any] | None:
            return await user_export(session, telegram_id, now or _now())

        return await self._read("export_user", work, telegram_id=telegram_id)

    @staticmethod
    async def _user_row(session: AsyncSession, user_id: int, lock: bool = False) -> User:
        statement = select(User).where(User.id == user_id)
        row = (await session.execute(statement.with_for_update() if lock else statement)).scalar_one_or_none()
        if row is None:
            raise UserNotFoundError(f"no user with id {user_id}", context={"user_id": user_id})
        return row

    # --- profile facts ------------------------------------------------------------------------------------------

    async def upsert_profile_fact(self, user_id: int, data: ProfileFactCreate) -> ProfileFactRead:
        """Store a fact by (category, key): the same value merges provenance, a new value supersedes the old one.

        A superseded value is kept with its valid_to set, so the user's history is never silently lost.
        """

        async def work(session: AsyncSession) -> ProfileFactRead:
            # Locking the user row serialises concurrent writes of the same fact.
            await self._user_row(session, user_id, lock=True)
            current = (await session.execute(
                select(ProfileFact).where(ProfileFact.user_id == user_id, ProfileFact.category == data.category.value,
                                          ProfileFact.key == data.key, ProfileFact.valid_to.is_(None))
            )).scalar_one_or_none()
            if current is not None and _same_value(current.value, data.value):
                current.source_keys = _merge_keys(current.source_keys, data.source_keys)
                current.confidence = max(current.confidence, data.confidence)
                await session.flush()
                await session.refresh(current)
                return ProfileFactRead.model_validate(current)
            now = _now()
            if current is not None:
                current.valid_to = now
                await session.flush()
            fact = ProfileFact(user_id=user_id, **data.model_dump(), valid_from=now)
            session.add(fact)
            await session.flush()
            await session.refresh(fact)
            return ProfileFactRead.model_validate(fact)

        return await self._tx("upsert_profile_fact", work, user_id=user_id, category=data.category.value,
                              key=data.key)

    async def list_profile_facts(self, user_id: int, category: FactCategory | None = None,
                                 include_history: bool = False) -> list[ProfileFactRead]:
        """The user's current facts (and superseded ones with include_history), by category and key."""

        async def work(session: AsyncSession) -> list[ProfileFactRead]:
            return await _facts(session, user_id, category, include_history)

        return await self._read("list_profile_facts", work, user_id=user_id)

    async def delete_profile_fact(self, user_id: int, fact_id: int) -> None:
        """Forget one fact (every version of it stays unless deleted one by one)."""

        async def work(session: AsyncSession) -> None:
            row = (await session.execute(select(ProfileFact).where(ProfileFact.id == fact_id,
                                                                   ProfileFact.user_id == user_id)))
            fact = row.scalar_one_or_none()
            if fact is None:
                raise RecordNotFoundError(f"no fact {fact_id} for user {user_id}",
                                          context={"user_id": user_id, "fact_id": fact_id})
            await session.delete(fact)

        await self._tx("delete_profile_fact", work, user_id=user_id, fact_id=fact_id)

    # --- what the user sees of their memory ----------------------------------------------------------------------

    async def memory_items(self, user_id: int, now: datetime | None = None) -> list[MemoryItem]:
        """What the companion knows of the user, as they may see and correct it (/memory): current facts by category
        and key, coming events, diary entries (newest first), pending nudges; each with when and from which message
        it was learned. At most MEMORY_ITEMS of each kind."""
        start = now or _now()

        async def work(session: AsyncSession) -> list[MemoryItem]:
            facts = (await _facts(session, user_id))[:MEMORY_ITEMS]
            events = await _events_between(session, user_id, start, start + timedelta(days=3_650), MEMORY_ITEMS)
            diary = await _recent_diary(session, user_id, MEMORY_ITEMS)
            nudges = await _nudges(session, user_id, NudgeStatus.PENDING, MEMORY_ITEMS)
            first_sources = [item.source_keys[0] for item in [*facts, *events, *diary, *nudges] if item.source_keys]
            said = dict((await session.execute(select(Conversation.message_key, Conversation.content).where(
                Conversation.user_id == user_id, Conversation.message_key.in_(first_sources)))).all())

            def source(keys: list[str]) -> str | None:
                return said.get(keys[0]) if keys else None

            return [
                *(MemoryItem(ref=f"fact:{f.id}", kind=MemoryItemKind.FACT, learned_at=f.valid_from,
                             text=f"{f.key.replace('_', ' ')} ({f.category.value}): {f.value}",
                             source=source(f.source_keys)) for f in facts),
                *(MemoryItem(ref=f"event:{e.id}", kind=MemoryItemKind.EVENT, text=e.title, at=e.event_at,
                             learned_at=e.created_at, source=source(e.source_keys)) for e in events),
                *(MemoryItem(ref=f"diary:{d.id}", kind=MemoryItemKind.DIARY, text=f"{d.title}: {d.content}",
                             at=d.occurred_at, learned_at=d.created_at, source=source(d.source_keys))
                  for d in diary),
                *(MemoryItem(ref=f"nudge:{n.nudge_id}", kind=MemoryItemKind.NUDGE, text=n.content or n.purpose or "",
                             at=n.scheduled_for, learned_at=n.created_at, source=source(n.source_keys))
                  for n in nudges)]

        return await self._read("memory_items", work, user_id=user_id)

    async def forget_memory_item(self, user_id: int, ref: str) -> list[int]:
        """Delete a fact (every version of it), an event or a diary entry by its /memory ref, with the memories made
        of it and the conversation memories around the messages it was learned from that repeat it (their text
        holds its value or title), which recall would otherwise bring back. Returns the ids of the memories deleted
        (their vectors are the memory index's to delete); RecordNotFoundError when the item is gone."""
        kind, _, number = ref.partition(":")
        models = {MemoryItemKind.FACT.value: ProfileFact, MemoryItemKind.EVENT.value: TimelineEvent,
                  MemoryItemKind.DIARY.value: DiaryEntry}
        if kind not in models or not number.isdigit():
            raise InvalidMemoryDataError(f"{ref!r} is not a fact, event or diary entry of /memory",
                                         context={"ref": ref[:100]})

        async def work(session: AsyncSession) -> list[int]:
            model = models[kind]
            row = (await session.execute(select(model).where(model.id == int(number), model.user_id == user_id)
                                         .with_for_update())).scalar_one_or_none()
            if row is None:
                raise RecordNotFoundError(f"nothing remembered as {ref}", context={"user_id": user_id, "ref": ref})
            if isinstance(row, ProfileFact):
                versions = select(ProfileFact).where(ProfileFact.user_id == user_id,
                                                     ProfileFact.category == row.category, ProfileFact.key == row.key)
                rows, said = list((await session.execute(versions)).scalars()), row.value
                # the current value's memory and those of the values it superseded
                own = [f"fact:{row.category}:{row.key}", *(f"fact:{row.category}:{row.key}:{v.id}" for v in rows)]
            else:
                rows, said = [row], row.title
                own = [f"{kind}:{row.idempotency_key}"] if row.idempotency_key else []
            sources = sorted({key for version in rows for key in version.source_keys})
            repeating = or_(Memory.memory_key.in_(own), and_(
                Memory.kind == MemoryKind.CONVERSATION.value, Memory.source_keys.overlap(sources),
                Memory.content.icontains(said, autoescape=True)))
            deleted = await session.execute(delete(Memory).where(Memory.user_id == user_id, repeating)
                                            .returning(Memory.id))
            for version in rows:
                await session.delete(version)
            return list(deleted.scalars())

        return await self._tx("forget_memory_item", work, user_id=user_id, ref=ref)

    # --- conversations ------------------------------------------------------------------------------------------

    async def add_message(self, user_id: int, data: MessageCreate) -> MessageRead:
        """Store a message once: writing the same message key again returns the row already stored."""
        params = {**data.model_dump(), "user_id": user_id}

        async def work(session: AsyncSession) -> MessageRead:
            inserted = (await session.execute(_INSERT_MESSAGE, params)).one_or_none()
            if inserted is not None:
                return MessageRead.model_validate(inserted)
            stored = (await session.execute(_SELECT_MESSAGE, {"owner": user_id, "key": data.message_key})).one()
            return MessageRead.model_validate(stored)

        # The insert stands alone, and the read after it only finds a row an earlier write committed.
        return await self._write_alone("add_message", work, user_id=user_id, message_key=data.message_key)

    async def get_message(self, user_id: int, message_key: str) -> MessageRead | None:
        """The message stored under this key, if any."""

        async def work(session: AsyncSession) -> MessageRead | None:
            row = (await session.execute(_SELECT_MESSAGE, {"owner": user_id, "key": message_key})).one_or_none()
            return None if row is None else MessageRead.model_validate(row)

        return await self._read("get_message", work, user_id=user_id, message_key=message_key)

    async def update_message_meta(self, user_id: int, message_key: str, meta: dict[str, Any]) -> None:
        """Merge ``meta`` into a stored message's meta (delivery progress, for one)."""

        async def work(session: AsyncSession) -> None:
            await session.execute(_MERGE_MESSAGE_META, {"owner": user_id, "key": message_key, "merged": meta})

        await self._write_alone("update_message_meta", work, user_id=user_id, message_key=message_key)

    async def claim_message(self, user_id: int, message_key: str, claim: str,
                            lease: timedelta) -> tuple[MessageRead | None, bool]:
        """Take a stored message for ``lease`` (its meta key ``claim`` says until when), unless a claim of another
        caller is alive: (the message, whether this caller holds it now); (None, False) when no message has the key.

        One statement: of two callers at once, the second waits for the first's claim and finds it taken.
        """

        async def work(session: AsyncSession) -> tuple[MessageRead | None, bool]:
            return await _claim_stored(session, user_id, message_key, claim, lease)

        return await self._write_alone("claim_message", work, user_id=user_id, message_key=message_key)

    async def add_claimed_message(self, user_id: int, data: MessageCreate, claim: str,
                                  lease: timedelta) -> tuple[MessageRead, bool]:
        """add_message and claim_message in one statement: the message stored once and taken for ``lease``, for a
        caller that sends it right away. (the message, whether this caller holds it); a message stored before is
        claimed as claim_message claims it."""
        params = {**data.model_dump(exclude={"meta"}), "user_id": user_id, "given_meta": data.meta, "claim": claim,
                  "lease": lease}

        async def work(session: AsyncSession) -> tuple[MessageRead, bool]:
            inserted = (await session.execute(_INSERT_CLAIMED_MESSAGE, params)).one_or_none()
            if inserted is not None:
                return MessageRead.model_validate(inserted), True
            stored, claimed = await _claim_stored(session, user_id, data.message_key, claim, lease)
            assert stored is not None  # the insert found it
            return stored, claimed

        return await self._write_alone("add_claimed_message", work, user_id=user_id, message_key=data.message_key)

    async def release_message(self, user_id: int, message_key: str, claim: str, meta: dict[str, Any]) -> None:
        """End a claim on a stored message, merging ``meta`` (what was done under it) in the same statement."""

        async def work(session: AsyncSession) -> None:
            await session.execute(_RELEASE_MESSAGE, {"owner": user_id, "key": message_key, "claim": claim,
                                                     "merged": meta})

        await self._write_alone("release_message", work, user_id=user_id, message_key=message_key)

    async def notify(self, channel: str, payload: str) -> None:
        """Send ``payload`` (at most 8,000 bytes) to whoever listens on ``channel`` now (PostgreSQL NOTIFY): a
        message to the moment, not stored."""

        async def work(session: AsyncSession) -> None:
            await session.execute(select(func.pg_notify(channel, payload)))

        await self._write_alone("notify", work, channel=channel)

    @asynccontextmanager
    async def listening(self, channel: str) -> AsyncIterator[asyncio.Queue[str]]:
        """The payloads sent to ``channel`` (``notify``) while the block runs, in the order they were sent; the block
        holds one connection of the pool."""
        engine = self._sessions.kw["bind"]
        heard: asyncio.Queue[str] = asyncio.Queue()

        def received(_connection: object, _pid: int, _channel: str, payload: str) -> None:
            heard.put_nowait(payload)

        async with AsyncExitStack() as stack:
            try:
                connection = await stack.enter_async_context(engine.connect())
                driver = (await connection.get_raw_connection()).driver_connection
                await driver.add_listener(channel, received)
            except (SQLAlchemyError, OSError) as exc:
                raise translate(exc, "listen", {"channel": channel}) from exc
            stack.push_async_callback(driver.remove_listener, channel, received)
            yield heard

    async def recent_messages(self, user_id: int, limit: int = CONTEXT_MESSAGES) -> list[MessageRead]:
        """The last ``limit`` messages, oldest first."""

        async def work(session: AsyncSession) -> list[MessageRead]:
            return await _recent_messages(session, user_id, limit)

        return await self._read("recent_messages", work, user_id=user_id)

    # --- timeline events ----------------------------------------------------------------------------------------

    async def add_timeline_event(self, user_id: int, data: TimelineEventCreate) -> TimelineEventRead:
        """Store an event; with an idempotency key, a repeated write returns the stored event."""
        return await self._insert_once(TimelineEvent, TimelineEventRead, "add_timeline_event", user_id, data)

    async def upcoming_events(self, user_id: int, now: datetime | None = None,
                              within: timedelta = CONTEXT_EVENT_HORIZON,
                              limit: int = CONTEXT_EVENTS) -> list[TimelineEventRead]:
        """Events from now until ``within`` ahead, soonest first."""
        start = now or _now()
        return await self.events_between(user_id, start, start + within, limit=limit)

    async def events_between(self, user_id: int, start: datetime, end: datetime,
                             limit: int = 100) -> list[TimelineEventRead]:
        """Events with start <= event_at < end, in time order."""
        if start.tzinfo is None or end.tzinfo is None:
            raise InvalidMemoryDataError("event ranges need timezone-aware datetimes",
                                         context={"start": start, "end": end})

        async def work(session: AsyncSession) -> list[TimelineEventRead]:
            return await _events_between(session, user_id, start, end, limit)

        return await self._read("events_between", work, user_id=user_id)

    # --- diary --------------------------------------------------------------------------------------------------

    async def add_diary_entry(self, user_id: int, data: DiaryEntryCreate) -> DiaryEntryRead:
        """Store a diary entry; with an idempotency key, a repeated write returns the stored entry."""
        return await self._insert_once(DiaryEntry, DiaryEntryRead, "add_diary_entry", user_id, data)

    async def recent_diary_entries(self, user_id: int, limit: int = CONTEXT_DIARY) -> list[DiaryEntryRead]:
        """The latest diary entries, newest first."""

        async def work(session: AsyncSession) -> list[DiaryEntryRead]:
            return await _recent_diary(session, user_id, limit)

        return await self._read("recent_diary_entries", work, user_id=user_id)

    async def _insert_once(self, model: type, read: type[T], operation: str, user_id: int, data: Any) -> T:
        values = {"user_id": user_id, **data.model_dump()}
        key = values.get("idempotency_key")

        async def work(session: AsyncSession) -> T:
            statement = insert(model).values(**values)
            if key is not None:
                statement = statement.on_conflict_do_nothing(index_elements=[model.user_id, model.idempotency_key])
            row = (await session.execute(statement.returning(model))).scalar_one_or_none()
            if row is None:
                row = (await session.execute(select(model).where(model.user_id == user_id,
                                                                  model.idempotency_key == key))).scalar_one()
            return read.model_validate(row)

        return await self._tx(operation, work, user_id=user_id, idempotency_key=key)

    # --- scheduled messages -------------------------------------------------------------------------------------

    async def create_scheduled_message(self, user_id: int, data: ScheduledMessageCreate) -> ScheduledMessageRead:
        """Record a nudge; creating the same nudge id again returns the stored record."""
        if data.content is None and data.purpose is None:
            raise InvalidMemoryDataError("a scheduled message needs its text or a purpose",
                                         context={"nudge_id": data.nudge_id})

        async def work(session: AsyncSession) -> ScheduledMessageRead:
            row = (await session.execute(
                insert(ScheduledMessage).values(user_id=user_id, **data.model_dump())
                .on_conflict_do_nothing(index_elements=[ScheduledMessage.nudge_id]).returning(ScheduledMessage)
            )).scalar_one_or_none()
            if row is None:
                row = await self._nudge_row(session, data.nudge_id)
                if row.user_id != user_id:
                    raise InvalidMemoryDataError("that nudge id belongs to another user",
                                                 context={"nudge_id": data.nudge_id, "user_id": user_id})
            return ScheduledMessageRead.model_validate(row)

        return await self._tx("create_scheduled_message", work, user_id=user_id, nudge_id=data.nudge_id)

    async def replace_scheduled_message(self, user_id: int, replaces: str | None,
                                        data: ScheduledMessageCreate) -> ScheduledMessageRead:
        """Cancel the pending nudge ``replaces`` (if still pending) and record ``data``, in one statement."""

        params = {**{f"new_{name}": value for name, value in data.model_dump().items()}, "owner": user_id,
                  "replaces": replaces, "now": _now(), "why": f"replaced by {data.nudge_id}"}

        async def work(session: AsyncSession) -> ScheduledMessageRead:
            row = (await session.execute(_REPLACE_NUDGE, params)).one_or_none()
            if row is None:  # stored by a call running at the same time, after this statement's snapshot
                return ScheduledMessageRead.model_validate(await self._nudge_row(session, data.nudge_id))
            return ScheduledMessageRead.model_validate(row)

        # One statement, so all or nothing without a transaction around it: in autocommit.
        return await self._write_alone("replace_scheduled_message", work, user_id=user_id, nudge_id=data.nudge_id)

    async def get_scheduled_message(self, nudge_id: str) -> ScheduledMessageRead:
        """The nudge with this id, or RecordNotFoundError."""

        async def work(session: AsyncSession) -> ScheduledMessageRead:
            return ScheduledMessageRead.model_validate(await self._nudge_row(session, nudge_id))

        return await self._read("get_scheduled_message", work, nudge_id=nudge_id)

    async def update_scheduled_message(self, nudge_id: str, data: ScheduledMessageUpdate) -> ScheduledMessageRead:
        """Change a nudge's status, time or text; a status leaves pending once (repeating it is a no-op)."""

        async def work(session: AsyncSession) -> ScheduledMessageRead:
            row = await self._nudge_row(session, nudge_id, lock=True)
            changes = data.model_dump(exclude_unset=True)
            status = changes.get("status")
            if status is not None:
                current = NudgeStatus(row.status)
                if status not in _NUDGE_TRANSITIONS[current]:
                    raise InvalidMemoryDataError(f"nudge {nudge_id} is {current.value}; it cannot become {status.value}",
                                                 context={"nudge_id": nudge_id, "status": current.value})
                if status != current:
                    stamp = {NudgeStatus.SENT: "sent_at", NudgeStatus.CANCELLED: "cancelled_at"}.get(status)
                    if stamp:
                        changes[stamp] = _now()
                changes["status"] = status.value
            await session.execute(update(ScheduledMessage).where(ScheduledMessage.id == row.id).values(**changes))
            await session.refresh(row)
            return ScheduledMessageRead.model_validate(row)

        return await self._tx("update_scheduled_message", work, nudge_id=nudge_id)

    async def list_scheduled_messages(self, user_id: int | None = None, status: NudgeStatus | None = None,
                                      limit: int = 100) -> list[ScheduledMessageRead]:
        """Nudges, soonest first, optionally for one user and one status."""

        async def work(session: AsyncSession) -> list[ScheduledMessageRead]:
            return await _nudges(session, user_id, status, limit)

        return await self._read("list_scheduled_messages", work, user_id=user_id)

    async def delete_scheduled_message(self, nudge_id: str) -> None:
        """Remove a nudge's record entirely (cancelling keeps it; this is for erasing a user's data)."""

        async def work(session: AsyncSession) -> None:
            await session.delete(await self._nudge_row(session, nudge_id))

        await self._tx("delete_scheduled_message", work, nudge_id=nudge_id)

    @staticmethod
    async def _nudge_row(session: AsyncSession, nudge_id: str, lock: bool = False) -> ScheduledMessage:
        statement = select(ScheduledMessage).where(ScheduledMessage.nudge_id == nudge_id)
        row = (await session.execute(statement.with_for_update() if lock else statement)).scalar_one_or_none()
        if row is None:
            raise RecordNotFoundError(f"no nudge {nudge_id}", context={"nudge_id": nudge_id})
        return row

    # --- usage ----------------------------------------------------------------------------------------------------

    async def record_usage(self, rows: list[UsageCreate]) -> int:
        """Store model calls; a call stored before (by its idempotency key) is not counted again. Returns how
        many were new."""
        if not rows:
            return 0

        async def work(session: AsyncSession) -> int:
            stored = await session.execute(
                insert(Usage).values([row.model_dump(mode="json") for row in rows])
                .on_conflict_do_nothing(index_elements=[Usage.idempotency_key]).returning(Usage.id))
            return len(stored.all())

        return await self._write_alone("record_usage", work, calls=len(rows))

    async def usage_totals(self, telegram_id: int | None, since: datetime,
                           until: datetime | None = None) -> UsageTotals:
        """What the user's calls (everyone's, for None) since ``since`` (until ``until``) consumed and cost."""
        [line] = await self.usage_report(telegram_id, since, until, by=None) or [UsageLine(group="")]
        return UsageTotals(**line.model_dump(exclude={"group"}))

    async def usage_report(self, telegram_id: int | None, since: datetime | None, until: datetime | None = None,
                           by: str | None = "day", zone: str = "UTC") -> list[UsageLine]:
        """Usage totals grouped ``by`` day (in ``zone``), model, kind or user (None: one line of everything),
        oldest day, or largest cost, first."""
        groups = {None: literal(""), "model": Usage.model, "kind": Usage.kind,
                  "user": cast(Usage.telegram_id, String),
                  "day": func.to_char(func.timezone(zone, Usage.created_at), "YYYY-MM-DD")}
        group = groups[by].label("group")
        statement = select(
            group, func.count().label("calls"),
            func.coalesce(func.sum(Usage.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(Usage.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(Usage.audio_seconds), 0.0).label("audio_seconds"),
            func.coalesce(func.sum(Usage.images), 0).label("images"),
            func.coalesce(func.sum(Usage.cost_usd), 0.0).label("cost_usd"),
            func.count().filter(~Usage.priced).label("unpriced_calls")).group_by(group)
        if telegram_id is not None:
            statement = statement.where(Usage.telegram_id == telegram_id)
        if since is not None:
            statement = statement.where(Usage.created_at >= since)
        if until is not None:
            statement = statement.where(Usage.created_at < until)
        statement = statement.order_by(group if by == "day" else func.sum(Usage.cost_usd).desc(), group)

        async def work(session: AsyncSession) -> list[UsageLine]:
            return [UsageLine(**row._asdict()) for row in await session.execute(statement)]

        return await self._read("usage_report", work, telegram_id=telegram_id)

    async def usage_users(self, since: datetime) -> int:
        """How many users made a model call since ``since``."""

        async def work(session: AsyncSession) -> int:
            return (await session.execute(select(func.count(func.distinct(Usage.telegram_id)))
                                          .where(Usage.created_at >= since))).scalar_one()

        return await self._read("usage_users", work)

    # --- the context of a turn ----------------------------------------------------------------------------------

    async def get_user_context(self, user_id: int, message_limit: int = CONTEXT_MESSAGES,
                               now: datetime | None = None) -> UserContextSchema:
        """Everything the prompt needs about a user, in one statement.

        PostgreSQL gathers the user, facts, upcoming events, diary, pending nudges and recent messages as JSON
        arrays of one row, and whether the user has any memory to search: one round trip instead of seven, and no
        ORM objects to build.
        """
        start = now or _now()
        params = {"user_id": user_id, "start": start, "end": start + CONTEXT_EVENT_HORIZON,
                  "message_limit": message_limit}

        async def work(session: AsyncSession) -> UserContextSchema:
            user, facts, events, diary, nudges, messages, remembered = (await session.execute(_CONTEXT, params)).one()
            if not user:
                raise UserNotFoundError(f"no user with id {user_id}", context={"user_id": user_id})
            return UserContextSchema(user=UserRead.model_validate(user[0]), facts=facts, upcoming_events=events,
                                     diary_entries=diary, pending_nudges=nudges, recent_messages=messages,
                                     has_memories=remembered)

        return await self._read("get_user_context", work, user_id=user_id)


# --- reads shared by the methods above and the turn's context ---------------------------------------------------

def _json_rows(statement: Select, order: Callable[[ReadOnlyColumnCollection], list[Any]]) -> ScalarSelect:
    """The rows of ``statement`` as one JSON array (empty when none) in ``order``, for one column of a larger
    SELECT. Each row is an object keyed by column name, as the read schemas' fields are."""
    rows = statement.subquery()
    return (select(func.coalesce(func.json_agg(aggregate_order_by(rows.table_valued(), *order(rows.c))),
                                 literal_column("'[]'::json")))
            .select_from(rows).scalar_subquery())


def _facts_query(user_id: Param[int], category: FactCategory | None = None,
                 include_history: bool = False) -> Select:
    statement = select(ProfileFact).where(ProfileFact.user_id == user_id)
    if category is not None:
        statement = statement.where(ProfileFact.category == category.value)
    if not include_history:
        statement = statement.where(ProfileFact.valid_to.is_(None))
    return statement.order_by(ProfileFact.category, ProfileFact.key, ProfileFact.valid_from)


def _messages_query(user_id: Param[int], limit: Param[int]) -> Select:
    """The user's last ``limit`` messages, newest first."""
    return (select(Conversation).where(Conversation.user_id == user_id)
            .order_by(Conversation.sent_at.desc(), Conversation.id.desc()).limit(limit))


def _events_query(user_id: Param[int], start: Param[datetime], end: Param[datetime], limit: int) -> Select:
    return (select(TimelineEvent).where(TimelineEvent.user_id == user_id, TimelineEvent.event_at >= start,
                                        TimelineEvent.event_at < end)
            .order_by(TimelineEvent.event_at, TimelineEvent.id).limit(limit))


def _diary_query(user_id: Param[int], limit: int) -> Select:
    return (select(DiaryEntry).where(DiaryEntry.user_id == user_id)
            .order_by(DiaryEntry.occurred_at.desc(), DiaryEntry.id.desc()).limit(limit))


def _nudges_query(user_id: Param[int] | None, status: NudgeStatus | None, limit: int) -> Select:
    statement = select(ScheduledMessage)
    if user_id is not None:
        statement = statement.where(ScheduledMessage.user_id == user_id)
    if status is not None:
        statement = statement.where(ScheduledMessage.status == status.value)
    return statement.order_by(ScheduledMessage.scheduled_for, ScheduledMessage.id).limit(limit)


_USER_ID = bindparam("user_id")
# The turn's context as one statement, built once (SQLAlchemy then finds its compiled form at once): each part is
# the query its own reader uses, as a JSON array in that query's order.
_CONTEXT = select(
    _json_rows(select(User).where(User.id == _USER_ID), lambda rows: [rows.id]),
    _json_rows(_facts_query(_USER_ID), lambda rows: [rows.category, rows.key, rows.valid_from]),
    _json_rows(_events_query(_USER_ID, bindparam("start"), bindparam("end"), CONTEXT_EVENTS),
               lambda rows: [rows.event_at, rows.id]),
    _json_rows(_diary_query(_USER_ID, CONTEXT_DIARY), lambda rows: [rows.occurred_at.desc(), rows.id.desc()]),
    _json_rows(_nudges_query(_USER_ID, NudgeStatus.PENDING, CONTEXT_NUDGES),
               lambda rows: [rows.scheduled_for, rows.id]),
    _json_rows(_messages_query(_USER_ID, bindparam("message_limit")), lambda rows: [rows.sent_at, rows.id]),
    select(Memory.id).where(Memory.user_id == _USER_ID).exists())


# The statements of a turn's messages, built once and run on the table rather than through the ORM: a turn stores
# its two messages, and delivery claims the reply (reading it back) and merges its progress into the meta.
_MESSAGES = Conversation.__table__
# Bound names other than the columns': an UPDATE takes a column's own name for a value to SET.
_IS_MESSAGE = (_MESSAGES.c.user_id == bindparam("owner")) & (_MESSAGES.c.message_key == bindparam("key"))
_INSERT_MESSAGE = (insert(_MESSAGES).on_conflict_do_nothing(index_elements=["user_id", "message_key"])
                   .returning(*_MESSAGES.c))
_SELECT_MESSAGE = select(_MESSAGES).where(_IS_MESSAGE)
_MERGE_MESSAGE_META = (update(_MESSAGES).where(_IS_MESSAGE)
                       .values(meta=_MESSAGES.c.meta.op("||")(bindparam("merged", type_=JSONB))))
# A check-in moved (replace_scheduled_message) as one statement: the pending nudge it replaces cancelled, the new one
# stored once by its id, and the new one's row returned (the query sees the table as it was before the statement,
# so a nudge stored earlier is read from the table, one stored now from the INSERT). No bound name is a column's:
# SQLAlchemy would add such a value to the SET and VALUES of every INSERT and UPDATE in the statement.
_NUDGES = ScheduledMessage.__table__
_NUDGE_STORED = (insert(_NUDGES)
                 .values(user_id=bindparam("owner"),
                         **{name: bindparam(f"new_{name}") for name in ScheduledMessageCreate.model_fields})
                 .on_conflict_do_nothing(index_elements=["nudge_id"]).returning(*_NUDGES.c).cte("stored"))
_REPLACE_NUDGE = (
    select(*_NUDGE_STORED.c)
    .add_cte(update(_NUDGES)
             .where(_NUDGES.c.nudge_id == bindparam("replaces"), _NUDGES.c.user_id == bindparam("owner"),
                    _NUDGES.c.status == NudgeStatus.PENDING.value)
             .values(status=NudgeStatus.CANCELLED.value, cancelled_at=bindparam("now"), error=bindparam("why"))
             .cte("cancelled"))
    .union_all(select(_NUDGES).where(_NUDGES.c.nudge_id == bindparam("new_nudge_id"),
                                     ~select(_NUDGE_STORED.c.id).exists())))
_USERS = User.__table__
# A turn's first write (add_user_message): the user upserted as get_or_create_user does, and the message inserted
# once by its key for that user, by a data-modifying WITH. Bound names are prefixed: none may be a column's.
_KNOWN_USER = (insert(_USERS)
               .values(**{name: bindparam(f"u_{name}") for name in UserCreate.model_fields}, last_seen_at=func.now())
               .on_conflict_do_update(index_elements=[User.telegram_id], set_=_USER_REFRESHED)
               .returning(*_USERS.c).cte("known"))
_USER_WITH_MESSAGE = select(*_KNOWN_USER.c).add_cte(
    insert(_MESSAGES)
    .from_select(["user_id", *MessageCreate.model_fields],
                 select(_KNOWN_USER.c.id, *(bindparam(f"m_{name}", type_=_MESSAGES.c[name].type)
                                            for name in MessageCreate.model_fields)))
    .on_conflict_do_nothing(index_elements=["user_id", "message_key"]).cte("recorded"))
# A claim is the meta key it names, holding the time (PostgreSQL's clock) it lapses at.
_CLAIM = bindparam("claim", type_=String)
_CLAIMED = func.jsonb_build_object(_CLAIM, func.now() + bindparam("lease", type_=Interval))
_CLAIM_MESSAGE = (
    update(_MESSAGES)
    .where(_IS_MESSAGE, or_(_MESSAGES.c.meta.op("->>")(_CLAIM).is_(None),
                            cast(_MESSAGES.c.meta.op("->>")(_CLAIM), DateTime(timezone=True)) <= func.now()))
    .values(meta=_MESSAGES.c.meta.op("||")(_CLAIMED))
    .returning(*_MESSAGES.c))
_RELEASE_MESSAGE = (update(_MESSAGES).where(_IS_MESSAGE)
                    .values(meta=_MESSAGES.c.meta.op("-")(_CLAIM).op("||")(bindparam("merged", type_=JSONB))))
_INSERT_CLAIMED_MESSAGE = (insert(_MESSAGES).values(meta=bindparam("given_meta", type_=JSONB).op("||")(_CLAIMED))
                           .on_conflict_do_nothing(index_elements=["user_id", "message_key"])
                           .returning(*_MESSAGES.c))


async def _claim_stored(session: AsyncSession, user_id: int, message_key: str, claim: str,
                        lease: timedelta) -> tuple[MessageRead | None, bool]:
    params = {"owner": user_id, "key": message_key}
    row = (await session.execute(_CLAIM_MESSAGE, {**params, "claim": claim, "lease": lease})).one_or_none()
    if row is not None:
        return MessageRead.model_validate(row), True
    row = (await session.execute(_SELECT_MESSAGE, params)).one_or_none()
    return (None if row is None else MessageRead.model_validate(row)), False


async def _update_user(session: AsyncSession, user_id: int, **values: Any) -> UserRead:
    row = (await session.execute(update(User).where(User.id == user_id).values(**values)
                                 .returning(User))).scalar_one_or_none()
    if row is None:
        raise UserNotFoundError(f"no user with id {user_id}", context={"user_id": user_id})
    return UserRead.model_validate(row)


def _merged_preferences(changes: dict[str, Any]) -> ColumnElement[Any]:
    """users.preferences with ``changes`` merged in by PostgreSQL (jsonb ``-`` and ``||``); None drops a key."""
    merged: ColumnElement[Any] = User.preferences
    for key in (key for key, value in changes.items() if value is None):
        merged = merged.op("-")(literal(key))
    kept = {key: value for key, value in changes.items() if value is not None}
    return merged.op("||")(literal(kept, type_=JSONB)) if kept else merged


async def _facts(session: AsyncSession, user_id: int, category: FactCategory | None = None,
                 include_history: bool = False) -> list[ProfileFactRead]:
    rows = (await session.execute(_facts_query(user_id, category, include_history))).scalars()
    return [ProfileFactRead.model_validate(row) for row in rows]


async def _recent_messages(session: AsyncSession, user_id: int, limit: int) -> list[MessageRead]:
    rows = (await session.execute(_messages_query(user_id, limit))).scalars().all()
    return [MessageRead.model_validate(row) for row in reversed(rows)]


async def _events_between(session: AsyncSession, user_id: int, start: datetime, end: datetime,
                          limit: int) -> list[TimelineEventRead]:
    rows = (await session.execute(_events_query(user_id, start, end, limit))).scalars()
    return [TimelineEventRead.model_validate(row) for row in rows]


async def _recent_diary(session: AsyncSession, user_id: int, limit: int) -> list[DiaryEntryRead]:
    rows = (await session.execute(_diary_query(user_id, limit))).scalars()
    return [DiaryEntryRead.model_validate(row) for row in rows]


async def _nudges(session: AsyncSession, user_id: int | None, status: NudgeStatus | None,
                  limit: int) -> list[ScheduledMessageRead]:
    rows = (await session.execute(_nudges_query(user_id, status, limit))).scalars()
    return [ScheduledMessageRead.model_validate(row) for row in rows]
