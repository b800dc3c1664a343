"""Trainer agents, and which agent runs a job (schema version 2)."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "agents",
        # id is derived from the agent's name: an agent that restarts keeps its identity (and
        # re-adopts the trainers it left running).
        sa.Column("id", sa.String(64), primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("gpus", sa.Text, nullable=False),  # JSON list of the agent's GPU indices
        sa.Column("max_jobs", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # live | lost | gone
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
    )
    # Null for the local executor. SQLite and PostgreSQL both add a nullable column in place.
    op.add_column("jobs", sa.Column("agent_id", sa.String(64)))
