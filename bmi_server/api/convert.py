"""Domain records <-> bmi.v1 messages."""

from __future__ import annotations

from bmi.v1 import disks_pb2, images_pb2, inventory_pb2, nodes_pb2, quotas_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from ..core.errors import InvalidArgument
from ..core.image_digests import Verification
from ..core.models import (
    BootMode,
    Disk,
    Image,
    ImageKind,
    Inventory,
    InventoryCpu,
    InventoryDisk,
    InventoryFirmware,
    InventoryMemory,
    InventoryNic,
    Node,
    NodeConfig,
    NodeState,
    Principal,
    ProjectQuota,
    ResourceState,
    SessionState,
    Smbios,
    Transition,
    Visibility,
)
from ..core.node_config import CONFIG_LUN, ConfigRequest
from ..core.nodes import check_smbios_field, normalise_mac

_VISIBILITY = {
    Visibility.PRIVATE: images_pb2.VISIBILITY_PRIVATE,
    Visibility.PUBLIC: images_pb2.VISIBILITY_PUBLIC,
}
_KIND = {
    ImageKind.GOLDEN: images_pb2.IMAGE_KIND_GOLDEN,
    ImageKind.SNAPSHOT: images_pb2.IMAGE_KIND_SNAPSHOT,
    ImageKind.COPY: images_pb2.IMAGE_KIND_COPY,
}
_STATE = {
    ResourceState.CREATING: images_pb2.RESOURCE_STATE_CREATING,
    ResourceState.READY: images_pb2.RESOURCE_STATE_READY,
    ResourceState.DELETING: images_pb2.RESOURCE_STATE_DELETING,
    ResourceState.MISSING: images_pb2.RESOURCE_STATE_MISSING,
}
_SESSION_STATE = {
    None: nodes_pb2.SESSION_STATE_NONE,
    SessionState.LOGGED_IN: nodes_pb2.SESSION_STATE_LOGGED_IN,
    SessionState.ENDED: nodes_pb2.SESSION_STATE_ENDED,
}
_FORMAT = {images_pb2.IMAGE_FORMAT_RAW: "raw", images_pb2.IMAGE_FORMAT_QCOW2: "qcow2"}


def _timestamp(value) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def quota_message(quota: ProjectQuota) -> quotas_pb2.Quota:
    def limit(name: str) -> quotas_pb2.QuotaLimit:
        return quotas_pb2.QuotaLimit(
            limit=getattr(quota.limits, name),
            used=getattr(quota.used, name),
            overridden=getattr(quota.override, name) is not None,
        )

    return quotas_pb2.Quota(
        project=quota.project,
        virtual_bytes=limit("size_bytes"),
        images=limit("images"),
        disks=limit("disks"),
    )


def image_message(image: Image, viewer: Principal) -> images_pb2.Image:
    return images_pb2.Image(
        id=image.id,
        name=image.name,
        project=image.project,
        visibility=_VISIBILITY[image.visibility],
        kind=_KIND[image.kind],
        state=_STATE[image.state],
        size_bytes=image.size_bytes,
        source=image.source,
        create_time=_timestamp(image.create_time),
        rbd_name=image.volume if viewer.is_admin else "",
        content_sha256=image.content_sha256,
        file_digest=image.file_digest,
        fetched_bytes=image.fetched_bytes,
        fetch_total_bytes=image.fetch_total_bytes,
    )


def verification_message(result: Verification) -> images_pb2.VerifyImageResponse:
    return images_pb2.VerifyImageResponse(
        image_id=result.image_id,
        recorded_sha256=result.recorded_sha256,
        computed_sha256=result.computed_sha256,
        matches=result.matches,
        detail=result.detail,
    )


def disk_message(disk: Disk, viewer: Principal, used_bytes: int = 0) -> disks_pb2.Disk:
    return disks_pb2.Disk(
        id=disk.id,
        name=disk.name,
        project=disk.project,
        image_id=disk.image_id,
        image_name=disk.image_name,
        state=_STATE[disk.state],
        size_bytes=disk.size_bytes,
        used_bytes=used_bytes,
        create_time=_timestamp(disk.create_time),
        rbd_name=disk.volume if viewer.is_admin else "",
    )


def visibility_of(value: int, *, default: Visibility | None) -> Visibility | None:
    if value == images_pb2.VISIBILITY_UNSPECIFIED:
        return default
    for domain, wire in _VISIBILITY.items():
        if wire == value:
            return domain
    raise InvalidArgument(f"unknown visibility {value}")


