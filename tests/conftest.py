"""Shared fixtures: a real PostgreSQL for the session, a freshly migrated database for every test."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from core.logging import configure_logging
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres
from storage.repository import MemoryRepository

# Settings come from the environment: keep a developer's own .env and variables out of the tests.
for _name in list(os.environ):
    if _name.startswith(("COMPANION_", "TELEGRAM_", "OPENAI_", "PINECONE_", "TEMPORAL_")) or _name in (
            "ENVIRONMENT", "LOG_LEVEL", "LOG_FORMAT"):
        os.environ.pop(_name)

configure_logging("WARNING", "console")


def libpq_url(url: str, database: str | None = None) -> str:
    """A URL asyncpg and psql understand, optionally pointing at another database on the same server."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The server the tests use: DATABASE_URL when set, else an embedded PostgreSQL in a temporary folder."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    folder = Path(tempfile.mkdtemp(prefix="companion-test-pg-"))
    server = EmbeddedPostgres(folder / "data")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _admin(server: str, *statements: str) -> None:
    connection = await asyncpg.connect(libpq_url(server))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """A database migrated to head once per session; each test's database is a copy of it."""
    name = f"companion_template_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    asyncio.run(_migrate(str(make_url(server_url).set(database=name).render_as_string(hide_password=False))))
    yield name
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def new_database(server_url: str, template: str = "template0") -> str:
    """A new database on the test server; returns its URL."""
    name = f"companion_test_{uuid.uuid4().hex[:12]}"
    await _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, url: str) -> None:
    """Drop a database made by new_database, closing whatever still uses it."""
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


@pytest.fixture
async def database_url(server_url: str, template_database: str) -> AsyncIterator[str]:
    """A migrated database of this test's own."""
    url = await new_database(server_url, template_database)
    yield url
    await drop_database(server_url, url)


@pytest.fixture
async def empty_database_url(server_url: str) -> AsyncIterator[str]:
    """A database with no tables at all, for migration tests."""
    url = await new_database(server_url)
    yield url
    await drop_database(server_url, url)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def repo(engine: AsyncEngine) -> MemoryRepository:
    return MemoryRepository(create_session_factory(engine))
