"""The HNSW index keeps the vectors of users with many memories alone (a partial index on memories.ann_indexed).

Users with fewer memories are searched exactly, so their vectors never needed the index; keeping it up to date was
most of PostgreSQL's work in a remember step. Users who already have ANN_INDEX_FROM memories are marked here.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ANN_INDEX_FROM = 5_000  # storage.vectors.ANN_INDEX_FROM when this revision was written
HNSW_MAX_DIMENSIONS = 2000  # pgvector's limit for an HNSW index on vector columns
_DIMENSION = "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'memories'::regclass AND attname = 'embedding'"


def _create_index(where: str) -> None:
    """The HNSW index, unless the column holds vectors too long for one (as `companion memory reindex` leaves it)."""
    if op.get_bind().execute(sa.text(_DIMENSION)).scalar_one() <= HNSW_MAX_DIMENSIONS:
        op.execute(f"CREATE INDEX ix_memories_embedding ON memories USING hnsw (embedding vector_cosine_ops){where}")


def upgrade() -> None:
    for table in ("users", "memories"):
        op.add_column(table, sa.Column("ann_indexed", sa.Boolean(), nullable=False, server_default=sa.text("false")))
    op.execute("DROP INDEX IF EXISTS ix_memories_embedding")
    op.execute(f"UPDATE users SET ann_indexed = true WHERE id IN "
               f"(SELECT user_id FROM memories GROUP BY user_id HAVING count(*) >= {ANN_INDEX_FROM})")
    op.execute("UPDATE memories SET ann_indexed = true FROM users WHERE users.id = memories.user_id "
               "AND users.ann_indexed")
    _create_index(" WHERE ann_indexed")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_memories_embedding")
    for table in ("memories", "users"):
        op.drop_column(table, "ann_indexed")
    _create_index("")