def format_of(value: int) -> str:
    try:
        return _FORMAT[value]
    except KeyError:
        raise InvalidArgument("format must be IMAGE_FORMAT_RAW or IMAGE_FORMAT_QCOW2") from None


_NODE_STATE = {
    NodeState.DISCOVERED: nodes_pb2.NODE_STATE_DISCOVERED,
    NodeState.AVAILABLE: nodes_pb2.NODE_STATE_AVAILABLE,
    NodeState.PROVISIONING: nodes_pb2.NODE_STATE_PROVISIONING,
    NodeState.PROVISIONED: nodes_pb2.NODE_STATE_PROVISIONED,
    NodeState.BOOTING: nodes_pb2.NODE_STATE_BOOTING,
    NodeState.ACTIVE: nodes_pb2.NODE_STATE_ACTIVE,
    NodeState.DEPROVISIONING: nodes_pb2.NODE_STATE_DEPROVISIONING,
    NodeState.FAILED: nodes_pb2.NODE_STATE_FAILED,
}
_NODE_STATE_OF = {wire: domain for domain, wire in _NODE_STATE.items()}


def node_state_of(value: int) -> NodeState | None:
    if value == nodes_pb2.NODE_STATE_UNSPECIFIED:
        return None
    try:
        return _NODE_STATE_OF[value]
    except KeyError:
        raise InvalidArgument(f"unknown node state {value}") from None


def transition_message(transition: Transition) -> nodes_pb2.NodeTransition:
    return nodes_pb2.NodeTransition(
        from_state=(
            _NODE_STATE[transition.from_state]
            if transition.from_state is not None
            else nodes_pb2.NODE_STATE_UNSPECIFIED
        ),
        to_state=_NODE_STATE[transition.to_state],
        reason=transition.reason,
        time=_timestamp(transition.time),
    )


def node_message(
    node: Node,
    portals: list[str],
    history: list[Transition] | None = None,
    inventory: Inventory | None = None,
    config: NodeConfig | None = None,
) -> nodes_pb2.Node:
    """Never carries CHAP credentials (only the node's boot script does), user-data or a
    network config (``config`` adds only whether they are set, with the keys and
    metadata: single-node answers)."""
    message = nodes_pb2.Node(
        id=node.id,
        name=node.name,
        project=node.project or "",
        macs=node.macs,
        state=_NODE_STATE[node.state],
        failure_reason=node.failure_reason,
        smbios=nodes_pb2.Smbios(
            uuid=node.smbios.uuid,
            serial=node.smbios.serial,
            manufacturer=node.smbios.manufacturer,
            product=node.smbios.product,
        ),
        disk_id=node.disk_id,
        image_id=node.image_id,
        history=[transition_message(t) for t in history or []],
    )
    if node.id:  # a node not recorded yet (listed from the isolation layer) has no time
        message.create_time.CopyFrom(_timestamp(node.create_time))
    if node.target is not None:
        message.target.CopyFrom(
            nodes_pb2.TargetInfo(
                iqn=node.target.iqn,
                lun=1,
                portals=portals,
                initiator_iqn=node.target.initiator_iqn,
                config_lun=CONFIG_LUN if node.target.config_volume else 0,
            )
        )
    if node.instance_id:
        message.identity.CopyFrom(
            nodes_pb2.NodeIdentity(instance_id=node.instance_id, hostname=node.hostname)
        )
        if config is not None:
            message.identity.ssh_authorized_keys.extend(config.ssh_keys)
            message.identity.user_data_set = bool(config.user_data)
            message.identity.network_config_set = bool(config.network_config)
            message.identity.metadata.update(dict(config.metadata))
    if node.target is not None:
        session = node.current_session
        message.session.state = _SESSION_STATE[session.state if session else None]
        if session is not None:
            message.session.time.CopyFrom(_timestamp(session.time))
    if node.last_seen_time is not None:
        message.last_seen_time.CopyFrom(_timestamp(node.last_seen_time))
    message.boot_mode = _BOOT_MODE[node.boot_mode]
    if inventory is not None:
        message.inventory.CopyFrom(inventory_message(inventory))
    return message


_BOOT_MODE = {
    BootMode.SANBOOT: nodes_pb2.BOOT_MODE_SANBOOT,
    BootMode.AGENT: nodes_pb2.BOOT_MODE_AGENT,
}


def config_request_of(message: nodes_pb2.NodeConfig) -> ConfigRequest:
    return ConfigRequest(
        hostname=message.hostname,
        ssh_keys=tuple(message.ssh_authorized_keys),
        user_data=message.user_data,
        network_config=message.network_config,
        metadata=dict(message.metadata),
    )


