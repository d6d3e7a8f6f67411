"""Migrations: up, down, up again; models and migrations agree; `companion db upgrade` on a DATABASE_URL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from storage import migrate
from storage.database import create_engine
from storage.models import Base

TABLES = {"users", "profile_facts", "conversations", "timeline_events", "diary_entries", "scheduled_messages",
          "memories", "usage"}


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names())) - {"alembic_version"}


async def test_upgrade_creates_the_tables_and_downgrade_removes_them(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        assert await migrate.current_revision(engine) is None
        await migrate.upgrade(engine)
        assert await _tables(engine) == TABLES
        assert await migrate.current_revision(engine) == migrate.head_revision()

        await migrate.downgrade(engine, "base")
        assert await _tables(engine) == set()
        assert await migrate.current_revision(engine) is None

        await migrate.upgrade(engine)
        assert await _tables(engine) == TABLES
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_models(engine: AsyncEngine) -> None:
    def differences(sync) -> list:
        context = MigrationContext.configure(sync, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, Base.metadata)

    async with engine.connect() as connection:
        assert await connection.run_sync(differences) == []


_CONSTRAINTS = text(
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE connamespace = 'public'::regnamespace")
_INDEXES = text("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")


async def _schema_objects(engine: AsyncEngine) -> set[tuple]:
    async with engine.connect() as connection:
        constraints = (await connection.execute(_CONSTRAINTS)).all()
        indexes = (await connection.execute(_INDEXES)).all()
    return {tuple(row) for row in constraints + indexes if row[0] != "alembic_version"}


async def test_migrations_build_the_same_constraints_and_indexes_as_the_models(
        engine: AsyncEngine, empty_database_url: str) -> None:
    from_models = create_engine(empty_database_url)
    try:
        async with from_models.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        assert await _schema_objects(engine) == await _schema_objects(from_models)
    finally:
        await from_models.dispose()


async def test_indexes_serve_the_repository_queries(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"))
        names = {row[0] for row in rows}
    assert {"ix_conversations_user_id_sent_at", "uq_conversations_user_id_message_key", "ux_profile_facts_current",
            "ix_timeline_events_user_id_event_at", "ix_diary_entries_user_id_occurred_at",
            "ix_scheduled_messages_status_scheduled_for", "uq_users_telegram_id", "ix_memories_search",
            "ix_memories_embedding", "uq_memories_user_id_memory_key"} <= names


async def test_telegram_ids_are_bigint_and_timestamps_timezone_aware(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        rows = (await connection.execute(text(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' AND (column_name IN ('telegram_id', 'id', 'user_id') "
            "OR data_type LIKE 'timestamp%')"))).all()
    for table, column, data_type in rows:
        if column in ("telegram_id", "id", "user_id"):
            assert data_type == "bigint", (table, column)
        else:
            assert data_type == "timestamp with time zone", (table, column)


async def test_cli_db_upgrade_creates_the_tables_in_database_url(empty_database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    done = subprocess.run([sys.executable, "-m", "cli", "db", "upgrade"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"database upgraded: base -> {migrate.head_revision()}" in done.stdout
    assert not (tmp_path / ".companion").exists()  # the given server was used, nothing embedded started
    engine = create_engine(empty_database_url)
    try:
        assert await _tables(engine) == TABLES
    finally:
        await engine.dispose()


async def test_upgrading_puts_the_users_with_many_memories_in_the_hnsw_index_and_no_one_else(
        empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        await migrate.upgrade(engine, "0002")  # the index held every vector
        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO users (telegram_id) VALUES (1), (2)"))
            await connection.execute(text(
                "INSERT INTO memories (user_id, memory_key, kind, content, occurred_at, embedding) "
                "SELECT u.id, 'm' || n, 'conversation', 'text', now(), array_fill(0.5, ARRAY[384])::vector "
                "FROM users u, generate_series(1, CASE u.telegram_id WHEN 1 THEN 5000 ELSE 4999 END) n"))
        await migrate.upgrade(engine)
        async with engine.connect() as connection:
            users = (await connection.execute(text(
                "SELECT u.telegram_id, u.ann_indexed, array_agg(DISTINCT m.ann_indexed) FROM users u "
                "JOIN memories m ON m.user_id = u.id GROUP BY u.telegram_id, u.ann_indexed ORDER BY 1"))).all()
            index = (await connection.execute(text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_memories_embedding'"))).scalar_one()
        assert [tuple(row) for row in users] == [(1, True, [True]), (2, False, [False])]
        assert index.endswith("USING hnsw (embedding vector_cosine_ops) WHERE ann_indexed")

        await migrate.downgrade(engine, "0002")  # back to one index over every vector
        async with engine.connect() as connection:
            index = (await connection.execute(text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_memories_embedding'"))).scalar_one()
        assert index.endswith("USING hnsw (embedding vector_cosine_ops)")
    finally:
        await engine.dispose()
