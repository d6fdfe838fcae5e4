"""What a PXE-booting node is told to do, decided per MAC (the HTTP edge renders it)."""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from . import lifecycle
from .agent import AgentService
from .errors import FailedPrecondition
from .models import BootMode, Node, NodeState, NodeTarget, SessionState, Smbios, utcnow
from .nodes import NodeRegistry, normalise_mac
from .portals import static_portals
from .ports import NodeStateStore, PortalSource, TargetDriver

log = logging.getLogger(__name__)

LAST_SEEN_EVERY = 30  # seconds: the resolution of Node.last_seen_time


class BootKind(enum.StrEnum):
    RETRY = "retry"  # not ready yet: fetch the script again later
    SANBOOT = "sanboot"  # boot the node's disk over iSCSI
    EXIT = "exit"  # nothing for this node: boot the next device
    AGENT = "agent"  # boot the node agent's kernel + initramfs with a one-boot token


class DiscoveryMode(enum.StrEnum):
    WAIT = "wait"  # unknown nodes ask again until they are enrolled and provisioned
    INVENTORY = "inventory"  # unknown nodes boot the agent, which reports their hardware


@dataclass(frozen=True)
class BootAction:
    kind: BootKind
    reason: str
    node: Node | None = None
    target: NodeTarget | None = None
    portals: tuple[str, ...] = ()
    retry_seconds: int = 0
    token: str = field(default="", repr=False)  # AGENT: the one-boot token
    mac: str = ""  # the MAC that asked, normalised


class BootPlanner:
    def __init__(
        self,
        registry: NodeRegistry,
        nodes: NodeStateStore,
        advertised_portals: Sequence[str] | PortalSource,
        retry_seconds: int = 30,
        agents: AgentService | None = None,
        discovery_mode: DiscoveryMode = DiscoveryMode.WAIT,
    ) -> None:
        self._registry = registry
        self._nodes = nodes
        self._portals = static_portals(advertised_portals)
        self._retry = retry_seconds
        self._agents = agents
        self._discovery = DiscoveryMode(discovery_mode)

    def action_for(
        self, mac: str, smbios: Smbios, admit_new: Callable[[], float] | None = None
    ) -> BootAction:
        """Decide for the node with this MAC; an unknown one is recorded as discovered
        if ``admit_new`` (see NodeRegistry.discover) lets it.

        Raises InvalidArgument (bad MAC) or ResourceExhausted before anything is recorded.
        """
        mac = normalise_mac(mac)
        node, new = self._registry.discover(mac, smbios, admit_new)
        if not new:
            self._seen(node, smbios)
        if node.state is NodeState.DISCOVERED:
            why = "registered as discovered" if new else "waiting to be enrolled"
            if self._discovery is DiscoveryMode.INVENTORY and self._agents is not None:
                return BootAction(
                    BootKind.AGENT,
                    why + "; booting the agent for inventory",
                    node,
                    retry_seconds=self._retry,
                    token=self._agents.issue_token(node),
                    mac=mac,
                )
            return BootAction(BootKind.RETRY, why, node, retry_seconds=self._retry)
        if node.state is NodeState.PROVISIONING:
            return BootAction(BootKind.RETRY, "being provisioned", node, retry_seconds=self._retry)
        if node.state in lifecycle.HAS_EXPORT and node.target is not None:
            portals = tuple(self._portals.portals_for(node.target.iqn))
            if not portals and node.boot_mode is not BootMode.AGENT:
                # Gateway mode with every gateway of its disk down: nothing to log in to.
                return BootAction(BootKind.RETRY, "no live iSCSI gateway exports its disk",
                                  node, retry_seconds=self._retry)
            try:
                self._registry.move(node, NodeState.BOOTING, "fetched its boot script")
            except FailedPrecondition:
                # Changed under us (e.g. deprovisioned this instant): decide afresh.
                return self.action_for(mac, smbios, admit_new)
            if node.boot_mode is BootMode.AGENT and self._agents is not None:
                return BootAction(
                    BootKind.AGENT,
                    "booting the agent",
                    node,
                    retry_seconds=self._retry,
                    token=self._agents.issue_token(node),
                    mac=mac,
                )
            return BootAction(
                BootKind.SANBOOT, "booting its disk", node, node.target, portals
            )
        return BootAction(BootKind.EXIT, f"node is {node.state.value}", node)

    def _seen(self, node: Node, smbios: Smbios) -> None:
        # Keep what the firmware says now; an empty field never erases a known one.
        merged = Smbios(
            **{
                f: getattr(smbios, f) or getattr(node.smbios, f)
                for f in ("uuid", "serial", "manufacturer", "product")
            }
        )
        now = utcnow()
        last = node.last_seen_time
        if merged == node.smbios and last and (now - last).total_seconds() < LAST_SEEN_EVERY:
            return  # a waiting node asks every few seconds: not a write for every ask
        node.smbios = merged
        node.last_seen_time = now
        with contextlib.suppress(FailedPrecondition):  # state moved meanwhile: not worth a retry
            self._registry.save(node)


class SessionWatcher:
    """Follows the iSCSI sessions on provisioned nodes' targets.

    ``poll_once`` (every ``session_poll_seconds``, on every replica) moves BOOTING nodes to
    ACTIVE once their initiator has logged in to the target (sanboot nodes; an agent's
    reports move agent nodes, see core/agent.py) and records the session as seen. Its cost
    grows with the number of nodes booting right now, not with all nodes.

    ``sweep`` (every ``session_sweep_seconds``, one replica at a time) compares one listing
    of the sessions on every target (``TargetDriver.sessions``) with what is recorded for
    every node that has a target, and records each session seen or ended: a database write
    only for a change. A node whose session ended keeps its lifecycle state: a reboot ends
    the session as a power-off does, and the state says what BMI made of the node, not
    whether the machine is on; the node's record says "session ended at T".
    """

    def __init__(self, registry: NodeRegistry, nodes: NodeStateStore, targets: TargetDriver,
                 clock: Callable[[], datetime] = utcnow):
        self._registry = registry
        self._nodes = nodes
        self._targets = targets
        self._clock = clock

    def poll_once(self) -> int:
        moved = 0
        booting = self._nodes.list_nodes(
            projects=None, state=NodeState.BOOTING, after=None, limit=100000
        )
        for node in booting:
            if node.boot_mode is BootMode.AGENT:
                continue  # its agent logs in before mounting the root: its reports decide
            if node.target is None or not self._targets.has_session(node.target.iqn):
                continue
            try:
                self._registry.move(node, NodeState.ACTIVE, "initiator logged in to its target")
                moved += 1
            except FailedPrecondition:
                continue  # deprovisioned or rebooted meanwhile
            self._nodes.record_session(node.target.iqn, SessionState.LOGGED_IN, self._clock())
        return moved

    def sweep(self) -> tuple[int, int]:
        """Record sessions seen and ended since the last sweep; (seen, ended) recorded."""
        live = self._targets.sessions()
        now = self._clock()
        seen = ended = 0
        for iqn, session in self._nodes.target_sessions().items():
            logged_in = session is not None and session.state is SessionState.LOGGED_IN
            if iqn in live and not logged_in:
                seen += self._nodes.record_session(iqn, SessionState.LOGGED_IN, now)
            elif iqn not in live and logged_in:
                ended += self._nodes.record_session(iqn, SessionState.ENDED, now)
        if seen or ended:
            log.info("iSCSI sessions: %d seen, %d ended", seen, ended)
        return seen, ended
