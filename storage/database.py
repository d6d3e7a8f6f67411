"""The one engine factory, the retry policy for transient failures, and the translation of driver errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from core.errors import (
    CompanionError,
    ConstraintViolationError,
    DatabaseConnectionError,
    DatabaseError,
    DuplicateRecordError,
    SchemaMissingError,
    UserNotFoundError,
)
from core.logging import get_logger
from core.settings import DATABASE_MAX_OVERFLOW, DATABASE_POOL_SIZE, to_async_url

T = TypeVar("T")

# Connections are kept rather than opened per burst: under load, overflow connections opened and closed for each
# transaction (authentication, type introspection, statement preparation) cost the worker more than the queries.
# The pool is still small, since every process sharing the server counts against its max_connections: a turn waits
# for a connection of its worker's pool (a queue in this process) rather than the server refusing a new one.
POOL_SIZE = DATABASE_POOL_SIZE
MAX_OVERFLOW = DATABASE_MAX_OVERFLOW
POOL_RECYCLE_S = 3600
# A transient failure is retried this many times (so 1 + 3 attempts), backing off 0.1 s, 0.2 s, 0.4 s.
TRANSIENT_RETRIES = 3
RETRY_FIRST_WAIT_S = 0.1
RETRY_MAX_WAIT_S = 2.0

# SQLSTATEs worth another attempt: serialization failure, deadlock, server shutting down or killing the backend,
# too many connections. Class 08 (connection exceptions) is matched by prefix.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300"}

_log = get_logger(__name__)


def create_engine(url: str | URL, **overrides: Any) -> AsyncEngine:
    """An asyncpg engine with the pool every process of the companion uses."""
    options: dict[str, Any] = {
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        # No ping before each checkout (two round trips per transaction): a connection found dead fails its
        # transaction, SQLAlchemy invalidates the pool, and run_transaction retries on a fresh connection.
        "pool_pre_ping": False,
        "pool_recycle": POOL_RECYCLE_S,
    }
    options.update(overrides)
    return create_async_engine(to_async_url(str(url)) if isinstance(url, str) else url, **options)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose loaded objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind a SQLAlchemy or asyncpg error, when there is one."""
    for candidate in (getattr(exc, "orig", None), getattr(getattr(exc, "orig", None), "__cause__", None), exc):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures another attempt can cure: dropped connections, serialization failures, restarts."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    code = sqlstate(exc)
    if code is not None:
        return code.startswith("08") or code in _TRANSIENT_SQLSTATES
    return isinstance(exc, (OperationalError, InterfaceError, ConnectionError, TimeoutError, OSError))


# undefined_table, undefined_column, invalid_schema_name: the schema is not (or no longer) the code's.
_SCHEMA_MISSING = {"42P01", "42703", "3F000"}


def translate(exc: BaseException, operation: str, context: dict[str, Any]) -> CompanionError:
    """The typed error for a driver failure; the one place SQLAlchemy errors become ours."""
    context = {"operation": operation, **context}
    if isinstance(exc, CompanionError):
        return exc
    cause = getattr(getattr(exc, "orig", None), "__cause__", None)
    constraint = getattr(cause, "constraint_name", None)
    if constraint:
        context["constraint"] = constraint
    code = sqlstate(exc)
    if code == "23505":
        return DuplicateRecordError(f"{operation}: a record with the same unique key exists", context=context,
                                    cause=exc)
    if code == "23503" and constraint and constraint.endswith("_user_id_users"):
        return UserNotFoundError(f"{operation}: no user with that id", context=context, cause=exc)
    if isinstance(exc, IntegrityError) or (code or "").startswith("23"):
        return ConstraintViolationError(f"{operation}: the write breaks constraint {constraint or code}",
                                        context=context, cause=exc)
    if code in _SCHEMA_MISSING:
        return SchemaMissingError(f"{operation}: the database schema is missing or older than this code; run "
                                  "`companion db upgrade`", context=context, cause=exc)
    if is_transient(exc):
        return DatabaseConnectionError(f"{operation}: PostgreSQL unavailable after {TRANSIENT_RETRIES} retries "
                                       f"({type(exc).__name__})", context=context, cause=exc)
    return DatabaseError(f"{operation}: database error ({type(exc).__name__})", context=context, cause=exc)


async def run_transaction(
    sessions: async_sessionmaker[AsyncSession],
    operation: str,
    work: Callable[[AsyncSession], Awaitable[T]],
    autocommit: bool = False,
    **context: Any,
) -> T:
    """Run ``work`` in one transaction, retrying the whole of it on transient failures, translating the rest.

    An ``autocommit`` work runs its statements on one connection in autocommit, with no BEGIN and no COMMIT: two
    round trips fewer. It is for reads, which give the same answers, since under READ COMMITTED every statement of
    a transaction sees its own snapshot anyway; and for writes whose every statement stands alone (an idempotent
    upsert, say), so that a failure between two of them leaves nothing half done. Work that must write all or
    nothing, or that needs one snapshot or SET LOCAL, runs in a transaction.
    """
    # A plain loop rather than a retrying library: every transaction of every turn passes through here, and the
    # first attempt, which nearly always succeeds, then costs nothing beyond the transaction itself.
    for attempt in range(1, TRANSIENT_RETRIES + 2):
        try:
            async with _autocommitting(sessions) if autocommit else sessions.begin() as session:
                return await work(session)
        except Exception as exc:
            if attempt <= TRANSIENT_RETRIES and is_transient(exc):
                _log.warning("db.transient_failure_retrying", operation=operation, attempt=attempt,
                             error=type(exc).__name__, **context)
                await asyncio.sleep(min(RETRY_FIRST_WAIT_S * 2 ** (attempt - 1), RETRY_MAX_WAIT_S))
                continue
            if isinstance(exc, (SQLAlchemyError, OSError, TimeoutError)):
                raise translate(exc, operation, context) from exc
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


@asynccontextmanager
async def _autocommitting(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session whose connection runs each statement in autocommit (reset when it goes back to the pool)."""
    async with sessions() as session:
        await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session
