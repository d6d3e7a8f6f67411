"""Vector stores behind one interface: pgvector in the memories table (default) and Pinecone (one namespace a user).

Both keep a memory's vector under its row id, scoped to its user: a query names the user and can return nothing else.
Failures raise VectorStoreConnectionError after a few retries with backoff; callers degrade gracefully.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from pgvector.sqlalchemy import Vector
from sqlalchemy import REAL, Cast, Select, bindparam, cast, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from core.errors import (
    CompanionError,
    ConfigurationError,
    EmbedderChangedError,
    VectorStoreConnectionError,
    VectorStoreError,
)
from core.logging import get_logger
from storage.database import run_transaction
from storage.models import EMBEDDING_DIMENSION, Memory

T = TypeVar("T")
_log = get_logger(__name__)

# The pinecone SDK retries connection errors and 429/5xx itself (3 retries, jittered backoff); writes get one more
# round on top, a query in the turn's path none (the turn goes on without vectors instead).
WRITE_ATTEMPTS = 2
# Per-user search is exact up to this many vectors (a sequential scan of the user's rows, a few ms); beyond it the
# HNSW index answers, asked for more candidates than needed because it filters by user after the scan.
EXACT_SEARCH_LIMIT = 20_000
# The HNSW index is partial: it holds the vectors of users with at least this many memories (users.ann_indexed, and
# memories.ann_indexed on each of their rows), well before the exact search stops serving them. Keeping an index up
# to date costs PostgreSQL ~90% of a remember step's CPU (33.7 and 36.6 ms of it, against 3.5 and 5.7 ms without);
# users who are searched exactly no longer pay it.
ANN_INDEX_FROM = 5_000
HNSW_EF_SEARCH = 400
HNSW_MAX_DIMENSIONS = 2000  # pgvector's limit for an HNSW index on vector columns
_COLUMN_DIMENSION = ("SELECT atttypmod FROM pg_attribute WHERE attrelid = 'memories'::regclass "
                     "AND attname = 'embedding'")


# The exact search of one user's vectors. The count reads at most one row past the limit, without the vectors; only
# when it is within the limit are the user's rows read (MATERIALIZED keeps the planner from answering through the
# HNSW index, which would filter by user only after picking its neighbours) and ranked. One row at least: the count,
# with no id when the user has no vectors or too many.
_EXACT_SEARCH = text("""
WITH total AS (
    SELECT count(*) AS n FROM (SELECT 1 FROM memories WHERE user_id = :user_id AND embedding IS NOT NULL
                               LIMIT :limit + 1) AS capped),
mine AS MATERIALIZED (
    SELECT id, embedding FROM memories
    WHERE user_id = :user_id AND embedding IS NOT NULL AND (SELECT n FROM total) <= :limit)
SELECT total.n AS total, mine.id, mine.embedding <=> CAST(CAST(:vector AS real[]) AS vector) AS distance
FROM total LEFT JOIN mine ON true
ORDER BY distance, mine.id LIMIT :k
""").bindparams(bindparam("vector", type_=ARRAY(REAL)))


# Whether the user's vectors are in the HNSW index and, when not, how many memories they have (counted up to the
# threshold). FOR SHARE: a user's vectors written meanwhile by another transaction are marked, or were already there
# to be marked, when the user joins the index.
_ANN_STATE = text("""
SELECT u.ann_indexed,
       CASE WHEN NOT u.ann_indexed THEN (SELECT count(*) FROM (SELECT 1 FROM memories WHERE user_id = :user_id
                                                             LIMIT :threshold) AS capped) END AS memories
