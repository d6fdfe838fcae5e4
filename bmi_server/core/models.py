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
    # Complete once, but its volume is gone from the image store: unusable, deletable.
    MISSING = "missing"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Credentials:
    """A caller's own credentials for the isolation layer (HIL), carried so that calls
    made for the caller are authorised by that layer as the caller. Opaque to the core;
    the password never appears in a repr, a log line or an error."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, or a tenant acting for exactly one project."""

    name: str
    project: str | None = None
    is_admin: bool = False
    # Pass-through credentials (HIL mode); None for token callers and BMI's own work.
    credentials: Credentials | None = field(default=None, repr=False, compare=False)

    def can_access_project(self, project: str) -> bool:
        return self.is_admin or self.project == project


# BMI itself, for work no caller asked for (reconcile, rollback bookkeeping).
SYSTEM = Principal(name="bmi-system", is_admin=True)


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
    # The server replica working on this record while it is in flight (creating or
    # deleting; provisioning or deprovisioning), as the state store stamped it; "" if none.
    owner: str = ""
    # SHA-256 (hex) of the raw virtual disk content as made, holes as zeros; "" if not
    # recorded (images made before digests were).
    content_sha256: str = ""
    # URL imports: "<algorithm>:<hex>" of the file as fetched (what was checked).
    file_digest: str = ""
    # URL imports in progress: bytes fetched so far and the announced length (0: unknown).
    fetched_bytes: int = 0
    fetch_total_bytes: int = 0

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
    # The server replica working on this record while it is in flight (creating or
    # deleting; provisioning or deprovisioning), as the state store stamped it; "" if none.
    owner: str = ""


@dataclass(frozen=True)
class QuotaAmounts:
    """Amounts a quota limits, for one project: the virtual bytes of its images and disks
    together, and how many of each. As limits, 0 means no limit."""

    size_bytes: int = 0
    images: int = 0
    disks: int = 0


@dataclass(frozen=True)
class QuotaOverride:
    """A project's own limits, set by an admin; None: the server's default (0: no limit)."""

    size_bytes: int | None = None
    images: int | None = None
    disks: int | None = None

    @property
    def empty(self) -> bool:
        return self.size_bytes is None and self.images is None and self.disks is None


@dataclass(frozen=True)
class ProjectQuota:
    """A project's effective limits, what it uses now, and which limits are its own."""

    project: str
    limits: QuotaAmounts
    used: QuotaAmounts
    override: QuotaOverride


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str = ""


@dataclass(frozen=True)
class ExternalVolume:
    """A volume in the pool that is not one of BMI's records (an import source)."""

    size_bytes: int
    # The store's own marker says it is BMI's, or made from BMI's (a copy or clone).
    from_bmi: bool


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
    # Most bytes converting the file to raw can write (its mapped clusters; raw: its size).
    data_bytes_bound: int = 0


@dataclass(frozen=True)
class TargetSpec:
    """Everything the target driver needs to export one disk to one initiator."""

    iqn: str  # target name, e.g. iqn.2026-11.org.moc.bmi:dsk-3f2a9c0d1e4b5a67
    volume: str  # volume backing LUN 1
    initiator_iqn: str  # the only initiator allowed to log in
    chap_user: str
    chap_secret: str = field(repr=False)
    # Volume backing LUN 2: the node's config drive (cloud-init NoCloud); "" for none
    # (targets made before config drives existed).
    config_volume: str = ""


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
    from_state: NodeState | None  # None: the node's first record (it came into being)
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
    config_volume: str = ""  # LUN 2: the node's config drive ("" on older nodes)

    def spec(self) -> TargetSpec:
        return TargetSpec(
            iqn=self.iqn,
            volume=self.volume,
            initiator_iqn=self.initiator_iqn,
            chap_user=self.chap_user,
            chap_secret=self.chap_secret,
            config_volume=self.config_volume,
        )


@dataclass(frozen=True)
class NodeConfig:
    """What a node's OS is told about itself at boot (through its config drive; see
    core/node_config.py): checked and normalised before it is stored. ``user_data`` may
    hold secrets: it is never in a repr, a log line, an error or an API answer."""

    hostname: str
    ssh_keys: tuple[str, ...] = ()
    user_data: bytes = field(default=b"", repr=False)
    network_config: bytes = field(default=b"", repr=False)
    metadata: tuple[tuple[str, str], ...] = ()  # sorted by key


