"""SQLAlchemy models of the memory tables. Migrations in storage/migrations create them; a test keeps both equal."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.usage import UsageKind
from schemas.memory import Channel, DiaryKind, FactCategory, MemoryKind, NudgeCreator, NudgeKind, NudgeStatus, Role

# Stable constraint names: migrations can refer to them and errors can report them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The dimension of the default embedder (all-MiniLM-L6-v2). `companion memory reindex` changes the column to another
# embedder's dimension; models and migrations describe the default.
EMBEDDING_DIMENSION = 384
# Keyword search: English stemming and stop words, the same configuration for stored text and questions.
TEXT_SEARCH_CONFIG = "english"


def _one_of(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _id() -> Mapped[int]:
    return mapped_column(BigInteger, Identity(always=False), primary_key=True)


def _user_id() -> Mapped[int]:
    return mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False)


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now())


def _source_keys() -> Mapped[list[str]]:
    # Provenance: the message keys a memory came from.
    return mapped_column(ARRAY(Text), nullable=False, server_default=text("'{}'::text[]"))


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = _id()
    telegram_id: Mapped[int] = mapped_column(BigInteger, nullable=False, unique=True)
    username: Mapped[str | None] = mapped_column(Text)
    first_name: Mapped[str | None] = mapped_column(Text)
    last_name: Mapped[str | None] = mapped_column(Text)
    language_code: Mapped[str | None] = mapped_column(Text)
    timezone: Mapped[str] = mapped_column(Text, nullable=False, server_default="UTC")
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    preferences: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The user's memory vectors are in the HNSW index (they have many memories; see storage.vectors.ANN_INDEX_FROM).
    ann_indexed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))


class ProfileFact(Base):
    __tablename__ = "profile_facts"
    __table_args__ = (
        CheckConstraint(_one_of("category", FactCategory), name="category"),
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="confidence"),
        # One current value per fact; superseded values keep their valid_to.
        Index("ux_profile_facts_current", "user_id", "category", "key", unique=True,
              postgresql_where=text("valid_to IS NULL")),
    )

    id: Mapped[int] = _id()
    user_id: Mapped[int] = _user_id()
    category: Mapped[str] = mapped_column(Text, nullable=False)
    key: Mapped[str] = mapped_column(Text, nullable=False)
    value: Mapped[str] = mapped_column(Text, nullable=False)
    confidence: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("1.0"))
    source_keys: Mapped[list[str]] = _source_keys()
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("user_id", "message_key"),
        CheckConstraint(_one_of("role", Role), name="role"),
        CheckConstraint(_one_of("channel", Channel), name="channel"),
        Index("ix_conversations_user_id_sent_at", "user_id", "sent_at"),
    )

    id: Mapped[int] = _id()
    user_id: Mapped[int] = _user_id()
    message_key: Mapped[str] = mapped_column(Text, nullable=False)
    role: Mapped[str] = mapped_column(Text, nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    channel: Mapped[str] = mapped_column(Text, nullable=False)
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created_at()


class TimelineEvent(Base):
    __tablename__ = "timeline_events"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        Index("ix_timeline_events_user_id_event_at", "user_id", "event_at"),
    )

    id: Mapped[int] = _id()
    user_id: Mapped[int] = _user_id()
    title: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    event_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    category: Mapped[str] = mapped_column(Text, nullable=False, server_default="general")
    source_keys: Mapped[list[str]] = _source_keys()
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class DiaryEntry(Base):
    __tablename__ = "diary_entries"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        CheckConstraint(_one_of("kind", DiaryKind), name="kind"),
        CheckConstraint("importance BETWEEN 1 AND 5", name="importance"),
        Index("ix_diary_entries_user_id_occurred_at", "user_id", "occurred_at"),
    )

    id: Mapped[int] = _id()
    user_id: Mapped[int] = _user_id()
    title: Mapped[str] = mapped_column(Text, nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default="milestone")
    importance: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default=text("3"))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    source_keys: Mapped[list[str]] = _source_keys()
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class ScheduledMessage(Base):
    __tablename__ = "scheduled_messages"
    __table_args__ = (
        CheckConstraint(_one_of("kind", NudgeKind), name="kind"),
        CheckConstraint(_one_of("created_by", NudgeCreator), name="created_by"),
        CheckConstraint(_one_of("status", NudgeStatus), name="status"),
        CheckConstraint("content IS NOT NULL OR purpose IS NOT NULL", name="content_or_purpose"),
        Index("ix_scheduled_messages_user_id_status_scheduled_for", "user_id", "status", "scheduled_for"),
        Index("ix_scheduled_messages_status_scheduled_for", "status", "scheduled_for"),
    )

    id: Mapped[int] = _id()
    user_id: Mapped[int] = _user_id()
    nudge_id: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    scheduled_for: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    content: Mapped[str | None] = mapped_column(Text)
    purpose: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default="custom")
    created_by: Mapped[str] = mapped_column(Text, nullable=False, server_default="companion")
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    source_keys: Mapped[list[str]] = _source_keys()
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Memory(Base):
    """One unit of semantic memory: a stretch of conversation, a fact, an event or a diary entry, as searchable text.

    Provenance is source_keys, the message keys the memory came from. The vector lives in ``embedding`` with
    pgvector, in the user's namespace with Pinecone (then ``embedding`` stays empty); ``embedder`` names what made it.
    ``word_vectors``: its words as the offline embedder read them (`storage.embedding.words`), none with another.
    """

    __tablename__ = "memories"
    __table_args__ = (
        UniqueConstraint("user_id", "memory_key"),
        CheckConstraint(_one_of("kind", MemoryKind), name="kind"),
        Index("ix_memories_user_id_occurred_at", "user_id", "occurred_at"),
        Index("ix_memories_search", "search", postgresql_using="gin"),
        # The HNSW index holds the vectors of users with many memories alone; everyone else is searched exactly.
        Index("ix_memories_embedding", "embedding", postgresql_using="hnsw",
              postgresql_ops={"embedding": "vector_cosine_ops"}, postgresql_where=text("ann_indexed")),
    )

    id: Mapped[int] = _id()
    user_id: Mapped[int] = _user_id()
    memory_key: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    source_keys: Mapped[list[str]] = _source_keys()
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    search: Mapped[Any] = mapped_column(
        TSVECTOR, Computed(f"to_tsvector('{TEXT_SEARCH_CONFIG}'::regconfig, content)", persisted=True))
    embedding: Mapped[Any | None] = mapped_column(Vector(EMBEDDING_DIMENSION))
    embedder: Mapped[str | None] = mapped_column(Text)
    word_vectors: Mapped[bytes | None] = mapped_column(LargeBinary)
    # In the HNSW index: set for every memory of a user whose ann_indexed is set.
    ann_indexed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    created_at: Mapped[datetime] = _created_at()


class Usage(Base):
    """One model call that answered, counted against the user it served (by Telegram id): tokens, audio, images,
    and its cost in USD from the price table (``priced`` false: the model had no price, and cost is 0). No content.
    Kept after /forget, so that forgetting doesn't reset a budget and the operator's figures stay whole."""

    __tablename__ = "usage"
    __table_args__ = (
        CheckConstraint(_one_of("kind", UsageKind), name="kind"),
        Index("ix_usage_telegram_id_created_at", "telegram_id", "created_at"),
        Index("ix_usage_created_at", "created_at"),
    )

    id: Mapped[int] = _id()
    # The call's key: the activity attempt that made it and its place among its calls (a retry counts once).
    idempotency_key: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    telegram_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str] = mapped_column(Text, nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    cached_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    audio_seconds: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("0"))
    images: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    cost_usd: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("0"))
    priced: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    created_at: Mapped[datetime] = _created_at()


# The memories table needs pgvector; the migration creates the extension, and so does creating the tables from these
# models (tests compare the two).
event.listen(Memory.__table__, "before_create", DDL("CREATE EXTENSION IF NOT EXISTS vector"))