FROM users u WHERE u.id = :user_id FOR SHARE
""")
# A user joins the HNSW index: every memory of theirs is marked, and their vectors are indexed from then on.
_JOIN_ANN_INDEX = text("""
WITH joined AS (UPDATE users SET ann_indexed = true WHERE id = :user_id)
UPDATE memories SET ann_indexed = true WHERE user_id = :user_id AND NOT ann_indexed
""")


def _vector(name: str) -> Cast[Any]:
    """A bound vector that travels as a float4 array, in asyncpg's binary format, and becomes pgvector's type in
    PostgreSQL. pgvector's own bind writes it as text: a statement with a 1,536-float vector cost the worker 0.89 ms
    of CPU that way, 0.42 ms this way (medians, measured interleaved)."""
    return cast(bindparam(name, type_=ARRAY(REAL)), Vector())  # asyncpg's dialect writes the bind as $n::REAL[]


def indexed_search(user_id: int, k: int) -> Select[tuple[int, float]]:
    """The ``k`` memories of a user in the HNSW index nearest the bound ``vector``: ids and cosine distances. The
    ann_indexed condition lets the planner use the partial index."""
    distance = Memory.embedding.cosine_distance(_vector("vector")).label("distance")
    return (select(Memory.id, distance)
            .where(Memory.user_id == user_id, Memory.ann_indexed, Memory.embedding.is_not(None))
            .order_by(distance).limit(k))


@dataclass(frozen=True)
class VectorItem:
    """A memory's vector and the metadata a store keeps beside it (provenance, kind, time), and its words when the
    embedder gives them (kept in the memories table whatever the store)."""

    memory_id: int
    vector: list[float]
    kind: str
    occurred_at: datetime
    source_keys: list[str] = field(default_factory=list)
    words: bytes | None = None


@dataclass(frozen=True)
class VectorHit:
    memory_id: int
    score: float  # cosine similarity


class VectorStore(Protocol):
    """Where memory vectors live, searched per user."""

    name: str

    async def upsert(self, user_id: int, items: list[VectorItem], embedder: str) -> None: ...

    async def query(self, user_id: int, vector: list[float], k: int) -> list[VectorHit]: ...

    async def delete(self, user_id: int, memory_ids: list[int]) -> None: ...

    async def delete_user(self, user_id: int) -> None: ...

    async def check(self, dimension: int) -> None:
        """Raise ConfigurationError when the store can't hold vectors of this dimension."""
        ...

    async def close(self) -> None: ...


async def _with_retries(operation: str, work: Callable[[], Awaitable[T]], attempts: int = WRITE_ATTEMPTS,
                        **context: Any) -> T:
    """Run a store operation, retrying with backoff; a final failure is a VectorStoreConnectionError."""
    try:
        async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts),
                                           wait=wait_exponential(multiplier=0.2, max=2),
                                           retry=retry_if_exception(lambda exc: not isinstance(exc, CompanionError)),
                                           reraise=True):
            with attempt:
                return await work()
    except CompanionError:
        raise
    except Exception as exc:
        raise VectorStoreConnectionError(f"vector store {operation} failed after {attempts} attempt(s) "
                                         f"({type(exc).__name__})", context=context, cause=exc) from exc
    raise AssertionError("unreachable")


