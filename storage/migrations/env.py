"""Alembic environment. storage.migrate hands it an open connection; `--sql` (offline) mode renders SQL."""

from __future__ import annotations

from alembic import context

from storage.models import Base

config = context.config
target_metadata = Base.metadata

if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
else:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations with `companion db upgrade`, which opens the connection")
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)

with context.begin_transaction():
    context.run_migrations()
