"""Narrow interfaces the core needs from the outside world; adapters implement them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Protocol

from .models import (
    UNCHANGED,
    Assignment,
    Disk,
    ExternalVolume,
    Gateway,
    Image,
    ImageFormatInfo,
    Inventory,
    IsolatedNode,
    Node,
    NodeConfig,
    NodeSession,
    NodeState,
    Principal,
    QuotaAmounts,
    QuotaOverride,
    Replica,
    SessionState,
    TargetChange,
    TargetReport,
    TargetSpec,
    Transition,
    Unchanged,
    VolumeInfo,
)


class ImageStore(Protocol):
    """Block storage holding images and disks as volumes (production: Ceph RBD).

    Volume names are chosen by the core and are stable ids. Every volume carries the
    metadata it was created with, so the catalogue can be rebuilt from the store alone.
    An empty metadata value may read back as absent. A volume is *complete* only once
    its last creation step (``seal`` or ``clone``)
    finished; reconcile removes incomplete volumes that no record claims.
    Every method raises ``Unavailable`` when the store cannot be reached.
    """

    def create(self, volume: str, size_bytes: int, metadata: Mapping[str, str]) -> None:
        """Create an empty, incomplete volume. AlreadyExists if the name is taken."""

    def write(self, volume: str, offset: int, data: bytes) -> None:
        """Write bytes into a volume made by ``create``."""

    def import_raw_file(self, volume: str, path: Path) -> None:
        """Copy a local raw file's data into a fresh volume made by ``create`` (holes
        stay unwritten). Stops with DeadlineExceeded at the caller's deadline."""

    def external_volume(self, source: str) -> ExternalVolume:
        """Size of an import source, and whether the store marks it as BMI's or made from
        BMI's (``from_bmi``: its own or inherited marker, or a clone of such a volume).
        NotFound if missing."""

    def copy_external(self, source: str, volume: str, metadata: Mapping[str, str]) -> None:
        """Copy an import source into a new, incomplete volume. PermissionDenied
        (``naming.NOT_IMPORTABLE``) if the source is ``from_bmi`` after all."""

    def copy_flattened(self, source: str, volume: str, metadata: Mapping[str, str]) -> None:
        """Copy the current content of ``source`` into a new, incomplete, independent volume.

        Uses a temporary snapshot of ``source`` that is removed afterwards.
        """

    def seal(self, volume: str) -> None:
        """Freeze a volume as an image: protected snapshot to clone from; marks it complete."""

    def clone(self, image_volume: str, volume: str, metadata: Mapping[str, str]) -> None:
        """Copy-on-write clone of a sealed image; the new volume is complete."""

    def mark_complete(self, volume: str) -> None:
        """Mark a volume made by ``create`` and filled by ``write`` complete, as it is
        (no snapshot: it is no image to clone from, e.g. a node's config drive)."""

    def set_metadata(self, volume: str, metadata: Mapping[str, str]) -> None:
        """Replace the given metadata keys of a volume."""

    def remove(self, volume: str) -> None:
        """Remove a volume and its snapshots. Idempotent: a missing volume is not an error.

        FailedPrecondition if clones still depend on it.
        """

    def remove_temporary_snapshot(self, volume: str, snapshot: str) -> None:
        """Remove a temporary snapshot left by an interrupted ``copy_flattened``."""

    def get(self, volume: str) -> VolumeInfo | None:
        """One BMI volume, or None."""

    def list_volumes(self) -> list[VolumeInfo]:
        """Every volume made by BMI (those carrying BMI metadata)."""

    def used_bytes(self, volume: str) -> int:
        """Bytes allocated in the volume itself, not counting a parent."""

    def content_digest(self, volume: str) -> str:
        """SHA-256 (hex) of the volume's whole virtual content, holes as zeros: of its
        sealed snapshot once sealed (what clones get), else of its head. Reads only the
        allocated extents; holes cost hashing, not reads. Stops with DeadlineExceeded at
        the caller's deadline."""

    def modified_since_sealed(self, volume: str) -> bool:
        """Whether the volume's head was written after ``seal`` (a sealed image never is
        by BMI). False for a volume not sealed."""


class ImageFileInspector(Protocol):
    """Checks an uploaded disk-image file and turns it into raw data. Files are hostile:
    nothing they name outside themselves is ever opened."""

    def inspect(self, path: Path, declared_format: str) -> ImageFormatInfo:
        """InvalidArgument if the file is not a self-contained, valid image of the declared
        format within the server's limits (virtual size, no shared clusters)."""

    def convert_to_raw(self, path: Path, output: Path, timeout: float | None = None) -> None:
        """Write an inspected qcow2 file as a sparse raw file (``timeout``: the caller's
        remaining time, or None). InvalidArgument if it fails or takes too long."""


