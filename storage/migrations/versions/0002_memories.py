"""Semantic memory: the memories table, with a pgvector column (HNSW, cosine) and a full-text index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "memories",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.BigInteger(),
                  sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_memories_user_id_users"), nullable=False),
        sa.Column("memory_key", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("source_keys", postgresql.ARRAY(sa.Text()), nullable=False,
                  server_default=sa.text("'{}'::text[]")),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("search", postgresql.TSVECTOR(),
                  sa.Computed("to_tsvector('english'::regconfig, content)", persisted=True)),
        sa.Column("embedding", Vector(384)),
        sa.Column("embedder", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("id", name="pk_memories"),
        sa.UniqueConstraint("user_id", "memory_key", name="uq_memories_user_id_memory_key"),
        sa.CheckConstraint("kind IN ('conversation', 'fact', 'event', 'diary', 'summary')", name="kind"),
    )
    op.create_index("ix_memories_user_id_occurred_at", "memories", ["user_id", "occurred_at"])
    op.create_index("ix_memories_search", "memories", ["search"], postgresql_using="gin")
    op.create_index("ix_memories_embedding", "memories", ["embedding"], postgresql_using="hnsw",
                    postgresql_ops={"embedding": "vector_cosine_ops"})


def downgrade() -> None:
    op.drop_table("memories")
