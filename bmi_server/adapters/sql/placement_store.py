"""Which tgtd process exports each target (mixed into SqlStateStore): the placement store
of ``adapters/tgt/pool.py``. Kept in the database so every replica and every restart finds
a target where nodes were told to log in to it."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from .schema import tgt_placements


class SqlPlacementStore:
    """Mixed into SqlStateStore; uses its engine and helpers."""

    def placement(self, iqn: str) -> int | None:
        with self._read() as conn:
            return conn.execute(
                select(tgt_placements.c.process).where(tgt_placements.c.iqn == iqn)
            ).scalar()

    def place(self, iqn: str, process: int) -> int:
        """Record ``iqn`` on ``process`` unless it has a placement; the recorded one."""
        try:
            with self._begin() as conn:
                conn.execute(tgt_placements.insert().values(iqn=iqn, process=process))
            return process
        except IntegrityError:
            # Another replica placed it first: that placement stands.
            recorded = self.placement(iqn)
            return process if recorded is None else recorded

    def unplace(self, iqn: str) -> None:
        with self._begin() as conn:
            conn.execute(delete(tgt_placements).where(tgt_placements.c.iqn == iqn))

    def placements(self) -> dict[str, int]:
        with self._read() as conn:
            return dict(conn.execute(select(tgt_placements.c.iqn, tgt_placements.c.process)).all())

    def placement_counts(self) -> dict[int, int]:
        with self._read() as conn:
            rows = conn.execute(
                select(tgt_placements.c.process, func.count())
                .group_by(tgt_placements.c.process)
            ).all()
        return {process: count for process, count in rows}
