"""The memory repository against a real PostgreSQL: every function, idempotent writes, typed errors."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import (
    ConstraintViolationError,
    DuplicateRecordError,
    InvalidMemoryDataError,
    RecordNotFoundError,
    UserNotFoundError,
)
from schemas.memory import (
    Channel,
    DiaryEntryCreate,
    DiaryKind,
    FactCategory,
    MessageCreate,
    NudgeCreator,
    NudgeKind,
    NudgeStatus,
    ProfileFactCreate,
    Role,
    ScheduledMessageCreate,
    ScheduledMessageUpdate,
    TimelineEventCreate,
    UserCreate,
    UserRead,
    UserUpdate,
)
from storage.database import create_engine, create_session_factory, run_transaction
from storage.export import USER_TABLES
from storage.models import Base, Conversation, TimelineEvent, User
from storage.repository import MemoryRepository

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
async def user(repo: MemoryRepository) -> UserRead:
    return await repo.get_or_create_user(UserCreate(telegram_id=42, first_name="Simon", timezone="Europe/Berlin"))


def message(key: str, text: str = "hello", minutes: int = 0, role: Role = Role.USER) -> MessageCreate:
    return MessageCreate(message_key=key, role=role, content=text, channel=Channel.TELEGRAM,
                         sent_at=NOW + timedelta(minutes=minutes))


async def count(engine: AsyncEngine, model: type) -> int:
    async with create_session_factory(engine)() as session:
        return (await session.execute(select(func.count()).select_from(model))).scalar_one()


# --- users ------------------------------------------------------------------------------------------------------


async def test_get_or_create_user_creates_once_and_refreshes_names(repo: MemoryRepository, user: UserRead) -> None:
    assert user.telegram_id == 42 and user.first_name == "Simon" and user.timezone == "Europe/Berlin"
    again = await repo.get_or_create_user(UserCreate(telegram_id=42, username="simon_k"))
    assert again.id == user.id
    assert again.username == "simon_k"
    assert again.first_name == "Simon"  # not given this time: kept
    assert again.timezone == "Europe/Berlin"  # the user's own setting is never reset by a sighting
    assert again.last_seen_at >= user.last_seen_at


async def test_a_turns_first_write_stores_the_user_and_the_message_once(repo: MemoryRepository,
                                                                          engine: AsyncEngine) -> None:
    first = await repo.add_user_message(UserCreate(telegram_id=44, first_name="Ada"), message("tg:44:1", "hi"))
    again = await asyncio.gather(*(repo.add_user_message(UserCreate(telegram_id=44, username="ada_l"),
                                                         message("tg:44:1", "changed")) for _ in range(3)))
    assert {user.id for user in again} == {first.id} and again[0].username == "ada_l" and again[0].first_name == "Ada"
    assert [m.content for m in await repo.recent_messages(first.id)] == ["hi"]  # stored once, as first written
    await repo.delete_user_by_telegram_id(44)  # the rows gone: the next message creates the user again
    anew = await repo.add_user_message(UserCreate(telegram_id=44), message("tg:44:2", "back"))
    assert anew.id != first.id and [m.content for m in await repo.recent_messages(anew.id)] == ["back"]
    assert await count(engine, Conversation) == 1


async def test_telegram_ids_beyond_32_bits_are_stored(repo: MemoryRepository) -> None:
    big = await repo.get_or_create_user(UserCreate(telegram_id=7_123_456_789))
    assert (await repo.get_user_by_telegram_id(7_123_456_789)).id == big.id


async def test_get_update_and_missing_users(repo: MemoryRepository, user: UserRead) -> None:
    assert (await repo.get_user(user.id)).display_name == "Simon"
    updated = await repo.update_user(user.id, UserUpdate(timezone="America/New_York", is_active=False,
                                                          preferences={"check_ins": False}))
    assert (updated.timezone, updated.is_active, updated.preferences) == ("America/New_York", False,
                                                                          {"check_ins": False})
    assert updated.first_name == "Simon"
    with pytest.raises(UserNotFoundError):
        await repo.get_user(999_999)
    with pytest.raises(UserNotFoundError):
        await repo.get_user_by_telegram_id(999_999)
    with pytest.raises(UserNotFoundError):
        await repo.update_user(999_999, UserUpdate(is_active=False))


def test_schemas_refuse_bad_input() -> None:
    with pytest.raises(ValidationError, match="unknown time zone"):
        UserCreate(telegram_id=1, timezone="Mars/Olympus")
    with pytest.raises(ValidationError):
        UserCreate(telegram_id=0)
    with pytest.raises(ValidationError, match="timezone"):
        MessageCreate(message_key="k", role=Role.USER, content="x", sent_at=datetime(2026, 1, 1))
    with pytest.raises(ValidationError):
        ProfileFactCreate(category="astrology", key="sign", value="leo")
    with pytest.raises(ValidationError):
        ProfileFactCreate(category=FactCategory.PERSONAL, key="name", value="   ")


# --- profile facts ----------------------------------------------------------------------------------------------


async def test_a_new_value_supersedes_the_old_one_which_is_kept(repo: MemoryRepository, user: UserRead) -> None:
    first = await repo.upsert_profile_fact(user.id, ProfileFactCreate(
        category=FactCategory.WORK, key="Employer", value="Acme", source_keys=["tg:1:10"]))
    assert first.key == "employer" and first.is_current
    second = await repo.upsert_profile_fact(user.id, ProfileFactCreate(
        category=FactCategory.WORK, key="employer", value="Globex", source_keys=["tg:1:20"]))
    assert second.id != first.id and second.value == "Globex"

    current = await repo.list_profile_facts(user.id)
    assert [(f.key, f.value) for f in current] == [("employer", "Globex")]
    history = await repo.list_profile_facts(user.id, FactCategory.WORK, include_history=True)
    assert [(f.value, f.is_current) for f in history] == [("Acme", False), ("Globex", True)]
    assert history[0].valid_to == history[1].valid_from
    assert history[0].source_keys == ["tg:1:10"]


async def test_the_same_fact_again_merges_provenance_not_rows(repo: MemoryRepository, user: UserRead) -> None:
    fact = ProfileFactCreate(category=FactCategory.PERSONAL, key="name", value="Simon", confidence=0.6,
                             source_keys=["tg:1:1"])
    await repo.upsert_profile_fact(user.id, fact)
    again = await repo.upsert_profile_fact(user.id, fact.model_copy(update={"value": " simon ",
                                                                            "source_keys": ["tg:1:1", "tg:1:5"],
                                                                            "confidence": 0.9}))
    assert again.source_keys == ["tg:1:1", "tg:1:5"]
    assert again.confidence == 0.9
    assert len(await repo.list_profile_facts(user.id, include_history=True)) == 1


async def test_concurrent_writes_of_one_fact_leave_one_current_value(repo: MemoryRepository, user: UserRead) -> None:
    values = [f"city {n}" for n in range(8)]
    await asyncio.gather(*(repo.upsert_profile_fact(user.id, ProfileFactCreate(
        category=FactCategory.LOCATION, key="city", value=value)) for value in values))
    history = await repo.list_profile_facts(user.id, include_history=True)
    assert len(history) == 8
    assert sum(fact.is_current for fact in history) == 1


async def test_facts_of_unknown_users_and_deleting_facts(repo: MemoryRepository, user: UserRead) -> None:
    with pytest.raises(UserNotFoundError):
        await repo.upsert_profile_fact(999_999, ProfileFactCreate(category=FactCategory.OTHER, key="x", value="y"))
    fact = await repo.upsert_profile_fact(user.id, ProfileFactCreate(category=FactCategory.HOBBIES, key="sport",
                                                                     value="climbing"))
    await repo.delete_profile_fact(user.id, fact.id)
    assert await repo.list_profile_facts(user.id) == []
    with pytest.raises(RecordNotFoundError):
        await repo.delete_profile_fact(user.id, fact.id)


# --- conversations ----------------------------------------------------------------------------------------------


async def test_the_same_message_key_is_stored_once(repo: MemoryRepository, user: UserRead,
                                                   engine: AsyncEngine) -> None:
    first = await repo.add_message(user.id, message("tg:42:100", "Hi, I'm Simon"))
    again = await repo.add_message(user.id, message("tg:42:100", "Hi, I'm Simon"))
    assert again.id == first.id
    results = await asyncio.gather(*(repo.add_message(user.id, message("tg:42:101", "again")) for _ in range(5)))
    assert len({r.id for r in results}) == 1
    assert await count(engine, Conversation) == 2


async def test_a_message_is_claimed_by_one_sender_at_a_time(repo: MemoryRepository, user: UserRead) -> None:
    """Deliver attempts that overlap: one holds the claim, the others find it taken until it is released."""
    lease = timedelta(seconds=30)
    reply = message("tg:42:102:reply", "a reply", role=Role.ASSISTANT).model_copy(update={"meta": {"model": "m"}})
    await repo.add_message(user.id, reply)
    racing = await asyncio.gather(*(repo.claim_message(user.id, reply.message_key, "sending", lease)
                                    for _ in range(4)))
    assert sorted(held for _, held in racing) == [False, False, False, True]
    stored = next(row for row, held in racing if held)
    assert stored.meta["model"] == "m" and datetime.fromisoformat(stored.meta["sending"]) > datetime.now(UTC)
    await repo.release_message(user.id, reply.message_key, "sending", {"sent": 1})
    released, held = await repo.claim_message(user.id, reply.message_key, "sending", lease)
    assert held and released.meta["sent"] == 1 and released.meta["model"] == "m"


async def test_a_message_stored_claimed_is_stored_once_and_held_by_the_one_that_stored_it(
        repo: MemoryRepository, user: UserRead, engine: AsyncEngine) -> None:
    """A reply sent as soon as it is stored: attempts storing it at once store one row, of which one holds the
    claim (its meta kept), and deliver's claim finds it taken until that one releases it."""
    lease = timedelta(seconds=30)
    reply = message("tg:42:103:reply", "a reply", role=Role.ASSISTANT).model_copy(update={"meta": {"model": "m"}})
    racing = await asyncio.gather(*(repo.add_claimed_message(user.id, reply, "sending", lease) for _ in range(4)))
    assert len({row.id for row, _ in racing}) == 1 and await count(engine, Conversation) == 1
    assert sorted(held for _, held in racing) == [False, False, False, True]
    stored = next(row for row, held in racing if held)
    assert stored.meta["model"] == "m" and datetime.fromisoformat(stored.meta["sending"]) > datetime.now(UTC)
    assert (await repo.claim_message(user.id, reply.message_key, "sending", lease))[1] is False
    await repo.release_message(user.id, reply.message_key, "sending", {"sent": 1})
    again, held = await repo.add_claimed_message(user.id, reply, "sending", lease)  # stored before: claimed
    assert held and again.id == stored.id and again.meta["sent"] == 1


