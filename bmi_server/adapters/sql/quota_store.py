"""Quota usage, projects' own limits, and the admission of new records (mixed into
SqlStateStore).

An admission (core/quotas.py) runs inside the transaction that inserts an image or disk
record, after the project is locked, so counting and inserting are one step for every
server sharing the database:
- PostgreSQL: a transaction-scoped advisory lock on the project (``pg_advisory_xact_lock``,
  released at commit or rollback); a second insert into the project waits for it and then
  counts the first one's record.
- SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock before the count (a plain
  transaction would count under a read lock only, and two processes could both count the
  same free slot); other writers wait in the busy handler.
"""

from __future__ import annotations

import zlib

from sqlalchemy import Connection, and_, delete, func, select, text

from ...core.models import QuotaAmounts, QuotaOverride, utcnow
from ...core.ports import Admission
from .schema import disks, images, project_quotas

Q = project_quotas.c
# Advisory locks of quota admissions: (this class, a hash of the project). The two-key
# form never collides with the one-key locks of replica_store.exclusive.
_LOCK_CLASS = zlib.crc32(b"bmi:quota") - (1 << 31)
_COLUMNS = {"size_bytes": "max_bytes", "images": "max_images", "disks": "max_disks"}


class SqlQuotaStore:
    """Mixed into SqlStateStore; uses its engine and helpers."""

    def quota_usage(self, project: str) -> QuotaAmounts:
        with self._read() as conn:
            return _usage(conn, project)

    def get_quota_override(self, project: str) -> QuotaOverride:
        with self._read() as conn:
            return _override(conn, project)

    def set_quota_override(
        self, project: str, override: QuotaOverride, *, replace: bool = False
    ) -> QuotaOverride:
        given = {
            column: getattr(override, name)
            for name, column in _COLUMNS.items()
            if replace or getattr(override, name) is not None
        }
        row = {"project": project, **dict.fromkeys(_COLUMNS.values()), **given,
               "update_time": utcnow()}
        insert = self._upsert_dialect().insert(project_quotas).values(**row)
        changes = {**given, "update_time": row["update_time"]}
        with self._begin() as conn:
            conn.execute(insert.on_conflict_do_update(index_elements=[Q.project], set_=changes))
            # A project with no limit of its own left needs no row.
            conn.execute(delete(project_quotas).where(
                and_(Q.project == project, *(Q[c].is_(None) for c in _COLUMNS.values()))))
            return _override(conn, project)

    # -- admission ---------------------------------------------------------------------

    def _admit(self, conn: Connection, project: str, admit: Admission) -> None:
        """Lock ``project`` for the rest of the transaction, then run ``admit`` on what it
        holds now. Must be the transaction's first statement (SQLite)."""
        if self.is_postgres:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:cls, :key)"),
                {"cls": _LOCK_CLASS, "key": zlib.crc32(project.encode()) - (1 << 31)},
            )
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        admit(_usage(conn, project), _override(conn, project))

    def _upsert_dialect(self):
        if self.is_postgres:
            from sqlalchemy.dialects import postgresql

            return postgresql
        from sqlalchemy.dialects import sqlite

        return sqlite


def _usage(conn: Connection, project: str) -> QuotaAmounts:
    counted = [
        conn.execute(
            select(func.count(), func.coalesce(func.sum(table.c.size_bytes), 0)).where(
                table.c.project == project
            )
        ).one()
        for table in (images, disks)
    ]
    (image_count, image_bytes), (disk_count, disk_bytes) = counted
    return QuotaAmounts(
        size_bytes=int(image_bytes) + int(disk_bytes), images=image_count, disks=disk_count
    )


def _override(conn: Connection, project: str) -> QuotaOverride:
    row = conn.execute(select(project_quotas).where(Q.project == project)).mappings().first()
    if row is None:
        return QuotaOverride()
    return QuotaOverride(**{name: row[column] for name, column in _COLUMNS.items()})