class Unchanged(enum.Enum):
    """Leave a value as stored (``NodeStateStore.save_node``'s ``config``)."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED


class SessionState(enum.StrEnum):
    LOGGED_IN = "logged_in"  # an initiator is logged in to the node's target
    ENDED = "ended"  # the last session ended (the machine is off, rebooting, or elsewhere)


@dataclass(frozen=True)
class NodeSession:
    """The iSCSI session on one target as the server's session watcher last saw it change:
    ``time`` is when it was first seen (LOGGED_IN) or seen gone (ENDED)."""

    iqn: str
    state: SessionState
    time: datetime


class BootMode(enum.StrEnum):
    SANBOOT = "sanboot"  # iPXE boots the disk over iSCSI itself
    AGENT = "agent"  # iPXE boots the node agent, which attaches the disk and pivots


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
    # How it boots its disk: iPXE sanboot, or the node agent (bmi_agent).
    boot_mode: BootMode = BootMode.SANBOOT
    # Of the current provisioning (with a config drive): cloud-init's instance id, new at
    # every provisioning, and the host name its config drive gives ("" otherwise).
    instance_id: str = ""
    hostname: str = ""
    # The server replica working on this record while it is in flight (creating or
    # deleting; provisioning or deprovisioning), as the state store stamped it; "" if none.
    owner: str = ""
    # The last session change seen on a target of this node (maybe an earlier target's).
    session: NodeSession | None = None

    @property
    def current_session(self) -> NodeSession | None:
        """The session record of the node's current target; None: none seen on it yet
        (or no target)."""
        if self.target is None or self.session is None or self.session.iqn != self.target.iqn:
            return None
        return self.session

    def visible_to(self, principal: Principal) -> bool:
        return principal.is_admin or (
            self.project is not None and self.project == principal.project
        )


@dataclass(frozen=True)
class Replica:
    """One running bmi-server process sharing the database with others. ``id`` is new on
    every start (an incarnation); ``name`` is stable across restarts of the same server."""

    id: str
    name: str
    address: str = ""


@dataclass(frozen=True)
class NodeNic:
    """One NIC of a node as the isolation layer records it."""

    label: str
    mac: str  # as recorded there; not necessarily a valid MAC
    networks: tuple[str, ...] = ()  # networks attached to it now


@dataclass(frozen=True)
class IsolatedNode:
    """A node as the isolation layer (HIL, or BMI's own records) sees it."""

    name: str
    project: str | None  # None: free (in no project)
    nics: tuple[NodeNic, ...]
    boot_nic: str  # label of the NIC the node network-boots from
    # Whether the operator named the boot NIC; if not, BMI may prefer the NIC whose MAC
    # it saw at a PXE boot (NodeOwnership) over the layer's default.
    boot_nic_configured: bool = False

    @property
    def boot_mac(self) -> str:
        for nic in self.nics:
            if nic.label == self.boot_nic:
                return nic.mac
        return ""


# -- hardware inventory, as a node's agent reports it ---------------------------------------


@dataclass(frozen=True)
class InventoryCpu:
    model: str = ""
    count: int = 0  # logical CPUs online
    architecture: str = ""
    sockets: int = 0


@dataclass(frozen=True)
class InventoryMemory:
    physical_bytes: int = 0
    usable_bytes: int = 0


@dataclass(frozen=True)
class InventoryDisk:
    name: str
    size_bytes: int
    model: str = ""
    serial: str = ""
    rotational: bool = False
    vendor: str = ""


@dataclass(frozen=True)
class InventoryNic:
    name: str
    mac: str  # normalised: lower-case, colon-separated
    driver: str = ""
    speed_mbps: int = 0
    carrier: bool = False


@dataclass(frozen=True)
class InventoryFirmware:
    kind: str = ""  # "bios" | "uefi" | "" (unknown)
    vendor: str = ""
    version: str = ""


@dataclass(frozen=True)
class Inventory:
    cpu: InventoryCpu = InventoryCpu()
    memory: InventoryMemory = InventoryMemory()
    disks: tuple[InventoryDisk, ...] = ()
    nics: tuple[InventoryNic, ...] = ()
    system: Smbios = Smbios()
    firmware: InventoryFirmware = InventoryFirmware()
    collectors: tuple[str, ...] = ()
    collect_time: datetime | None = None  # when the server received it

    def macs(self) -> list[str]:
        return [nic.mac for nic in self.nics]


# -- iSCSI gateways (gateway mode, see core/gateways.py) --------------------------------


class ExportStatus(enum.StrEnum):
    PENDING = "pending"  # assigned; the gateway has not said yet
    APPLIED = "applied"  # the gateway's tgtd exports it as specified
    FAILED = "failed"  # the gateway could not export it (detail says why)


@dataclass(frozen=True)
class Gateway:
    name: str
    portals: tuple[str, ...]
    heartbeat_time: datetime
    incarnation: str = ""


@dataclass(frozen=True)
class Assignment:
    """One disk's target on one gateway (``removed``: it is to be taken down there)."""

    gateway: str
    iqn: str
    revision: int
    status: ExportStatus = ExportStatus.PENDING
    detail: str = ""
    removed: bool = False
    logged_in: bool = False
    portals: tuple[str, ...] = ()  # as reported; empty: every portal of the gateway


@dataclass(frozen=True)
class TargetChange:
    revision: int
    iqn: str
    spec: TargetSpec | None  # None: remove the target


@dataclass(frozen=True)
class WatchBatch:
    """What a gateway is sent: a full set (``reset``) or the changes since its revision."""

    revision: int
    reset: bool
    changes: tuple[TargetChange, ...] = ()


@dataclass(frozen=True)
class TargetReport:
    iqn: str
    revision: int
    status: ExportStatus | None  # None: the removal at ``revision`` is done
    detail: str = ""
    # APPLIED: the gateway's portals this target is on (one tgtd process of several);
    # empty: all of the gateway's.
    portals: tuple[str, ...] = ()


