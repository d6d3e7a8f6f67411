"""Transient failures: killed connections are retried and lose nothing; an unreachable server gives a typed error."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import asyncpg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import DatabaseConnectionError
from schemas.memory import MessageCreate, Role, UserCreate
from storage.database import create_engine, create_session_factory
from storage.models import Conversation
from storage.repository import MemoryRepository
from tests.conftest import libpq_url

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

# The first insert into conversations terminates its own backend mid-transaction. A sequence is used as the
# "already done" flag because nextval() survives the rollback that the kill causes.
KILL_FIRST_INSERT = """
CREATE SEQUENCE kill_switch;
CREATE FUNCTION kill_first_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('kill_switch') <= {kills} THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER kill_first_insert BEFORE INSERT ON conversations FOR EACH ROW EXECUTE FUNCTION kill_first_insert();
"""


async def _install_killer(database_url: str, kills: int) -> None:
    connection = await asyncpg.connect(libpq_url(database_url))
    try:
        await connection.execute(KILL_FIRST_INSERT.format(kills=kills))
    finally:
        await connection.close()


def _message(key: str) -> MessageCreate:
    return MessageCreate(message_key=key, role=Role.USER, content="I got the job!", sent_at=NOW)


async def _messages(engine: AsyncEngine) -> int:
    async with create_session_factory(engine)() as session:
        return (await session.execute(select(func.count()).select_from(Conversation))).scalar_one()


async def test_connection_killed_mid_transaction_is_retried_and_nothing_is_lost(
        repo: MemoryRepository, engine: AsyncEngine, database_url: str) -> None:
    user = await repo.get_or_create_user(UserCreate(telegram_id=42))
    await _install_killer(database_url, kills=2)

    stored = await repo.add_message(user.id, _message("tg:42:1"))

    assert stored.content == "I got the job!"
    assert await _messages(engine) == 1
    assert (await repo.recent_messages(user.id))[0].message_key == "tg:42:1"


async def test_connections_killed_between_operations_are_replaced(repo: MemoryRepository, engine: AsyncEngine,
                                                                  database_url: str) -> None:
    user = await repo.get_or_create_user(UserCreate(telegram_id=42))
    await repo.add_message(user.id, _message("tg:42:1"))
    admin = await asyncpg.connect(libpq_url(database_url))
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()
    assert killed >= 1  # the pool's idle connection really was killed

    await repo.add_message(user.id, _message("tg:42:2"))
    assert [m.message_key for m in await repo.recent_messages(user.id)] == ["tg:42:1", "tg:42:2"]


async def test_a_connection_that_keeps_dying_ends_in_a_typed_error(repo: MemoryRepository, engine: AsyncEngine,
                                                                   database_url: str) -> None:
    user = await repo.get_or_create_user(UserCreate(telegram_id=42))
    await _install_killer(database_url, kills=100)

    with pytest.raises(DatabaseConnectionError) as caught:
        await repo.add_message(user.id, _message("tg:42:1"))

    assert caught.value.context == {"operation": "add_message", "user_id": user.id, "message_key": "tg:42:1"}
    async with engine.connect() as connection:
        attempts = (await connection.execute(text("SELECT last_value FROM kill_switch"))).scalar_one()
    assert attempts == 4  # the first try and three retries
    assert await _messages(engine) == 0


async def test_an_unreachable_server_gives_a_typed_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = create_engine(f"postgresql://companion:pw@127.0.0.1:{port}/companion")
    try:
        with pytest.raises(DatabaseConnectionError, match="get_user: PostgreSQL unavailable"):
            await MemoryRepository(create_session_factory(engine)).get_user(1)
    finally:
        await engine.dispose()
