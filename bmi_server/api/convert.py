"""Domain records <-> bmi.v1 messages."""

from __future__ import annotations

from bmi.v1 import disks_pb2, images_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from ..core.errors import InvalidArgument
from ..core.models import Disk, Image, ImageKind, Principal, ResourceState, Visibility

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
