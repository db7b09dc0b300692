"""Alembic environment: run programmatically by ``keylocked.library.migrate`` on a given connection."""

from alembic import context

from keylocked.library.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