async def test_recent_messages_come_oldest_first_and_limited(repo: MemoryRepository, user: UserRead) -> None:
    for n in range(5):
        await repo.add_message(user.id, message(f"k{n}", f"message {n}", minutes=n))
    recent = await repo.recent_messages(user.id, limit=3)
    assert [m.content for m in recent] == ["message 2", "message 3", "message 4"]
    assert (await repo.get_message(user.id, "k1")).content == "message 1"
    assert await repo.get_message(user.id, "missing") is None


async def test_messages_for_an_unknown_user_raise_user_not_found(repo: MemoryRepository) -> None:
    with pytest.raises(UserNotFoundError) as caught:
        await repo.add_message(999_999, message("k"))
    assert caught.value.context["constraint"] == "fk_conversations_user_id_users"


# --- timeline and diary -----------------------------------------------------------------------------------------


async def test_upcoming_events_and_ranges(repo: MemoryRepository, user: UserRead) -> None:
    for days, title in ((-1, "yesterday's dentist"), (1, "job interview"), (3, "flight to Lisbon"),
                        (45, "wedding")):
        await repo.add_timeline_event(user.id, TimelineEventCreate(title=title, event_at=NOW + timedelta(days=days)))
    upcoming = await repo.upcoming_events(user.id, now=NOW)
    assert [e.title for e in upcoming] == ["job interview", "flight to Lisbon"]
    window = await repo.events_between(user.id, NOW - timedelta(days=2), NOW + timedelta(days=2))
    assert [e.title for e in window] == ["yesterday's dentist", "job interview"]
    with pytest.raises(InvalidMemoryDataError):
        await repo.events_between(user.id, datetime(2026, 1, 1), datetime(2026, 2, 1))