class Download(Protocol):
    """One HTTP(S) response body being fetched, after every policy check passed."""

    # The length the web server announced (Content-Length), or None.
    total_bytes: int | None

    def chunks(self) -> Iterator[bytes]:
        """The body, in order. Unavailable when the connection breaks or stalls, or the
        body is longer than announced or than the fetcher's byte cap; DeadlineExceeded at
        the caller's (or the fetcher's own) deadline. A body that simply ends early is
        not detected here: compare with ``total_bytes``."""

    def close(self) -> None: ...


class UrlFetcher(Protocol):
    """Fetches files from URLs for imports (production: ``adapters/http_fetcher.py``),
    refusing what the operator's policy does not allow (no server-side request forgery).
    Messages never carry credentials a URL held."""

    def open(self, url: str) -> Download:
        """Follow the URL (and allowed redirects) to a response with a body.
        PermissionDenied for a scheme, host, address or redirect the policy refuses;
        InvalidArgument for a malformed URL; FailedPrecondition for an HTTP error status
        (4xx); Unavailable when the host cannot be reached or answers 5xx."""


class SpoolFile(Protocol):
    """A private local file for one upload; held until ``discard``."""

    path: Path

    def write(self, chunk: bytes) -> None: ...

    def close(self) -> None:
        """Everything written is on disk (the file is still held)."""

    def discard(self) -> None:
        """Delete the file and let it go."""


class UploadSpool(Protocol):
    """Local room for uploads in progress."""

    def new_file(self, expected_bytes: int, suffix: str) -> SpoolFile:
        """ResourceExhausted if ``expected_bytes`` would not fit with the reserve kept."""

    def sweep(self) -> int:
        """Remove files no live upload holds; how many went."""


# Called by the state store inside the transaction that inserts an image or disk record,
# once the record's project is locked against every other admission (on any server
# sharing the database), with what the project holds then and its own limits; whatever
# it raises aborts the insert. core/quotas.py makes these.
Admission = Callable[[QuotaAmounts, QuotaOverride], None]


class StateStore(Protocol):
    """The catalogue's records (production: SQL). Unique names are enforced here, so that
    several servers on one database stay consistent. A record written in state CREATING or
    DELETING carries the writing replica's id as ``owner`` (read back; "" otherwise)."""

    def add_image(self, image: Image, admit: Admission | None = None) -> None:
        """AlreadyExists if the project already has an image of that name. With ``admit``,
        the insert and the admission (the quota check) are one transaction: two inserts
        into one project never both pass the last free slot."""

    def update_image(self, image: Image) -> None:
        """Store every field of an existing image. AlreadyExists on a name clash."""

    def delete_image(self, image_id: str) -> None: ...

    def get_image(self, image_id: str) -> Image | None: ...

    def find_images_by_name(self, name: str, projects: Iterable[str] | None) -> list[Image]:
        """Images of that name in the given projects (None: any project)."""

    def find_image_by_request(self, request_id: str) -> Image | None: ...

    def list_images(
        self,
        *,
        projects: Iterable[str] | None,
        include_public: bool,
        after: tuple[str, str] | None,
        limit: int,
    ) -> list[Image]:
        """Images ordered by (project, name), strictly after ``after``.

        ``projects`` None means every project; ``include_public`` adds public images
        of other projects.
        """

    def all_images(self) -> list[Image]: ...

    def images_missing_digest(self, limit: int) -> list[Image]:
        """READY images with no content digest recorded yet, oldest first."""

    def record_image_digest(self, image_id: str, sha256: str) -> bool:
        """Record the content digest of a READY image that has none (and nothing else);
        False if it is no longer such an image."""

    def add_disk(self, disk: Disk, admit: Admission | None = None) -> None:
        """AlreadyExists if the project already has a disk of that name; ``admit`` as
        for ``add_image``."""

    def update_disk(self, disk: Disk) -> None: ...

    def delete_disk(self, disk_id: str) -> None: ...

    def get_disk(self, disk_id: str) -> Disk | None: ...

    def find_disks_by_name(self, name: str, projects: Iterable[str] | None) -> list[Disk]:
        """Disks of that name in the given projects (None: any project)."""

    def find_disk_by_request(self, request_id: str) -> Disk | None: ...

    def list_disks(
        self,
        *,
        projects: Iterable[str] | None,
        image_id: str | None,
        after: tuple[str, str] | None,
        limit: int,
    ) -> list[Disk]:
        """Disks ordered by (project, name), strictly after ``after``."""

    def disks_of_image(self, image_id: str) -> list[Disk]: ...

    def all_disks(self) -> list[Disk]: ...

    def quota_usage(self, project: str) -> QuotaAmounts:
        """What the project holds: its images and disks in every state (those being
        created or deleted too) and the sum of their virtual sizes."""

    def get_quota_override(self, project: str) -> QuotaOverride:
        """The project's own limits (all None when it has none)."""

    def set_quota_override(
        self, project: str, override: QuotaOverride, *, replace: bool = False
    ) -> QuotaOverride:
        """Make the limits ``override`` gives (not None) the project's own, in one
        transaction; the others are kept, or with ``replace`` go back to the defaults.
        Returns the project's own limits now."""

    def record_request(self, request_id: str, action: str, resource_id: str) -> None:
        """Remember that the call with this (caller-scoped) key acts on ``resource_id``.
        AlreadyExists if the key is recorded already."""

    def recall_request(self, request_id: str) -> tuple[str, str] | None:
        """(action, resource_id) recorded for this key, or None."""

    def forget_requests(self, before: datetime) -> int:
        """Drop the keys recorded before ``before``; how many went."""


