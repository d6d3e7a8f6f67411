"""Semantic memory: what gets remembered as searchable text, and hybrid retrieval over it.

A memory is a row of the memories table with its provenance (the message keys it came from), its time, a full-text
vector and an embedding in the configured vector store. Conversation is remembered as short stretches: each message
with the two before it (from the same sitting), so a search hit carries what "yes, I did!" was an answer to.
Extracted facts, events and diary entries are memories too.

Search fuses two rankings by weighted reciprocal rank: cosine similarity from the vector store, and BM25 over
PostgreSQL full text (English stemming, the user's own rows for document frequencies); a query that names a time
("last week", "in May") adds a third, the memories of that time. With pgvector, the rankings, their fusion and the rows
come from one statement. With the offline embedder, the best hundred are ranked once more by their words (each word
of the query matched to its like among a memory's words, `storage.embedding.word_match`) and that ranking fused in
too. The best are then spread over the past: stretches of conversation that overlap join into one (each message read
once, in order), and a memory that repeats one already found without joining it waits behind memories of other
moments. Every query is scoped to one user. When the vector store fails, search goes on with keywords alone and says
so in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import REAL, DateTime, Select, bindparam, delete, func, null, select, text
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import CompanionError, DatabaseConnectionError, VectorStoreError
from core.logging import get_logger
from core.timeframe import Anchor, TimeRange, anchor, time_range
from schemas.memory import MemoryKind, MessageRead, Role
from storage import vectors
from storage.database import run_transaction
from storage.embedding import Embedder, MiniLMEmbedder, word_match, words
from storage.models import TEXT_SEARCH_CONFIG, Conversation, Memory
from storage.vectors import PgVectorStore, VectorItem, VectorStore

_log = get_logger(__name__)

# A stretch of conversation: a message and up to this many before it, if they came within the gap.
WINDOW_BEFORE = 2
WINDOW_GAP = timedelta(hours=3)
MAX_MEMORY_CHARS = 4_000
# Fusion: reciprocal-rank constant and the weight of each ranking (keywords carry names, places and dates well).
RRF_K = 30
DENSE_WEIGHT = 1.0
KEYWORD_WEIGHT = 1.5
# A query that names a time ("last week", "in May") ranks the memories of that time too: the best of them gains about
# what the best of both other rankings gives, so they come first unless an older one matches far better.
TIME_WEIGHT = 2.5
CANDIDATES = 100
STALE_SLACK = 10
# The words ranking: of the best fused memories, this many are ranked by their words, with this weight. It finds the
# memories that answer a question without sharing a word with it; on LoCoMo, weights of 3 to 6 gave recall@10
# 0.896-0.900, 2 gave 0.892; ranking 60 memories instead of 100 gave 0.886, 150 gave 0.893.
WORDS_CANDIDATES = 100
WORDS_WEIGHT = 4.0
# What dates "before the move": the best keyword matches of "move", an extracted event over a diary moment over talk.
ANCHOR_CANDIDATES = 20
_TELLS_FIRST = {MemoryKind.EVENT.value: 0, MemoryKind.DIARY.value: 1}
# Search fuses k * POOL_FACTOR memories, from which `spread` picks k.
POOL_FACTOR = 2
# Overlapping stretches join while together they hold at most this many messages (two stretches of three that share
# one): never more text than the two would show apart. 4 gave LoCoMo recall@10 0.880, 5 0.919, 6 0.922, 7 0.927, while
# the share of the evidence a reply's prompt holds went 0.862, 0.897, 0.898, 0.897.
JOINED_MESSAGES = 5
BM25_K1 = 1.2
BM25_B = 0.75


@dataclass(frozen=True)
class NewMemory:
    """A memory to store: idempotent by its key within the user."""

    key: str
    kind: MemoryKind
    content: str
    occurred_at: datetime
    source_keys: list[str]


@dataclass(frozen=True)
class MemoryHit:
    """A memory found for a query, with its fused score and the rankings it came from."""

    memory_id: int
    kind: MemoryKind
    content: str
    occurred_at: datetime
    source_keys: list[str]
    score: float
    via: tuple[str, ...]


@dataclass(frozen=True)
class SearchResult:
    hits: list[MemoryHit]
    degraded: bool  # True when the vector store failed and only keywords answered
    elapsed_ms: float


async def _nothing() -> None:
    """No vector ranking (the query could not be embedded)."""


def speaker_of(message: MessageRead, user_name: str) -> str:
    """Who said a message, as the memory text names them: a name in meta (group chats, imports) wins."""
    named = message.meta.get("speaker") if isinstance(message.meta, dict) else None
    if isinstance(named, str) and named:
        return named
    return user_name if message.role == Role.USER else "Companion"


def conversation_memories(messages: Sequence[MessageRead], new_keys: set[str], user_name: str) -> list[NewMemory]:
    """One memory per new message: it and up to WINDOW_BEFORE messages before it from the same sitting.

    ``messages`` are in time order and include the context before the first new one.
    """
    memories = []
    for index, message in enumerate(messages):
        if message.message_key not in new_keys or message.role == Role.SYSTEM or message.meta.get("fallback"):
            continue
        window = [message]
        for earlier in reversed(messages[max(0, index - WINDOW_BEFORE):index]):
            if window[0].sent_at - earlier.sent_at > WINDOW_GAP:
                break
            window.insert(0, earlier)
        content = "\n".join(f"{speaker_of(m, user_name)}: {m.content}" for m in window)[:MAX_MEMORY_CHARS]
        memories.append(NewMemory(key=f"msg:{message.message_key}", kind=MemoryKind.CONVERSATION,
                                  content=content, occurred_at=message.sent_at,
                                  source_keys=[m.message_key for m in window]))
    return memories


def spread(hits: Sequence[MemoryHit], k: int) -> list[MemoryHit]:
    """The best k hits, spread over the past: a stretch of conversation that overlaps one already picked joins it
    (`joined`), and a hit that cannot join a better one it overlaps waits until the hits about other moments are
    placed. So no message is shown twice unless fewer than k hits are about other moments."""
    picked: list[MemoryHit] = []
    waiting: list[MemoryHit] = []
    shown: set[str] = set()
    for hit in hits:
        if shared := shown.intersection(hit.source_keys):
            # It joins the one picked that holds all it shares (so no message shows twice), or it waits.
            for at, better in enumerate(picked):
                if shared <= set(better.source_keys) and (together := joined(better, hit)) is not None:
                    picked[at] = together
                    shown.update(hit.source_keys)
                    break
            else:
                waiting.append(hit)
            continue
        picked.append(hit)
        shown.update(hit.source_keys)
        if len(picked) == k:
            return picked
    return (picked + waiting)[:k]


def joined(better: MemoryHit, other: MemoryHit) -> MemoryHit | None:
    """``better`` (a stretch of conversation) with the messages of ``other`` that overlaps it, as one stretch read
    in order (scored, identified and found as ``better``, of the time of its last message); None unless both are
    stretches sharing a message, the two together hold at most JOINED_MESSAGES and their texts line up (a text cut
    at MAX_MEMORY_CHARS does not)."""
    conversation = MemoryKind.CONVERSATION
    if better.kind != conversation or other.kind != conversation:
        return None
    if not set(better.source_keys) & set(other.source_keys):
        return None
    # The earlier stretch is the one whose last message the other holds too.
    first, second = (better, other) if better.source_keys[-1] in other.source_keys else (other, better)
    keys = list(dict.fromkeys([*first.source_keys, *second.source_keys]))
    if len(keys) > JOINED_MESSAGES:
        return None
    cut = _overlap(first.content, second.content)
    if cut == 0:
        return None
    return dataclasses.replace(better, content=first.content + second.content[cut:], source_keys=keys,
                               occurred_at=max(first.occurred_at, second.occurred_at),
                               via=tuple(dict.fromkeys([*better.via, *other.via])))


def _overlap(first: str, second: str) -> int:
    """The length of the longest start of ``second``, in whole lines, that ``first`` ends with (0: none)."""
    cut = len(second)
    while cut > 0:
        if first.endswith(second[:cut]) and (cut == len(first) or first[-cut - 1] == "\n"):
            return cut
        cut = second.rfind("\n", 0, cut)
    return 0


def has_words(wording: np.ndarray | None) -> bool:
    """Whether a query has words to rank memories by (the offline embedder's, and not stopwords alone)."""
    return wording is not None and len(wording) > 0


def by_words(hits: list[MemoryHit], worded: Sequence[bytes | None], wording: np.ndarray | None,
             keep: int) -> list[MemoryHit]:
    """The best ``keep`` of ``hits`` (best fused first, ``worded`` their words) with the words ranking fused in: by
    how well each word of the query (``wording``) finds its like among a memory's words, best first; a memory without
    words keeps its score. Without the query's words, the first ``keep`` hits."""
    if not has_words(wording) or not hits:
        return hits[:keep]
    matched = word_match(wording, [stored or b"" for stored in worded])
    having = [at for at in range(len(hits)) if worded[at]]
    scores = [hit.score for hit in hits]
    for rank, at in enumerate(sorted(having, key=lambda at: -matched[at])):
        scores[at] += WORDS_WEIGHT / (RRF_K + rank + 1)
    best = sorted(range(len(hits)), key=lambda at: -scores[at])[:keep]
    return [dataclasses.replace(hits[at], score=scores[at]) for at in best]


# BM25 over the user's full-text vectors: the lexemes of the query, the user's document statistics, each lexeme's
# weight, and the memories holding any of them. Of a memory's lexemes only the query's are read (marked with weight A,
# then kept): the statement of a search took a third less time than reading them all.
_KEYWORD_CTES = f"""
terms AS MATERIALIZED (
    SELECT DISTINCT lexeme,
           ('''' || replace(replace(lexeme, '\\', '\\\\'), '''', '''''') || '''')::tsquery AS term
    FROM unnest(to_tsvector('{TEXT_SEARCH_CONFIG}', :query))
),
stats AS MATERIALIZED (
    SELECT count(*)::float8 AS n, greatest(avg(length(search)), 1)::float8 AS avgdl
    FROM memories WHERE user_id = :user_id
),
weights AS MATERIALIZED (
    SELECT t.lexeme,
           ln(1 + (s.n - d.df + 0.5) / (d.df + 0.5)) AS idf
    FROM terms t CROSS JOIN stats s
    CROSS JOIN LATERAL (SELECT count(*)::float8 AS df FROM memories m
                        WHERE m.user_id = :user_id AND m.search @@ t.term) d
),
candidates AS (
    SELECT m.id, m.search, length(m.search)::float8 AS dl FROM memories m
    WHERE m.user_id = :user_id
      AND m.search @@ (SELECT string_agg(term::text, ' | ')::tsquery FROM terms)
)
"""
_KEYWORD_RANKING = f"""
SELECT c.id,
       sum(w.idf * array_length(u.positions, 1) * ({BM25_K1} + 1)
           / (array_length(u.positions, 1) + {BM25_K1} * (1 - {BM25_B} + {BM25_B} * c.dl / s.avgdl))) AS score
FROM candidates c
CROSS JOIN stats s
CROSS JOIN LATERAL unnest(ts_filter(setweight(c.search, 'A', (SELECT array_agg(lexeme) FROM terms)), '{{a}}'))
    AS u(lexeme, positions, weights)
JOIN weights w ON w.lexeme = u.lexeme
GROUP BY c.id
ORDER BY score DESC, c.id DESC
LIMIT :limit"""
_KEYWORD_SQL = text(f"WITH {_KEYWORD_CTES}{_KEYWORD_RANKING}")

# The time ranking: the user's memories of the time a query names (none without one), those the other rankings found
# first, best fused first, then the newest. In one statement with `alike` (the fused rankings); on its own, with the
# ids the rankings found in order.
_DATED_CTE = """dated AS (
    SELECT of_then.id, of_then.rank FROM (
        SELECT m.id, row_number() OVER (ORDER BY s.score DESC NULLS LAST, m.occurred_at DESC, m.id DESC) AS rank
        FROM memories m LEFT JOIN alike s ON s.id = m.id
        WHERE CAST(:since AS timestamptz) IS NOT NULL  -- no time named: not a row read
          AND m.user_id = :user_id AND m.occurred_at >= :since AND m.occurred_at < :until
    ) AS of_then WHERE of_then.rank <= :limit
)"""
_DATED_SQL = text(f"""
WITH alike AS (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:scores AS float8[])) AS s(id, score)),
{_DATED_CTE}
SELECT id FROM dated ORDER BY rank""").bindparams(bindparam("since", type_=DateTime(timezone=True)),
                                                  bindparam("until", type_=DateTime(timezone=True)))

# Search with pgvector in one statement: the exact vector ranking (as PgVectorStore.query ranks, for a user within the
# exact search's limit), the keyword ranking, their fusion as `search` fuses them (the same float8 sums, ties in the
# order the fusion meets them: the vector ranking's, then the keyword ranking's, then the time ranking's), the time
# ranking when the query names a time (the memories of that time, best fused first, then newest first) and the best
# rows. One row at least: the count of the user's vectors, with no memory when nothing was found or the user is past
# the limit. The rows are read by id alone (each ranking holds the user's memories only): asked for the user's too,
# PostgreSQL may read them through the user's index, a scan of all their memories for each row, while the statistics
# of the table do not yet know the user's many (a search took 21-27 ms against 11-13 ms, in a freshly loaded one).
_HYBRID_SQL = text(f"""
WITH {_KEYWORD_CTES},
keyword AS (
    SELECT ranked.id, row_number() OVER (ORDER BY ranked.score DESC, ranked.id DESC) AS rank
    FROM ({_KEYWORD_RANKING}) AS ranked
),
total AS (
    SELECT count(*) AS n FROM (SELECT 1 FROM memories WHERE user_id = :user_id AND embedding IS NOT NULL
                               LIMIT :exact_limit + 1) AS capped
),
mine AS MATERIALIZED (
    SELECT id, embedding FROM memories
    WHERE user_id = :user_id AND embedding IS NOT NULL AND (SELECT n FROM total) <= :exact_limit
),
dense AS (
    SELECT near.id, row_number() OVER (ORDER BY near.distance, near.id) AS rank
    FROM (SELECT id, embedding <=> CAST(CAST(:vector AS real[]) AS vector) AS distance FROM mine
          ORDER BY distance, id LIMIT :limit) AS near
),
alike AS (
    SELECT coalesce(d.id, kw.id) AS id, d.rank AS dense_rank, kw.rank AS keyword_rank,
           coalesce({DENSE_WEIGHT}::float8 / ({RRF_K} + d.rank), 0)
           + coalesce({KEYWORD_WEIGHT}::float8 / ({RRF_K} + kw.rank), 0) AS score
    FROM dense d FULL JOIN keyword kw ON kw.id = d.id
),
{_DATED_CTE},
fused AS (
    SELECT coalesce(s.id, dt.id) AS id, s.dense_rank, s.keyword_rank, dt.rank AS dated_rank,
           coalesce(s.score, 0) + coalesce({TIME_WEIGHT}::float8 / ({RRF_K} + dt.rank), 0) AS score
    FROM alike s FULL JOIN dated dt ON dt.id = s.id
),
best AS (
    SELECT f.id, f.dense_rank, f.keyword_rank, f.dated_rank, f.score, m.kind, m.content, m.occurred_at,
           m.source_keys, m.word_vectors
    FROM fused f JOIN memories m ON m.id = f.id
    ORDER BY f.score DESC, f.dense_rank NULLS LAST, f.keyword_rank, f.dated_rank
    LIMIT :k
)
SELECT total.n AS total, best.* FROM total LEFT JOIN best ON true
ORDER BY best.score DESC, best.dense_rank NULLS LAST, best.keyword_rank, best.dated_rank
""").bindparams(bindparam("vector", type_=ARRAY(REAL)), bindparam("since", type_=DateTime(timezone=True)),
               bindparam("until", type_=DateTime(timezone=True)))


class MemoryIndex:
    """Stores memories for one database and vector store, and searches them per user."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], embedder: Embedder, store: VectorStore):
        self._sessions = sessions
        self.embedder = embedder
        self.store = store
        # The embedder that gives the words of a text, if this one does.
        self._wording = embedder if isinstance(embedder, MiniLMEmbedder) else None

    async def close(self) -> None:
        """Close the vector store's and the embedder's connections."""
        await self.store.close()
        await self.embedder.close()

    async def _tx(self, operation, work, **context):
        return await run_transaction(self._sessions, operation, work, **context)

    async def _read(self, operation, work, **context):
        return await run_transaction(self._sessions, operation, work, autocommit=True, **context)

    # --- writing ------------------------------------------------------------------------------------------------

    async def add(self, user_id: int, memories: Sequence[NewMemory]) -> list[int]:
        """Store memories (a key already stored with the same content is left alone) and index their vectors.

        Rows are written first; a vector store failure is logged and leaves them findable by keywords until
        `companion memory reindex` embeds them. Returns the ids of the rows written or changed.
        """
        if not memories:
            return []
        latest = {memory.key: memory for memory in memories}  # the last word for a key repeated in one call
        rows = [{"user_id": user_id, "memory_key": m.key, "kind": m.kind.value,
                 "content": m.content[:MAX_MEMORY_CHARS], "occurred_at": m.occurred_at,
                 "source_keys": list(dict.fromkeys(m.source_keys))} for m in latest.values()]

        async def work(session: AsyncSession) -> list[tuple[int, str, str, datetime, list[str]]]:
            statement = insert(Memory).values(rows)
            statement = statement.on_conflict_do_update(
                index_elements=[Memory.user_id, Memory.memory_key],
                set_={"content": statement.excluded.content, "kind": statement.excluded.kind,
                      "occurred_at": statement.excluded.occurred_at,
                      "source_keys": statement.excluded.source_keys, "embedding": None, "embedder": None,
                      "word_vectors": None},
                # An unchanged memory keeps its vector: nothing to write, nothing to embed.
                where=(Memory.content != statement.excluded.content)
                | (Memory.source_keys != statement.excluded.source_keys),
            ).returning(Memory.id, Memory.content, Memory.kind, Memory.occurred_at, Memory.source_keys)
            return [tuple(row) for row in (await session.execute(statement)).all()]

        written = await self._tx("memories.add", work, user_id=user_id, count=len(rows))
        await self._embed(user_id, written)
        return [row[0] for row in written]

    async def _embed(self, user_id: int, rows: Sequence[tuple]) -> bool:
        if not rows:
            return True
        texts = [row[1] for row in rows]
        try:
            if self._wording is not None:
                vectors, worded = await self._wording.embed_with_words(texts)
            else:
                vectors, worded = await self.embedder.embed(texts), [None] * len(texts)
            items = [VectorItem(memory_id=row[0], vector=vector, kind=row[2], occurred_at=row[3], source_keys=row[4],
                                words=said) for row, vector, said in zip(rows, vectors, worded, strict=True)]
            await self.store.upsert(user_id, items, embedder=self.embedder.name)
            if not isinstance(self.store, PgVectorStore):  # rows embedded elsewhere: mark them for reindexing
                await self._mark_embedded(user_id, items)
            return True
        except VectorStoreError as exc:
            _log.warning("memory.vectors_unavailable", user_id=user_id, memories=len(rows), store=self.store.name,
                         error=exc.code, detail=exc.message)
            return False

    async def _mark_embedded(self, user_id: int, items: list[VectorItem]) -> None:
        """Mark rows whose vectors another store holds as embedded, with their words."""
        async def work(session: AsyncSession) -> None:
            await session.execute(text("UPDATE memories SET embedder = :name, word_vectors = :words "
                                       "WHERE user_id = :u AND id = :id"),
                                  [{"name": self.embedder.name, "words": item.words, "u": user_id,
                                    "id": item.memory_id} for item in items])

        await self._tx("memories.mark_embedded", work, user_id=user_id)

    async def remember_messages(self, user_id: int, new_keys: Sequence[str], user_name: str) -> list[int]:
        """Remember stored messages (by key) as stretches of conversation, with the messages before them."""
        return await self.remember_window(user_id, await self.window(user_id, new_keys), new_keys, user_name)

    async def remember_window(self, user_id: int, window: Sequence[MessageRead], new_keys: Sequence[str],
                              user_name: str) -> list[int]:
        """Remember the messages ``new_keys`` of a ``window`` read with :meth:`window`."""
        return await self.add(user_id, conversation_memories(window, set(new_keys), user_name))

    async def window(self, user_id: int, new_keys: Sequence[str]) -> list[MessageRead]:
        """The stored messages from the first of ``new_keys`` on, with the WINDOW_BEFORE before it, in order."""
        if not new_keys:
            return []

        async def work(session: AsyncSession) -> list[MessageRead]:
            first = (await session.execute(
                select(Conversation.sent_at, Conversation.id)
                .where(Conversation.user_id == user_id, Conversation.message_key.in_(list(new_keys)))
                .order_by(Conversation.sent_at, Conversation.id).limit(1))).first()
            if first is None:
                return []
            before = (await session.execute(
                select(Conversation).where(Conversation.user_id == user_id,
                                           (Conversation.sent_at < first.sent_at)
                                           | ((Conversation.sent_at == first.sent_at)
                                              & (Conversation.id < first.id)))
                .order_by(Conversation.sent_at.desc(), Conversation.id.desc()).limit(WINDOW_BEFORE))).scalars().all()
            since = (await session.execute(
                select(Conversation).where(Conversation.user_id == user_id,
                                           (Conversation.sent_at > first.sent_at)
                                           | ((Conversation.sent_at == first.sent_at)
                                              & (Conversation.id >= first.id)))
                .order_by(Conversation.sent_at, Conversation.id))).scalars().all()
            return [MessageRead.model_validate(row) for row in [*reversed(before), *since]]

        return await self._read("memories.messages", work, user_id=user_id)

    async def forget(self, user_id: int, keys: Sequence[str]) -> None:
        """Remove memories by key, rows and vectors."""

        async def work(session: AsyncSession) -> list[int]:
            deleted = await session.execute(delete(Memory).where(Memory.user_id == user_id,
                                                                 Memory.memory_key.in_(list(keys)))
                                            .returning(Memory.id))
            return list(deleted.scalars())

        ids = await self._tx("memories.forget", work, user_id=user_id)
        await self.store.delete(user_id, ids)

    async def forget_user(self, user_id: int) -> None:
        """Remove every vector of a user from the store (rows go with the user's row)."""
        await self.store.delete_user(user_id)

    # --- reading ------------------------------------------------------------------------------------------------

    async def time_named(self, user_id: int, query: str, now: datetime, zone: ZoneInfo) -> TimeRange | None:
        """The time ``query`` names, as of ``now`` in ``zone``: a date phrase ("last week"), or something that happened
        ("before the move") dated by the user's memories; None when it names none."""
        named = time_range(query, now, zone)
        if named is not None:
            return named
        happened = anchor(query)
        return await self.when_happened(user_id, happened) if happened is not None else None

    async def search(self, user_id: int, query: str, k: int = 10, when: TimeRange | None = None) -> SearchResult:
        """The k memories of this user that best answer ``query``, best first; with ``when`` (the time the query
        names, see `core.timeframe`), the memories of that time first unless others match far better.

        A memory whose messages are all but one in better memories (the stretch beside one already found) waits
        until memories of other moments are placed, so that k memories cover as much of the past as they can."""
        started = time.perf_counter()
        if not query.strip():
            return SearchResult(hits=[], degraded=False, elapsed_ms=0.0)
        pool = k * POOL_FACTOR
        if not isinstance(self.store, PgVectorStore) and self._wording is None:
            # The query is embedded (by a remote embedder) while the keywords are searched.
            return await self._search_apart(user_id, query, k, started, when=when)
        try:
            vector, wording = await self._embed_query(query)
        except VectorStoreError as exc:
            self._without_vectors(user_id, exc)
            return await self._search_apart(user_id, query, k, started, dense=_nothing(), when=when)
        if isinstance(self.store, PgVectorStore):
            # Once the query is embedded, one statement does it all (a user past the exact search's limit
            # excepted): two rankings and the rows cost three statements.
            found = await self._search_at_once(user_id, query, vector, self._candidates(pool, wording), when)
            if found is not None:
                hits = by_words(*found, wording, keep=pool)
                return SearchResult(hits=spread(hits, k), degraded=False,
                                    elapsed_ms=(time.perf_counter() - started) * 1000)
        return await self._search_apart(user_id, query, k, started, dense=self._nearest(user_id, query, vector),
                                        when=when, wording=wording)

    async def _embed_query(self, query: str) -> tuple[list[float], np.ndarray | None]:
        """The query's vector and, with the offline embedder, its words."""
        if self._wording is None:
            return (await self.embedder.embed([query]))[0], None
        vectors, worded = await self._wording.embed_with_words([query])
        return vectors[0], words(worded[0])

    @staticmethod
    def _candidates(pool: int, wording: np.ndarray | None) -> int:
        """How many of the best fused memories to read: those ranked by their words too, when the query has some."""
        return max(pool, WORDS_CANDIDATES) if has_words(wording) else pool

    async def _search_at_once(self, user_id: int, query: str, vector: list[float], k: int,
                              when: TimeRange | None = None) -> tuple[list[MemoryHit], list[bytes | None]] | None:
        """Both rankings (and the time ranking), fused, with their rows (and the memories' words), in one statement;
        None for a user past the exact search's limit or when the statement fails short of PostgreSQL being out of
        reach (the rankings one by one then tell which one failed, and search goes on with the other)."""
        params = {"query": query, "user_id": user_id, "vector": vector, "limit": CANDIDATES, "k": k,
                  "exact_limit": vectors.EXACT_SEARCH_LIMIT, "since": when.start if when else None,
                  "until": when.end if when else None}

        async def work(session: AsyncSession) -> tuple[list[MemoryHit], list[bytes | None]] | None:
            rows = (await session.execute(_HYBRID_SQL, params)).all()
            if rows[0].total > params["exact_limit"]:
                return None
            rows = [row for row in rows if row.id is not None]
            return [MemoryHit(memory_id=row.id, kind=MemoryKind(row.kind), content=row.content,
                              occurred_at=row.occurred_at, source_keys=list(row.source_keys), score=row.score,
                              via=tuple(name for name, rank in (("vector", row.dense_rank),
                                                                ("keyword", row.keyword_rank),
                                                                ("time", row.dated_rank)) if rank is not None))
                    for row in rows], [row.word_vectors for row in rows]

        try:
            return await self._read("memories.search", work, user_id=user_id)
        except DatabaseConnectionError:
            raise
        except CompanionError as exc:
            _log.warning("memory.search_at_once_failed", user_id=user_id, error=exc.code, detail=exc.message)
            return None

    async def _search_apart(self, user_id: int, query: str, k: int, started: float,
                            dense: Coroutine[Any, Any, list[int] | None] | None = None,
                            when: TimeRange | None = None, wording: np.ndarray | None = None) -> SearchResult:
        """Search with the rankings asked for one by one (``dense``: the vector ranking, embedding the query unless
        given) and fused here, then the rows of the best, ranked by their words too when ``wording`` (the query's
        words) is given."""

        async def keyword_work(session: AsyncSession) -> list[int]:
            rows = await session.execute(_KEYWORD_SQL, {"query": query, "user_id": user_id, "limit": CANDIDATES})
            return [row[0] for row in rows]

        # The two rankings come from different places (the vector store, PostgreSQL): ask both at once.
        found_dense, keyword = await asyncio.gather(
            dense if dense is not None else self._nearest(user_id, query),
            self._read("memories.keyword_search", keyword_work, user_id=user_id))
        degraded = found_dense is None
        ranking = found_dense or []
        scores: dict[int, float] = {}
        via: dict[int, list[str]] = {}
        for name, ranked_ids, weight in (("vector", ranking, DENSE_WEIGHT), ("keyword", keyword, KEYWORD_WEIGHT)):
            for rank, memory_id in enumerate(ranked_ids):
                scores[memory_id] = scores.get(memory_id, 0.0) + weight / (RRF_K + rank + 1)
                via.setdefault(memory_id, []).append(name)
        if when is not None:
            for rank, memory_id in enumerate(await self._of_then(user_id, when, scores)):
                scores[memory_id] = scores.get(memory_id, 0.0) + TIME_WEIGHT / (RRF_K + rank + 1)
                via.setdefault(memory_id, []).append("time")
        wanted = self._candidates(k * POOL_FACTOR, wording)
        ranked = sorted(scores, key=lambda memory_id: -scores[memory_id])[:wanted + STALE_SLACK]
        hits: list[MemoryHit] = []
        worded: list[bytes | None] = []
        if ranked:
            # A few more than asked for: a vector store may still know a vector whose row is gone.
            rows = await self._rows(user_id, ranked, with_words=has_words(wording))
            for memory_id in ranked:
                row = rows.get(memory_id)
                if row is None:  # a vector whose row is gone (or another user's): never shown
                    continue
                hits.append(MemoryHit(memory_id=row.id, kind=MemoryKind(row.kind), content=row.content,
                                      occurred_at=row.occurred_at, source_keys=list(row.source_keys),
                                      score=scores[memory_id], via=tuple(via[memory_id])))
                worded.append(row.word_vectors)
                if len(hits) == wanted:
                    break
        hits = by_words(hits, worded, wording, keep=k * POOL_FACTOR)
        return SearchResult(hits=spread(hits, k), degraded=degraded,
                            elapsed_ms=(time.perf_counter() - started) * 1000)

    async def _of_then(self, user_id: int, when: TimeRange, scores: dict[int, float]) -> list[int]:
        """The time ranking: the user's memories of ``when``, those with ``scores`` first, best first."""

        async def work(session: AsyncSession) -> list[int]:
            rows = await session.execute(_DATED_SQL, {"user_id": user_id, "since": when.start, "until": when.end,
                                                      "limit": CANDIDATES, "ids": list(scores),
                                                      "scores": list(scores.values())})
            return [row[0] for row in rows]

        return await self._read("memories.of_then", work, user_id=user_id)

    async def when_happened(self, user_id: int, what: Anchor) -> TimeRange | None:
        """The span "before/after/since the <something>" names, dated by the memory that best tells of it (an
        extracted event first, then a diary moment, then conversation); None when no memory mentions it."""

        async def work(session: AsyncSession) -> list[int]:
            rows = await session.execute(_KEYWORD_SQL, {"query": what.what, "user_id": user_id,
                                                        "limit": ANCHOR_CANDIDATES})
            return [row[0] for row in rows]

        ranked = await self._read("memories.anchor", work, user_id=user_id)
        rows = await self._rows(user_id, ranked) if ranked else {}
        # Gone since they were ranked (forgotten meanwhile): not told.
        telling = [(rank, rows[memory_id]) for rank, memory_id in enumerate(ranked) if memory_id in rows]
        if not telling:
            return None
        _, told = min(telling, key=lambda ranked_row: (_TELLS_FIRST.get(ranked_row[1].kind, len(_TELLS_FIRST)),
                                                       ranked_row[0]))
        return what.around(told.occurred_at)

    async def _nearest(self, user_id: int, query: str, vector: list[float] | None = None) -> list[int] | None:
        """The vector ranking: ids of the memories nearest the query (embedded here unless ``vector`` is given), best
        first; None when the embedder or the vector store fails."""
        try:
            if vector is None:
                vector = (await self.embedder.embed([query]))[0]
            return [hit.memory_id for hit in await self.store.query(user_id, vector, CANDIDATES)]
        except VectorStoreError as exc:
            self._without_vectors(user_id, exc)
            return None

    def _without_vectors(self, user_id: int, exc: VectorStoreError) -> None:
        _log.warning("memory.search_without_vectors", user_id=user_id, store=self.store.name, error=exc.code,
                     detail=exc.message)

    async def _rows(self, user_id: int, ids: list[int], with_words: bool = False) -> dict[int, Memory]:
        """The rows of ``ids`` (of this user), with their words when asked (~10 KB a memory), else None for them."""
        words_column = Memory.word_vectors if with_words else null().label("word_vectors")

        async def work(session: AsyncSession) -> dict[int, Memory]:
            rows = await session.execute(select(Memory.id, Memory.kind, Memory.content, Memory.occurred_at,
                                                Memory.source_keys, words_column)
                                         .where(Memory.user_id == user_id, Memory.id.in_(ids)))
            return {row.id: row for row in rows}

        return await self._read("memories.rows", work, user_id=user_id)

    # --- maintenance --------------------------------------------------------------------------------------------

    async def reindex(self, user_id: int | None = None, batch: int = 256, everything: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Embed memories again with the current embedder (all of them, or only those without its vector).

        With pgvector, a change of dimension first changes the column (and rebuilds the HNSW index). ``progress`` is
        told (done, total) after each batch. Returns how many memories were embedded.
        """
        if isinstance(self.store, PgVectorStore):
            await self.store.fit(self.embedder.dimension)

        def chosen(statement: Select) -> Select:
            if user_id is not None:
                statement = statement.where(Memory.user_id == user_id)
            if not everything:
                missing = (Memory.embedder.is_(None)) | (Memory.embedder != self.embedder.name)
                if self._wording is not None:
                    missing = missing | Memory.word_vectors.is_(None)
                statement = statement.where(missing)
            return statement

        async def count(session: AsyncSession) -> int:
            return (await session.execute(chosen(select(func.count()).select_from(Memory)))).scalar_one()

        total = await self._tx("memories.reindex_count", count) if progress is not None else 0
        done, last_id = 0, 0
        while True:
            async def work(session: AsyncSession, after: int = last_id) -> list[tuple]:
                statement = chosen(select(Memory.id, Memory.content, Memory.kind, Memory.occurred_at,
                                          Memory.source_keys, Memory.user_id).where(Memory.id > after))
                return [tuple(row) for row in (await session.execute(statement.order_by(Memory.id).limit(batch)))]

            rows = await self._tx("memories.reindex_batch", work)
            if not rows:
                return done
            by_user: dict[int, list[tuple]] = {}
            for row in rows:
                by_user.setdefault(row[5], []).append(row[:5])
            for owner, owned in by_user.items():
                if not await self._embed(owner, owned):
                    raise VectorStoreError("the vector store failed during reindexing; run it again",
                                           context={"user_id": owner, "done": done})
                done += len(owned)
            last_id = rows[-1][0]
            if progress is not None:
                progress(done, max(total, done))
