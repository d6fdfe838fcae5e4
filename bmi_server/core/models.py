"""Domain records. Plain data; the core's services own the rules about them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

T = TypeVar("T")


class Visibility(enum.StrEnum):
    PRIVATE = "private"
    PUBLIC = "public"


class ImageKind(enum.StrEnum):
    GOLDEN = "golden"
    SNAPSHOT = "snapshot"
    COPY = "copy"


class ResourceState(enum.StrEnum):
    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, or a tenant acting for exactly one project."""

    name: str
    project: str | None = None
    is_admin: bool = False

    def can_access_project(self, project: str) -> bool:
        return self.is_admin or self.project == project


@dataclass
class Image:
    id: str
    name: str
    project: str
    kind: ImageKind
    size_bytes: int
    volume: str  # name of the backing volume in the image store
    visibility: Visibility = Visibility.PRIVATE
    state: ResourceState = ResourceState.CREATING
    source: str = ""
    request_id: str = ""
    create_time: datetime = field(default_factory=utcnow)

    def visible_to(self, principal: Principal) -> bool:
        return principal.can_access_project(self.project) or self.visibility is Visibility.PUBLIC


@dataclass
class Disk:
    id: str
    name: str
    project: str
    image_id: str
    image_name: str
    size_bytes: int
    volume: str
    state: ResourceState = ResourceState.CREATING
    request_id: str = ""
    create_time: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str = ""


@dataclass(frozen=True)
class VolumeInfo:
    """What the image store knows of one volume it holds for BMI."""

    name: str
    size_bytes: int
    metadata: dict[str, str]
    parent: str | None  # volume this one is a clone of, if any
    complete: bool  # every creation step finished (see ImageStore.seal / clone)
    temporary_snapshots: tuple[str, ...] = ()  # left by an interrupted copy


@dataclass(frozen=True)
class ImageFormatInfo:
    """What inspecting an uploaded disk-image file found."""

    file_format: str  # "raw" or "qcow2"
    virtual_size_bytes: int


@dataclass(frozen=True)
class TargetSpec:
    """Everything the target driver needs to export one disk to one initiator."""

    iqn: str  # target name, e.g. iqn.2026-11.org.moc.bmi:dsk-3f2a9c0d1e4b5a67
    volume: str  # volume backing LUN 1
    initiator_iqn: str  # the only initiator allowed to log in
    chap_user: str
    chap_secret: str = field(repr=False)


class NodeState(enum.StrEnum):
    DISCOVERED = "discovered"
    AVAILABLE = "available"
    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"
    BOOTING = "booting"
    ACTIVE = "active"
    DEPROVISIONING = "deprovisioning"
    FAILED = "failed"


@dataclass(frozen=True)
class Smbios:
    uuid: str = ""
    serial: str = ""
    manufacturer: str = ""
    product: str = ""


@dataclass(frozen=True)
class Transition:
    from_state: NodeState
    to_state: NodeState
    reason: str
    time: datetime


@dataclass(frozen=True)
class NodeTarget:
    """A provisioned node's iSCSI export: what the target driver needs, and the boot plan."""

    iqn: str
    volume: str
    initiator_iqn: str
    chap_user: str
    chap_secret: str = field(repr=False)

    def spec(self) -> TargetSpec:
        return TargetSpec(
            iqn=self.iqn,
            volume=self.volume,
            initiator_iqn=self.initiator_iqn,
            chap_user=self.chap_user,
            chap_secret=self.chap_secret,
        )


@dataclass
class Node:
    id: str
    name: str
    project: str | None  # None while discovered
    macs: list[str]
    state: NodeState
    smbios: Smbios = Smbios()
    failure_reason: str = ""
    disk_id: str = ""
    image_id: str = ""
    # The node's disk was cloned for it by provisioning (deleted on deprovision).
    owns_disk: bool = False
    target: NodeTarget | None = None
    request_id: str = ""
    create_time: datetime = field(default_factory=utcnow)
    last_seen_time: datetime | None = None

    def visible_to(self, principal: Principal) -> bool:
        return principal.is_admin or (
            self.project is not None and self.project == principal.project
        )