async def test_events_and_diary_are_idempotent_by_key(repo: MemoryRepository, user: UserRead,
                                                      engine: AsyncEngine) -> None:
    event = TimelineEventCreate(title="interview", event_at=NOW, idempotency_key="tg:42:7:event:0",
                                source_keys=["tg:42:7"])
    first, again = [await repo.add_timeline_event(user.id, event) for _ in range(2)]
    assert first.id == again.id and first.source_keys == ["tg:42:7"]
    assert await count(engine, TimelineEvent) == 1

    entry = DiaryEntryCreate(title="New job", content="Simon started at Globex", occurred_at=NOW,
                             importance=5, idempotency_key="tg:42:8:diary:0")
    one, two = [await repo.add_diary_entry(user.id, entry) for _ in range(2)]
    assert one.id == two.id and one.kind == DiaryKind.MILESTONE


async def test_recent_diary_entries_newest_first(repo: MemoryRepository, user: UserRead) -> None:
    for days in (3, 1, 2):
        await repo.add_diary_entry(user.id, DiaryEntryCreate(title=f"day {days}", content="...",
                                                             occurred_at=NOW + timedelta(days=days)))
    assert [e.title for e in await repo.recent_diary_entries(user.id, limit=2)] == ["day 3", "day 2"]


# --- scheduled messages -----------------------------------------------------------------------------------------


