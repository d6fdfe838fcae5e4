"""Several tgtd processes per host: which process exports each target (table
tgt_placements, local target mode), and which of a gateway's processes' portals a
target was applied on (gateway_targets.portals).

Revision ID: 0006_tgtd_processes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from bmi_server.adapters.sql.migrations import guarded

revision = "0006_tgtd_processes"
down_revision = "0005_image_digests"
branch_labels = None
depends_on = None

tgt_placements = sa.Table(
    "tgt_placements",
    sa.MetaData(),
    sa.Column("iqn", sa.String(255), primary_key=True),
    sa.Column("process", sa.Integer, nullable=False),
    sa.Index("ix_tgt_placements_process", "process"),
)


def upgrade() -> None:
    guarded.create_table(tgt_placements)
    guarded.add_column("gateway_targets", sa.Column("portals", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gateway_targets") as batch:
        batch.drop_column("portals")
    op.drop_table("tgt_placements")
