"""Alembic's environment for the job store: runs the revisions on the connection it is handed.

`services.control_plane.migrations.migrate` builds the Config in code and passes its open
connection (there is no alembic.ini), so the revisions run inside its one transaction.
"""

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
