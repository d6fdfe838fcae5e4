"""The node registry: discovery at PXE boot, enrolment, listing, state changes."""

from __future__ import annotations

import re
from collections.abc import Callable

from . import lifecycle
from .access import listing_projects
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from .models import (
    UNCHANGED,
    Node,
    NodeConfig,
    NodeState,
    Page,
    Principal,
    Smbios,
    Transition,
    Unchanged,
    utcnow,
)
from .naming import check_name, check_project, check_ref, new_id
from .paging import decode_token, encode_token, page_size
from .ports import NodeEventBus, NodeStateStore

NODE_ID_PREFIX = "node-"
_MAC = re.compile(r"[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}")
NODE_ID_PATTERN = re.compile(r"node-[0-9a-f]{16}")
MAX_SMBIOS_FIELD = 128


def normalise_mac(mac: str) -> str:
    """``52-54-00-AB-CD-EF`` and friends -> ``52:54:00:ab:cd:ef``; InvalidArgument if not a MAC."""
    candidate = mac.strip().lower()
    if not _MAC.fullmatch(candidate):
        raise InvalidArgument(f"{mac[:40]!r} is not a MAC address")
    digits = candidate.replace(":", "").replace("-", "")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def check_smbios_field(value: str, what: str) -> str:
    if len(value) > MAX_SMBIOS_FIELD or not value.isprintable():
        raise InvalidArgument(f"{what} must be at most {MAX_SMBIOS_FIELD} printable characters")
    return value