class NodeStateStore(Protocol):
    """Nodes, their MACs and their transitions. A node's state changes only by
    compare-and-set, so two servers can never both act on one node. A node stored in
    PROVISIONING or DEPROVISIONING carries the writing replica's id as ``owner``."""

    def add_node(self, node: Node, transition: Transition | None = None) -> None:
        """AlreadyExists if the name or one of the MACs is taken."""

    def save_node(
        self,
        node: Node,
        transition: Transition | None,
        *,
        expected: NodeState,
        config: NodeConfig | Unchanged | None = UNCHANGED,
    ) -> None:
        """Store every field of ``node`` but its MACs, and the transition, in one
        transaction, if the stored state is still ``expected`` and the stored owner still
        ``node.owner``; else FailedPrecondition. Sets ``node.owner`` to the owner stored.
        ``config``: the node's config (see ``get_node_config``) is replaced by it, or
        dropped (None), in the same transaction; UNCHANGED leaves it."""

    def get_node_config(self, node_id: str) -> NodeConfig | None:
        """The config of the node's current provisioning, user-data and all (only for
        building its config drive: never for an answer or a log line)."""

    def get_node(self, node_id: str) -> Node | None: ...

    def find_node_by_name(self, name: str) -> Node | None: ...

    def find_node_by_mac(self, mac: str) -> Node | None: ...

    def list_nodes(
        self,
        *,
        projects: Iterable[str] | None,
        state: NodeState | None,
        after: str | None,
        limit: int,
        names: Iterable[str] | None = None,
    ) -> list[Node]:
        """Nodes ordered by name, strictly after ``after`` (and among ``names``)."""

    def all_nodes(self) -> list[Node]: ...

    def count_nodes_by_state(self) -> dict[NodeState, int]:
        """How many nodes are in each state (states with none may be left out)."""

    def node_history(self, node_id: str, limit: int) -> list[Transition]:
        """The last ``limit`` transitions, oldest first."""

    def node_of_disk(self, disk_id: str) -> Node | None:
        """The node whose disk this is, if any."""

    def target_sessions(self) -> dict[str, NodeSession | None]:
        """Every node's target IQN with the session recorded on that very target (None:
        none seen on it yet); one read, for the session sweep."""

    def record_session(self, iqn: str, state: SessionState, time: datetime) -> bool:
        """Record that the session on target ``iqn`` is now ``state`` (since ``time``) on
        the node that has that target, unless it is recorded so already; True if it
        changed. Never touches the node's state or any other field."""

    def count_node_sessions(self) -> dict[SessionState | None, int]:
        """How many nodes with a target have each session state (None: none seen yet)."""