def nudge(nudge_id: str, hours: int = 1, **fields) -> ScheduledMessageCreate:
    return ScheduledMessageCreate(nudge_id=nudge_id, scheduled_for=NOW + timedelta(hours=hours),
                                  **{"content": "drink water", **fields})


async def test_scheduled_message_lifecycle(repo: MemoryRepository, user: UserRead) -> None:
    created = await repo.create_scheduled_message(user.id, nudge("n1", kind=NudgeKind.REMINDER,
                                                                 created_by=NudgeCreator.USER))
    assert created.status == NudgeStatus.PENDING
    assert (await repo.create_scheduled_message(user.id, nudge("n1"))).id == created.id  # idempotent

    later = await repo.update_scheduled_message("n1", ScheduledMessageUpdate(scheduled_for=NOW + timedelta(hours=5)))
    assert later.scheduled_for == NOW + timedelta(hours=5)
    sent = await repo.update_scheduled_message("n1", ScheduledMessageUpdate(status=NudgeStatus.SENT))
    assert sent.status == NudgeStatus.SENT and sent.sent_at is not None
    resent = await repo.update_scheduled_message("n1", ScheduledMessageUpdate(status=NudgeStatus.SENT))
    assert resent.sent_at == sent.sent_at  # a retried "sent" changes nothing
    with pytest.raises(InvalidMemoryDataError, match="is sent; it cannot become cancelled"):
        await repo.update_scheduled_message("n1", ScheduledMessageUpdate(status=NudgeStatus.CANCELLED))

    await repo.create_scheduled_message(user.id, nudge("n2", hours=2, content=None, purpose="ask about the trip"))
    cancelled = await repo.update_scheduled_message("n2", ScheduledMessageUpdate(status=NudgeStatus.CANCELLED))
    assert cancelled.cancelled_at is not None
    assert [n.nudge_id for n in await repo.list_scheduled_messages(user.id)] == ["n2", "n1"]
    assert [n.nudge_id for n in await repo.list_scheduled_messages(status=NudgeStatus.CANCELLED)] == ["n2"]

    await repo.delete_scheduled_message("n2")
    with pytest.raises(RecordNotFoundError):
        await repo.get_scheduled_message("n2")
    with pytest.raises(RecordNotFoundError):
        await repo.update_scheduled_message("nope", ScheduledMessageUpdate(status=NudgeStatus.SENT))


async def test_moving_a_check_in_cancels_the_one_it_replaces_and_a_retry_changes_nothing(
        repo: MemoryRepository, user: UserRead) -> None:
    first = await repo.replace_scheduled_message(user.id, None, nudge("c1", kind=NudgeKind.CHECK_IN))
    assert first.status == NudgeStatus.PENDING and first.kind == NudgeKind.CHECK_IN
    moved = await repo.replace_scheduled_message(user.id, "c1", nudge("c2", hours=3, kind=NudgeKind.CHECK_IN))
    old = await repo.get_scheduled_message("c1")
    assert old.status == NudgeStatus.CANCELLED and old.error == "replaced by c2" and old.cancelled_at is not None
    assert moved.status == NudgeStatus.PENDING and moved.scheduled_for == NOW + timedelta(hours=3)
    # A retried move, and moves racing each other: the same record, nothing cancelled twice or stored twice.
    again = await asyncio.gather(*(repo.replace_scheduled_message(user.id, "c1", nudge("c2", hours=3))
                                   for _ in range(3)))
    assert {n.id for n in again} == {moved.id} and await repo.get_scheduled_message("c1") == old
    assert [n.nudge_id for n in await repo.list_scheduled_messages(user.id, status=NudgeStatus.PENDING)] == ["c2"]


