"""Jobs and their metric rows (schema version 1).

Frozen once released, like every revision: it names its own columns instead of reading the live
tables in store.py, so replaying it on an empty database always builds the same schema.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        # seq orders jobs (newest first) and is the pagination cursor; id is the public name.
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(200)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("config", sa.Text, nullable=False),  # TrainConfig JSON, paths resolved
        sa.Column("gpus_requested", sa.Integer, nullable=False),
        sa.Column("gpus", sa.Text, nullable=False),  # JSON list of assigned GPU indices
        sa.Column("executor", sa.String(32), nullable=False),
        sa.Column("pid", sa.Integer),
        sa.Column("exit_code", sa.Integer),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer),
        sa.Column("total_steps", sa.Integer),
        sa.Column("epoch", sa.Float),
        sa.Column("cancel_requested_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_table(
        "metric_rows",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),  # JSON object name -> float | null
    )
    op.create_index("ix_metric_rows_job_step", "metric_rows", ["job_id", "step"])