class PgVectorStore:
    """Vectors in the memories table's ``embedding`` column; cosine distance, always filtered by user: an exact search
    for most users, an HNSW index for those with many memories."""

    name = "pgvector"

    def __init__(self, sessions: async_sessionmaker[AsyncSession]):
        self._sessions = sessions

    async def _tx(self, operation: str, work: Callable[[AsyncSession], Awaitable[T]], autocommit: bool = False,
                  **context: Any) -> T:
        try:
            return await run_transaction(self._sessions, f"vectors.{operation}", work, autocommit=autocommit,
                                         **context)
        except CompanionError as exc:
            if isinstance(exc, VectorStoreError):
                raise
            raise VectorStoreConnectionError(f"pgvector {operation} failed: {exc.message}", context=context,
                                             cause=exc) from exc

    async def upsert(self, user_id: int, items: list[VectorItem], embedder: str) -> None:
        if not items:
            return

        table = Memory.__table__
        statement = (update(table).where(table.c.id == bindparam("memory_id"), table.c.user_id == bindparam("owner"))
                     .values(embedding=_vector("vector"), embedder=bindparam("model"),
                             word_vectors=bindparam("words"), ann_indexed=bindparam("indexed")))

        async def work(session: AsyncSession) -> None:
            indexed = await self._ann_indexed(session, user_id, ANN_INDEX_FROM)
            await session.execute(statement, [{"memory_id": item.memory_id, "owner": user_id, "vector": item.vector,
                                               "model": embedder, "words": item.words, "indexed": indexed}
                                              for item in items])

        await self._tx("upsert", work, user_id=user_id, count=len(items))

    async def query(self, user_id: int, vector: list[float], k: int) -> list[VectorHit]:
        # One statement in autocommit for the usual case; a user past EXACT_SEARCH_LIMIT costs a second one, through
        # the index, in a transaction for SET LOCAL.
        async def exact(session: AsyncSession) -> list[VectorHit] | None:
            rows = (await session.execute(_EXACT_SEARCH, {"user_id": user_id, "vector": vector, "k": k,
                                                          "limit": EXACT_SEARCH_LIMIT})).all()
            if rows[0].total > EXACT_SEARCH_LIMIT:
                return None
            return [VectorHit(memory_id=row.id, score=1.0 - float(row.distance)) for row in rows if row.id is not None]

        async def indexed(session: AsyncSession) -> list[VectorHit]:
            await self._ann_indexed(session, user_id, 0)  # a user past the limit is in the index already, or now
            await session.execute(text(f"SET LOCAL hnsw.ef_search = {max(HNSW_EF_SEARCH, 4 * k)}"))
            rows = await session.execute(indexed_search(user_id, k), {"vector": vector})
            return [VectorHit(memory_id=row.id, score=1.0 - float(row.distance)) for row in rows]

        hits = await self._tx("query", exact, autocommit=True, user_id=user_id)
        return hits if hits is not None else await self._tx("query", indexed, user_id=user_id)

    @staticmethod
    async def _ann_indexed(session: AsyncSession, user_id: int, threshold: int) -> bool:
        """Whether the user's vectors are in the HNSW index; a user with ``threshold`` memories or more joins it
        here, once (marking their memories, whose vectors the index then takes in)."""
        state = (await session.execute(_ANN_STATE, {"user_id": user_id, "threshold": max(threshold, 1)})).one_or_none()
        if state is None:  # forgotten meanwhile: their rows are gone
            return False
        if state.ann_indexed:
            return True
        if state.memories < threshold:
            return False
        result = await session.execute(_JOIN_ANN_INDEX, {"user_id": user_id})
        _log.info("memory.ann_index_joined", user_id=user_id, memories=result.rowcount)
        return True

    async def delete(self, user_id: int, memory_ids: list[int]) -> None:
        """Nothing to do: the vector goes with its row."""

    async def delete_user(self, user_id: int) -> None:
        """Nothing to do: the user's rows cascade, vectors with them."""

    async def check(self, dimension: int) -> None:
        """Fit the column to the embedder while it holds no vectors; with vectors of another size, refuse."""
        async def work(session: AsyncSession) -> tuple[int | None, bool]:
            stored = (await session.execute(text(_COLUMN_DIMENSION))).scalar_one_or_none()
            filled = (await session.execute(text(
                "SELECT EXISTS (SELECT 1 FROM memories WHERE embedding IS NOT NULL)"))).scalar_one()
            return stored, filled

        stored, filled = await self._tx("check", work)
        if stored is None or stored == dimension:
            return
        if filled:
            raise EmbedderChangedError(
                f"the stored memories were embedded in {stored} dimensions, but the configured embedder makes "
                f"{dimension}: embed them again once with `companion memory reindex` (`companion dev --reindex` does "
                "it as it starts), or " + ("keep the offline embedder with EMBEDDING_PROVIDER=local"
                                           if stored == EMBEDDING_DIMENSION else
                                           "set the embedder back (EMBEDDING_PROVIDER, OPENAI_EMBEDDING_MODEL)"),
                context={"stored": stored, "embedder": dimension})
        await self.fit(dimension)

    async def fit(self, dimension: int) -> bool:
        """Make the column hold vectors of ``dimension`` (emptying it, rebuilding the HNSW index); True if changed."""
        async def work(session: AsyncSession) -> bool:
            stored = (await session.execute(text(_COLUMN_DIMENSION))).scalar_one()
            if stored == dimension:
                return False
            await session.execute(text("DROP INDEX IF EXISTS ix_memories_embedding"))
            await session.execute(text(f"ALTER TABLE memories ALTER COLUMN embedding TYPE vector({int(dimension)}) "
                                       "USING NULL"))
            await session.execute(text("UPDATE memories SET embedder = NULL"))
            if dimension <= HNSW_MAX_DIMENSIONS:
                await session.execute(text("CREATE INDEX ix_memories_embedding ON memories "
                                           "USING hnsw (embedding vector_cosine_ops) WHERE ann_indexed"))
            return True

        changed = await self._tx("fit", work, dimension=dimension)
        if changed:
            _log.warning("memory.vector_dimension_changed", dimension=dimension)
        return changed

    async def close(self) -> None:
        """The engine belongs to the caller."""


