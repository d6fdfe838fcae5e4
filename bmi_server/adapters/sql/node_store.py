"""Nodes, MACs and transitions in SQL. State changes are compare-and-set updates."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, case, func, or_, select
from sqlalchemy.exc import IntegrityError

from ...core.errors import AlreadyExists, FailedPrecondition
from ...core.lifecycle import IN_FLIGHT
from ...core.models import (
    UNCHANGED,
    BootMode,
    Node,
    NodeConfig,
    NodeSession,
    NodeState,
    NodeTarget,
    SessionState,
    Smbios,
    Transition,
    Unchanged,
    utcnow,
)
from .schema import node_configs, node_macs, node_transitions, nodes

# PostgreSQL NOTIFY channel of node transitions; the payload is "<origin replica> <seq>".
NODE_EVENTS_CHANNEL = "bmi_node_events"


class SqlNodeStore:
    """Mixed into SqlStateStore; uses its engine and helpers."""

    def add_node(self, node: Node, transition: Transition | None = None) -> None:
        try:
            with self._begin() as conn:
                conn.execute(nodes.insert().values(**self._row_to_write(node)))
                conn.execute(
                    node_macs.insert(), [{"mac": mac, "node_id": node.id} for mac in node.macs]
                )
                if transition is not None:
                    self._record(conn, node.id, transition)
        except IntegrityError as exc:
            raise AlreadyExists(f"node {node.name!r} or one of its MACs already exists") from exc

    def save_node(
        self,
        node: Node,
        transition: Transition | None,
        *,
        expected: NodeState,
        config: NodeConfig | Unchanged | None = UNCHANGED,
    ) -> None:
        row = self._row_to_write(node)
        del row["id"]
        # Also compare the owner the caller last saw: a replica whose work another one took
        # over (its lease had expired) can no longer write over the new owner's.
        owner = nodes.c.owner.is_not_distinct_from(node.owner or None)
        try:
            with self._begin() as conn:
                updated = conn.execute(
                    nodes.update()
                    .where(nodes.c.id == node.id, nodes.c.state == expected.value, owner)
                    .values(**row)
                ).rowcount
                if updated != 1:
                    raise FailedPrecondition(
                        f"node {node.name!r} changed meanwhile (it is no longer {expected.value}); "
                        "look at it again and retry"
                    )
                if transition is not None:
                    self._record(conn, node.id, transition)
                if config is not UNCHANGED:
                    conn.execute(node_configs.delete().where(node_configs.c.node_id == node.id))
                    if config is not None:
                        conn.execute(node_configs.insert().values(**_config_row(node.id, config)))
        except IntegrityError as exc:
            raise AlreadyExists(f"node name {node.name!r} or its disk is taken") from exc
        node.owner = row["owner"] or ""

    def get_node_config(self, node_id: str) -> NodeConfig | None:
        with self._read() as conn:
            row = conn.execute(
                select(node_configs).where(node_configs.c.node_id == node_id)
            ).mappings().first()
        return _config(row) if row is not None else None

    def get_node(self, node_id: str) -> Node | None:
        found = self._node_row(_NODE_BY_ID, {"node_id": node_id})
        return found[0] if found else None

    def find_node_by_name(self, name: str) -> Node | None:
        return self._first_node(nodes.c.name == name)

    def find_node_by_mac(self, mac: str) -> Node | None:
        return self._first_node(
            nodes.c.id
            == select(node_macs.c.node_id).where(node_macs.c.mac == mac).scalar_subquery()
        )

    def node_of_disk(self, disk_id: str) -> Node | None:
        return self._first_node(nodes.c.disk_id == disk_id)

    def list_nodes(
        self,
        *,
        projects: Iterable[str] | None,
        state: NodeState | None,
        after: str | None,
        limit: int,
        names: Iterable[str] | None = None,
    ) -> list[Node]:
        query = select(nodes)
        if names is not None:
            query = query.where(nodes.c.name.in_(sorted(names)))
        if projects is not None:
            query = query.where(nodes.c.project.in_(list(projects)))
        if state is not None:
            query = query.where(nodes.c.state == state.value)
        if after is not None:
            query = query.where(nodes.c.name > after)
        return self._nodes(query.order_by(nodes.c.name).limit(limit))

    def all_nodes(self) -> list[Node]:
        return self._nodes(select(nodes).order_by(nodes.c.name))

    def count_nodes_by_state(self) -> dict[NodeState, int]:
        query = select(nodes.c.state, func.count()).group_by(nodes.c.state)
        with self._read() as conn:
            return {NodeState(state): count for state, count in conn.execute(query)}

    # -- iSCSI sessions (the session watcher's records) ------------------------------------

    def target_sessions(self) -> dict[str, NodeSession | None]:
        query = select(nodes.c.target_iqn, nodes.c.session_iqn, nodes.c.session_state,
                       nodes.c.session_time).where(nodes.c.target_iqn.is_not(None))
        with self._read() as conn:
            rows = conn.execute(query).mappings()
            return {row["target_iqn"]: _session(row) if row["session_iqn"] == row["target_iqn"]
                    else None for row in rows}

    def record_session(self, iqn: str, state: SessionState, time: datetime) -> bool:
        unchanged = and_(nodes.c.session_iqn == iqn, nodes.c.session_state == state.value)
        with self._begin() as conn:
            return conn.execute(
                nodes.update()
                .where(nodes.c.target_iqn == iqn,
                       or_(nodes.c.session_iqn.is_(None), nodes.c.session_state.is_(None),
                           ~unchanged))
                .values(session_iqn=iqn, session_state=state.value, session_time=time)
            ).rowcount > 0

    def count_node_sessions(self) -> dict[SessionState | None, int]:
        current = case((nodes.c.session_iqn == nodes.c.target_iqn, nodes.c.session_state),
                       else_=None)
        query = (select(current.label("session"), func.count())
                 .where(nodes.c.target_iqn.is_not(None)).group_by(current))
        with self._read() as conn:
            return {SessionState(s) if s else None: n for s, n in conn.execute(query)}

    def node_history(self, node_id: str, limit: int) -> list[Transition]:
        query = (
            select(node_transitions)
            .where(node_transitions.c.node_id == node_id)
            .order_by(node_transitions.c.seq.desc())
            .limit(limit)
        )
        with self._read() as conn:
            rows = list(conn.execute(query).mappings())
        return [_transition(r) for r in reversed(rows)]

    # -- other replicas' transitions (for the PostgreSQL event relay) -------------------

    def last_transition_seq(self) -> int:
        with self._begin() as conn:
            return conn.execute(select(func.max(node_transitions.c.seq))).scalar() or 0

    def foreign_transitions(
        self, *, seqs: list[int] | None = None, after: int = 0, limit: int = 1000
    ) -> list[tuple[int, str, Transition]]:
        """(seq, node id, transition) recorded by other replicas than this one, by seq:
        those numbered ``seqs``, or every one after ``after`` (at most ``limit``)."""
        table = node_transitions
        query = select(table).order_by(table.c.seq).limit(limit)
        query = query.where(table.c.seq.in_(seqs)) if seqs is not None else query.where(
            table.c.seq > after
        )
        if self.replica_id:
            query = query.where(
                (table.c.origin.is_(None)) | (table.c.origin != self.replica_id)
            )
        with self._begin() as conn:
            rows = list(conn.execute(query).mappings())
        return [(r["seq"], r["node_id"], _transition(r)) for r in rows]

    # -- plumbing ----------------------------------------------------------------------

    def _row_to_write(self, node: Node) -> dict[str, Any]:
        row = _node_row(node)
        row["owner"] = (self.replica_id or None) if node.state in IN_FLIGHT else None
        return row

    def _record(self, conn: Connection, node_id: str, transition: Transition) -> None:
        """Insert the transition; on PostgreSQL also NOTIFY it, which other replicas'
        event relays receive when (and only if) this transaction commits."""
        row = _transition_row(node_id, transition)
        row["origin"] = self.replica_id or None
        seq = conn.execute(node_transitions.insert().values(**row)).inserted_primary_key[0]
        if self.is_postgres:
            conn.execute(select(func.pg_notify(NODE_EVENTS_CHANNEL, f"{self.replica_id} {seq}")))

    def _first_node(self, cond) -> Node | None:
        found = self._node_row(with_macs().where(cond))
        return found[0] if found else None

    def _node_row(self, query, params: dict[str, Any] | None = None) -> tuple[Node, Any] | None:
        """The node a ``with_macs`` query selects by a unique key, and its first row (for any
        extra columns): one statement for the hot path of every agent call and boot script."""
        with self._read() as conn:
            rows = list(conn.execute(query, params or {}).mappings())
        if not rows:
            return None
        first = rows[0]
        macs = sorted(r["_mac"] for r in rows if r["id"] == first["id"] and r["_mac"] is not None)
        return _node(first, macs), first

    def _nodes(self, query) -> list[Node]:
        with self._read() as conn:
            rows = list(conn.execute(query).mappings())
            if not rows:
                return []
            ids = [r["id"] for r in rows]
            macs: dict[str, list[str]] = {i: [] for i in ids}
            for mac, node_id in conn.execute(
                select(node_macs.c.mac, node_macs.c.node_id).where(node_macs.c.node_id.in_(ids))
            ):
                macs[node_id].append(mac)
        return [_node(r, sorted(macs[r["id"]])) for r in rows]


def with_macs(*extra, join=None):
    """Nodes with one row per MAC (outer join), plus ``extra`` columns of an inner ``join``."""
    query = select(nodes, node_macs.c.mac.label("_mac"), *extra)
    if join is not None:
        query = query.join(*join)
    return query.outerjoin(node_macs, node_macs.c.node_id == nodes.c.id)


# Built once: SQLAlchemy then reuses its compiled form without rebuilding the statement.
_NODE_BY_ID = with_macs().where(nodes.c.id == bindparam("node_id"))


def _aware(value):
    # SQLite returns naive datetimes; every time here is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _node_row(node: Node) -> dict[str, Any]:
    target = node.target
    return {
        "id": node.id,
        "name": node.name,
        "project": node.project,
        "state": node.state.value,
        "failure_reason": node.failure_reason[:1000],
        "smbios_uuid": node.smbios.uuid,
        "smbios_serial": node.smbios.serial,
        "smbios_manufacturer": node.smbios.manufacturer,
        "smbios_product": node.smbios.product,
        "disk_id": node.disk_id or None,
        "image_id": node.image_id or None,
        "owns_disk": node.owns_disk,
        "target_iqn": target.iqn if target else None,
        "target_volume": target.volume if target else None,
        "initiator_iqn": target.initiator_iqn if target else None,
        "chap_user": target.chap_user if target else None,
        "chap_secret": target.chap_secret if target else None,
        "request_id": node.request_id or None,
        "create_time": node.create_time,
        "last_seen_time": node.last_seen_time,
        "boot_mode": node.boot_mode.value,
        "instance_id": node.instance_id or None,
        "hostname": node.hostname or None,
        "config_volume": (target.config_volume or None) if target else None,
    }


def _config_row(node_id: str, config: NodeConfig) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "hostname": config.hostname,
        "ssh_keys": json.dumps(list(config.ssh_keys)),
        "user_data": config.user_data,
        "network_config": config.network_config,
        "metadata": json.dumps(dict(config.metadata), sort_keys=True),
        "update_time": utcnow(),
    }


def _config(row) -> NodeConfig:
    return NodeConfig(
        hostname=row["hostname"],
        ssh_keys=tuple(json.loads(row["ssh_keys"])),
        user_data=bytes(row["user_data"]),
        network_config=bytes(row["network_config"]),
        metadata=tuple(sorted(json.loads(row["metadata"]).items())),
    )


def _transition_row(node_id: str, transition: Transition) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "from_state": transition.from_state.value if transition.from_state else "",
        "to_state": transition.to_state.value,
        "reason": transition.reason[:1000],
        "time": transition.time,
    }


def _transition(row) -> Transition:
    return Transition(
        NodeState(row["from_state"]) if row["from_state"] else None,
        NodeState(row["to_state"]), row["reason"], _aware(row["time"]),
    )


def _node(row, macs: list[str]) -> Node:
    target = None
    if row["target_iqn"]:
        target = NodeTarget(
            iqn=row["target_iqn"],
            volume=row["target_volume"],
            initiator_iqn=row["initiator_iqn"],
            chap_user=row["chap_user"],
            chap_secret=row["chap_secret"],
            config_volume=row["config_volume"] or "",
        )
    return Node(
        id=row["id"],
        name=row["name"],
        project=row["project"],
        macs=macs,
        state=NodeState(row["state"]),
        smbios=Smbios(
            uuid=row["smbios_uuid"],
            serial=row["smbios_serial"],
            manufacturer=row["smbios_manufacturer"],
            product=row["smbios_product"],
        ),
        failure_reason=row["failure_reason"],
        disk_id=row["disk_id"] or "",
        image_id=row["image_id"] or "",
        owns_disk=bool(row["owns_disk"]),
        target=target,
        request_id=row["request_id"] or "",
        create_time=_aware(row["create_time"]),
        last_seen_time=_aware(row["last_seen_time"]) if row["last_seen_time"] else None,
        boot_mode=BootMode(row["boot_mode"] or BootMode.SANBOOT),
        owner=row["owner"] or "",
        instance_id=row["instance_id"] or "",
        hostname=row["hostname"] or "",
        session=_session(row),
    )


def _session(row) -> NodeSession | None:
    if not row["session_iqn"] or not row["session_state"] or not row["session_time"]:
        return None
    return NodeSession(row["session_iqn"], SessionState(row["session_state"]),
                       _aware(row["session_time"]))
