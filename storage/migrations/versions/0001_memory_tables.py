"""The six memory tables: users, profile facts, conversations, timeline events, diary entries, scheduled messages.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NOW = sa.text("now()")
EMPTY_KEYS = sa.text("'{}'::text[]")
EMPTY_JSON = sa.text("'{}'::jsonb")


def _id() -> sa.Column:
    return sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False)


def _user_id(table: str) -> sa.Column:
    return sa.Column("user_id", sa.BigInteger(),
                     sa.ForeignKey("users.id", ondelete="CASCADE", name=f"fk_{table}_user_id_users"), nullable=False)


def _stamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, server_default=None if nullable else NOW)


def _source_keys() -> sa.Column:
    return sa.Column("source_keys", postgresql.ARRAY(sa.Text()), nullable=False, server_default=EMPTY_KEYS)


def upgrade() -> None:
    op.create_table(
        "users",
        _id(),
        sa.Column("telegram_id", sa.BigInteger(), nullable=False),
        sa.Column("username", sa.Text()),
        sa.Column("first_name", sa.Text()),
        sa.Column("last_name", sa.Text()),
        sa.Column("language_code", sa.Text()),
        sa.Column("timezone", sa.Text(), nullable=False, server_default="UTC"),
        sa.Column("is_active", sa.Boolean(), nullable=False, server_default=sa.text("true")),
        sa.Column("preferences", postgresql.JSONB(), nullable=False, server_default=EMPTY_JSON),
        _stamp("created_at"),
        _stamp("updated_at"),
        _stamp("last_seen_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("telegram_id", name="uq_users_telegram_id"),
    )

    op.create_table(
        "profile_facts",
        _id(),
        _user_id("profile_facts"),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False, server_default=sa.text("1.0")),
        _source_keys(),
        _stamp("valid_from"),
        _stamp("valid_to", nullable=True),
        _stamp("created_at"),
        _stamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_profile_facts"),
        sa.CheckConstraint("category IN ('personal', 'relationships', 'work', 'education', 'health', 'hobbies', "
                           "'preferences', 'goals', 'location', 'other')", name=op.f("ck_profile_facts_category")),
        sa.CheckConstraint("confidence >= 0 AND confidence <= 1", name=op.f("ck_profile_facts_confidence")),
    )
    op.create_index("ux_profile_facts_current", "profile_facts", ["user_id", "category", "key"], unique=True,
                    postgresql_where=sa.text("valid_to IS NULL"))

    op.create_table(
        "conversations",
        _id(),
        _user_id("conversations"),
        sa.Column("message_key", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("meta", postgresql.JSONB(), nullable=False, server_default=EMPTY_JSON),
        _stamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
        sa.UniqueConstraint("user_id", "message_key", name="uq_conversations_user_id_message_key"),
        sa.CheckConstraint("role IN ('user', 'assistant', 'system')", name=op.f("ck_conversations_role")),
        sa.CheckConstraint("channel IN ('telegram', 'console')", name=op.f("ck_conversations_channel")),
    )
    op.create_index("ix_conversations_user_id_sent_at", "conversations", ["user_id", "sent_at"])

    op.create_table(
        "timeline_events",
        _id(),
        _user_id("timeline_events"),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("category", sa.Text(), nullable=False, server_default="general"),
        _source_keys(),
        sa.Column("idempotency_key", sa.Text()),
        _stamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_timeline_events"),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_timeline_events_user_id_idempotency_key"),
    )
    op.create_index("ix_timeline_events_user_id_event_at", "timeline_events", ["user_id", "event_at"])

    op.create_table(
        "diary_entries",
        _id(),
        _user_id("diary_entries"),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False, server_default="milestone"),
        sa.Column("importance", sa.SmallInteger(), nullable=False, server_default=sa.text("3")),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        _source_keys(),
        sa.Column("idempotency_key", sa.Text()),
        _stamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_diary_entries"),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_diary_entries_user_id_idempotency_key"),
        sa.CheckConstraint("kind IN ('milestone', 'reflection', 'note')", name=op.f("ck_diary_entries_kind")),
        sa.CheckConstraint("importance BETWEEN 1 AND 5", name=op.f("ck_diary_entries_importance")),
    )
    op.create_index("ix_diary_entries_user_id_occurred_at", "diary_entries", ["user_id", "occurred_at"])

    op.create_table(
        "scheduled_messages",
        _id(),
        _user_id("scheduled_messages"),
        sa.Column("nudge_id", sa.Text(), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content", sa.Text()),
        sa.Column("purpose", sa.Text()),
        sa.Column("kind", sa.Text(), nullable=False, server_default="custom"),
        sa.Column("created_by", sa.Text(), nullable=False, server_default="companion"),
        sa.Column("status", sa.Text(), nullable=False, server_default="pending"),
        _source_keys(),
        sa.Column("error", sa.Text()),
        _stamp("created_at"),
        _stamp("updated_at"),
        _stamp("sent_at", nullable=True),
        _stamp("cancelled_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_scheduled_messages"),
        sa.UniqueConstraint("nudge_id", name="uq_scheduled_messages_nudge_id"),
        sa.CheckConstraint("kind IN ('reminder', 'follow_up', 'check_in', 'custom')", name=op.f("ck_scheduled_messages_kind")),
        sa.CheckConstraint("created_by IN ('companion', 'user', 'operator')", name=op.f("ck_scheduled_messages_created_by")),
        sa.CheckConstraint("status IN ('pending', 'sent', 'cancelled', 'failed')", name=op.f("ck_scheduled_messages_status")),
        sa.CheckConstraint("content IS NOT NULL OR purpose IS NOT NULL",
                           name=op.f("ck_scheduled_messages_content_or_purpose")),
    )
    op.create_index("ix_scheduled_messages_user_id_status_scheduled_for", "scheduled_messages",
                    ["user_id", "status", "scheduled_for"])
    op.create_index("ix_scheduled_messages_status_scheduled_for", "scheduled_messages", ["status", "scheduled_for"])


def downgrade() -> None:
    for table in ("scheduled_messages", "diary_entries", "timeline_events", "conversations", "profile_facts",
                  "users"):
        op.drop_table(table)
