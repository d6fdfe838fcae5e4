"""Replica leases and cluster-wide exclusive jobs in SQL (mixed into SqlStateStore).

A lease is a row per running replica with an expiry it keeps pushing forward. Exclusive
jobs (reconcile, the target audit) run under a PostgreSQL session advisory lock, which the
database drops by itself when the holder's connection dies; on SQLite, which one server
uses alone, an in-process lock per database file does.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import delete, select, text, update

from ...core.models import Replica
from .schema import replicas

_local_jobs: dict[tuple[str, str], threading.Lock] = {}  # (database url, job) -> lock
_local_jobs_lock = threading.Lock()


class SqlReplicaStore:
    """Mixed into SqlStateStore; uses its engine and helpers."""

    def register_replica(self, replica: Replica, now: datetime, expire_time: datetime) -> None:
        with self._begin() as conn:
            # An earlier incarnation under the same name is dead (this one replaces it):
            # dropping its lease lets its in-flight work be repaired at once.
            conn.execute(delete(replicas).where(replicas.c.name == replica.name))
            conn.execute(
                replicas.insert().values(
                    id=replica.id,
                    name=replica.name,
                    address=replica.address,
                    start_time=now,
                    expire_time=expire_time,
                )
            )

    def renew_lease(self, replica_id: str, expire_time: datetime) -> bool:
        with self._begin() as conn:
            updated = conn.execute(
                update(replicas).where(replicas.c.id == replica_id).values(expire_time=expire_time)
            ).rowcount
        return updated == 1

    def claim_expired(self, replica_id: str, now: datetime) -> bool:
        with self._begin() as conn:
            # A concurrent renewal holds the row: PostgreSQL re-checks expire_time after it.
            dropped = conn.execute(
                delete(replicas).where(replicas.c.id == replica_id, replicas.c.expire_time <= now)
            ).rowcount
            if dropped:
                return True
            return (
                conn.execute(select(replicas.c.id).where(replicas.c.id == replica_id)).first()
                is None
            )

    def retire_replica(self, replica_id: str) -> None:
        with self._begin() as conn:
            conn.execute(delete(replicas).where(replicas.c.id == replica_id))

    def live_replicas(self, now: datetime) -> dict[str, Replica]:
        with self._begin() as conn:
            rows = conn.execute(
                select(replicas.c.id, replicas.c.name, replicas.c.address).where(
                    replicas.c.expire_time > now
                )
            ).all()
        return {r.id: Replica(id=r.id, name=r.name, address=r.address) for r in rows}

    @contextmanager
    def exclusive(self, job: str) -> Iterator[bool]:
        if not self.is_postgres:
            with _local_jobs_lock:
                lock = _local_jobs.setdefault((self.url, job), threading.Lock())
            got = lock.acquire(blocking=False)
            try:
                yield got
            finally:
                if got:
                    lock.release()
            return
        key = zlib.crc32(f"bmi:{job}".encode())
        with self._guard(), self._engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    try:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                        conn.commit()
                    except Exception:
                        # A session lock must not go back to the pool with the connection.
                        conn.invalidate()
                        raise
