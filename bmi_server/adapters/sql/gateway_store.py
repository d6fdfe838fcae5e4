"""Gateways and their desired targets in SQL (the GatewayStateStore port)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, and_, func, select
from sqlalchemy.exc import IntegrityError

from ...core.models import (
    Assignment,
    ExportStatus,
    Gateway,
    TargetChange,
    TargetReport,
    TargetSpec,
)
from .node_store import _aware
from .schema import gateway_revision, gateway_targets, gateways

T = gateway_targets.c


class SqlGatewayStore:
    """Mixed into SqlStateStore; uses its engine and helpers."""

    # -- gateways ----------------------------------------------------------------------

    def save_gateway(self, gateway: Gateway) -> bool:
        row = {
            "portals": ",".join(gateway.portals),
            "heartbeat_time": gateway.heartbeat_time,
            "incarnation": gateway.incarnation,
        }
        with self._begin() as conn:
            old = conn.execute(
                select(gateways.c.incarnation).where(gateways.c.name == gateway.name)
            ).scalar()
            if old is None:
                conn.execute(gateways.insert().values(name=gateway.name, pruned_through=0, **row))
            else:
                conn.execute(gateways.update().where(gateways.c.name == gateway.name).values(**row))
            restarted = old != gateway.incarnation
            if restarted and old is not None:
                # A fresh daemon (and maybe tgtd) has shown nothing yet: not applied.
                conn.execute(
                    gateway_targets.update()
                    .where(and_(T.gateway == gateway.name, T.removed.is_(False)))
                    .values(status=ExportStatus.PENDING.value, detail="", logged_in=False)
                )
        return restarted

    def list_gateways(self) -> list[Gateway]:
        return self._many(select(gateways).order_by(gateways.c.name), _gateway)

    # -- desired targets ---------------------------------------------------------------

    def assign(self, spec: TargetSpec, names: Sequence[str]) -> None:
        fields = {
            "volume": spec.volume,
            "initiator_iqn": spec.initiator_iqn,
            "chap_user": spec.chap_user,
            "chap_secret": spec.chap_secret,
            "config_volume": spec.config_volume or None,
        }
        with self._begin() as conn:
            revision = _next_revision(conn)
            existing = {
                r["gateway"]: r
                for r in conn.execute(select(gateway_targets).where(T.iqn == spec.iqn)).mappings()
            }
            for name in names:
                row = existing.get(name)
                if row is not None and not row["removed"] and all(
                    row[k] == v for k, v in fields.items()
                ):
                    continue  # already desired as is
                values = {**fields, "revision": revision, "removed": False,
                          "status": ExportStatus.PENDING.value, "detail": "",
                          "logged_in": False}
                if row is None:
                    conn.execute(gateway_targets.insert().values(
                        gateway=name, iqn=spec.iqn, **values))
                else:
                    conn.execute(gateway_targets.update().where(
                        and_(T.gateway == name, T.iqn == spec.iqn)).values(**values))

    def unassign(self, iqn: str) -> None:
        with self._begin() as conn:
            revision = _next_revision(conn)
            conn.execute(
                gateway_targets.update()
                .where(and_(T.iqn == iqn, T.removed.is_(False)))
                .values(revision=revision, removed=True, status=ExportStatus.PENDING.value,
                        detail="", logged_in=False)
            )

    def assignments(self, iqn: str) -> list[Assignment]:
        return self._many(
            select(gateway_targets).where(T.iqn == iqn).order_by(T.gateway), _assignment
        )

    def all_assignments(self) -> list[Assignment]:
        return self._many(select(gateway_targets).where(T.removed.is_(False)), _assignment)

    def load(self) -> dict[str, int]:
        query = (
            select(T.gateway, func.count())
            .where(T.removed.is_(False))
            .group_by(T.gateway)
        )
        with self._begin() as conn:
            return {name: count for name, count in conn.execute(query)}

    def snapshot(self, gateway: str) -> tuple[int, list[TargetChange]]:
        with self._begin() as conn:
            # The counter first: rows changed after this read carry larger revisions and
            # reach the gateway as changes.
            revision = _current_revision(conn)
            rows = conn.execute(
                select(gateway_targets).where(
                    and_(T.gateway == gateway, T.revision <= revision)
                ).order_by(T.iqn)
            ).mappings()
            return revision, [_change(r) for r in rows]

    def changes(self, gateway: str, after: int) -> tuple[int, list[TargetChange]] | None:
        with self._begin() as conn:
            current = _current_revision(conn)
            pruned = conn.execute(
                select(gateways.c.pruned_through).where(gateways.c.name == gateway)
            ).scalar() or 0
            if after < pruned or after > current:  # pruned meanwhile, or another database
                return None
            rows = list(conn.execute(
                select(gateway_targets).where(
                    and_(T.gateway == gateway, T.revision > after, T.revision <= current)
                ).order_by(T.revision, T.iqn)
            ).mappings())
        changes = [_change(r) for r in rows]
        return (max((c.revision for c in changes), default=after), changes)

    # -- reports -----------------------------------------------------------------------

    def record(self, gateway: str, reports: Sequence[TargetReport]) -> None:
        with self._begin() as conn:
            for report in reports:
                where = and_(T.gateway == gateway, T.iqn == report.iqn,
                             T.revision == report.revision)
                if report.status is None:
                    conn.execute(gateway_targets.delete().where(
                        and_(where, T.removed.is_(True))))
                else:
                    conn.execute(
                        gateway_targets.update()
                        .where(and_(where, T.removed.is_(False)))
                        .values(status=report.status.value, detail=report.detail,
                                portals=",".join(report.portals) or None)
                    )

    def record_sessions(self, gateway: str, iqns: Iterable[str]) -> None:
        iqns = sorted(set(iqns))
        mine = T.gateway == gateway
        with self._begin() as conn:
            if iqns:
                conn.execute(gateway_targets.update().where(
                    and_(mine, T.iqn.in_(iqns), T.logged_in.is_(False))).values(logged_in=True))
                gone = and_(mine, T.logged_in.is_(True), T.iqn.not_in(iqns))
            else:
                gone = and_(mine, T.logged_in.is_(True))
            conn.execute(gateway_targets.update().where(gone).values(logged_in=False))

    def prune_removals(self, names: Iterable[str]) -> int:
        names = list(names)
        with self._begin() as conn:
            removals = and_(T.gateway.in_(names), T.removed.is_(True))
            last = conn.execute(
                select(T.gateway, func.max(T.revision)).where(removals).group_by(T.gateway)
            ).all()
            for name, revision in last:
                conn.execute(gateways.update().where(gateways.c.name == name)
                             .values(pruned_through=revision))
            return conn.execute(gateway_targets.delete().where(removals)).rowcount


def _current_revision(conn: Connection) -> int:
    return conn.execute(
        select(gateway_revision.c.revision).where(gateway_revision.c.id == 1)
    ).scalar() or 0


def _next_revision(conn: Connection) -> int:
    """Take the counter's row lock (held to commit) and the next revision."""
    bumped = conn.execute(
        gateway_revision.update().where(gateway_revision.c.id == 1)
        .values(revision=gateway_revision.c.revision + 1)
    ).rowcount
    if not bumped:
        try:
            with conn.begin_nested():
                conn.execute(gateway_revision.insert().values(id=1, revision=1))
            return 1
        except IntegrityError:  # another server made the row this instant
            conn.execute(
                gateway_revision.update().where(gateway_revision.c.id == 1)
                .values(revision=gateway_revision.c.revision + 1)
            )
    return _current_revision(conn)


def _gateway(row) -> Gateway:
    return Gateway(
        name=row["name"],
        portals=tuple(p for p in row["portals"].split(",") if p),
        heartbeat_time=_aware(row["heartbeat_time"]),
        incarnation=row["incarnation"],
    )


def _spec(row) -> TargetSpec:
    return TargetSpec(
        iqn=row["iqn"],
        volume=row["volume"],
        initiator_iqn=row["initiator_iqn"],
        chap_user=row["chap_user"],
        chap_secret=row["chap_secret"],
        config_volume=row["config_volume"] or "",
    )


def _change(row) -> TargetChange:
    return TargetChange(row["revision"], row["iqn"], None if row["removed"] else _spec(row))


def _assignment(row) -> Assignment:
    return Assignment(
        gateway=row["gateway"],
        iqn=row["iqn"],
        revision=row["revision"],
        status=ExportStatus(row["status"]),
        detail=row["detail"],
        removed=bool(row["removed"]),
        logged_in=bool(row["logged_in"]),
        portals=tuple(p for p in (row["portals"] or "").split(",") if p),
    )
