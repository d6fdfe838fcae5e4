"""Quotas: each project's own limits (table project_quotas).

Revision ID: 0002_project_quotas
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from bmi_server.adapters.sql.migrations import guarded

revision = "0002_project_quotas"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

project_quotas = sa.Table(
    "project_quotas",
    sa.MetaData(),
    sa.Column("project", sa.String(64), primary_key=True),
    sa.Column("max_bytes", sa.BigInteger, nullable=True),
    sa.Column("max_images", sa.BigInteger, nullable=True),
    sa.Column("max_disks", sa.BigInteger, nullable=True),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)


def upgrade() -> None:
    guarded.create_table(project_quotas)


def downgrade() -> None:
    op.drop_table("project_quotas")
