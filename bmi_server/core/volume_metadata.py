"""What each volume records about its catalogue entry, so Ceph alone can rebuild it."""

from __future__ import annotations

from datetime import datetime

from .models import Disk, Image, ImageKind, Node, ResourceState, Visibility, VolumeInfo, utcnow

KIND = "bmi.kind"
# SHA-256 of an image's content, written before it is sealed (core/image_digests.py).
CONTENT_SHA256 = "bmi.content_sha256"
# URL imports: "<algorithm>:<hex>" of the file as fetched and checked.
FILE_DIGEST = "bmi.file_digest"
# A node's config drive (core/node_config.py): not a catalogue entry; it belongs to the
# node's provisioning, whose record names it.
CONFIG_DRIVE = "node-config"


def for_image(image: Image) -> dict[str, str]:
    return {
        KIND: "image",
        "bmi.id": image.id,
        "bmi.project": image.project,
        "bmi.name": image.name,
        "bmi.image_kind": image.kind.value,
        "bmi.visibility": image.visibility.value,
        "bmi.source": image.source,
        "bmi.create_time": image.create_time.isoformat(),
    }


def for_disk(disk: Disk) -> dict[str, str]:
    return {
        KIND: "disk",
        "bmi.id": disk.id,
        "bmi.project": disk.project,
        "bmi.name": disk.name,
        "bmi.image_id": disk.image_id,
        "bmi.image_name": disk.image_name,
        "bmi.create_time": disk.create_time.isoformat(),
    }


def for_config_drive(node: Node) -> dict[str, str]:
    """Who the drive is for; never its content (user-data may hold secrets)."""
    return {
        KIND: CONFIG_DRIVE,
        "bmi.node": node.id,
        "bmi.node_name": node.name,
        "bmi.project": node.project or "",
        "bmi.instance_id": node.instance_id,
        "bmi.disk_id": node.disk_id,
        "bmi.hostname": node.hostname,
        "bmi.create_time": utcnow().isoformat(),
    }


def is_config_drive(volume: VolumeInfo) -> bool:
    return volume.metadata.get(KIND) == CONFIG_DRIVE


def image_from(volume: VolumeInfo) -> Image:
    m = volume.metadata
    return Image(
        id=m["bmi.id"],
        name=m["bmi.name"],
        project=m["bmi.project"],
        kind=ImageKind(m.get("bmi.image_kind", "golden")),
        size_bytes=volume.size_bytes,
        volume=volume.name,
        visibility=Visibility(m.get("bmi.visibility", "private")),
        state=ResourceState.READY,
        source=m.get("bmi.source", ""),
        create_time=datetime.fromisoformat(m["bmi.create_time"]),
        content_sha256=m.get(CONTENT_SHA256, ""),
        file_digest=m.get(FILE_DIGEST, ""),
    )


def disk_from(volume: VolumeInfo) -> Disk:
    m = volume.metadata
    return Disk(
        id=m["bmi.id"],
        name=m["bmi.name"],
        project=m["bmi.project"],
        image_id=m["bmi.image_id"],
        image_name=m.get("bmi.image_name", ""),
        size_bytes=volume.size_bytes,
        volume=volume.name,
        state=ResourceState.READY,
        create_time=datetime.fromisoformat(m["bmi.create_time"]),
    )
