"""memories.word_vectors: a memory's words as the offline embedder read them, for search to rank by (4-bit vectors).

Memories stored before this revision have none until `companion memory reindex --missing` embeds them again
(`companion dev` does it as it starts); search ranks them by their other rankings meanwhile.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("memories", sa.Column("word_vectors", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("memories", "word_vectors")
