"""Node ownership: BMI's node records kept in step with the isolation layer (HIL).

The isolation layer decides who owns which node. A tenant's listing and lookups follow
the layer's membership of its project (one cached request per listing, never one per
node): a node the layer put in the project is listed even before BMI has recorded it
(as available, with no id), and a node the layer took out of it is no longer shown.
BMI records a node the first time a caller of its project shows or works with it (name,
project and boot MAC from the layer: the configured boot NIC's, else the NIC whose MAC
BMI saw at a PXE boot, else the layer's default), follows it when the layer moved it to another
project, and lets tenants take free nodes and give them back. In standalone mode the
"layer" is BMI's own records, so all of this is a no-op apart from the access checks.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .access import listing_projects, target_project
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from .models import SYSTEM, IsolatedNode, Node, NodeState, Page, Principal
from .naming import check_ref
from .nodes import NODE_ID_PATTERN, NodeRegistry, normalise_mac
from .ports import Isolator, NodeStateStore

log = logging.getLogger(__name__)


class NodeOwnership:
    def __init__(self, registry: NodeRegistry, nodes: NodeStateStore, isolator: Isolator) -> None:
        self._registry = registry
        self._nodes = nodes
        self.isolator = isolator

    def node_for(self, principal: Principal, ref: str) -> tuple[Node, IsolatedNode]:
        """The node ``ref`` names, checked against the isolation layer: it must be in the
        caller's project there (admins: in any project). Recorded in BMI if new."""
        name = self._name_of(ref)
        view = self._view(principal, ref, name)
        if not principal.is_admin and view.project is None:
            raise FailedPrecondition(
                f"node {name!r} is in no project; take it first (bmi node take {name})"
            )
        if view.project is None:
            return self._registry.resolve(principal, name), view
        node = self._adopt(view)  # the current record: no need to read it again
        if not node.visible_to(principal):
            raise NotFound(f"node {ref!r} not found")
        return node, view

    def list(
        self,
        principal: Principal,
        *,
        project: str = "",
        state: NodeState | None = None,
        size: int = 0,
        token: str = "",
    ) -> Page[Node]:
        """A page of the nodes of the caller's project (admins: of ``project``, or of
        every project BMI has recorded), as the isolation layer counts them."""
        projects = listing_projects(principal, project)  # refused before HIL is asked
        members = None if projects is None else self.isolator.project_nodes(
            principal, projects[0]
        )
        return self._registry.list(
            principal, project=project, state=state, size=size, token=token, members=members
        )

    def get(self, principal: Principal, ref: str) -> Node:
        """The node ``ref`` names, if the isolation layer puts it in the caller's project
        (admins: in any project); recorded in BMI if it was not yet. Anything else is
        NotFound, as for a node that does not exist."""
        if principal.is_admin:
            try:
                return self._registry.resolve(principal, ref)
            except NotFound:
                if not self.isolator.has_free_pool or NODE_ID_PATTERN.fullmatch(ref):
                    raise
            view = self._pxe_nic(self.isolator.node(principal, self._name_of(ref)))
            if view.project is None:
                raise NotFound(f"node {ref!r} is in no project; BMI has not recorded it")
            return self._adopt(view)
        assert principal.project is not None
        members = self.isolator.project_nodes(principal, principal.project)
        if members is None:
            return self._registry.resolve(principal, ref)
        name = self._name_of(ref)
        if name not in members:
            raise NotFound(f"node {ref!r} not found")
        node = self._nodes.find_node_by_name(name)
        if node is not None and node.project == principal.project:
            return node
        return self.node_for(principal, name)[0]

    def free_nodes(self, principal: Principal) -> list[str]:
        return sorted(self.isolator.free_nodes(principal))

    def take(self, principal: Principal, ref: str, project: str = "") -> Node:
        """Move a free node into the caller's project (admins: ``project``) and record it.
        Idempotent: a node already in that project is that node, unchanged."""
        into = target_project(principal, project)
        name = self._name_of(ref)
        try:
            view = self.isolator.node(principal, name)
        except (NotFound, PermissionDenied):
            if principal.is_admin:
                raise
            raise NotFound(f"no free node {ref!r}") from None
        view = self._pxe_nic(view)
        if view.project == into:
            return self._adopt(view)  # taken already (a retry): the same node again
        if view.project is not None:
            if principal.is_admin:
                raise FailedPrecondition(f"node {name!r} is in project {view.project!r}")
            raise NotFound(f"no free node {ref!r}")  # another project's: not to be known
        self.isolator.connect_node(principal, into, name)
        return self._adopt(self._pxe_nic(self.isolator.node(principal, name)))

    def give_back(self, principal: Principal, ref: str) -> None:
        """Return a node that has no disk to the free pool. BMI records the intent first
        (the node becomes DISCOVERED) so that nobody provisions it meanwhile. A node in
        the free pool already is left as it is: a retry changes nothing."""
        if not self.isolator.has_free_pool:
            # Refused before anything is recorded: without a free pool nothing can go back.
            raise FailedPrecondition(
                'giving nodes back needs HIL (isolator = "hil"); here admins enrol nodes'
            )
        name = self._name_of(ref)
        view = self._view(principal, ref, name)
        if view.project is None:
            return
        node = self._nodes.find_node_by_name(name)
        if node is None or node.state is NodeState.DISCOVERED:
            self.isolator.detach_node(principal, view.project, name)
            return
        if node.state is not NodeState.AVAILABLE:
            raise FailedPrecondition(
                f"node {name!r} is {node.state.value}; deprovision it before giving it back"
            )
        previous = node.project
        node.project = None
        self._registry.move(node, NodeState.DISCOVERED, f"given back by project {view.project}")
        try:
            self.isolator.detach_node(principal, view.project, name)
        except BaseException as exc:
            node.project = previous
            why = getattr(exc, "message", type(exc).__name__)
            self._registry.move(node, NodeState.AVAILABLE, f"giving back failed: {why}")
            raise

    # -- helpers -----------------------------------------------------------------------

    def _view(self, principal: Principal, ref: str, name: str) -> IsolatedNode:
        """The layer's view of a node in the caller's project or in none (admins: any).
        Another project's node answers exactly as a node that does not exist, naming only
        what the caller said (the layer refusing to show it is such an answer too)."""
        try:
            view = self.isolator.node(principal, name)
        except (NotFound, PermissionDenied):
            if principal.is_admin:
                raise
            raise NotFound(f"node {ref!r} not found") from None
        if not principal.is_admin and view.project not in (None, principal.project):
            raise NotFound(f"node {ref!r} not found")
        return self._pxe_nic(view)

    def _pxe_nic(self, view: IsolatedNode) -> IsolatedNode:
        """Unless the boot NIC is configured, the NIC BMI knows the node by (its record's
        MAC, or a MAC seen at a PXE boot and not claimed yet) is the boot NIC: the
        layer's default (HIL: the label that sorts first) need not be the one that boots."""
        if view.boot_nic_configured or len(view.nics) < 2:
            return view
        record = self._nodes.find_node_by_name(view.name)
        seen: str = ""
        for nic in view.nics:
            try:
                mac = normalise_mac(nic.mac)
            except InvalidArgument:
                continue
            if record is not None and mac in record.macs:
                return replace(view, boot_nic=nic.label)
            owner = self._nodes.find_node_by_mac(mac)
            if not seen and owner is not None and owner.state is NodeState.DISCOVERED:
                seen = nic.label
        return replace(view, boot_nic=seen) if seen else view

    def _name_of(self, ref: str) -> str:
        check_ref(ref, "node")
        if not NODE_ID_PATTERN.fullmatch(ref):
            return ref
        known = self._nodes.get_node(ref)
        if known is None:
            raise NotFound(f"node {ref!r} not found")
        return known.name

    def _adopt(self, view: IsolatedNode) -> Node:
        """BMI's record of a node the layer puts in a project: made, or brought up to date."""
        if view.project is None:
            raise FailedPrecondition(f"node {view.name!r} is in no project")
        if not view.boot_mac:
            raise FailedPrecondition(f"node {view.name!r} has no boot NIC with a MAC")
        mac = normalise_mac(view.boot_mac)
        by_name = self._nodes.find_node_by_name(view.name)
        # MACs are unique: a node known by this name and MAC is the MAC's node too.
        known = by_name is not None and mac in by_name.macs
        by_mac = by_name if known else self._nodes.find_node_by_mac(mac)
        if by_name is None:
            if by_mac is None:
                return self._registry.enrol(SYSTEM, name=view.name, project=view.project,
                                            macs=[mac])
            if by_mac.state is NodeState.DISCOVERED:
                # It PXE-booted before anyone claimed it: that record becomes this node.
                return self._registry.enrol(SYSTEM, name=view.name, project=view.project,
                                            macs=[], discovered_node=by_mac.id)
            raise AlreadyExists(f"MAC {mac} of node {view.name!r} belongs to node {by_mac.name!r}")
        node = by_name
        if mac not in node.macs:
            raise FailedPrecondition(
                f"node {node.name!r} boots from MAC {mac}, which BMI does not know it by "
                f"({', '.join(node.macs)}); an admin must re-enrol it"
            )
        if node.project == view.project:
            return node
        if node.state is NodeState.DISCOVERED:
            node.project = view.project
            self._registry.move(node, NodeState.AVAILABLE, f"taken by project {view.project}")
        elif node.state is NodeState.AVAILABLE:
            # Moved in the layer behind BMI's back: recorded as given back and taken, so
            # the new project's view of its history starts here.
            log.info("node %s moved to project %s", node.name, view.project)
            previous, node.project = node.project, None
            self._registry.move(node, NodeState.DISCOVERED, f"left project {previous}")
            node.project = view.project
            self._registry.move(node, NodeState.AVAILABLE, f"taken by project {view.project}")
        else:
            raise FailedPrecondition(
                f"node {node.name!r} is still {node.state.value} for another project"
            )
        return node
