"""Node sessions: the last iSCSI session change seen on a node's target, and the index
the session sweep finds nodes by target with.

Revision ID: 0004_node_sessions
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from bmi_server.adapters.sql.migrations import guarded

revision = "0004_node_sessions"
down_revision = "0003_config_drives"
branch_labels = None
depends_on = None


def upgrade() -> None:
    guarded.add_column("nodes", sa.Column("session_iqn", sa.String(255), nullable=True))
    guarded.add_column("nodes", sa.Column("session_state", sa.String(16), nullable=True))
    guarded.add_column("nodes", sa.Column("session_time", sa.DateTime(timezone=True),
                                          nullable=True))
    guarded.create_index("ix_nodes_target_iqn", "nodes", ["target_iqn"])


def downgrade() -> None:
    op.drop_index("ix_nodes_target_iqn", table_name="nodes")
    with op.batch_alter_table("nodes") as batch:
        for name in ("session_time", "session_state", "session_iqn"):
            batch.drop_column(name)
