"""`companion db`: apply, revert and report the database's migrations."""

from __future__ import annotations

import argparse
import time

from alembic.util import CommandError as AlembicCommandError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import InvalidArgumentError, InvalidInputError
from core.settings import Settings
from storage import migrate
from storage.database import create_engine, translate
from storage.embedded import postgres_url


async def run_db(settings: Settings, args: argparse.Namespace) -> int:
    with postgres_url(settings) as url:
        engine = create_engine(url)
        try:
            before = await migrate.current_revision(engine)
            if args.db_command == "upgrade":
                await migrate.upgrade(engine, args.revision)
            elif args.db_command == "downgrade":
                await _guard_downgrade(settings, engine, args)
                await migrate.downgrade(engine, args.revision)
            after = await migrate.current_revision(engine)
        except AlembicCommandError as exc:
            raise InvalidInputError(f"db {args.db_command}: {exc}", context={"revision": args.revision}) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, f"db {args.db_command}", {}) from exc
        finally:
            await engine.dispose()
    if args.db_command == "current":
        print(f"database at revision {after or 'base'} (newest: {migrate.head_revision()})")
    else:
        print(f"database {args.db_command}d: {before or 'base'} -> {after or 'base'}")
    return 0


# Workers long-poll for a minute at a time: one that polled within this long is running.
POLLER_SEEN_S = 70
_COUNTED = {"users": "users", "conversations": "messages", "memories": "memories"}


async def _guard_downgrade(settings: Settings, engine: AsyncEngine, args: argparse.Namespace) -> None:
    """Refuse a downgrade nobody confirmed (--yes), saying what it would drop, and one that would pull the schema
    from under running workers (--force: they wait, retrying, until `companion db upgrade`)."""
    async with engine.connect() as connection:
        counts = {}
        for table, what in _COUNTED.items():
            if (await connection.execute(text("SELECT to_regclass(:table)"), {"table": table})).scalar():
                counts[what] = (await connection.execute(text(f'SELECT count(*) FROM "{table}"'))).scalar_one()
    held = ", ".join(f"{count:,} {what}" for what, count in counts.items()) or "no tables of the companion"
    if not args.yes:
        raise InvalidArgumentError(f"db downgrade {args.revision} drops the tables of the migrations it reverts, with "
                                f"their rows (the database holds {held}); run it again with --yes to do it")
    if args.force:
        return
    workers = await _polling_workers(settings)
    if workers is None:
        raise InvalidInputError(f"cannot reach Temporal at {settings.temporal_address} to see whether workers run; "
                                "stop them and pass --force to go ahead")
    if workers:
        raise InvalidInputError(f"{workers} worker(s) poll task queue {settings.temporal_task_queue}: stop them "
                                "first, or pass --force (their messages then wait for `companion db upgrade`)")


async def _polling_workers(settings: Settings) -> int | None:
    """How many workers polled the task queue lately; None when Temporal cannot be reached."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    from workflows.client import connect

    try:
        client = await connect(settings)
    except RuntimeError:
        return None
    workers = set()
    for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
        described = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=settings.temporal_task_queue),
            task_queue_type=kind))
        workers.update(poller.identity for poller in described.pollers
                       if time.time() - poller.last_access_time.ToSeconds() < POLLER_SEEN_S)
    return len(workers)
