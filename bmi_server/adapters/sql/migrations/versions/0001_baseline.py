"""Baseline: the schema of the release of 2026-11-26 (``baseline_schema.py``).

On an empty database this creates it; on an unversioned one from before that release
it adds the tables, nullable columns and indexes it lacks (as that release's start did).

Revision ID: 0001_baseline
"""

from __future__ import annotations

from alembic import op

from bmi_server.adapters.sql.migrations import baseline_schema, guarded

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in baseline_schema.metadata.sorted_tables:
        guarded.create_table(table)


def downgrade() -> None:
    for table in reversed(baseline_schema.metadata.sorted_tables):
        op.drop_table(table.name)