def boot_mode_of(value: int) -> BootMode:
    """UNSPECIFIED means sanboot."""
    if value == nodes_pb2.BOOT_MODE_UNSPECIFIED:
        return BootMode.SANBOOT
    for domain, wire in _BOOT_MODE.items():
        if wire == value:
            return domain
    raise InvalidArgument(f"unknown boot mode {value}")


_FIRMWARE = {"bios": inventory_pb2.FIRMWARE_KIND_BIOS, "uefi": inventory_pb2.FIRMWARE_KIND_UEFI}
MAX_INVENTORY_ITEMS = 256


def inventory_message(inv: Inventory) -> inventory_pb2.Inventory:
    message = inventory_pb2.Inventory(
        cpu=inventory_pb2.Cpu(
            model=inv.cpu.model,
            count=inv.cpu.count,
            architecture=inv.cpu.architecture,
            sockets=inv.cpu.sockets,
        ),
        memory=inventory_pb2.Memory(
            physical_bytes=inv.memory.physical_bytes, usable_bytes=inv.memory.usable_bytes
        ),
        block_devices=[
            inventory_pb2.BlockDevice(
                name=d.name,
                size_bytes=d.size_bytes,
                model=d.model,
                serial=d.serial,
                rotational=d.rotational,
                vendor=d.vendor,
            )
            for d in inv.disks
        ],
        interfaces=[
            inventory_pb2.NetworkInterface(
                name=n.name, mac=n.mac, driver=n.driver, speed_mbps=n.speed_mbps, carrier=n.carrier
            )
            for n in inv.nics
        ],
        system=inventory_pb2.SystemInfo(
            manufacturer=inv.system.manufacturer,
            product=inv.system.product,
            serial=inv.system.serial,
            uuid=inv.system.uuid,
        ),
        firmware=inventory_pb2.Firmware(
            kind=_FIRMWARE.get(inv.firmware.kind, inventory_pb2.FIRMWARE_KIND_UNSPECIFIED),
            vendor=inv.firmware.vendor,
            version=inv.firmware.version,
        ),
        collectors=list(inv.collectors),
    )
    if inv.collect_time is not None:
        message.collect_time.CopyFrom(_timestamp(inv.collect_time))
    return message


def _text(value: str, what: str) -> str:
    return check_smbios_field(value.strip(), what)  # printable, bounded


def inventory_of(message: inventory_pb2.Inventory) -> Inventory:
    """An agent's report, checked: bounded, printable text and valid MACs."""
    if len(message.block_devices) > MAX_INVENTORY_ITEMS or (
        len(message.interfaces) > MAX_INVENTORY_ITEMS
    ):
        raise InvalidArgument(f"at most {MAX_INVENTORY_ITEMS} disks and NICs")
    kinds = {wire: name for name, wire in _FIRMWARE.items()}
    return Inventory(
        cpu=InventoryCpu(
            model=_text(message.cpu.model, "cpu.model"),
            count=max(message.cpu.count, 0),
            architecture=_text(message.cpu.architecture, "cpu.architecture"),
            sockets=max(message.cpu.sockets, 0),
        ),
        memory=InventoryMemory(
            physical_bytes=message.memory.physical_bytes,
            usable_bytes=message.memory.usable_bytes,
        ),
        disks=tuple(
            InventoryDisk(
                name=_text(d.name, "block device name"),
                size_bytes=d.size_bytes,
                model=_text(d.model, "block device model"),
                serial=_text(d.serial, "block device serial"),
                rotational=d.rotational,
                vendor=_text(d.vendor, "block device vendor"),
            )
            for d in message.block_devices
        ),
        nics=tuple(
            InventoryNic(
                name=_text(n.name, "interface name"),
                mac=normalise_mac(n.mac),
                driver=_text(n.driver, "interface driver"),
                speed_mbps=max(n.speed_mbps, 0),
                carrier=n.carrier,
            )
            for n in message.interfaces
        ),
        system=Smbios(
            uuid=_text(message.system.uuid, "system.uuid"),
            serial=_text(message.system.serial, "system.serial"),
            manufacturer=_text(message.system.manufacturer, "system.manufacturer"),
            product=_text(message.system.product, "system.product"),
        ),
        firmware=InventoryFirmware(
            kind=kinds.get(message.firmware.kind, ""),
            vendor=_text(message.firmware.vendor, "firmware.vendor"),
            version=_text(message.firmware.version, "firmware.version"),
        ),
        collectors=tuple(_text(c, "collector") for c in message.collectors[:MAX_INVENTORY_ITEMS]),
    )