class NodeRegistry:
    def __init__(self, state: NodeStateStore, events: NodeEventBus) -> None:
        self._state = state
        self.events = events

    # -- reading -----------------------------------------------------------------------

    def resolve(self, principal: Principal, ref: str) -> Node:
        check_ref(ref, "node")
        node = (
            self._state.get_node(ref)
            if NODE_ID_PATTERN.fullmatch(ref)
            else self._state.find_node_by_name(ref)
        )
        if node is None or not node.visible_to(principal):
            raise NotFound(f"node {ref!r} not found")
        return node

    def list(
        self,
        principal: Principal,
        *,
        project: str = "",
        state: NodeState | None = None,
        size: int = 0,
        token: str = "",
        members: frozenset[str] | None = None,
    ) -> Page[Node]:
        """``members``: the isolation layer's names of the project's nodes (HIL). Then
        the page lists exactly those: BMI's records of them, and the ones BMI has not
        recorded yet as available nodes with no id (recorded once shown, provisioned
        or taken), so listing asks the layer nothing per node."""
        limit = page_size(size)
        projects = listing_projects(principal, project)
        scope = ",".join(projects) if projects is not None else ""
        after = None
        if token:
            # Keyset on the name; a token from another listing is refused, as garbage.
            listed, after = decode_token(token) or ("", "")
            if listed != scope:
                raise InvalidArgument(
                    "page_token is invalid; pass next_page_token from a previous response"
                )
        if members is not None and projects is not None:
            return self._members_page(projects[0], members, state, after, limit)
        nodes = self._state.list_nodes(
            projects=projects, state=state, after=after, limit=limit + 1
        )
        more = len(nodes) > limit
        nodes = nodes[:limit]
        return Page(nodes, encode_token(scope, nodes[-1].name) if more else "")

    def _members_page(
        self, project: str, members: frozenset[str], state: NodeState | None,
        after: str | None, limit: int,
    ) -> Page[Node]:
        names = sorted(n for n in members if after is None or n > after)
        recorded = {
            n.name: n
            for n in self._state.list_nodes(
                projects=[project], state=None, after=after, limit=len(names) + 1, names=names
            )
        }
        nodes: list[Node] = []
        for name in names:
            node = recorded.get(name) or Node(
                id="", name=name, project=project, macs=[], state=NodeState.AVAILABLE
            )
            if state is None or node.state is state:
                nodes.append(node)
                if len(nodes) > limit:
                    break
        more = len(nodes) > limit
        nodes = nodes[:limit]
        return Page(nodes, encode_token(project, nodes[-1].name) if more else "")

    def history(
        self, node: Node, limit: int = 100, viewer: Principal | None = None
    ) -> list[Transition]:
        """The node's transitions, oldest first. A tenant (``viewer``) sees only those
        since the node last came into a project: before that it may have been another
        project's, and the reasons name that project's images."""
        history = self._state.node_history(node.id, limit)
        if viewer is None or viewer.is_admin:
            return history
        freed = [i for i, t in enumerate(history) if t.to_state is NodeState.DISCOVERED]
        return history[freed[-1] + 1 :] if freed else history

    # -- changing ----------------------------------------------------------------------

    def move(self, node: Node, target: NodeState, reason: str) -> Transition:
        """Record a transition by compare-and-set, then tell the watchers."""
        expected = node.state
        transition = lifecycle.move(node, target, reason)
        try:
            self._state.save_node(node, transition, expected=expected)
        except BaseException:
            node.state = expected
            raise
        self.events.publish(node, transition)
        return transition

    def save(self, node: Node, *, config: NodeConfig | Unchanged | None = UNCHANGED) -> None:
        """Store changed fields without a transition (and the node's config, unless
        UNCHANGED: None drops it)."""
        self._state.save_node(node, None, expected=node.state, config=config)

    def config(self, node: Node) -> NodeConfig | None:
        """The config of the node's current provisioning (None: none, or from before
        config drives). Holds user-data: for building drives and saying what is set."""
        return self._state.get_node_config(node.id) if node.instance_id else None

    def enrol(
        self,
        principal: Principal,
        *,
        name: str,
        project: str,
        macs: list[str],
        discovered_node: str = "",
    ) -> Node:
        if not principal.is_admin:
            raise PermissionDenied("only admins enrol nodes")
        check_name(name, "node")
        if not project:
            raise InvalidArgument("project is required")
        check_project(project)
        normalised = sorted({normalise_mac(m) for m in macs})
        existing = self._state.find_node_by_name(name)
        if existing is not None and existing.project == project and (
            existing.id == discovered_node if discovered_node else existing.macs == normalised
        ):
            # Enrolled already, exactly so: a retry gets the node, and nothing changes.
            return existing
        if existing is not None and existing.id != discovered_node:
            raise AlreadyExists(f"node {name!r} already exists")
        if discovered_node:
            if macs:
                raise InvalidArgument("give either macs or discovered_node, not both")
            node = self.resolve(principal, discovered_node)
            if node.state is not NodeState.DISCOVERED:
                raise FailedPrecondition(
                    f"node {node.name!r} is {node.state.value}, not discovered"
                )
            node.name, node.project = name, project
            self.move(node, NodeState.AVAILABLE, f"enrolled in project {project}")
            return node
        if not macs:
            raise InvalidArgument("at least one MAC is required")
        for mac in normalised:
            if (owner := self._state.find_node_by_mac(mac)) is not None:
                hint = " (enrol it with discovered_node)" if owner.project is None else ""
                raise AlreadyExists(f"MAC {mac} belongs to node {owner.name!r}{hint}")
        node = Node(
            id=new_id(NODE_ID_PREFIX),
            name=name,
            project=project,
            macs=normalised,
            state=NodeState.AVAILABLE,
        )
        transition = Transition(None, NodeState.AVAILABLE, f"enrolled in project {project}",
                                utcnow())
        self._state.add_node(node, transition)
        self.events.publish(node, transition)
        return node

    def discover(
        self, mac: str, smbios: Smbios, admit_new: Callable[[], float] | None = None
    ) -> tuple[Node, bool]:
        """The node a PXE client with this MAC is; recorded as DISCOVERED if new.

        ``admit_new`` is asked before a new node is recorded: seconds to wait, or 0 to go
        ahead (a rate limit); a wait raises ResourceExhausted with nothing recorded.
        Returns (node, newly_discovered).
        """
        known = self._state.find_node_by_mac(mac)
        if known is not None:
            return known, False
        if admit_new is not None and (wait := admit_new()):
            raise ResourceExhausted("too many new machines from this address", wait)
        node_id = new_id(NODE_ID_PREFIX)
        node = Node(
            id=node_id,
            name=f"discovered-{mac.replace(':', '')}",
            project=None,
            macs=[mac],
            state=NodeState.DISCOVERED,
            smbios=smbios,
            last_seen_time=utcnow(),
        )
        transition = Transition(None, NodeState.DISCOVERED, "seen at PXE boot", utcnow())
        try:
            self._state.add_node(node, transition)
        except AlreadyExists:
            # Two fetches of one new node raced; the other one recorded it.
            again = self._state.find_node_by_mac(mac)
            if again is None:
                raise
            return again, False
        self.events.publish(node, transition)
        return node, True
