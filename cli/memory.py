"""`companion memory`: what the companion remembers of a user, what it recalls for a query, and rebuilding vectors
after an embedder change."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from cli.conversation import open_repository
from core.errors import UserNotFoundError
from core.settings import Settings
from schemas.memory import describe_memory
from storage.database import create_engine, create_session_factory
from storage.embedded import postgres_url
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from storage.semantic import create_memory_index

HIT_LINES = 2  # a hit's text is wrapped to this many lines at most


@asynccontextmanager
async def _memory(settings: Settings) -> AsyncIterator[tuple[MemoryRepository, MemoryIndex]]:
    with postgres_url(settings) as url:
        engine = create_engine(url)
        index = None
        try:
            sessions = create_session_factory(engine)
            index = create_memory_index(settings, sessions)
            yield MemoryRepository(sessions), index
        finally:
            if index is not None:
                await index.close()
            await engine.dispose()


async def reindex(settings: Settings, telegram_id: int | None, missing_only: bool) -> int:
    async with _memory(settings) as (repo, index):
        user_id = None if telegram_id is None else (await repo.get_user_by_telegram_id(telegram_id)).id
        done = await index.reindex(user_id, everything=not missing_only)
        print(f"embedded {done} memories with {index.embedder.name} ({index.embedder.dimension} dimensions) "
              f"into {index.store.name}")
    return 0


async def search(settings: Settings, telegram_id: int, query: str, k: int) -> int:
    async with _memory(settings) as (repo, index):
        user = await repo.get_user_by_telegram_id(telegram_id)
        zone = user.timezone_info
        found = await index.search(user.id, query, k=k,
                                   when=await index.time_named(user.id, query, datetime.now(UTC), zone))
        width = max(40, shutil.get_terminal_size().columns)
        for hit in found.hits:
            when = hit.occurred_at.astimezone(zone).strftime("%Y-%m-%d %H:%M")
            head = f"{hit.score:.3f}  {when}  {hit.kind.value:<12} {'+'.join(hit.via):<15} "
            text = " ".join(hit.content.replace("\n", " / ").split())
            lines = textwrap.wrap(text, width - len(head), max_lines=HIT_LINES, placeholder=" …") or [""]
            print(head + lines[0])
            for line in lines[1:]:
                print(" " * len(head) + line)
        note = " (vector store unavailable: keywords only)" if found.degraded else ""
        print(f"{len(found.hits)} found in {found.elapsed_ms:.1f} ms{note}")
    return 0


async def list_memory(settings: Settings, telegram_id: int) -> int:
    """`companion memory list`: what the user sees with /memory, numbered the same, in their time zone."""
    async with open_repository(settings) as repo:
        try:
            user = await repo.get_user_by_telegram_id(telegram_id)
        except UserNotFoundError:
            print(f"nothing remembered: user {telegram_id} is unknown")
            return 0
        print(describe_memory(await repo.memory_items(user.id), user.timezone_info))
    return 0
