"""Index metric_rows (job_id, id) (schema version 3).

A job's rows in arrival (id) order straight from the index: with only (job_id, step), every
history read and every poll `after_id` sorted the job's rows first.
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_index("ix_metric_rows_job_id", "metric_rows", ["job_id", "id"])
