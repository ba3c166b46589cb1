"""The environment Alembic runs for each of Lethe's migration commands (never imported).

The runner (`lethe.kernel.migrations`) gives the connection, already in its transaction and
holding its lock, and the schema's own version table, so Alembic neither opens nor commits one.
"""

from __future__ import annotations

from alembic import context

context.configure(
    connection=context.config.attributes["connection"],
    version_table=context.config.attributes["version_table"],
)
with context.begin_transaction():
    context.run_migrations()