async def test_a_nudge_needs_text_or_purpose_and_ids_are_per_user(repo: MemoryRepository, user: UserRead) -> None:
    with pytest.raises(InvalidMemoryDataError, match="needs its text or a purpose"):
        await repo.create_scheduled_message(user.id, nudge("n3", content=None))
    other = await repo.get_or_create_user(UserCreate(telegram_id=43))
    await repo.create_scheduled_message(user.id, nudge("n4"))
    with pytest.raises(InvalidMemoryDataError, match="belongs to another user"):
        await repo.create_scheduled_message(other.id, nudge("n4"))


# --- constraint violations are typed ----------------------------------------------------------------------------


async def test_constraint_violations_raise_typed_errors(repo: MemoryRepository, user: UserRead,
                                                        engine: AsyncEngine) -> None:
    sessions = create_session_factory(engine)
    base = {"user_id": user.id, "message_key": "dup", "role": "user", "content": "x", "channel": "console",
            "sent_at": NOW}
    await run_transaction(sessions, "insert", lambda s: _add(s, Conversation(**base)))
    with pytest.raises(DuplicateRecordError) as duplicate:
        await run_transaction(sessions, "insert", lambda s: _add(s, Conversation(**base)))
    assert duplicate.value.context["constraint"] == "uq_conversations_user_id_message_key"
    assert duplicate.value.to_dict()["code"] == "DATABASE_DUPLICATE_RECORD"

    with pytest.raises(ConstraintViolationError) as check:
        await run_transaction(sessions, "insert", lambda s: _add(s, Conversation(**{**base, "message_key": "k2",
                                                                                    "role": "robot"})))
    assert not isinstance(check.value, DuplicateRecordError)
    assert check.value.context["constraint"] == "ck_conversations_role"
    assert await count(engine, Conversation) == 1  # nothing already accepted was lost


async def _add(session, row):
    session.add(row)
    await session.flush()
    return row


# --- reads and writes on a shared pool --------------------------------------------------------------------------


async def _clock_twice(session) -> tuple[datetime, datetime]:
    """The transaction's clock (now()) before and after a short sleep."""
    first = (await session.execute(text("SELECT now()"))).scalar_one()
    await session.execute(text("SELECT pg_sleep(0.02)"))
    return first, (await session.execute(text("SELECT now()"))).scalar_one()


async def test_a_read_sends_no_begin_or_commit_and_a_write_stays_one_transaction(database_url: str) -> None:
    # One pooled connection, so the write runs on the very connection the read put in autocommit.
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    sessions = create_session_factory(engine)
    try:
        first, then = await run_transaction(sessions, "read", _clock_twice, autocommit=True)
        assert then > first  # each statement of a read is its own transaction: no BEGIN before, no COMMIT after

        first, then = await run_transaction(sessions, "write", _clock_twice)
        assert then == first  # a write is one transaction again on the same connection
        user = await run_transaction(sessions, "user", lambda s: _add(s, User(telegram_id=4242)))

        async def half_a_write(session) -> None:
            await _add(session, Conversation(user_id=user.id, message_key="k", role="user", content="x",
                                             channel="console", sent_at=NOW))
            raise RuntimeError("the write fails after its first statement")

        await run_transaction(sessions, "read", lambda s: s.execute(text("SELECT 1")), autocommit=True)
        with pytest.raises(RuntimeError, match="after its first statement"):
            await run_transaction(sessions, "half a write", half_a_write)
        assert await count(engine, Conversation) == 0  # rolled back whole, not committed statement by statement
    finally:
        await engine.dispose()


def test_every_table_holding_a_users_rows_is_exported_and_erased_by_forget() -> None:
    # /export and /forget work from one list of the user's tables: a table added without it would be neither.
    holding = {table.name for table in Base.metadata.tables.values() if "user_id" in table.columns}
    assert holding == {model.__tablename__ for model in USER_TABLES}
