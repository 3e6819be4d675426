"""Alembic's entry point for lathe's schema migrations, run by `Store` (store/migrate.py) on
the connection it opened; never from a command line of its own."""

from __future__ import annotations

from alembic import context

from lathe.store.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
