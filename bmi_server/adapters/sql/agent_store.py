"""Node inventories and one-boot token hashes in SQL (the AgentStateStore port).

An inventory is stored as one JSON document per node: it is read and written whole,
never queried by field, and its shape may grow without a schema change.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select

from ...core.models import (
    Inventory,
    InventoryCpu,
    InventoryDisk,
    InventoryFirmware,
    InventoryMemory,
    InventoryNic,
    Node,
    Smbios,
)
from .node_store import _aware, with_macs
from .schema import boot_tokens, node_inventories, nodes

# Every agent call starts with this read; built once (see node_store._NODE_BY_ID).
_NODE_WITH_TOKEN = with_macs(
    boot_tokens.c.token_hash,
    boot_tokens.c.expire_time,
    join=(boot_tokens, boot_tokens.c.node_id == nodes.c.id),
).where(nodes.c.id == bindparam("node_id"))


class SqlAgentStore:
    """Mixed into SqlStateStore; uses its engine and helpers."""

    def save_inventory(self, node_id: str, inventory: Inventory) -> None:
        row = {
            "inventory": inventory_to_json(inventory),
            "collect_time": inventory.collect_time,
        }
        with self._begin() as conn:
            updated = conn.execute(
                node_inventories.update().where(node_inventories.c.node_id == node_id).values(**row)
            ).rowcount
            if not updated:
                conn.execute(node_inventories.insert().values(node_id=node_id, **row))

    def get_inventory(self, node_id: str) -> Inventory | None:
        with self._read() as conn:
            row = (
                conn.execute(select(node_inventories).where(node_inventories.c.node_id == node_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return inventory_from_json(row["inventory"], _aware(row["collect_time"]))

    def put_boot_token(self, node_id: str, token_hash: str, expire_time: datetime) -> None:
        row = {"token_hash": token_hash, "expire_time": expire_time}
        with self._begin() as conn:
            updated = conn.execute(
                boot_tokens.update().where(boot_tokens.c.node_id == node_id).values(**row)
            ).rowcount
            if not updated:
                conn.execute(boot_tokens.insert().values(node_id=node_id, **row))

    def get_boot_token(self, node_id: str) -> tuple[str, datetime] | None:
        with self._read() as conn:
            row = conn.execute(
                select(boot_tokens.c.token_hash, boot_tokens.c.expire_time).where(
                    boot_tokens.c.node_id == node_id
                )
            ).first()
        return (row[0], _aware(row[1])) if row is not None else None

    def node_with_boot_token(self, node_id: str) -> tuple[Node, str, datetime] | None:
        found = self._node_row(_NODE_WITH_TOKEN, {"node_id": node_id})
        if found is None:
            return None
        node, row = found
        return node, row["token_hash"], _aware(row["expire_time"])

    def delete_boot_token(self, node_id: str) -> None:
        with self._begin() as conn:
            conn.execute(boot_tokens.delete().where(boot_tokens.c.node_id == node_id))


def inventory_to_json(inventory: Inventory) -> str:
    data = asdict(inventory)
    data.pop("collect_time", None)
    return json.dumps(data, sort_keys=True)


def inventory_from_json(raw: str, collect_time: datetime | None) -> Inventory:
    data: dict[str, Any] = json.loads(raw)
    return Inventory(
        cpu=InventoryCpu(**data.get("cpu", {})),
        memory=InventoryMemory(**data.get("memory", {})),
        disks=tuple(InventoryDisk(**d) for d in data.get("disks", [])),
        nics=tuple(InventoryNic(**n) for n in data.get("nics", [])),
        system=Smbios(**data.get("system", {})),
        firmware=InventoryFirmware(**data.get("firmware", {})),
        collectors=tuple(data.get("collectors", [])),
        collect_time=collect_time,
    )
