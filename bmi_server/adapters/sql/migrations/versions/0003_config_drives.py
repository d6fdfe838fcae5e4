"""Config drives: what a node's drive holds (table node_configs), the node's instance id,
host name and drive volume, and the drive as LUN 2 of a gateway's target.

Revision ID: 0003_config_drives
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from bmi_server.adapters.sql.migrations import guarded

revision = "0003_config_drives"
down_revision = "0002_project_quotas"
branch_labels = None
depends_on = None

_meta = sa.MetaData()
# Only the key the foreign key names; create_table makes node_configs alone.
sa.Table("nodes", _meta, sa.Column("id", sa.String(32), primary_key=True))
node_configs = sa.Table(
    "node_configs",
    _meta,
    sa.Column("node_id", sa.String(32), sa.ForeignKey("nodes.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("hostname", sa.String(253), nullable=False),
    sa.Column("ssh_keys", sa.Text, nullable=False),
    sa.Column("user_data", sa.LargeBinary, nullable=False),
    sa.Column("network_config", sa.LargeBinary, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)

NODE_COLUMNS = (("instance_id", 32), ("hostname", 253), ("config_volume", 64))


def upgrade() -> None:
    for name, length in NODE_COLUMNS:
        guarded.add_column("nodes", sa.Column(name, sa.String(length), nullable=True))
    guarded.add_column("gateway_targets", sa.Column("config_volume", sa.String(64),
                                                    nullable=True))
    guarded.create_table(node_configs)


def downgrade() -> None:
    op.drop_table("node_configs")
    with op.batch_alter_table("gateway_targets") as batch:
        batch.drop_column("config_volume")
    with op.batch_alter_table("nodes") as batch:
        for name, _ in reversed(NODE_COLUMNS):
            batch.drop_column(name)