class ReplicaStore(Protocol):
    """Leases of the server replicas sharing one database, and jobs only one of them may
    run at a time (production: SQL; PostgreSQL advisory locks)."""

    def register_replica(self, replica: Replica, now: datetime, expire_time: datetime) -> None:
        """Record a starting replica's lease; drops the leases of earlier incarnations of
        the same name (they are dead: this one replaces them)."""

    def renew_lease(self, replica_id: str, expire_time: datetime) -> bool:
        """Push the lease forward; False if the lease is gone (replaced by a new start
        under the same name, or claimed by a replica that took over its work)."""

    def retire_replica(self, replica_id: str) -> None:
        """Drop the lease (a clean stop)."""

    def claim_expired(self, replica_id: str, now: datetime) -> bool:
        """Take over an expired replica's work: drop its lease if it expired at ``now``.
        True if it did, or there is no such lease; False if the replica renewed it (it is
        alive after all). Atomic against ``renew_lease``: exactly one of them wins."""

    def live_replicas(self, now: datetime) -> dict[str, Replica]:
        """Replicas whose lease has not expired at ``now``, by id."""

    def exclusive(self, job: str) -> AbstractContextManager[bool]:
        """Try to hold the cluster-wide lock of ``job`` for the ``with`` block; yields
        whether it was got (never waits: another replica is doing the job)."""


class NodeEventBus(Protocol):
    """Fan-out of node transitions to watchers (WatchNodes). Production: in process
    (core/events.py), fed by other replicas' transitions through a relay on PostgreSQL."""

    def publish(self, node: Node, transition: Transition) -> None: ...

    def subscribe(self, wants: Callable[[Node], bool]): ...


class Authenticator(Protocol):
    """Turns the credentials a caller presented into a Principal."""

    def authenticate(self, credentials: str | None, project: str = "") -> Principal:
        """``credentials`` is the raw ``authorization`` value; ``project`` the project the
        caller says it acts in (empty: the one its credentials imply, or none for admins).

        Unauthenticated if the credentials are bad; PermissionDenied if they are good but
        may not act in ``project``; Unavailable if the authority cannot be reached.
        """


class Isolator(Protocol):
    """Who owns which node, which networks its NICs are on, and its power (production:
    HIL; standalone: BMI's own node records, no network changes).

    Every call is made *for* a principal: a caller's own credentials, when it carries
    some, are used so the isolation layer authorises the caller itself; without (BMI's
    background work) the adapter uses its own account. Adapters raise NotFound for
    unknown nodes, PermissionDenied when the caller may not touch the node,
    FailedPrecondition for conflicts, and Unavailable when the layer is down or slow.
    Network changes return only once they are done (or raise).
    """

    # Whether nodes move between projects and a free pool (HIL) or stay where an admin
    # enrolled them (standalone: take and give back cannot be done).
    has_free_pool: bool

    def node(self, caller: Principal, name: str) -> IsolatedNode:
        """Owner, NICs (with MACs and networks) and boot NIC of one node."""

    def attach_provisioning_network(self, caller: Principal, node: IsolatedNode) -> None:
        """Put the boot NIC of ``node`` (as ``node()`` just described it) on the
        provisioning network; no-op if it is there already."""

    def detach_provisioning_network(
        self, caller: Principal, name: str, *, wait: bool = True
    ) -> None:
        """Take the provisioning network off the node's NICs; no-op if not attached.
        A NIC still busy with an earlier change is waited for (``wait``; within the
        adapter's timeout and the caller's deadline), else DeadlineExceeded at once."""

    def power_cycle(self, caller: Principal, name: str) -> None:
        """Reboot the node (it network-boots next), enabling its out-of-band management
        in the layer first if that is what stands in the way."""

    def project_nodes(self, caller: Principal, project: str) -> frozenset[str] | None:
        """Names of the nodes the layer puts in ``project`` (it may answer from a short
        cache); None where BMI's own records say (standalone)."""

    def free_nodes(self, caller: Principal) -> list[str]:
        """Names of nodes in no project, which a tenant may take."""

    def connect_node(self, caller: Principal, project: str, name: str) -> None:
        """Move a free node into ``project``."""

    def detach_node(self, caller: Principal, project: str, name: str) -> None:
        """Give a node of ``project`` back to the free pool (its out-of-band management
        disabled first, where the layer requires that)."""


