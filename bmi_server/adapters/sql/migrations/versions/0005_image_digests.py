"""Image digests and URL imports: the SHA-256 of an image's content, the digest of the
file it was imported from, and a URL import's progress.

Revision ID: 0005_image_digests
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from bmi_server.adapters.sql.migrations import guarded

revision = "0005_image_digests"
down_revision = "0004_node_sessions"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("content_sha256", sa.String(64)),
    ("file_digest", sa.String(140)),
    ("fetched_bytes", sa.BigInteger()),
    ("fetch_total_bytes", sa.BigInteger()),
)


def upgrade() -> None:
    for name, kind in _COLUMNS:
        guarded.add_column("images", sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