def namespace_of(user_id: int) -> str:
    """The Pinecone namespace of one user."""
    return f"user-{user_id}"


class PineconeStore:
    """A Pinecone serverless index, one namespace per user; provenance, kind and time in each vector's metadata."""

    name = "pinecone"

    def __init__(self, index: Any):
        self._index = index  # pinecone.AsyncIndex

    @classmethod
    def connect(cls, api_key: str, host: str, timeout: float = 10.0) -> PineconeStore:
        from pinecone import AsyncIndex

        return cls(AsyncIndex(host=host, api_key=api_key, timeout=timeout))

    async def upsert(self, user_id: int, items: list[VectorItem], embedder: str) -> None:
        if not items:
            return
        vectors = [{"id": str(item.memory_id), "values": item.vector,
                    "metadata": {"kind": item.kind, "occurred_at": item.occurred_at.isoformat(),
                                 "source_keys": item.source_keys[:100], "embedder": embedder}}
                   for item in items]

        async def work() -> None:
            response = await self._index.upsert(vectors=vectors, namespace=namespace_of(user_id),
                                                show_progress=False)
            if getattr(response, "failed_item_count", 0):
                raise VectorStoreError(f"Pinecone refused {response.failed_item_count} of {len(vectors)} vectors",
                                       context={"user_id": user_id})

        await _with_retries("upsert", work, user_id=user_id, count=len(items))

    async def query(self, user_id: int, vector: list[float], k: int) -> list[VectorHit]:
        async def work() -> list[VectorHit]:
            response = await self._index.query(top_k=k, vector=vector, namespace=namespace_of(user_id))
            return [VectorHit(memory_id=int(match.id), score=float(match.score)) for match in response.matches]

        return await _with_retries("query", work, attempts=1, user_id=user_id)

    async def delete(self, user_id: int, memory_ids: list[int]) -> None:
        if not memory_ids:
            return

        async def work() -> None:
            await self._index.delete(ids=[str(i) for i in memory_ids], namespace=namespace_of(user_id))

        await _with_retries("delete", work, user_id=user_id)

    async def delete_user(self, user_id: int) -> None:
        async def work() -> None:
            await self._index.delete(delete_all=True, namespace=namespace_of(user_id))

        await _with_retries("delete_user", work, user_id=user_id)

    async def check(self, dimension: int) -> None:
        async def work() -> Any:
            return await self._index.describe_index_stats()

        stats = await _with_retries("describe_index_stats", work, attempts=1)
        stored = getattr(stats, "dimension", None)
        if stored and stored != dimension:
            raise ConfigurationError(f"the Pinecone index holds {stored}-dimensional vectors but the embedder makes "
                                     f"{dimension}; use an index of that dimension", context={"stored": stored})

    async def close(self) -> None:
        await self._index.close()