class TargetDriver(Protocol):
    """iSCSI export of disks (production: tgt through tgtadm).

    One target per disk, LUN 1 backed by the disk's volume, its own CHAP account and an
    initiator-name ACL. Every call costs the same however many targets exist.
    """

    def create_export(self, spec: TargetSpec) -> None:
        """Create (or complete) the target for ``spec``. Idempotent for the same spec."""

    def remove_export(self, iqn: str) -> None:
        """Remove the target, its LUN and its CHAP account. A missing target is not an error."""

    def ensure_exports(
        self,
        specs: Iterable[TargetSpec],
        still_wanted: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Re-create every missing target of ``specs`` (after a tgtd restart).

        ``still_wanted(iqn)`` is asked again just before re-creating a target, while no
        other call for that IQN can run: a target removed since ``specs`` were read (a
        concurrent deprovisioning) must not come back.

        Returns the IQNs of stray targets under BMI's prefix that no spec names; they are
        reported, not removed.
        """

    def list_exports(self) -> list[str]:
        """IQNs of every target under BMI's prefix that exists now."""

    def portals(self) -> list[str]:
        """``host:port`` portals the target daemon listens on."""

    def has_session(self, iqn: str) -> bool:
        """Whether an initiator is logged in to the target now."""

    def sessions(self) -> set[str]:
        """IQNs of the targets an initiator is logged in to now, BMI's or not: one listing
        of every target (its cost grows with the number of targets; the session sweep
        calls it, not each poll)."""


class PortalSource(Protocol):
    """Where nodes log in to one target now, in order of preference."""

    def portals_for(self, iqn: str) -> list[str]:
        """``host:port`` portals; empty when no portal exports the target now."""


class AgentStateStore(Protocol):
    """What node agents report (inventories) and the one-boot tokens they present
    (production: SQL, next to the nodes). Only a token's hash is ever stored."""

    def save_inventory(self, node_id: str, inventory: Inventory) -> None:
        """Store (replace) the node's inventory."""

    def get_inventory(self, node_id: str) -> Inventory | None: ...

    def put_boot_token(self, node_id: str, token_hash: str, expire_time: datetime) -> None:
        """Store the node's token hash, replacing any earlier one (one token per node)."""

    def get_boot_token(self, node_id: str) -> tuple[str, datetime] | None:
        """(token hash, expiry) of the node's current token, if any."""

    def node_with_boot_token(self, node_id: str) -> tuple[Node, str, datetime] | None:
        """The node with its current token's (hash, expiry), in one read: every agent call
        starts with it. None if the node or its token is missing."""

    def delete_boot_token(self, node_id: str) -> None:
        """Revoke the node's token. Idempotent."""


class GatewayStateStore(Protocol):
    """Gateways, the targets each should export and what they reported (production: SQL).

    Revisions come from one counter shared by all gateways; changes commit in revision
    order, so a watcher that read up to revision r never later finds a change below r.
    """

    def save_gateway(self, gateway: Gateway) -> bool:
        """Insert or update; True if the incarnation changed (its statuses become pending)."""

    def list_gateways(self) -> list[Gateway]: ...

    def assign(self, spec: TargetSpec, gateways: Sequence[str]) -> None:
        """Desire ``spec`` on each gateway; a new revision only where the spec is new or
        differs (its status then becomes pending)."""

    def unassign(self, iqn: str) -> None:
        """Turn every assignment of ``iqn`` into a removal, under a new revision."""

    def assignments(self, iqn: str) -> list[Assignment]:
        """Rows for ``iqn`` on every gateway, removals included."""

    def all_assignments(self) -> list[Assignment]:
        """Every row that is not a removal."""

    def load(self) -> dict[str, int]:
        """Targets (not removals) per gateway."""

    def snapshot(self, gateway: str) -> tuple[int, list[TargetChange]]:
        """(current revision, every target of one gateway with its own revision: desired
        ones and removals it has not confirmed), read consistently."""

    def changes(self, gateway: str, after: int) -> tuple[int, list[TargetChange]] | None:
        """Changes after revision ``after`` and the revision they bring the gateway to;
        None when removals after ``after`` were pruned (the gateway needs a snapshot)."""

    def record(self, gateway: str, reports: Sequence[TargetReport]) -> None:
        """Store each report that is about its row's current revision (one transaction);
        a done removal deletes the row."""

    def record_sessions(self, gateway: str, iqns: Iterable[str]) -> None:
        """The targets of ``gateway`` an initiator is logged in to now (all others: none)."""

    def prune_removals(self, gateways: Iterable[str]) -> int:
        """Delete pending removals on these (dead) gateways; later watches from before
        them get a snapshot. Returns how many."""


class GatewayAuthenticator(Protocol):
    """Checks a gateway's credential (not a tenant's): which gateway presented it."""

    def authenticate(self, credentials: str | None) -> str:
        """The gateway name the credential belongs to; Unauthenticated if it is bad."""
