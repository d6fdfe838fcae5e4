"""Provisioning: network + disk + iSCSI target + boot plan for a node, all or nothing.

The steps, in order: the node must be in the caller's project (asked of the isolation
layer, which also names its boot NIC's MAC); its boot NIC goes on the provisioning
network; its disk is cloned; its config drive (host name, SSH keys, user-data for
cloud-init: core/node_config.py) is written; its target is exported with the disk as LUN 1
and the drive as LUN 2; optionally it is power-cycled. Deprovisioning undoes them in
reverse.

The node's PROVISIONING / DEPROVISIONING state is the intent: it is recorded (by
compare-and-set, so one node is never worked on twice at once) before any change, and
reconcile rolls an interrupted provisioning back or finishes a deprovisioning.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import deadlines, lifecycle
from .disks import DiskService
from .errors import BmiError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .faults import crash_point
from .images import ImageCatalogue, require_ready, scoped_request_id
from .isolation import NodeOwnership
from .models import (
    SYSTEM,
    BootMode,
    Image,
    Node,
    NodeConfig,
    NodeState,
    NodeTarget,
    Principal,
)
from .naming import check_request_id
from .node_config import ConfigDrives, ConfigRequest, drive_volume, hostname_for, new_instance_id
from .nodes import NodeRegistry
from .portals import static_portals
from .ports import NodeStateStore, PortalSource, StateStore, TargetDriver
from .reconcile import ReconcileReport
from .replicas import Orphaned, single_server

log = logging.getLogger(__name__)

CHAP_SECRET_BYTES = 12  # 16 characters: the most some initiators accept
# A node that boots while an operation starts on it moves (provisioned -> booting ->
# active) under the operation's compare-and-set; it is tried again this often.
BOOT_RACE_ATTEMPTS = 3
BOOT_STATES = frozenset({NodeState.PROVISIONED, NodeState.BOOTING, NodeState.ACTIVE})
# Reconcile's repair of a failed node the isolation layer is still busy with is tried
# again after this long (at the next reconcile from then), doubling up to the maximum.
REPAIR_BACKOFF = 5.0
REPAIR_BACKOFF_MAX = 900.0
RECONCILE_NOTE = " (reconcile: "


def _only_booted(node: Node, fresh: Node | None) -> bool:
    """Whether ``fresh`` differs from ``node`` by a boot step alone (same disk and target)."""
    return (
        fresh is not None
        and node.state in BOOT_STATES
        and fresh.state in BOOT_STATES
        and fresh.disk_id == node.disk_id
        and fresh.target == node.target
        and fresh.owner == node.owner
    )


@dataclass(frozen=True)
class IqnScheme:
    """One naming scheme for targets (per disk) and initiators (per node)."""

    target_prefix: str = "iqn.2026-11.org.moc.bmi:"
    initiator_prefix: str = "iqn.2026-11.org.moc.bmi.node:"

    def target(self, disk_id: str) -> str:
        return self.target_prefix + disk_id

    def initiator(self, node_id: str) -> str:
        return self.initiator_prefix + node_id


class Provisioner:
    def __init__(
        self,
        registry: NodeRegistry,
        images: ImageCatalogue,
        disks: DiskService,
        state: StateStore,
        nodes: NodeStateStore,
        targets: TargetDriver,
        iqns: IqnScheme | None = None,
        advertised_portals: list[str] | None = None,
        *,
        ownership: NodeOwnership,
        portal_source: PortalSource | None = None,
        drives: ConfigDrives,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._ownership = ownership
        self._isolator = ownership.isolator
        self._images = images
        self._disks = disks
        self._state = state
        self._nodes = nodes
        self._targets = targets
        self.drives = drives
        self.iqns = iqns or IqnScheme()
        # What nodes are told; may differ from where tgtd listens (NAT, a VIP, QEMU).
        self._portals = list(advertised_portals or targets.portals())
        # Gateway mode: the portals of the live gateways that export each target.
        self._portal_source = portal_source or static_portals(self._portals)
        self._clock = clock
        self._repair_after: dict[str, float] = {}  # node id -> when to try again
        self._repair_wait: dict[str, float] = {}

    # -- operations --------------------------------------------------------------------

    def provision(
        self,
        principal: Principal,
        ref: str,
        *,
        image: str = "",
        disk: str = "",
        request_id: str = "",
        power_cycle: bool = False,
        boot_mode: BootMode = BootMode.SANBOOT,
        config: ConfigRequest | None = None,
    ) -> Node:
        """Give an AVAILABLE or FAILED node a disk, a config drive, a target and a boot
        plan. A FAILED node first loses the target, drive and own clone it may still hold
        (a project disk it booted is kept, and may be given again as ``disk``), as in a
        reprovisioning. ``config``: what its OS is told (None: the defaults, the node's
        name as host name and nothing else), checked before anything changes."""
        scoped = scoped_request_id(principal, check_request_id(request_id))
        if scoped and (done := self._replayed(principal, ref, scoped, lifecycle.HAS_EXPORT)):
            return done  # a retry of a provisioning that completed
        if bool(image) == bool(disk):
            raise InvalidArgument("give exactly one of image or disk")
        # Ownership and boot MAC come from the isolation layer; nothing is changed yet.
        node, view = self._ownership.node_for(principal, ref)
        if node.project is None:
            raise FailedPrecondition(f"node {node.name!r} is not enrolled in a project")
        if replay := self._replay_of(node, scoped, lifecycle.HAS_EXPORT):
            return replay  # the same request won a race since the check above
        checked = (config or ConfigRequest()).check(node.name)
        owner = Principal(name=principal.name, project=node.project)
        source_image = self._image_for(principal, owner, image) if image else None
        existing_disk = self._disk_for(principal, node, disk) if disk else None
        if not lifecycle.can_move(node.state, NodeState.PROVISIONING) or (
            node.state in lifecycle.HAS_EXPORT
        ):
            raise FailedPrecondition(
                f"node {node.name!r} is {node.state.value}; provision needs an available node"
            )
        if source_image is not None:
            # Refused before the node or the network is touched; the clone's record is
            # checked again, atomically, when it is inserted.
            self._images.quotas.check(
                node.project, add_bytes=source_image.size_bytes, add_disks=1
            )
        what = f"image {source_image.name}" if source_image else f"disk {existing_disk.name}"
        # Stored with the intent, so a retry with this id (on any replica) recognises it.
        node.request_id = scoped
        why = f"provisioning from {what}" + _leftovers(node)
        if won := self._move_once(
            principal, node, NodeState.PROVISIONING, why, lifecycle.HAS_EXPORT
        ):
            return won
        node.boot_mode = boot_mode  # stored with the disk and target by _attach
        try:
            if _holds_export(node):
                # A FAILED node may still hold the disk and target of what failed: they go
                # first, as in a reprovisioning. From here on a crash or a failure removes
                # whatever the node records (reconcile, _roll_back), so nothing is orphaned.
                self._detach(node)
            self._isolator.attach_provisioning_network(principal, view)
            self._attach(node, source_image, existing_disk, checked)
            if power_cycle:
                self._isolator.power_cycle(principal, node.name)
        except BaseException as exc:
            self._roll_back(principal, node, exc)
            raise
        done = f"provisioned from {what}" + (", power-cycled" if power_cycle else "")
        self._registry.move(node, NodeState.PROVISIONED, done)
        return node

    def _replayed(
        self, principal: Principal, ref: str, scoped: str, done: frozenset[NodeState]
    ) -> Node | None:
        """The node, if the request ``scoped`` already got it into one of the ``done``
        states; Unavailable (retry) while that request is still under way somewhere."""
        try:
            node = self._registry.resolve(principal, ref)
        except NotFound:
            return None  # not known to BMI yet: cannot be a retry
        return self._replay_of(node, scoped, done)

    @staticmethod
    def _replay_of(node: Node, scoped: str, done: frozenset[NodeState]) -> Node | None:
        if not scoped or node.request_id != scoped:
            return None
        if node.state in done:
            return node
        if node.state in lifecycle.IN_FLIGHT:
            # Another replica (or a crashed one, until its lease expires and reconcile
            # repairs it) is doing this very request: the client retries, and gets the result.
            raise Unavailable(
                f"request {scoped.split('/', 1)[1]!r} on node {node.name!r} is still in progress; "
                "retry"
            )
        return None

    def _move_once(
        self, principal: Principal, node: Node, target: NodeState, why: str, done: frozenset
    ) -> Node | None:
        """Move ``node`` into an operation by compare-and-set. The loser of a race with the
        same request id gets the winner's result (or Unavailable, to retry, while it is
        under way); any other loser is refused. None when this call won."""
        for attempt in range(BOOT_RACE_ATTEMPTS):
            try:
                self._registry.move(node, target, why)
                return None
            except FailedPrecondition:
                if node.request_id and (
                    won := self._replayed(principal, node.id, node.request_id, done)
                ):
                    return won
                fresh = self._nodes.get_node(node.id)
                last = attempt == BOOT_RACE_ATTEMPTS - 1
                if last or not _only_booted(node, fresh) or not lifecycle.can_move(
                    fresh.state, target
                ):
                    raise
                # Only its boot moved on (fetched its script, logged in: on any replica):
                # the operation still applies, from the state the node is in now.
                node.state, node.last_seen_time = fresh.state, fresh.last_seen_time
        return None

    def deprovision(
        self, principal: Principal, ref: str, *, keep_disk: bool = False, request_id: str = ""
    ) -> Node:
        """A retry (same ``request_id``) of a deprovisioning that completed returns the
        node as it is; one that failed (node FAILED) is finished by the retry; one still
        under way (on any replica) answers Unavailable, to be retried."""
        scoped = _keyed("deprovision", principal, request_id)
        done = frozenset({NodeState.AVAILABLE})
        node = self._registry.resolve(principal, ref)
        if replay := self._replay_of(node, scoped, done):
            return replay  # done already: no second effect
        if node.state not in (*lifecycle.HAS_EXPORT, NodeState.FAILED):
            raise FailedPrecondition(
                f"node {node.name!r} is {node.state.value}; nothing to deprovision"
            )
        if keep_disk:
            node.owns_disk = False  # the disk stays, as an ordinary disk of the project
        node.request_id = scoped  # saved with the transition: the retry's marker
        why = "deprovisioning" + (" (keeping the disk)" if keep_disk else "")
        if won := self._move_once(principal, node, NodeState.DEPROVISIONING, why, done):
            return won
        try:
            self._detach(node)
            self._isolator.detach_provisioning_network(principal, node.name)
        except BmiError as exc:
            # Whatever is left is retried by the next deprovision (every step is idempotent).
            self._registry.move(
                node, NodeState.FAILED, f"deprovisioning failed: {exc.message}; retry it"
            )
            raise
        self._registry.move(node, NodeState.AVAILABLE, "deprovisioned")
        return node

    def reprovision(
        self,
        principal: Principal,
        ref: str,
        *,
        request_id: str = "",
        config: ConfigRequest | None = None,
    ) -> Node:
        """A fresh clone of the node's image replaces its disk, and a new config drive
        (a new instance id) its drive: with ``config`` (checked before anything changes),
        or (None) the config it had. A retry (same ``request_id``) of one that completed
        returns the node without a second clone."""
        scoped = _keyed("reprovision", principal, request_id)
        node = self._registry.resolve(principal, ref)
        if replay := self._replay_of(node, scoped, lifecycle.HAS_EXPORT):
            return replay  # done already: no second clone
        if node.state not in (*lifecycle.HAS_EXPORT, NodeState.FAILED) or not node.image_id:
            raise FailedPrecondition(
                f"node {node.name!r} is {node.state.value}; reprovision needs a provisioned node"
            )
        image = self._state.get_image(node.image_id)
        if image is None:
            raise FailedPrecondition(f"the image of node {node.name!r} no longer exists")
        require_ready(image, "image")
        if config is not None:
            checked = config.check(node.name)
        else:  # kept; a node provisioned before config drives gets the defaults
            checked = self._registry.config(node) or NodeConfig(hostname=hostname_for(node.name))
        self._check_room_for_new_disk(node, image)
        node.request_id = scoped
        if won := self._move_once(
            principal, node, NodeState.PROVISIONING, f"reprovisioning from image {image.name}",
            lifecycle.HAS_EXPORT,
        ):
            return won
        try:
            self._detach(node)
            self._attach(node, image, None, checked)
        except BaseException as exc:
            self._roll_back(principal, node, exc)
            raise
        self._registry.move(node, NodeState.PROVISIONED, f"reprovisioned from image {image.name}")
        return node

    def portals(self) -> list[str]:
        return list(self._portals)

    def _check_room_for_new_disk(self, node: Node, image: Image) -> None:
        """Before a reprovisioning deletes the node's disk: would the project have room
        for the new clone once the old disk is gone? (Refused here, the node keeps its
        disk; the clone's insert checks again, atomically.)"""
        old = self._state.get_disk(node.disk_id) if node.owns_disk and node.disk_id else None
        self._images.quotas.check(
            node.project or "",
            add_bytes=image.size_bytes - (old.size_bytes if old is not None else 0),
            add_disks=0 if old is not None else 1,
        )

    def portals_for(self, iqn: str) -> list[str]:
        """Where a node logs in to target ``iqn`` now (PortalSource)."""
        return self._portal_source.portals_for(iqn)

    # -- steps -------------------------------------------------------------------------

    def _image_for(self, principal: Principal, owner: Principal, ref: str) -> Image:
        image = self._images.get(principal, ref)
        if not image.visible_to(owner):
            raise FailedPrecondition(
                f"image {image.name!r} is private to project {image.project!r}"
            )
        require_ready(image, "image")
        return image

    def _disk_for(self, principal: Principal, node: Node, ref: str):
        disk = self._disks.get(principal, ref)
        if disk.project != node.project:
            raise FailedPrecondition(f"disk {disk.name!r} is not in project {node.project!r}")
        require_ready(disk, "disk")
        user = self._nodes.node_of_disk(disk.id)
        # A FAILED node may boot again the project's disk it still holds: its teardown
        # keeps that disk (but deletes a clone of the node's own).
        again = user is not None and user.id == node.id and node.state is NodeState.FAILED
        if user is not None and not (again and not node.owns_disk):
            raise FailedPrecondition(f"disk {disk.name!r} is the disk of node {user.name!r}")
        return disk

    def _attach(self, node: Node, image: Image | None, disk, config: NodeConfig) -> None:
        if image is not None:
            disk = self._disks.create(
                SYSTEM,
                name=f"{node.name[:48]}-root-{secrets.token_hex(3)}",
                image=image.id,
                project=node.project or "",
            )
            node.owns_disk = True
        node.disk_id, node.image_id = disk.id, disk.image_id
        # A new instance id at every provisioning: cloud-init runs its per-instance steps
        # (host name, SSH host keys, user-data) again.
        node.instance_id, node.hostname = new_instance_id(), config.hostname
        node.target = NodeTarget(
            iqn=self.iqns.target(disk.id),
            volume=disk.volume,
            initiator_iqn=self.iqns.initiator(node.id),
            chap_user="bmi-" + disk.id,
            chap_secret=secrets.token_urlsafe(CHAP_SECRET_BYTES),
            config_volume=drive_volume(node.instance_id),
        )
        # Disk, drive and target named (and the config kept) before the drive and the
        # export are made, so reconcile knows what to remove.
        self._registry.save(node, config=config)
        crash_point("node.provision.after_disk")
        self.drives.make(node, config)
        crash_point("node.provision.after_config")
        self._targets.create_export(node.target.spec())
        crash_point("node.provision.after_export")

    def _detach(self, node: Node) -> None:
        """Remove target, config drive and (if the node owns it) disk; safe to repeat
        after a crash."""
        if node.target is not None:
            self._targets.remove_export(node.target.iqn)
        crash_point("node.detach.after_export")
        if node.target is not None and node.target.config_volume:
            self.drives.remove(node.target.config_volume)  # tgtd has closed it
        if node.owns_disk and node.disk_id:
            with contextlib.suppress(NotFound):  # already gone: a repeat after a crash
                self._disks.delete_for_node(node.disk_id)
        node.disk_id = node.image_id = node.instance_id = node.hostname = ""
        node.owns_disk = False
        node.target = None
        self._registry.save(node, config=None)

    def _roll_back(self, principal: Principal, node: Node, cause: BaseException) -> None:
        reason = cause.message if isinstance(cause, BmiError) else type(cause).__name__
        # Undone even when the caller's deadline has passed (that may be the cause): the
        # node must not stay half made. A NIC still busy in the isolation layer is not
        # waited for here: the node is left FAILED and reconcile finishes it later.
        with deadlines.unbounded():
            try:
                self._detach(node)
                self._isolator.detach_provisioning_network(principal, node.name, wait=False)
                self._registry.move(
                    node, NodeState.AVAILABLE, f"provisioning rolled back: {reason}"
                )
            except Exception as exc:  # leave it FAILED with both reasons
                log.exception("rolling back node %s failed", node.id)
                self._registry.move(
                    node, NodeState.FAILED,
                    f"provisioning failed ({reason}); rollback failed: {exc}",
                )

    # -- after a restart -----------------------------------------------------------------

    def reconcile(
        self, orphaned: Orphaned = single_server, *, ensure: bool = True
    ) -> ReconcileReport:
        """Roll back interrupted provisioning, finish deprovisioning (of nodes whose owner
        is ``orphaned``: a live replica's work is its own), take failed nodes with nothing
        left but (perhaps) the provisioning network off it and make them available, and
        (``ensure``) re-create targets."""
        report = ReconcileReport()
        wanted = []
        for node in self._nodes.all_nodes():
            label = f"node {node.name} ({node.id})"
            if node.state in lifecycle.IN_FLIGHT and not orphaned(node.owner):
                continue  # a live replica's; its target is claimed, not a stray (_ensure)
            try:
                if node.state is NodeState.PROVISIONING:
                    self._detach(node)
                    self._isolator.detach_provisioning_network(SYSTEM, node.name, wait=False)
                    self._registry.move(
                        node, NodeState.AVAILABLE, "interrupted provisioning rolled back on restart"
                    )
                    report.repaired.append(f"rolled back interrupted provisioning of {label}")
                elif node.state is NodeState.DEPROVISIONING:
                    self._detach(node)
                    self._isolator.detach_provisioning_network(SYSTEM, node.name, wait=False)
                    self._registry.move(node, NodeState.AVAILABLE, "deprovisioned on restart")
                    report.repaired.append(f"finished deprovisioning {label}")
                elif node.target is not None:
                    wanted.append(node.target.spec())
                elif (node.state is NodeState.FAILED and not node.disk_id
                      and self._repair_failed(node)):
                    report.repaired.append(f"took failed {label} off the provisioning network")
            except BmiError as exc:
                report.problems.append(f"could not repair {label}: {exc.message}")
        if ensure:
            self._ensure(wanted, report)
        return report

    def _repair_failed(self, node: Node) -> bool:
        """A FAILED node whose disk and target are gone has, at most, its NIC left on the
        provisioning network (an attach the isolation layer finished after BMI had given
        up on it, or a detach it refused while busy): take it off and make the node
        available. Claimed first (DEPROVISIONING, by compare-and-set), so a provisioning
        started meanwhile is never undone; while the layer is still busy the node stays
        FAILED and is tried again later, less and less often."""
        now = self._clock()
        if self._repair_after.get(node.id, 0.0) > now:
            return False
        why = node.failure_reason.split(RECONCILE_NOTE)[0]
        self._registry.move(
            node, NodeState.DEPROVISIONING, "taking it off the provisioning network (reconcile)"
        )
        try:
            self._isolator.detach_provisioning_network(SYSTEM, node.name, wait=False)
        except BmiError as exc:
            wait = min(REPAIR_BACKOFF_MAX, 2 * self._repair_wait.get(node.id, REPAIR_BACKOFF / 2))
            self._repair_wait[node.id] = wait
            self._repair_after[node.id] = now + wait
            self._registry.move(node, NodeState.FAILED, f"{why}{RECONCILE_NOTE}{exc.message})")
            raise
        self._repair_wait.pop(node.id, None)
        self._repair_after.pop(node.id, None)
        self._registry.move(
            node, NodeState.AVAILABLE, "repaired by reconcile: off the provisioning network"
        )
        return True

    def ensure_targets(self) -> ReconcileReport:
        """Re-create targets tgtd lost (it keeps them in memory only, so a restart of
        tgtd drops them all); run periodically. Cost grows with provisioned nodes."""
        report = ReconcileReport()
        exported = {
            n.target.iqn: n
            for n in self._nodes.all_nodes()
            if n.target is not None and n.state in lifecycle.HAS_EXPORT
        }
        wanted = [n.target.spec() for n in exported.values()]

        def still_exported(iqn: str) -> bool:
            # Re-read: a deprovisioning records its state before it removes the target.
            node = self._nodes.get_node(exported[iqn].id)
            return (node is not None and node.state in lifecycle.HAS_EXPORT
                    and node.target is not None and node.target.iqn == iqn)

        self._ensure(wanted, report, still_exported)
        return report

    def _ensure(self, wanted: list, report: ReconcileReport, still_wanted=None) -> None:
        try:
            strays = self._targets.ensure_exports(wanted, still_wanted)
        except BmiError as exc:
            report.problems.append(f"could not re-create targets: {exc.message}")
            return
        if strays:
            # A provisioning or deprovisioning under way names its target before it
            # makes it and until it removed it: not a stray.
            claimed = {n.target.iqn for n in self._nodes.all_nodes() if n.target is not None}
            strays = [iqn for iqn in strays if iqn not in claimed]
        report.problems += [f"stray target {iqn} is not BMI's to keep" for iqn in strays]


def _holds_export(node: Node) -> bool:
    return bool(node.disk_id) or node.target is not None


def _leftovers(node: Node) -> str:
    """What a provisioning of ``node`` removes first (a FAILED node's), for its reason."""
    if not _holds_export(node):
        return ""
    if not node.disk_id:
        return " (first removing the target left by the failure)"
    if node.owns_disk:
        return f" (first removing disk {node.disk_id} and its target, left by the failure)"
    return (f" (first removing the target of disk {node.disk_id}, left by the failure; "
            "the disk is kept)")


def _keyed(action: str, principal: Principal, request_id: str) -> str:
    """A node keeps the key of its last keyed operation; the action is part of it, so a
    key reused for another operation on the node is never taken for a retry."""
    scoped = scoped_request_id(principal, check_request_id(request_id))
    return f"{action}:{scoped}" if scoped else ""
