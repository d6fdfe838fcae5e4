"""Tables of the catalogue. Unique constraints, not in-process locks, keep names unique
so several servers can share one database."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

images = Table(
    "images",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("project", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("visibility", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("volume", String(64), nullable=False, unique=True),
    Column("source", String(255), nullable=False, default=""),
    # NULL when unused, so the unique constraint ignores calls without one.
    Column("request_id", String(200), nullable=True, unique=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("project", "name", name="uq_images_project_name"),
    Index("ix_images_visibility", "visibility"),
    Index("ix_images_name", "name"),
)

disks = Table(
    "disks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("project", String(64), nullable=False),
    Column("image_id", String(32), nullable=False),
    Column("image_name", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("volume", String(64), nullable=False, unique=True),
    Column("request_id", String(200), nullable=True, unique=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("project", "name", name="uq_disks_project_name"),
    Index("ix_disks_image_id", "image_id"),
    Index("ix_disks_name", "name"),
)
