"""Domain records <-> bmi.v1 messages."""

from __future__ import annotations

from bmi.v1 import disks_pb2, images_pb2, nodes_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from ..core.errors import InvalidArgument
from ..core.models import (
    Disk,
    Image,
    ImageKind,
    Node,
    NodeState,
    Principal,
    ResourceState,
    Transition,
    Visibility,
)

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
}
_FORMAT = {images_pb2.IMAGE_FORMAT_RAW: "raw", images_pb2.IMAGE_FORMAT_QCOW2: "qcow2"}


def _timestamp(value) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


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
        from_state=_NODE_STATE[transition.from_state],
        to_state=_NODE_STATE[transition.to_state],
        reason=transition.reason,
        time=_timestamp(transition.time),
    )


def node_message(
    node: Node, portals: list[str], history: list[Transition] | None = None
) -> nodes_pb2.Node:
    """Never carries CHAP credentials: only the node's boot script does."""
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
        create_time=_timestamp(node.create_time),
    )
    if node.target is not None:
        message.target.CopyFrom(
            nodes_pb2.TargetInfo(
                iqn=node.target.iqn,
                lun=1,
                portals=portals,
                initiator_iqn=node.target.initiator_iqn,
            )
        )
    if node.last_seen_time is not None:
        message.last_seen_time.CopyFrom(_timestamp(node.last_seen_time))
    return message
