"""The node agent's side of the core: one-boot tokens, registration with an inventory,
boot plans, progress reports and heartbeats (bmi.v1.BootService translates to these).

Tokens. The boot endpoint issues a token whenever it sends a node to the agent and puts
it on the agent's kernel command line. It is 256 random bits; only its SHA-256 is stored,
one per node (a new boot script replaces the previous boot's token), with an expiry. The
agent presents it with the node id it was given; the token is checked against that
node's stored hash only, so a token never unlocks another node -- whatever the node id
presented, a wrong token, an expired one or none is Unauthenticated. The node's pivot
into its OS (or its agent giving up) spends the token: the OS runs on the same kernel
and can read /proc/cmdline, so the token must be dead by then. The one thing a spent
token still gets is an empty OK for a repeat of that final report, changing nothing:
the agent's retry after a lost reply must not stop the pivot.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from . import lifecycle
from .errors import FailedPrecondition, PermissionDenied, Unauthenticated
from .models import BootMode, Inventory, Node, NodeState, NodeTarget, utcnow
from .nodes import NODE_ID_PATTERN, NodeRegistry
from .portals import static_portals
from .ports import AgentStateStore, NodeStateStore, PortalSource

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
MAX_DETAIL = 300
TOUCH_EVERY_SECONDS = 30
S = NodeState


class AgentPhase(enum.StrEnum):
    ATTACHING = "attaching"
    ATTACHED = "attached"
    MOUNTED = "mounted"
    PIVOTING = "pivoting"
    FAILED = "failed"


class PlanAction(enum.StrEnum):
    WAIT = "wait"  # nothing to boot yet: heartbeat and ask again
    ATTACH = "attach"  # attach the disk and pivot into its OS
    REBOOT = "reboot"  # the node boots another way now (sanboot)


class FailurePolicy(enum.StrEnum):
    SHELL = "shell"  # stop at a shell on the console for the operator
    REBOOT = "reboot"


@dataclass(frozen=True)
class AgentPolicy:
    """How agents are told to behave (from the server's settings)."""

    token_ttl_seconds: int = 1800
    heartbeat_seconds: int = 10
    wait_seconds: int = 10  # a WAIT plan: ask again after this long
    attach_attempts: int = 3
    retry_delay_seconds: int = 5
    on_failure: FailurePolicy = FailurePolicy.SHELL
    init: str = "/sbin/init"
    init_args: tuple[str, ...] = ()
    root_partition: int = 0  # 0: the file system is on the whole LUN
    root_fs_type: str = ""  # "": mount detects it


@dataclass(frozen=True)
class BootPlan:
    action: PlanAction
    reason: str
    target: NodeTarget | None = None
    portals: tuple[str, ...] = ()
    lun: int = 1
    policy: AgentPolicy = AgentPolicy()


def token_hash(token: str) -> str:
    # 256 random bits need no slow hash: SHA-256 of them cannot be searched backwards.
    return hashlib.sha256(token.encode()).hexdigest()


def _clip(text: str) -> str:
    printable = "".join(c if c.isprintable() else " " for c in text).strip()
    return printable[:MAX_DETAIL]


class AgentService:
    def __init__(
        self,
        registry: NodeRegistry,
        nodes: NodeStateStore,
        store: AgentStateStore,
        portals: Sequence[str] | PortalSource,
        policy: AgentPolicy | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._registry = registry
        self._nodes = nodes
        self._store = store
        self._portals = static_portals(portals)
        self.policy = policy or AgentPolicy()
        self._clock = clock

    # -- tokens --------------------------------------------------------------------------

    def issue_token(self, node: Node) -> str:
        """A fresh one-boot token for ``node``; any earlier one stops working."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        expires = self._clock() + timedelta(seconds=self.policy.token_ttl_seconds)
        self._store.put_boot_token(node.id, token_hash(token), expires)
        return token

    def authenticate(self, node_id: str, token: str) -> Node:
        """The node ``node_id`` if ``token`` is its current, unexpired token."""
        if not token:
            raise Unauthenticated("a boot token is required (metadata bmi-boot-token)")
        valid_id = NODE_ID_PATTERN.fullmatch(node_id)
        found = self._store.node_with_boot_token(node_id) if valid_id else None
        if found is None or not hmac.compare_digest(found[1], token_hash(token)):
            raise Unauthenticated("this boot token is not valid for this node; reboot the node")
        node, _, expires = found
        if expires <= self._clock():
            raise Unauthenticated("this boot token has expired; reboot the node")
        return node

    # -- calls -----------------------------------------------------------------------------

    def register(self, node_id: str, token: str, inventory: Inventory) -> Node:
        """Store the node's inventory; it must list one of the node's MACs."""
        node = self.authenticate(node_id, token)
        if not set(inventory.macs()) & set(node.macs):
            raise PermissionDenied(
                f"the inventory lists none of node {node.name!r}'s MACs "
                f"({', '.join(node.macs)}); it is not that node's"
            )
        inventory = replace(inventory, collect_time=self._clock())
        self._store.save_inventory(node.id, inventory)
        summary = (
            f"agent registered: {inventory.cpu.count} CPUs, "
            f"{inventory.memory.physical_bytes >> 20} MiB, {len(inventory.nics)} NICs, "
            f"{len(inventory.disks)} disks"
        )
        log.info("node %s (%s): %s", node.name, node.id, summary)
        if node.state is S.BOOTING:
            node.last_seen_time = self._clock()
            self._registry.move(node, S.BOOTING, summary)
        else:
            self._touch(node)
        return node

    def plan_for(self, node: Node) -> BootPlan:
        """What an agent on ``node`` should do now (no change made)."""
        if node.state in lifecycle.HAS_EXPORT and node.target is not None:
            if node.boot_mode is not BootMode.AGENT:
                return BootPlan(PlanAction.REBOOT, "the node boots its disk by sanboot")
            portals = tuple(self._portals.portals_for(node.target.iqn))
            if not portals:  # gateway mode, every gateway of its disk down: wait for one
                return BootPlan(PlanAction.WAIT, "no live iSCSI gateway exports its disk")
            return BootPlan(
                PlanAction.ATTACH,
                f"boot disk {node.disk_id}",
                target=node.target,
                portals=portals,
                policy=self.policy,
            )
        waiting = {
            S.DISCOVERED: "waiting to be enrolled",
            S.AVAILABLE: "waiting to be provisioned",
            S.PROVISIONING: "being provisioned",
        }
        return BootPlan(PlanAction.WAIT, waiting.get(node.state, f"node is {node.state.value}"))

    def boot_plan(self, node_id: str, token: str) -> BootPlan:
        node = self.authenticate(node_id, token)
        plan = self.plan_for(node)
        if plan.action is PlanAction.ATTACH and node.state is S.PROVISIONED:
            # An agent that waited (inventory) and got provisioned meanwhile boots now.
            node.last_seen_time = self._clock()
            try:
                self._registry.move(node, S.BOOTING, "agent took its boot plan")
            except FailedPrecondition:
                return self.boot_plan(node_id, token)  # changed under us: decide afresh
        return plan

    def report(
        self,
        node_id: str,
        token: str,
        phase: AgentPhase,
        detail: str,
        *,
        attempt: int = 0,
        will_retry: bool = False,
    ) -> Node:
        """Record a step. PIVOTING makes the node ACTIVE; a FAILED that will not be retried
        makes it FAILED; both spend the token. A retry of either (its reply was lost)
        with the spent token changes nothing and succeeds, so the agent goes on."""
        final = phase is AgentPhase.PIVOTING or (phase is AgentPhase.FAILED and not will_retry)
        if final and (done := self._final_report_repeated(node_id, token, phase)) is not None:
            return done
        node = self.authenticate(node_id, token)
        detail = _clip(detail)
        tries = f" (attempt {attempt})" if attempt > 1 else ""
        if phase is AgentPhase.PIVOTING:
            if node.state is not S.BOOTING:
                raise FailedPrecondition(
                    f"node {node.name!r} is {node.state.value}, not booting: do not pivot"
                )
            self._registry.move(node, S.ACTIVE, f"agent pivoted into the OS: {detail}{tries}")
            self._spend_token(node.id)
            return node
        if phase is AgentPhase.FAILED and not will_retry:
            self._spend_token(node.id)
            if lifecycle.can_move(node.state, S.FAILED) and node.state in lifecycle.HAS_EXPORT:
                self._registry.move(node, S.FAILED, f"agent gave up: {detail}{tries}")
            return node
        if node.state is S.BOOTING:
            what = "failed, retrying" if phase is AgentPhase.FAILED else phase.value
            self._registry.move(node, S.BOOTING, f"agent {what}: {detail}{tries}")
        # Else the node left BOOTING meanwhile (deprovisioned, say): nothing to record.
        return node

    def _spend_token(self, node_id: str) -> None:
        """The token stops opening anything (it expires now); its hash stays only so that
        a repeated final report can be recognised (and answered with no effect)."""
        stored = self._store.get_boot_token(node_id)
        if stored is not None:
            self._store.put_boot_token(node_id, stored[0], self._clock())

    def _final_report_repeated(self, node_id: str, token: str, phase: AgentPhase) -> Node | None:
        """The node, if this is a repeat of the final report that spent ``token``."""
        stored = self._store.get_boot_token(node_id) if NODE_ID_PATTERN.fullmatch(node_id) else None
        if not token or stored is None or stored[1] > self._clock():
            return None  # no spent token here: the ordinary checks decide
        if not hmac.compare_digest(stored[0], token_hash(token)):
            return None
        node = self._nodes.get_node(node_id)
        # Only the state that report left: an OS that read the token cannot do anything.
        wanted = S.ACTIVE if phase is AgentPhase.PIVOTING else S.FAILED
        return node if node is not None and node.state is wanted else None

    def heartbeat(self, node_id: str, token: str) -> bool:
        """Whether a plan other than WAIT is ready."""
        node = self.authenticate(node_id, token)
        self._touch(node)
        return self.plan_for(node).action is not PlanAction.WAIT

    def inventory(self, node: Node) -> Inventory | None:
        return self._store.get_inventory(node.id)

    def _touch(self, node: Node) -> None:
        now = self._clock()
        last = node.last_seen_time
        if last is not None and (now - last).total_seconds() < TOUCH_EVERY_SECONDS:
            return  # a waiting agent heartbeats every few seconds: not a write for each
        node.last_seen_time = now
        with contextlib.suppress(FailedPrecondition):  # state moved meanwhile: no retry
            self._registry.save(node)
